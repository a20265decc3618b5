"""Is the atlas's registration of the Harvard pairs off, or is whole-image mutual information biased?

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_atlas_offset.py [--harvard ../shared/data/harvard-aanlib]
        [--checkpoint unifuse-2d-harvard] [--split val|train|all] [--every N] [--tasks CT-MRI,PET-MRI,SPECT-MRI]
        [--cases 10,30] [--figures 4] [--out-dir docs/results/atlas_offset] [--no-register]

`bench/probe_label_offset.py` found that our registrations move the unmoved (atlas-aligned) pairs:
SPECT by 6.7-8.7 px, PET and CT by 2-4 px. This probe estimates, for every unmoved pair, the
offset (y, x) in px that different measures assign to it, in the project's field convention
(the moving image sampled at ``x + u`` aligns it; a measure that finds the atlas right returns 0):

* ``matching`` / ``sitk`` -- the package's registrations on the whole images (as the label probe);
* ``sitk-rigid`` -- the rigid (Euler, Mattes MI) stage of ``sitk`` alone, whole images;
* ``sitk-rigid-brain`` / ``sitk-brain`` -- the same rigid / rigid + B-spline registration with
  the metric restricted (``SetMetricFixedMask`` / ``SetMetricMovingMask``) to the dilated brain
  masks of this script (no segmentation model: thresholds and morphology, see ``brain_mask``);
* ``mi-image`` / ``mi-fg`` / ``mi-brain`` -- an exhaustive integer translation scan (±``SCAN`` px,
  parabolic sub-pixel peak) of histogram MI (32 bins) over all pixels / over the pixels where
  either image shows anything (what ``model.matching`` uses) / over the joint dilated brain;
* ``mask-dice`` / ``mask-centroid`` -- no intensities at all: the translation that maximises the
  Dice overlap of the two brain masks, and the difference of their centroids.

Field measures are summarised as the mean of ``u`` over the MRI brain mask (a vector) and the mean
``|u|`` over the brain and over the whole image (the latter is the label probe's number).

A control that needs no atlas: the MRI's own brain (MRI x brain mask, Gaussian-blurred like an
emission image) is aligned to the MRI by construction; whatever a registration finds on it
(``control:*`` rows) is the method's own bias from the scalp/skull and the blur.

Writes ``per_pair.csv``, ``summary.md`` and PNG figures to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.feature import canny
from skimage.filters import threshold_multiotsu, threshold_otsu
from skimage.morphology import disk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_label_offset import luma  # noqa: E402  (the label probe's Y-channel reader)

from napari_unifuse.cli.evaluate import checkpoint_split  # noqa: E402
from napari_unifuse.data.misalign import warp_array  # noqa: E402
from napari_unifuse.engine import classical  # noqa: E402
from napari_unifuse.io import ImageVolume  # noqa: E402
from napari_unifuse.io.image import Geometry  # noqa: E402
from napari_unifuse.model.checkpoint import read_metadata  # noqa: E402
from napari_unifuse.training.harvard import index_harvard, read_harvard_pair, split_cases  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
BINS = 32
FOREGROUND = 0.02  # model.mi_refinement.FOREGROUND: "shows anything"
SCAN = 12  # px, half-width of the translation scans
MASK_MARGIN = 4  # px the brain masks are dilated by for the metric: keeps the brain's edge, not the scalp
CONTROL_BLUR = 3.0  # px, Gaussian sigma of the synthetic brain-only control image

# ---- brain masks without a segmentation model ------------------------------------------------------
# MRI (T1 or T2) and CT: the brain is the largest blob of non-bone tissue deep inside the head.
HEAD_FRACTION = 0.5  # tissue threshold = HEAD_FRACTION x Otsu (of the non-bone pixels for CT)
SCALP_DEPTH = 8  # px eroded off the head outline: scalp (+ skull) is ~8-15 px at 256² (~1 mm/px)
OPEN_RADIUS = {"mri": 5, "ct": 3}  # px opening that cuts the thin bridges from brain to scalp/face
CT_BONE = 0.9  # CT PNGs are bone-windowed: bone saturates near 1
CLOSE_RADIUS = 5  # px closing before the hole filling (sulci, ventricles)
# PET/SPECT: no skull; the brain is where the (smoothed) uptake exceeds half its robust maximum.
EMISSION_SIGMA = 2.0
EMISSION_FRACTION = 0.5
EMISSION_CLOSE = 11


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = ndi.sum(mask, labels, range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _head(image: np.ndarray, threshold: float) -> np.ndarray:
    return ndi.binary_fill_holes(_largest(ndi.binary_closing(image > threshold, disk(3))))


def _brain_from_tissue(tissue: np.ndarray, head: np.ndarray, open_radius: int) -> np.ndarray:
    inner = ndi.binary_erosion(head, disk(SCALP_DEPTH))
    core = _largest(ndi.binary_opening(tissue & inner, disk(open_radius)))
    core = ndi.binary_dilation(core, disk(open_radius)) & tissue & inner  # regrow what the opening shaved
    return ndi.binary_fill_holes(ndi.binary_closing(core, disk(CLOSE_RADIUS)))


def brain_mask(image: np.ndarray, modality: str) -> np.ndarray:
    """Brain (MRI, CT) or brain-uptake outline (PET, SPECT) of a 2D image in [0, 1].

    * ``mri``: tissue = ``I > 0.5·Otsu(I)``; head = largest blob of tissue, closed (r 3), filled;
      brain = largest blob of ``tissue ∧ erode(head, r 8)`` after an opening (r 5), regrown by the
      opening radius inside the tissue, closed (r 5), holes filled. (Intracranial: it keeps CSF and
      extra-axial fluid, which T2 shows bright.)
    * ``ct``: the same with tissue = ``0.5·Otsu(non-bone) < I < 0.9`` (bone excluded), opening r 3.
    * ``pet``/``spect``: Gaussian (σ 2) luma ``> 0.5 ×`` its 99th percentile, closed (r 11: bridges
      low-uptake gaps in the cortical ribbon), largest blob, holes filled. The faint SPECT scalp
      ring stays below the threshold.
    """
    image = np.asarray(image, dtype=np.float32)
    if modality in ("pet", "spect"):
        smooth = ndi.gaussian_filter(image, EMISSION_SIGMA)
        above = smooth > EMISSION_FRACTION * np.percentile(smooth, 99)
        return ndi.binary_fill_holes(_largest(ndi.binary_closing(above, disk(EMISSION_CLOSE))))
    if modality == "ct":
        soft = image[image < CT_BONE]
        threshold = HEAD_FRACTION * threshold_otsu(soft) if soft.size else 0.1
        return _brain_from_tissue((image > threshold) & (image < CT_BONE), _head(image, threshold), OPEN_RADIUS["ct"])
    threshold = HEAD_FRACTION * threshold_otsu(image)
    return _brain_from_tissue(image > threshold, _head(image, threshold), OPEN_RADIUS["mri"])


MRI_WEIGHTING = {"CT-MRI": "t2", "SPECT-MRI": "t2", "PET-MRI": "t1"}  # the atlas's MRIs per task (CSF bright/dark)


def parenchyma_mask(mri: np.ndarray, intracranial: np.ndarray, weighting: str) -> np.ndarray:
    """The MRI's brain tissue without CSF / extra-axial fluid: what PET/SPECT uptake outlines.

    Classes of a 3-class multi-Otsu inside ``intracranial``: T2 keeps the two darker ones (CSF is
    the bright one), T1 the two brighter ones; opened (r 2), largest blob, closed (r 3), filled.
    """
    values = mri[intracranial]
    if values.size < 100:
        return intracranial
    low, high = threshold_multiotsu(values, 3)
    tissue = intracranial & ((mri > low) if weighting == "t1" else (mri < high))
    core = _largest(ndi.binary_opening(tissue, disk(2)))
    return ndi.binary_fill_holes(ndi.binary_closing(core, disk(3)))


def metric_mask(mask: np.ndarray) -> np.ndarray:
    """The region a similarity should look at: the brain plus its edge (dilated by MASK_MARGIN)."""
    return ndi.binary_dilation(mask, disk(MASK_MARGIN))


# ---- SimpleITK with and without masks ------------------------------------------------------------
def register_sitk(reference: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray | None = None,
                  moving_mask: np.ndarray | None = None, bspline: bool = True) -> np.ndarray:
    """``classical.register_sitk`` (same stages and parameters), optionally rigid only and with the
    Mattes MI restricted to ``fixed_mask`` / ``moving_mask``; returns ``u`` (2, y, x) in voxels."""
    geometry = Geometry.identity(reference.ndim)
    fixed = ImageVolume(reference.astype(np.float32), geometry).to_sitk()
    moved = ImageVolume(moving.astype(np.float32), geometry).to_sitk()

    def masked(stage: sitk.ImageRegistrationMethod, samples: int) -> sitk.ImageRegistrationMethod:
        # The same number of random samples as unmasked, drawn inside the fixed mask.
        if fixed_mask is not None:
            stage.SetMetricSamplingPercentage(min(1.0, samples / max(1.0, float(fixed_mask.sum()))),
                                              classical._SAMPLING_SEED)
            stage.SetMetricFixedMask(ImageVolume(fixed_mask.astype(np.uint8), geometry).to_sitk())
        if moving_mask is not None:
            stage.SetMetricMovingMask(ImageVolume(moving_mask.astype(np.uint8), geometry).to_sitk())
        return stage

    initial = sitk.CenteredTransformInitializer(fixed, moved, sitk.Euler2DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    rigid_stage = masked(classical._mattes_registration(classical._RIGID_SHRINK, classical._RIGID_SMOOTH,
                                                        reference.shape, classical._RIGID_SAMPLES),
                         classical._RIGID_SAMPLES)
    rigid_stage.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=classical._RIGID_ITERATIONS, relaxationFactor=0.5)
    rigid_stage.SetOptimizerScalesFromPhysicalShift()
    rigid_stage.SetInitialTransform(initial, inPlace=False)
    transform = rigid_stage.Execute(fixed, moved)
    if bspline:
        mesh = sitk.BSplineTransformInitializer(fixed, [classical.DEFAULT_BSPLINE_MESH] * reference.ndim)
        stage = masked(classical._mattes_registration(classical._BSPLINE_SHRINK, classical._BSPLINE_SMOOTH,
                                                      reference.shape, classical._BSPLINE_SAMPLES),
                            classical._BSPLINE_SAMPLES)
        stage.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=classical._BSPLINE_ITERATIONS,
                                   costFunctionConvergenceFactor=classical._BSPLINE_COST_CONVERGENCE)
        stage.SetMovingInitialTransform(transform)
        stage.SetInitialTransform(mesh, inPlace=True)
        stage.Execute(fixed, moved)
        transform = sitk.CompositeTransform([transform, mesh])
    return classical.sitk_transform_to_displacement(transform, fixed, geometry)


def _attempt(function, *args, **kwargs) -> np.ndarray | None:
    """A masked registration can fail on a tiny mask (end slices): record no field rather than stop."""
    try:
        return function(*args, **kwargs)
    except RuntimeError as error:
        print(f"  {function.__name__} failed: {str(error).strip().splitlines()[-1][:120]}", flush=True)
        return None


# ---- exhaustive translation scans ----------------------------------------------------------------
def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    ia = np.clip(np.rint(np.clip(a, 0, 1) * (BINS - 1)), 0, BINS - 1).astype(np.int64)
    ib = np.clip(np.rint(np.clip(b, 0, 1) * (BINS - 1)), 0, BINS - 1).astype(np.int64)
    joint = np.bincount((ia * BINS + ib).ravel(), minlength=BINS * BINS).reshape(BINS, BINS).astype(np.float64)
    total = joint.sum()
    if total == 0:
        return 0.0
    joint /= total
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    seen = joint > 0
    return float((joint[seen] * np.log(joint[seen] / outer[seen])).sum())


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` sampled at ``x + (dy, dx)`` (zero outside): the aligned image for ``u = (dy, dx)``."""
    out = np.zeros_like(image)
    h, w = image.shape
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = image[ys, xs]
    return out


def _peak(scores: np.ndarray) -> tuple[float, float]:
    """Arg-max of a (2S+1)² score map as a shift (dy, dx), refined by a parabola along each axis."""
    iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)

    def refine(values: np.ndarray, i: int) -> float:
        if 0 < i < len(values) - 1:
            left, mid, right = values[i - 1], values[i], values[i + 1]
            curvature = left - 2 * mid + right
            if curvature < 0:
                return i + 0.5 * (left - right) / curvature
        return float(i)

    return refine(scores[:, ix], iy) - SCAN, refine(scores[iy, :], ix) - SCAN


def translation_scans(reference: np.ndarray, moving: np.ndarray, reference_brain: np.ndarray,
                      moving_brain: np.ndarray, tissue: np.ndarray) -> dict[str, tuple[np.ndarray, tuple[float, float]]]:
    """Score of every integer shift ``u`` of the moving image; returns name -> (score map, peak u).

    ``mi-image``: MI over all pixels; ``mi-fg``: over the pixels where either image shows anything
    (``model.matching``'s MI); ``mi-head``: over the MRI's dilated head (scalp and skull kept, only the
    background dropped); ``mi-brain``: over the MRI's dilated brain (a fixed sample set);
    ``mi-uptake``: over the moving image's dilated brain, carried along with it (also a fixed
    sample set); ``mask-dice``: Dice of the moving brain mask with ``tissue`` (the MRI mask of
    what the moving image outlines), no intensities at all.
    """
    size = 2 * SCAN + 1
    names = ("mi-image", "mi-fg", "mi-head", "mi-brain", "mi-uptake", "mask-dice")
    maps = {name: np.full((size, size), -np.inf) for name in names}
    fixed_region = metric_mask(reference_brain)
    head_region = metric_mask(_head(reference, HEAD_FRACTION * threshold_otsu(reference)))
    moving_region = metric_mask(moving_brain).astype(np.float32)
    moving_brain = moving_brain.astype(np.float32)
    for i, dy in enumerate(range(-SCAN, SCAN + 1)):
        for j, dx in enumerate(range(-SCAN, SCAN + 1)):
            aligned = _shifted(moving, dy, dx)
            maps["mi-image"][i, j] = _mutual_information(reference, aligned)
            either = (reference > FOREGROUND) | (aligned > FOREGROUND)
            maps["mi-fg"][i, j] = _mutual_information(reference[either], aligned[either])
            maps["mi-head"][i, j] = _mutual_information(reference[head_region], aligned[head_region])
            maps["mi-brain"][i, j] = _mutual_information(reference[fixed_region], aligned[fixed_region])
            carried = _shifted(moving_region, dy, dx) > 0.5
            maps["mi-uptake"][i, j] = _mutual_information(reference[carried], aligned[carried])
            overlap = _shifted(moving_brain, dy, dx) > 0.5
            maps["mask-dice"][i, j] = 2 * (overlap & tissue).sum() / max(1, overlap.sum() + tissue.sum())
    return {name: (scores, _peak(scores)) for name, scores in maps.items()}


def _dice_scan(tissue: np.ndarray, moving_brain: np.ndarray) -> np.ndarray:
    size = 2 * SCAN + 1
    scores = np.zeros((size, size))
    moving_brain = moving_brain.astype(np.float32)
    for i, dy in enumerate(range(-SCAN, SCAN + 1)):
        for j, dx in enumerate(range(-SCAN, SCAN + 1)):
            overlap = _shifted(moving_brain, dy, dx) > 0.5
            scores[i, j] = 2 * (overlap & tissue).sum() / max(1, overlap.sum() + tissue.sum())
    return scores


def centroid_offset(reference_brain: np.ndarray, moving_brain: np.ndarray) -> tuple[float, float]:
    if not reference_brain.any() or not moving_brain.any():
        return math.nan, math.nan
    cm, cr = ndi.center_of_mass(moving_brain), ndi.center_of_mass(reference_brain)
    return cm[0] - cr[0], cm[1] - cr[1]


# ---- figures ---------------------------------------------------------------------------------------
def mri_edges(reference: np.ndarray, reference_brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canny edges of the MRI (σ 2): (inside the dilated brain: brain outline, ventricles, sulci;
    outside it: scalp, skull, face)."""
    edges = canny(reference, sigma=2.0, low_threshold=0.04, high_threshold=0.10)
    inside = ndi.binary_dilation(reference_brain, disk(2))
    return edges & inside, edges & ~inside


def _save(fig, path: Path, dpi: int) -> None:
    """Save a figure as a 256-colour PNG (a third of the size of matplotlib's RGBA output)."""
    from PIL import Image

    fig.savefig(path, dpi=dpi)
    with Image.open(path) as image:
        quantised = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    quantised.save(path, optimize=True)


def _crop(mask: np.ndarray, margin: int = 6) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return slice(None), slice(None)
    h, w = mask.shape
    return (slice(max(0, ys.min() - margin), min(h, ys.max() + margin + 1)),
            slice(max(0, xs.min() - margin), min(w, xs.max() + margin + 1)))


def overlay_figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["MRI", "identity", "matching", "sitk", "sitk-rigid-brain"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.6 * len(columns), 3.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        brain_edges, outer_edges = row["edges"]
        window = _crop(row["reference"] > HEAD_FRACTION * threshold_otsu(row["reference"]))
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if name == "MRI":
                ax.imshow(row["reference"][window], cmap="gray", vmin=0, vmax=1)
                ax.contour(row["tissue"][window], [0.5], colors="lime", linewidths=0.9)
                ax.contour(row["moving_brain"][window], [0.5], colors="cyan", linewidths=0.9, linestyles="dashed")
                ax.set_title(f"{row['pair']} MRI; green: its brain mask,\ncyan dashed: the unmoved "
                             f"{row['modality'].upper()} brain mask", fontsize=8)
                continue
            u = np.zeros((2, *row["moving"].shape), np.float32) if name == "identity" else row["fields"].get(name)
            if u is None:
                ax.axis("off")
                continue
            image = warp_array(row["moving"], u) if name != "identity" else row["moving"]
            ax.imshow(image[window], cmap="gray", vmin=0,
                      vmax=max(1e-3, float(np.percentile(row["moving"], 99.5))))
            for edges, colour, alpha in ((outer_edges, "yellow", 0.5), (brain_edges, "red", 0.9)):
                ys, xs = np.nonzero(edges[window])
                ax.scatter(xs, ys, s=0.15, c=colour, alpha=alpha, linewidths=0)
            ax.contour(row["tissue"][window], [0.5], colors="lime", linewidths=0.9)
            if name == "identity":
                label = f"{row['modality'].upper()} as the atlas aligns it (u = 0)"
            else:
                mean = row["summaries"][name]
                label = f"after {name}: mean u on brain\n({mean[1]:+.1f}, {mean[2]:+.1f}) px, mean |u| {mean[0]:.1f} px"
            ax.set_title(label, fontsize=8)
    fig.suptitle(title + "\ngreen: MRI brain-mask outline; red: MRI edges (Canny σ 2) inside it; yellow: MRI "
                 "edges outside it (scalp, skull, face); drawn over the moving image's luma", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.9 * len(rows))))
    _save(fig, path, 90)
    plt.close(fig)


def _extent(profile: np.ndarray) -> tuple[float, float]:
    """First and last index where a mask profile (fraction of a band) reaches 0.5."""
    inside = np.nonzero(profile >= 0.5)[0]
    return (float(inside[0]), float(inside[-1])) if inside.size else (math.nan, math.nan)


def profile_figure(rows: list[dict], path: Path, title: str, shift_name: str = "sitk-rigid-brain") -> None:
    """Intensity profiles through the brain centre, along x (a row band) and y (a column band):
    the MRI, the unmoved moving image and the moving image after ``shift_name``'s mean shift, with
    the ends of the two brain masks along the band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 2.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        tissue, moving_brain = row["tissue"], row["moving_brain"]
        if not tissue.any():
            continue
        cy, cx = (int(round(c)) for c in ndi.center_of_mass(tissue))
        shift = row["summaries"].get(shift_name)
        moved = _shifted_float(row["moving"], shift[1], shift[2]) if shift else None
        for c, axis in enumerate(("x", "y")):
            ax = axes[r, c]
            band = (slice(cy - 4, cy + 5), slice(None)) if axis == "x" else (slice(None), slice(cx - 4, cx + 5))
            along = 0 if axis == "x" else 1

            def profile(image: np.ndarray, band: tuple = band, along: int = along) -> np.ndarray:
                return image[band].mean(axis=along)

            mri, emission = profile(row["reference"]), profile(row["moving"])
            scale = max(1e-6, float(np.percentile(row["moving"], 99.5)))
            ax.plot(mri, color="0.45", lw=1, label="MRI")
            ax.plot(emission / scale, color="tab:orange", lw=1.4, label=f"{row['modality'].upper()} (atlas, u = 0)")
            if moved is not None:
                ax.plot(profile(moved) / scale, color="tab:purple", lw=1, ls="--",
                        label=f"{row['modality'].upper()} moved by {shift_name} ({shift[1]:+.1f}, {shift[2]:+.1f})")
            (t0, t1), (m0, m1) = _extent(profile(tissue.astype(float))), _extent(profile(moving_brain.astype(float)))
            for value in (t0, t1):
                ax.axvline(value, color="green", lw=1)
            for value in (m0, m1):
                ax.axvline(value, color="tab:orange", lw=1, ls=":")
            ends = "left / right" if axis == "x" else "top (anterior) / bottom"
            ax.set_title(f"{row['pair']} profile along {axis} through the brain centre: mask ends {ends}: "
                         f"{row['modality'].upper()} − MRI = {m0 - t0:+.0f} / {m1 - t1:+.0f} px", fontsize=8)
            ax.set_xlim(0, len(mri) - 1)
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(title + "\ngreen lines: ends of the MRI brain mask (parenchyma for PET/SPECT), orange dotted: "
                 "ends of the moving image's brain mask, both at u = 0", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (2.9 * len(rows))))
    _save(fig, path, 80)
    plt.close(fig)


def _shifted_float(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``image`` sampled at ``x + (dy, dx)`` (linear, zero outside)."""
    return ndi.shift(image, (-dy, -dx), order=1, mode="constant", cval=0.0)


def poles_figure(rows: list[dict], path: Path, title: str, states: tuple[str, ...] = ("identity", "sitk-rigid",
                 "sitk-rigid-brain"), half: int = 34) -> None:
    """Close-ups (2·``half`` px) of the four ends of the MRI brain mask, the moving image at u = 0
    and after each of ``states``' mean shift, with the MRI mask outline and the MRI edges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    poles = ("top", "bottom", "left", "right")
    columns = [(pole, state) for pole in poles for state in states]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.9 * len(columns), 2.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        tissue = row["tissue"]
        ys, xs = np.nonzero(tissue)
        if ys.size == 0:
            continue
        cy, cx = (int(round(c)) for c in ndi.center_of_mass(tissue))
        centres = {"top": (ys.min(), cx), "bottom": (ys.max(), cx), "left": (cy, xs.min()), "right": (cy, xs.max())}
        brain_edges, _ = row["edges"]
        scale = max(1e-3, float(np.percentile(row["moving"], 99.5)))
        for c, (pole, state) in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            y0, x0 = (int(v) + half for v in centres[pole])  # in the padded frame
            window = (slice(y0 - half, y0 + half), slice(x0 - half, x0 + half))
            summary = row["summaries"].get(state)
            if state == "identity":
                image, label = row["moving"], "u = 0 (atlas)"
            elif summary is None:
                ax.axis("off")
                continue
            else:
                image = _shifted_float(row["moving"], summary[1], summary[2])
                label = f"{state}\n({summary[1]:+.1f}, {summary[2]:+.1f})"
            ax.imshow(np.pad(image, half)[window], cmap="gray", vmin=0, vmax=scale, interpolation="nearest")
            ax.contour(np.pad(tissue, half)[window], [0.5], colors="lime", linewidths=1.0)
            ey, ex = np.nonzero(np.pad(brain_edges, half)[window])
            ax.scatter(ex, ey, s=0.4, c="red", linewidths=0, alpha=0.8)
            ax.set_title(f"{row['pair']} {pole}: {label}", fontsize=6)
    fig.suptitle(title + "\ngreen: MRI brain-mask outline (parenchyma for PET/SPECT); red: MRI edges; grey: the "
                 "moving image shifted by each measure's mean u", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path, 90)
    plt.close(fig)


SLICE_MEASURES = (("sitk-rigid", "tab:blue", "-"), ("mi-image", "tab:cyan", ":"), ("sitk-rigid-brain", "tab:red", "-"),
                  ("mi-brain", "tab:orange", ":"), ("mask-dice", "tab:green", "--"))


def slice_figure(records: list[dict], path: Path, task: str) -> None:
    """Mean u (y and x) of each pair against its slice number, per atlas case: a 3D misregistration
    of the atlas shows as a smooth trend shared by all measures, a similarity's bias as disagreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["task"] == task]
    cases = sorted({int(r["case"]) for r in rows})
    width = min(5, len(cases))
    height = 2 * math.ceil(len(cases) / width)
    fig, axes = plt.subplots(height, width, figsize=(max(9.0, 4.2 * width), 2.6 * height), squeeze=False, sharey=True)
    for ax in axes.flat:
        ax.axis("off")
    for c, case in enumerate(cases):
        for a, (component, name) in enumerate((("u_y", "u_y"), ("u_x", "u_x"))):
            ax = axes[2 * (c // width) + a, c % width]
            ax.axis("on")
            for measure, colour, style in SLICE_MEASURES:
                points = sorted((int(r["pair"]) % 1000, float(r[component])) for r in rows
                                if int(r["case"]) == case and r["measure"] == measure
                                and (measure != "mask-dice" or float(r["mask_dice_best"]) >= MASK_GATE))
                if points:
                    ax.plot(*zip(*points), style, color=colour, marker=".", ms=3, lw=1, label=measure)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_ylim(-10, 10)
            ax.set_title(f"{task} case {case}: {name} (px)", fontsize=8)
            ax.set_xlabel("slice", fontsize=7)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"{task}: the mean shift each measure assigns to the unmoved pairs, slice by slice "
                 f"(mask-dice only where the masks reach Dice ≥ {MASK_GATE})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.6 * height)))
    _save(fig, path, 80)
    plt.close(fig)


def scan_figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["mi-image", "mi-fg", "mi-head", "mi-brain", "mi-uptake", "mask-dice"]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(3.2 * len(names), 3.0 * len(rows)), squeeze=False)
    extent = (-SCAN - 0.5, SCAN + 0.5, SCAN + 0.5, -SCAN - 0.5)
    for r, row in enumerate(rows):
        for c, name in enumerate(names):
            ax = axes[r, c]
            scores, (dy, dx) = row["scans"][name]
            ax.imshow(scores, extent=extent, cmap="viridis")
            ax.plot([dx], [dy], "r+", markersize=12)
            ax.plot([0], [0], "wo", markersize=4, fillstyle="none")
            ax.set_title(f"{row['pair']} {name}: peak u=({dy:+.1f}, {dx:+.1f})", fontsize=8)
            ax.set_xlabel("u_x px", fontsize=7)
            ax.set_ylabel("u_y px", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(title + " (white circle: the atlas, u=0; red cross: the peak)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.0 * len(rows))))
    _save(fig, path, 80)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------------
def field_summary(u: np.ndarray, brain: np.ndarray) -> tuple[float, float, float, float, float]:
    """(mean |u|, mean u_y, mean u_x, mean |u| on the whole image, mean |u - mean u|), the means
    over the MRI brain: the last is what is left after taking out the shift (rotation, warping)."""
    magnitude = np.linalg.norm(u, axis=0)
    region = brain if brain.any() else np.ones_like(brain)
    uy, ux = float(u[0][region].mean()), float(u[1][region].mean())
    residual = np.hypot(u[0][region] - uy, u[1][region] - ux).mean()
    return float(magnitude[region].mean()), uy, ux, float(magnitude.mean()), float(residual)


def select_pairs(args: argparse.Namespace) -> list:
    pairs = index_harvard(args.harvard)
    if args.split != "all":
        cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
        train, validation = split_cases(pairs, val_fraction=cases.val_fraction, seed=cases.seed)
        pairs = validation if args.split == "val" else train
    tasks = {t.strip() for t in args.tasks.split(",") if t.strip()}
    pairs = [p for p in pairs if p.task in tasks]
    if args.cases:
        wanted = {int(c) for c in args.cases.split(",")}
        pairs = [p for p in pairs if p.case in wanted]
    by_case: dict[tuple[str, int], list] = defaultdict(list)
    for pair in pairs:
        by_case[pair.task, pair.case].append(pair)
    return [p for group in by_case.values() for p in group[:: args.every]]


def figure_pairs(pairs: list, count: int) -> set[str]:
    """``count`` pairs per task spread over its slices, plus more of SPECT case 10 (largest offsets)."""
    chosen: set[str] = set()
    for task in sorted({p.task for p in pairs}):
        of_task = [p for p in pairs if p.task == task]
        n = count + 2 if any(p.case == 10 for p in of_task) else count
        for k in np.linspace(0.15, 0.85, n):
            chosen.add(f"{task}/{of_task[int(k * (len(of_task) - 1))].pair_id}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, default=REPOSITORY.parent / "shared" / "data" / "harvard-aanlib")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard", help="whose case split to use")
    parser.add_argument("--split", choices=("val", "train", "all"), default="val")
    parser.add_argument("--tasks", default="CT-MRI,PET-MRI,SPECT-MRI")
    parser.add_argument("--cases", default="", help="only these atlas cases (comma-separated)")
    parser.add_argument("--every", type=int, default=1, help="every N-th slice of each case")
    parser.add_argument("--figures", type=int, default=4, help="overlay pairs per task (0: none)")
    parser.add_argument("--figure-ids", default="", help="pair ids for the figures (comma-separated) instead")
    parser.add_argument("--figures-only", action="store_true",
                        help="process only the figure pairs; keep per_pair/summary, redraw the slice plots from it")
    parser.add_argument("--from-csv", action="store_true",
                        help="process nothing: rewrite summary and slice plots from the stored per_pair CSV")
    parser.add_argument("--no-register", action="store_true", help="skip matching/SimpleITK (scans and masks only)")
    parser.add_argument("--out-dir", type=Path, default=REPOSITORY / "docs" / "results" / "atlas_offset")
    parser.add_argument("--tag", default="", help="suffix for the output files")
    parser.add_argument("--threads", type=int, default=1, help="SimpleITK threads")
    args = parser.parse_args()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""

    pairs = select_pairs(args)
    if args.figure_ids:
        wanted = {i.strip() for i in args.figure_ids.split(",")}
        for_figures = {f"{p.task}/{p.pair_id}" for p in pairs if p.pair_id in wanted}
    else:
        for_figures = figure_pairs(pairs, args.figures) if args.figures else set()
    if args.figures_only:
        pairs = [p for p in pairs if f"{p.task}/{p.pair_id}" in for_figures]
    if args.from_csv:
        pairs = []
    records: list[dict] = []
    figure_rows: dict[str, list[dict]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        reference, moving = read_harvard_pair(pair)
        moving = np.ascontiguousarray(luma(moving), dtype=np.float32)
        reference_brain = brain_mask(reference, "mri")  # intracranial: where the field is averaged
        # What the moving image's brain mask outlines on the MRI: the parenchyma for PET/SPECT
        # (uptake stops at the cortex), the whole intracranial space for CT.
        tissue = (parenchyma_mask(reference, reference_brain, MRI_WEIGHTING[pair.task])
                  if pair.modality in ("pet", "spect") else reference_brain)
        moving_brain = brain_mask(moving, pair.modality)
        fixed_region, moving_region = metric_mask(reference_brain), metric_mask(moving_brain)
        # Control, aligned by construction: the MRI's own brain tissue, blurred like an emission image.
        control = ndi.gaussian_filter(reference * tissue, CONTROL_BLUR).astype(np.float32)
        control /= max(1e-6, float(control.max()))

        fields: dict[str, np.ndarray | None] = {}
        if not args.no_register:
            fields["matching"] = classical.register("matching", reference, moving).displacement
            fields["sitk"] = classical.register("sitk", reference, moving).displacement
            fields["sitk-rigid"] = register_sitk(reference, moving, bspline=False)
            fields["sitk-rigid-mri"] = _attempt(register_sitk, reference, moving, fixed_region, None, bspline=False)
            fields["sitk-rigid-brain"] = _attempt(register_sitk, reference, moving, fixed_region, moving_region,
                                                  bspline=False)
            fields["sitk-brain"] = _attempt(register_sitk, reference, moving, fixed_region, moving_region)
            fields["control:matching"] = classical.register("matching", reference, control).displacement
            fields["control:sitk"] = classical.register("sitk", reference, control).displacement
            fields["control:sitk-rigid"] = register_sitk(reference, control, bspline=False)
            fields["control:sitk-brain"] = _attempt(register_sitk, reference, control, fixed_region,
                                                    metric_mask(tissue))
        fields = {name: u for name, u in fields.items() if u is not None}
        summaries = {name: field_summary(u, reference_brain) for name, u in fields.items()}
        scans = translation_scans(reference, moving, reference_brain, moving_brain, tissue)
        for name, (_, (dy, dx)) in scans.items():
            summaries[name] = (math.hypot(dy, dx), dy, dx, math.hypot(dy, dx), 0.0)
        dy, dx = centroid_offset(tissue, moving_brain)
        summaries["mask-centroid"] = (math.hypot(dy, dx), dy, dx, math.hypot(dy, dx), 0.0)
        # The mask measures on the control: what the emission-style outline of an aligned image gives.
        # The scans and mask measures on the control too: each measure's own error on an aligned pair.
        control_brain = brain_mask(control, pair.modality if pair.modality in ("pet", "spect") else "spect")
        for name, (_, (dy, dx)) in translation_scans(reference, control, reference_brain, control_brain,
                                                     tissue).items():
            summaries[f"control:{name}"] = (math.hypot(dy, dx), dy, dx, math.hypot(dy, dx), 0.0)
        dy, dx = centroid_offset(tissue, control_brain)
        summaries["control:mask-centroid"] = (math.hypot(dy, dx), dy, dx, math.hypot(dy, dx), 0.0)
        dice_map = scans["mask-dice"][0]
        for name, (brain_mag, uy, ux, image_mag, residual) in summaries.items():
            records.append({"task": pair.task, "case": pair.case, "pair": pair.pair_id, "measure": name,
                            "brain_mean_abs_u": round(brain_mag, 3), "u_y": round(uy, 3), "u_x": round(ux, 3),
                            "image_mean_abs_u": round(image_mag, 3), "residual_abs_u": round(residual, 3),
                            "mask_dice_at_atlas": round(float(dice_map[SCAN, SCAN]), 3),
                            "mask_dice_best": round(float(dice_map.max()), 3)})
        key = f"{pair.task}/{pair.pair_id}"
        if key in for_figures:
            figure_rows[pair.task].append({
                "pair": pair.pair_id, "modality": pair.modality, "reference": reference, "moving": moving,
                "reference_brain": reference_brain, "tissue": tissue, "moving_brain": moving_brain, "fields": fields,
                "summaries": summaries, "scans": scans, "edges": mri_edges(reference, reference_brain)})
        short = {n: f"({s[1]:+.1f},{s[2]:+.1f})" for n, s in summaries.items()
                 if n in ("sitk", "sitk-brain", "mi-image", "mi-brain", "mask-dice")}
        print(f"[{index + 1}/{len(pairs)}] {key} {short}", flush=True)

    table_path = args.out_dir / f"per_pair{tag}.csv"
    if not args.figures_only and not args.from_csv:
        with table_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    stored: list[dict] = []
    if table_path.exists():
        with table_path.open(encoding="utf-8") as handle:
            stored = list(csv.DictReader(handle))
        for task in sorted({r["task"] for r in stored}):
            slice_figure(stored, args.out_dir / f"slices_{task.split('-')[0].lower()}{tag}.png", task)
    for task, rows in figure_rows.items():
        slug = task.split("-")[0].lower()
        cases = ",".join(sorted({str(int(r["pair"]) // 1000) for r in rows}))
        if not args.no_register:
            overlay_figure(rows, args.out_dir / f"overlay_{slug}{tag}.png",
                           f"{task}, atlas case {cases}: the unmoved pair and where each registration moves it")
            profile_figure(rows, args.out_dir / f"profile_{slug}{tag}.png",
                           f"{task}, atlas case {cases}: where the brain ends in each image")
            poles_figure(rows, args.out_dir / f"poles_{slug}{tag}.png",
                         f"{task}, atlas case {cases}: the ends of the brain, unmoved and after the whole-image "
                         "and the brain-restricted rigid MI shift")
        scan_figure(rows, args.out_dir / f"scan_{slug}{tag}.png",
                    f"{task}, atlas case {cases}: score of each integer translation u of the unmoved moving image")
    if not args.figures_only and stored:
        for record in stored:
            for field in ("brain_mean_abs_u", "u_y", "u_x", "image_mean_abs_u", "residual_abs_u", "mask_dice_at_atlas",
                          "mask_dice_best"):
                record[field] = float(record[field])
            record["case"] = int(record["case"])
        table = compact_tables(stored) + "\nAll measures:\n\n" + summary_table(stored, args)
        (args.out_dir / f"summary{tag}.md").write_text(table, encoding="utf-8")
        print(table)


MEASURE_ORDER = ["matching", "sitk", "sitk-rigid", "sitk-rigid-mri", "sitk-rigid-brain", "sitk-brain", "mi-image",
                 "mi-fg", "mi-head", "mi-brain", "mi-uptake", "mask-dice", "mask-centroid", "control:matching", "control:sitk",
                 "control:sitk-rigid", "control:sitk-brain", "control:mi-image", "control:mi-fg", "control:mi-head",
                 "control:mi-brain",
                 "control:mi-uptake", "control:mask-dice", "control:mask-centroid"]


MASK_GATE = 0.85  # mask measures also reported on the pairs whose masks overlap this well at their best shift


def summary_table(records: list[dict], args: argparse.Namespace) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[record["task"], record["measure"]].append(record)
        if record["measure"].startswith("mask-") and record["mask_dice_best"] >= MASK_GATE:
            groups[record["task"], f"{record['measure']} (Dice≥{MASK_GATE})"].append(record)
    order = [m for measure in MEASURE_ORDER for m in (measure, f"{measure} (Dice≥{MASK_GATE})")]
    lines = [f"Offsets assigned to the unmoved Harvard pairs ({args.split} split, every {args.every}. slice of each "
             "case; `bench/probe_atlas_offset.py`). Per pair: \\|u\\| = mean displacement magnitude over the MRI "
             "brain (px), shift = \\|mean u\\| over the brain, residual = mean \\|u − mean u\\| (rotation and "
             "warping); image \\|u\\| = mean over the whole image (the label probe's number). Columns give the "
             "mean / median / max over pairs; the vector is the median over pairs of the mean u (y, x).", "",
             "| task | pairs | measure | mean \\|u\\| | median \\|u\\| | max \\|u\\| | median shift | "
             "median vector (y, x) | mean vector (y, x) | mean residual | mean image \\|u\\| |",
             "|---|---:|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for task in sorted({t for t, _ in groups}):
        for measure in order:
            rows = groups.get((task, measure))
            if not rows:
                continue
            magnitude = np.array([r["brain_mean_abs_u"] for r in rows], dtype=float)
            uy = np.array([r["u_y"] for r in rows], dtype=float)
            ux = np.array([r["u_x"] for r in rows], dtype=float)
            shift = np.hypot(uy, ux)
            residual = np.nanmean([r["residual_abs_u"] for r in rows])
            image = np.nanmean([r["image_mean_abs_u"] for r in rows])
            lines.append(f"| {task} | {len(rows)} | {measure} | {np.nanmean(magnitude):.1f} | "
                         f"{np.nanmedian(magnitude):.1f} | {np.nanmax(magnitude):.1f} | {np.nanmedian(shift):.1f} | "
                         f"({np.nanmedian(uy):+.1f}, {np.nanmedian(ux):+.1f}) | ({np.nanmean(uy):+.1f}, "
                         f"{np.nanmean(ux):+.1f}) | {residual:.1f} | {image:.1f} |")
    return "\n".join(lines) + "\n"


COMPACT = (("matching", "whole image (package)"), ("sitk", "whole image (package: rigid + B-spline)"),
           ("sitk-rigid", "whole image, rigid only"), ("mi-image", "whole image, translation scan"),
           ("mi-fg", "either-foreground pixels (model.matching's MI), scan"),
           ("mi-head", "MRI head region (background dropped, scalp kept), scan"),
           ("sitk-rigid-brain", "**brain masks**, rigid"), ("mi-brain", "**MRI brain region**, scan"),
           ("mask-dice", f"**masks only**, pairs with Dice ≥ {MASK_GATE}"),
           ("control:sitk", "control: whole image (package)"), ("control:sitk-rigid", "control: whole image, rigid"),
           ("control:mi-brain", "control: MRI brain region, scan"))
BRAIN_MEASURES = ("sitk-rigid-brain", "mi-brain")  # + mask-dice where the masks overlap well


def _vector(record: dict) -> np.ndarray:
    return np.array([float(record["u_y"]), float(record["u_x"])])


def compact_tables(records: list[dict]) -> str:
    """Per task: the key measures, then the decomposition of the whole-image offset."""
    by_pair: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for record in records:
        by_pair[record["task"], record["pair"]][record["measure"]] = record
    lines = []
    for task in sorted({t for t, _ in by_pair}):
        keys = [k for k in by_pair if k[0] == task]
        cases = ",".join(sorted({str(int(k[1]) // 1000) for k in keys}, key=int))
        lines += ["", f"**{task}** ({len(keys)} pairs, atlas case(s) {cases})", "",
                  "| measure | similarity restricted to | shift px: mean / median / max | median vector (y, x) px "
                  "| mean \\|u\\| brain | mean \\|u\\| image |", "|---|---|---|---|---:|---:|"]
        for measure, description in COMPACT:
            chosen = [by_pair[k][measure] for k in keys if measure in by_pair[k]
                      and (measure != "mask-dice" or float(by_pair[k][measure]["mask_dice_best"]) >= MASK_GATE)]
            if not chosen:
                continue
            vectors = np.array([_vector(r) for r in chosen])
            shift = np.hypot(vectors[:, 0], vectors[:, 1])
            brain = np.mean([float(r["brain_mean_abs_u"]) for r in chosen])
            image = np.mean([float(r["image_mean_abs_u"]) for r in chosen])
            lines.append(f"| {measure} | {description} | {shift.mean():.1f} / {np.median(shift):.1f} / {shift.max():.1f} | "
                         f"({np.median(vectors[:, 0]):+.1f}, {np.median(vectors[:, 1]):+.1f}) | {brain:.1f} | {image:.1f} |")
    lines += ["", "Decomposition per atlas case. *Atlas offset*: per pair the median of the brain-restricted "
              f"measures ({', '.join(BRAIN_MEASURES)}, and mask-dice where Dice ≥ {MASK_GATE}); the vector is its median "
              "over the case's pairs. *Whole-image bias*: per pair sitk-rigid minus sitk-rigid-brain; the vector is "
              "its mean over pairs (systematic part), then the median per-pair size. *Warping*: mean \\|u − mean u\\| "
              "over the brain left after the shift (rotation + deformation) for sitk and matching, and the package "
              "sitk's mean \\|u\\| over the image on the aligned-by-construction control.", "",
              "| task | case | pairs | atlas offset vector (y, x) | its size | per-pair size: mean / median / max "
              "| whole-image bias vector | its size | per-pair bias size (median) | warping sitk / matching "
              "| control sitk image \\|u\\| |",
              "|---|---:|---:|---|---:|---|---|---:|---:|---|---:|"]
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for key in by_pair:
        groups[key[0], int(key[1]) // 1000].append(key)
    for (task, case), keys in sorted(groups.items()):
        consensus, bias = [], []
        for key in keys:
            measures = by_pair[key]
            votes = [_vector(measures[m]) for m in BRAIN_MEASURES if m in measures]
            if "mask-dice" in measures and float(measures["mask-dice"]["mask_dice_best"]) >= MASK_GATE:
                votes.append(_vector(measures["mask-dice"]))
            if votes:
                consensus.append(np.median(np.array(votes), axis=0))
            if "sitk-rigid" in measures and "sitk-rigid-brain" in measures:
                bias.append(_vector(measures["sitk-rigid"]) - _vector(measures["sitk-rigid-brain"]))
        consensus, bias = np.array(consensus), np.array(bias)
        offset = np.median(consensus, axis=0)
        size = np.hypot(consensus[:, 0], consensus[:, 1])
        systematic = bias.mean(axis=0) if len(bias) else np.array([math.nan, math.nan])
        per_pair_bias = np.median(np.hypot(bias[:, 0], bias[:, 1])) if len(bias) else math.nan

        def residual(measure: str, keys: list = keys) -> float:
            return float(np.mean([float(by_pair[k][measure]["residual_abs_u"]) for k in keys if measure in by_pair[k]]))

        control = np.mean([float(by_pair[k]["control:sitk"]["image_mean_abs_u"]) for k in keys
                           if "control:sitk" in by_pair[k]])
        lines.append(f"| {task} | {case} | {len(keys)} | ({offset[0]:+.1f}, {offset[1]:+.1f}) | {np.hypot(*offset):.1f} | "
                     f"{size.mean():.1f} / {np.median(size):.1f} / {size.max():.1f} | ({systematic[0]:+.1f}, "
                     f"{systematic[1]:+.1f}) | {np.hypot(*systematic):.1f} | {per_pair_bias:.1f} | "
                     f"{residual('sitk'):.1f} / {residual('matching'):.1f} | {control:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
