"""The alignment guard: a displacement is kept only where it reliably beats not moving the image.

On pairs that are already aligned, the structural matching and the network still move the moving
image by a few voxels (Harvard validation pairs as the atlas stores them: 2.3 px on average for
CT, 3.5 for PET, 6.8 for SPECT, 12 on one SPECT slice). After the
network, :func:`choose_displacement` lets the estimates compete, simplest first: the identity (no
motion) is kept unless the matching's field beats it reliably, and whichever is kept then must be
beaten reliably by the network's field.

* **Similarity**: mutual information (``model.mi_refinement``'s linear Parzen windows, 32 bins)
  between the reference and the moving image warped by the candidate, over the **joint
  foreground**: voxels where the reference shows tissue and the moving image, under at least one
  candidate, does too. Tissue only one modality shows (the MRI's scalp around a PET brain) then
  does not count, and every candidate is scored on the same voxels.
* **Noise**: the standard deviation of the paired gain under a block bootstrap: the voxels are
  resampled in blocks of ``BLOCK_VOXELS`` per side, with replacement, and both candidates are
  scored on each resample. Neighbouring voxels are not independent samples (images and fields are
  smooth over several voxels), so a voxel bootstrap would understate the noise.
* **Rule**: a challenger replaces the kept estimate when its gain exceeds ``GAIN_NOISE_FACTOR``
  (k) times that noise. k is well above a significance level's 2-3 because the matching and the
  network fit their fields to these very images, so they gain on pairs with nothing to correct;
  docs/alignment_guard.md gives the calibration. That burden of proof is for *small* motions, the
  spurious kind: a challenger that moves the tissue by more than ``LARGE_MOTION_VOXELS`` on
  average from the incumbent needs only a gain above one noise unit. No already aligned validation
  pair, as the atlas stores it, made the matching move that far (at most 10.6 px, SPECT 10010; with
  input noise of 1e-3 of the range it moves 10.9-17.5 px: docs/alignment_guard.md, Limits), while k = 4 alone left 12
  of the 117 grossly misaligned validation pairs (15-25 px) unaligned, where CT-MRI's mutual
  information gains little (z 1.3-2.7 for a 17-23 px correction).
* **Floor**: a challenger that moves the tissue by less than ``MIN_CREDIBLE_MOTION_VOXELS`` on
  average (from where it is, not from the incumbent: a fine correction of an accepted larger one
  still competes) is never accepted, whatever its gain. Across modalities the
  similarity itself is off by that much: registered onto the MRI, the same optimisers that bring
  a 2-4 px residual to 0.3-1.3 px when registered onto the moving modality end 3-9 px from the
  truth (``bench/probe_multimodal_floor.py``), so a smaller correction cannot be told from the
  similarity's own bias. docs/alignment_guard.md gives the calibration (training split). How far
  the similarity can be trusted depends on the data, so a checkpoint may carry its own floor,
  calibrated on its training data (:func:`credible_motion_floor`); the 3-D phantom checkpoint
  does (``bench/calibrate_guard_floor.py``).
* **Motion unit**: given the grid's spacing, motion is counted in voxels of its finest axis (each
  axis's displacement times its spacing over the finest spacing), the floor and the large-motion
  rule alike. On a thick-slice volume a voxel of the grid is several in-plane voxels through the
  slices: counted in grid voxels, an 11 mm shift across 7.5 mm slices was 1.5 voxels, under a
  floor of 2 calibrated on isotropic phantoms, and was refused however clearly the images preferred
  it. On an isotropic grid the two units are the same number.

* **Scale**: a checkpoint may ask for both images to be blurred (a Gaussian of
  ``alignment_guard.similarity_blur_voxels``, :func:`similarity_blur`) before anything is scored.
  On the 3-D phantoms the joint histogram is sharpest at the exact alignment, and a field that
  optimised this very measure (SimpleITK's) outscored fields closer to the truth on small
  residuals; judged at the scale of the residual, the guard's calls on the checkpoint's training
  pairs came closer to the truth (``bench/probe_guard_blur.py``, docs/alignment_guard.md).

Scores use at most ``MAX_SAMPLES`` voxels of the joint foreground, so the cost does not grow with
a volume's size; each candidate's voxels are histogrammed once per block, and a bootstrap replicate
is a weighted sum of block histograms. Nothing here is trained.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

from napari_unifuse.model.mi_refinement import BINS, joint_mutual_information, linear_bins
from napari_unifuse.model.smoothing import gaussian_blur

IDENTITY = "identity"
# k: see the module docstring and docs/alignment_guard.md.
GAIN_NOISE_FACTOR = 4.0
# Mean motion (voxels of the finest axis, over the scored tissue) beyond which one noise unit of gain suffices.
LARGE_MOTION_VOXELS = 12.0
LARGE_MOTION_FACTOR = 1.0
# Mean motion (voxels of the finest axis) below which no gain is evidence enough, unless a checkpoint says otherwise:
# see the module docstring.
MIN_CREDIBLE_MOTION_VOXELS = 8.0
# The checkpoint sidecar's section that may hold a floor calibrated on its training data.
METADATA_KEY = "alignment_guard"
BLOCK_VOXELS = 16
BOOTSTRAP_REPLICATES = 100
# Fewer blocks than this (of the scored voxels, or of the moving image's own tissue) give no usable spread:
# the identity is kept.
MIN_BLOCKS = 4
MAX_SAMPLES = 2**16
# A voxel shows tissue above this fraction of its image's 99th percentile.
FOREGROUND_FRACTION = 0.05
# The percentile is estimated on at most this many voxels (a strided subset of a large volume).
_PERCENTILE_VOXELS = 2**20
# Fixed, so that the same inputs always keep the same estimate.
_SEED = 0


@dataclass(frozen=True)
class Challenge:
    """One comparison: ``challenger`` against the estimate kept so far (``incumbent``)."""

    challenger: str
    incumbent: str
    gain: float  # mutual information (nats), challenger minus incumbent
    noise: float  # block-bootstrap standard deviation of that gain
    required: float  # how many noise units the gain had to exceed (k, or 1 for a large move)
    accepted: bool


@dataclass(frozen=True)
class GuardDecision:
    """Which displacement the guard kept, and the numbers it decided on."""

    kept: str  # IDENTITY or a name of the estimates given to choose_displacement
    scores: dict[str, float]  # mutual information (nats) per candidate, identity included
    magnitudes: dict[str, float]  # mean |displacement| (motion_unit) per candidate over the scored voxels
    challenges: tuple[Challenge, ...]
    factor: float  # k
    samples: int  # joint-foreground voxels scored
    blocks: int  # bootstrap blocks they fall in (when fewer, those the moving image's own tissue spans)
    min_credible_motion: float = MIN_CREDIBLE_MOTION_VOXELS  # the floor (motion_unit)
    blur_voxels: float = 0.0  # the Gaussian sigma both images were blurred by before scoring
    spacing: tuple[float, ...] | None = None  # the grid's mm per array axis; None: not given

    @property
    def motion_unit(self) -> str:
        """What ``magnitudes`` and ``min_credible_motion`` count, for people."""
        if self.spacing is None:
            return "voxels of the grid (its spacing was not given)"
        if _is_isotropic(self.spacing):
            return f"voxels of {min(self.spacing):.3g} mm"
        return (f"voxels of the finest axis ({min(self.spacing):.3g} mm): each axis's displacement counts "
                "by its size in mm")

    def _floor_in_words(self) -> str:
        if self.spacing is None:
            return f"{self.min_credible_motion:g} voxels"
        finest = min(self.spacing)
        in_mm = f"{self.min_credible_motion * finest:.3g} mm"
        if _is_isotropic(self.spacing):
            return f"{self.min_credible_motion:g} voxels ({in_mm})"
        return f"{in_mm} ({self.min_credible_motion:g} voxels of the finest axis, {finest:.3g} mm)"

    @property
    def message(self) -> str:
        """One line for people: what was kept and why."""
        if not self.challenges:
            return (f"kept {IDENTITY}: too little tissue to judge any motion (shown by both images, or in the "
                    f"moving image itself: fewer than {MIN_BLOCKS} blocks of {BLOCK_VOXELS} voxels)")
        deciding = next((c for c in reversed(self.challenges) if c.accepted), None)
        if deciding is None:
            # The floor judges each challenger's own motion (its magnitude), whatever it challenged.
            below_floor = [c.challenger for c in self.challenges
                           if self.magnitudes[c.challenger] < self.min_credible_motion]
            within_noise = [c for c in self.challenges if c.challenger not in below_floor]
            floor_reason = (f"by less than {self._floor_in_words()}, within what this similarity can confirm "
                            "across modalities")
            # A large move is held to one noise unit, not k: each is quoted the bar it missed.
            bars = {c.required for c in within_noise}
            noise_reason = (f"more than {bars.pop():g}× the similarity's noise" if len(bars) == 1 else
                            "more than the similarity's noise times its bar (" + ", ".join(
                                f"{c.challenger} {c.required:g}×" for c in within_noise) + ")")
            if not within_noise:
                return f"kept {IDENTITY}: no reliable improvement (every estimate moves the tissue {floor_reason})"
            if not below_floor:
                return f"kept {IDENTITY}: no reliable improvement (no estimate gained {noise_reason})"
            # Some were refused by the floor whatever their gain, the others by the noise: each its own reason.
            move = "moves" if len(below_floor) == 1 else "move"
            return (f"kept {IDENTITY}: no reliable improvement ({' and '.join(below_floor)} {move} the tissue "
                    f"{floor_reason}; {' and '.join(c.challenger for c in within_noise)} gained no {noise_reason})")
        return (f"kept {self.kept}: mutual information {deciding.gain:+.3f} nats over "
                f"{deciding.incumbent}, {deciding.gain / max(deciding.noise, 1e-12):.1f}× its noise")

    def to_dict(self) -> dict:
        return {
            "kept": self.kept,
            "message": self.message,
            "similarity": f"mutual information (nats, linear Parzen, {BINS} bins) over the joint foreground"
                          + (f", both images blurred by a Gaussian of sigma {self.blur_voxels:g} voxels"
                             if self.blur_voxels > 0 else ""),
            "blur_voxels": self.blur_voxels,
            "scores": self.scores,
            "motion_unit": self.motion_unit,
            "mean_displacement_voxels": self.magnitudes,
            "challenges": [asdict(challenge) for challenge in self.challenges],
            "noise": f"block bootstrap ({BOOTSTRAP_REPLICATES} replicates, blocks of {BLOCK_VOXELS} voxels)",
            "factor": self.factor,
            "min_credible_motion_voxels": self.min_credible_motion,
            "min_credible_motion_mm": None if self.spacing is None else self.min_credible_motion * min(self.spacing),
            "samples": self.samples,
            "blocks": self.blocks,
        }


def choose_displacement(
    moving: np.ndarray,
    reference: np.ndarray,
    estimates: Mapping[str, np.ndarray],
    factor: float = GAIN_NOISE_FACTOR,
    min_credible_motion: float = MIN_CREDIBLE_MOTION_VOXELS,
    blur_voxels: float = 0.0,
    spacing: Sequence[float] | None = None,
    field_of_view: np.ndarray | None = None,
) -> GuardDecision:
    """Identity or one of ``estimates`` for aligning ``moving`` to ``reference``.

    ``moving`` and ``reference``: model-ready intensities in [0, 1] on the same grid, (y, x) or
    (z, y, x); ``estimates``: name → displacement (ndim, *spatial) in voxels, in the order they
    challenge (each challenges whichever estimate is kept at its turn; the identity starts).
    ``factor``: k; ``min_credible_motion``: the floor (voxels of the finest axis); ``blur_voxels``: the Gaussian sigma
    both images are blurred by first (0: as given); ``spacing``: the grid's mm per array axis, so that
    motion is counted in voxels of its finest axis (None: in voxels of the grid, every axis alike).
    ``field_of_view``: where the moving image was acquired on this grid (boolean, the grid's shape;
    None: everywhere). Only reference voxels inside it are scored: outside, the moving image's zeros
    are no data, and a candidate that slid the covered slab into them would score as if it had found
    tissue there.
    """
    if spacing is not None:
        spacing = tuple(float(size) for size in spacing)
        if len(spacing) != moving.ndim or not all(math.isfinite(size) and size > 0 for size in spacing):
            raise ValueError(f"spacing must give a size > 0 (mm) for each of the {moving.ndim} axes, got {spacing!r}")
    # Each axis's voxel in voxels of the finest axis: ones when the grid is isotropic or unknown.
    axis_voxels = np.ones(moving.ndim) if spacing is None else np.asarray(spacing) / min(spacing)
    if blur_voxels > 0:
        moving, reference = (gaussian_blur(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None],
                                           blur_voxels)[0, 0].numpy() for image in (moving, reference))
    rng = np.random.default_rng(_SEED)
    points = _tissue_points(reference, rng, field_of_view)
    values = {IDENTITY: moving[tuple(points)],
              **{name: _sample_moved(moving, field, points) for name, field in estimates.items()}}
    moving_threshold = _foreground_threshold(moving)
    shown = np.any([sampled > moving_threshold for sampled in values.values()], axis=0)
    points = points[:, shown]
    blocks, block_count = _blocks_of(points, moving.shape)
    # A candidate can spread a small object over the reference's tissue (one that pulls every voxel
    # onto a 3-voxel cube showed it in 8 blocks): the moving image's own tissue must span the blocks too.
    judged_blocks = min(block_count, _occupied_blocks(moving > moving_threshold))
    if judged_blocks < MIN_BLOCKS:
        return GuardDecision(IDENTITY, {}, {}, (), factor, int(points.shape[1]), judged_blocks, min_credible_motion,
                             blur_voxels, spacing)

    # Row 0: the sample itself; then how often each block was drawn in each replicate.
    draws = np.concatenate([np.ones((1, block_count)), rng.multinomial(
        block_count, np.full(block_count, 1.0 / block_count), size=BOOTSTRAP_REPLICATES)])
    reference_bins = linear_bins(torch.from_numpy(reference[tuple(points)]))
    replicates = {
        name: joint_mutual_information(
            torch.from_numpy(draws) @ _block_histograms(reference_bins, sampled[shown], blocks, block_count)).numpy()
        for name, sampled in values.items()
    }

    fields = {IDENTITY: np.zeros_like(next(iter(estimates.values()))), **estimates}
    kept, challenges = IDENTITY, []
    for name in estimates:
        difference = replicates[name] - replicates[kept]
        gain, noise = float(difference[0]), float(difference[1:].std(ddof=1))
        motion = _mean_motion(fields[name] - fields[kept], points, axis_voxels)
        required = LARGE_MOTION_FACTOR if motion > LARGE_MOTION_VOXELS else factor
        credible = _mean_motion(fields[name], points, axis_voxels) >= min_credible_motion
        accepted = credible and gain > required * noise and gain > 0.0
        challenges.append(Challenge(name, kept, gain, noise, required, accepted))
        if accepted:
            kept = name
    scores = {name: float(replicate[0]) for name, replicate in replicates.items()}
    magnitudes = {name: _mean_motion(field, points, axis_voxels) for name, field in fields.items()}
    return GuardDecision(kept, scores, magnitudes, tuple(challenges), factor, int(points.shape[1]), block_count,
                         min_credible_motion, blur_voxels, spacing)


def credible_motion_floor(metadata: Mapping[str, object]) -> float:
    """The floor for a method whose checkpoint sidecar is ``metadata``: its
    ``alignment_guard.min_credible_motion_voxels`` when it was calibrated on the checkpoint's
    training data, else ``MIN_CREDIBLE_MOTION_VOXELS``."""
    return _sidecar_voxels(metadata, "min_credible_motion_voxels", MIN_CREDIBLE_MOTION_VOXELS)


def similarity_blur(metadata: Mapping[str, object]) -> float:
    """The Gaussian sigma (voxels) the guard blurs both images by, for a method whose checkpoint
    sidecar is ``metadata``: its ``alignment_guard.similarity_blur_voxels`` when it was calibrated on
    the checkpoint's training data (``bench/probe_guard_blur.py``), else 0 (the images as given)."""
    return _sidecar_voxels(metadata, "similarity_blur_voxels", 0.0)


def _sidecar_section(metadata: Mapping[str, object]) -> Mapping[str, object]:
    """The sidecar's guard settings ({} when it has none); anything but an object of settings is
    refused, since ignoring it would run the guard on defaults the checkpoint was not validated with."""
    section = metadata.get(METADATA_KEY)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{METADATA_KEY} must be an object of settings, got {section!r}")
    return section


def _sidecar_voxels(metadata: Mapping[str, object], key: str, default: float) -> float:
    value = _sidecar_section(metadata).get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{METADATA_KEY}.{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def weighs_network_field(metadata: Mapping[str, object]) -> bool:
    """Whether the guard weighs the network's own field for a method whose checkpoint sidecar is
    ``metadata``: ``alignment_guard.weigh_network_field``, true unless the checkpoint's validation
    showed that field never beats the initial alignment. The engine then decides before the
    network runs, which saves the network's second pass (docs/alignment_guard.md)."""
    return _sidecar_flag(metadata, "weigh_network_field", default=True)


def weighs_dense_refinement(metadata: Mapping[str, object]) -> bool:
    """Whether the guard also weighs the dense MIND refinement of the structural matching's field
    (``model.dense_refinement``) for a method whose checkpoint sidecar is ``metadata``:
    ``alignment_guard.weigh_dense_refinement``, false unless the checkpoint's validation showed it
    pays (on the Harvard atlas pairs it did not: docs/alignment_guard.md)."""
    return _sidecar_flag(metadata, "weigh_dense_refinement", default=False)


def _sidecar_flag(metadata: Mapping[str, object], key: str, default: bool) -> bool:
    value = _sidecar_section(metadata).get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{METADATA_KEY}.{key} must be true or false, got {value!r}")
    return value


def _mean_motion(field: np.ndarray, points: np.ndarray, axis_voxels: np.ndarray) -> float:
    """Mean |field| over ``points``, in voxels of the finest axis: ``field`` (voxels of the grid)
    scaled per axis by ``axis_voxels``, each axis's voxel in those units."""
    displacement = field[(slice(None), *points)]
    # In the field's own precision: scaled by ones, an isotropic grid's motions are the same bits as unscaled.
    scaled = displacement * axis_voxels.astype(displacement.dtype).reshape(-1, 1)
    return float(np.linalg.norm(scaled, axis=0).mean())


def _is_isotropic(spacing: Sequence[float]) -> bool:
    return max(spacing) == min(spacing)


def _foreground_threshold(image: np.ndarray) -> float:
    flat = image.reshape(-1)
    stride = max(1, flat.size // _PERCENTILE_VOXELS)
    return FOREGROUND_FRACTION * float(np.percentile(flat[::stride], 99))


def tissue_mask(image: np.ndarray) -> np.ndarray:
    """Where ``image`` shows tissue: above FOREGROUND_FRACTION of its 99th percentile (boolean)."""
    return image > _foreground_threshold(image)


def _tissue_points(reference: np.ndarray, rng: np.random.Generator,
                   field_of_view: np.ndarray | None = None) -> np.ndarray:
    """Voxel indices (ndim, N) where the reference shows tissue, inside ``field_of_view`` when
    given, at most MAX_SAMPLES of them."""
    tissue = tissue_mask(reference)
    if field_of_view is not None:
        tissue &= field_of_view
    points = np.argwhere(tissue).T
    if points.shape[1] > MAX_SAMPLES:
        points = points[:, np.sort(rng.choice(points.shape[1], MAX_SAMPLES, replace=False))]
    return points


def _sample_moved(moving: np.ndarray, field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The moving image warped by ``field``, at ``points`` only: moving(x + field(x)), zero
    outside the image as ``model.warp.warp`` pads."""
    positions = points + field[(slice(None), *points)]
    return ndimage.map_coordinates(moving, positions, order=1, mode="grid-constant", cval=0.0).astype(np.float32)


def _blocks_of(points: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Each point's block (0 .. count-1, only blocks that hold points) and the block count."""
    grid = tuple(math.ceil(size / BLOCK_VOXELS) for size in shape)
    cells = np.ravel_multi_index(tuple(points // BLOCK_VOXELS), grid)
    occupied, blocks = np.unique(cells, return_inverse=True)
    return blocks, len(occupied)


def _occupied_blocks(mask: np.ndarray) -> int:
    """How many blocks of BLOCK_VOXELS per side (as :func:`_blocks_of` lays them) hold a voxel of ``mask``."""
    grid = tuple(math.ceil(size / BLOCK_VOXELS) for size in mask.shape)
    padded = np.pad(mask, [(0, cells * BLOCK_VOXELS - size) for cells, size in zip(grid, mask.shape)])
    per_block = padded.reshape([length for cells in grid for length in (cells, BLOCK_VOXELS)])
    return int(per_block.any(axis=tuple(range(1, 2 * mask.ndim, 2))).sum())


def _block_histograms(reference_bins: tuple[torch.Tensor, torch.Tensor], moving: np.ndarray, blocks: np.ndarray,
                      block_count: int) -> torch.Tensor:
    """(block_count, BINS²) joint histograms of each block's voxels with the linear Parzen windows
    of ``soft_mutual_information``: a bootstrap replicate's histogram is then a weighted sum of
    these, and costs no pass over the voxels."""
    reference_lower, reference_upper = reference_bins
    moving_lower, moving_upper = linear_bins(torch.from_numpy(moving))
    offset = torch.from_numpy(blocks) * BINS * BINS
    histograms = torch.zeros(block_count * BINS * BINS, dtype=torch.float64)
    for reference_step, reference_weight in ((0, 1 - reference_upper), (1, reference_upper)):
        for moving_step, moving_weight in ((0, 1 - moving_upper), (1, moving_upper)):
            index = offset + (reference_lower + reference_step) * BINS + moving_lower + moving_step
            histograms.index_add_(0, index, (reference_weight * moving_weight).double())
    return histograms.view(block_count, BINS * BINS)
