"""What moves the degradation head's patch statistics: the artefact, or how the image was made?

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_statistics_resampling.py
        [--harvard ../shared/data/harvard-aanlib] [--pairs 20] [--out bench/results/probe_statistics_resampling.md]

Two measurements of ``model.dapl.patch_statistics`` (4-voxel patches, as the small preset reads
them), averaged over the patches with tissue:

* **3-D, where the motion is synthesised.** A 1 mm T2 phantom (176³, the bundled sample's voxel
  size) and 24 windows of 32³ in the head (the 3-D checkpoint's training crop): the shift of each
  statistic from the clean window when the motion (severity 0.5) is synthesised on the window, as
  training did, and when it is synthesised on the whole volume and then cut out, as a scanner makes
  it and the engine reads it (three whole-volume draws).
* **2-D, what a half-pixel resampling does** (``--harvard``): the first ``--pairs`` validation pairs
  of Harvard PET-MRI and SPECT-MRI (the luma; ``unifuse-2d-harvard``'s case split), clean, at low dose (severity 0.5), and clean moved by
  half a pixel along both axes with linear and with cubic interpolation, as the synthetic
  misalignment (cubic) and the matching's warp (linear) move a moving image. The AUC says how well
  the spectral slope alone tells low dose from the clean image, and from the moved clean image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.data.degrade import make_degradation
from napari_unifuse.data.phantoms import make_brain_phantoms
from napari_unifuse.io import normalize_intensity
from napari_unifuse.model.dapl import patch_statistics
from napari_unifuse.training import harvard
from napari_unifuse.training.datasets import PHANTOM_INTENSITY

STATISTICS = ("moving detail log RMS", "moving detail log mean |.|", "reference detail log RMS", "moving mean",
              "spectral slope")
PATCH = 4
# The case split of configs/harvard2d-cpu.yaml (unifuse-2d-harvard's validation split).
HARVARD_VAL_FRACTION = 0.1
TISSUE = 0.05


def tissue_statistics(moving: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The five statistics averaged over the patches whose moving-image mean is above ``TISSUE``."""
    as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]  # noqa: E731
    statistics = patch_statistics(as_tensor(moving), as_tensor(reference), PATCH)[0]
    tissue = statistics[3] > TISSUE
    return statistics[:, tissue].mean(dim=1).numpy()


def crop_versus_whole_volume(windows: int = 24, whole_draws: int = 3) -> list[str]:
    volumes = make_brain_phantoms(shape=(176, 176, 176), modalities=("t1", "t2"))
    t1, t2 = (normalize_intensity(volumes[name], PHANTOM_INTENSITY[name])[0].array.astype(np.float32)
              for name in ("t1", "t2"))
    spacing = tuple(volumes["t2"].geometry.spacing)
    motion = lambda: make_degradation("motion", 0.5, voxel_size_mm=spacing)  # noqa: E731
    whole = [motion()(t2, np.random.default_rng(100 + draw)) for draw in range(whole_draws)]
    rng = np.random.default_rng(0)
    shifts: dict[str, list[np.ndarray]] = {"on the 32³ window (training before)": [],
                                           "on the whole volume, then cut out": []}
    for index in range(windows):
        corner = [int(rng.integers(40, 176 - 72)) for _ in range(3)]
        window = tuple(slice(start, start + 32) for start in corner)
        clean = tissue_statistics(t2[window], t1[window])
        degraded_window = motion()(np.ascontiguousarray(t2[window]), np.random.default_rng(index))
        shifts["on the 32³ window (training before)"].append(tissue_statistics(degraded_window, t1[window]) - clean)
        shifts["on the whole volume, then cut out"].append(
            tissue_statistics(whole[index % whole_draws][window], t1[window]) - clean)
    rows = ["| motion synthesised | " + " | ".join(STATISTICS) + " |", "|---|" + "---:|" * len(STATISTICS)]
    rows += [f"| {name} | " + " | ".join(f"{value:+.3f}" for value in np.mean(values, axis=0)) + " |"
             for name, values in shifts.items()]
    return [f"## 3-D: motion on a 1 mm T2, shift from the clean window (mean of {windows} windows of 32³)", "",
            *rows, ""]


def half_pixel_resampling(root: Path, pairs: int) -> list[str]:
    _, validation = harvard.split_cases(harvard.index_harvard(root), HARVARD_VAL_FRACTION, 0)
    conditions = ("clean", "low dose", "clean, moved ½ px (linear)", "clean, moved ½ px (cubic)")
    lines = ["## 2-D: Harvard PET and SPECT luma, clean, low dose and resampled", "",
             "| task | condition | detail log RMS | spectral slope | slope AUC against low dose |",
             "|---|---|---:|---:|---:|"]
    for task in ("PET-MRI", "SPECT-MRI"):
        values: dict[str, list[np.ndarray]] = {condition: [] for condition in conditions}
        for index, pair in enumerate([pair for pair in validation if pair.task == task][:pairs]):
            reference, moving = harvard.read_harvard_pair(pair)
            luma = rgb_to_ycbcr(moving)[..., 0].astype(np.float32) if moving.ndim == 3 else moving.astype(np.float32)
            images = {
                "clean": luma,
                "low dose": make_degradation("lowdose", 0.5)(luma, np.random.default_rng(index)),
                "clean, moved ½ px (linear)": ndimage.shift(luma, (0.5, 0.5), order=1),
                "clean, moved ½ px (cubic)": ndimage.shift(luma, (0.5, 0.5), order=3),
            }
            for condition, image in images.items():
                values[condition].append(tissue_statistics(image, reference.astype(np.float32)))
        low_dose_slope = np.array(values["low dose"])[:, 4]
        for condition in conditions:
            table = np.array(values[condition])
            if condition == "low dose":
                auc = "—"
            else:
                labels = np.r_[np.zeros(len(table)), np.ones(len(low_dose_slope))]
                score = roc_auc_score(labels, np.r_[table[:, 4], low_dose_slope])
                auc = f"{max(score, 1.0 - score):.2f}"
            lines.append(f"| {task} | {condition} | {table[:, 0].mean():+.3f} | {table[:, 4].mean():+.3f} | {auc} |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, help="the Harvard AANLIB folder (the 2-D part)")
    parser.add_argument("--pairs", type=int, default=20, help="validation pairs per task")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["# What moves the degradation head's patch statistics", "",
             "`bench/probe_statistics_resampling.py`, one torch thread.", "", *crop_versus_whole_volume()]
    if args.harvard:
        lines += half_pixel_resampling(args.harvard, args.pairs)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
