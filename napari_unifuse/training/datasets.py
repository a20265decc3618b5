"""Training datasets: clean aligned pairs in, degraded misaligned training samples out.

Every dataset holds *clean, aligned* (reference, label) pairs and synthesises the model input on
the fly with ``data.pairs.make_pair``: the label of the moving modality is degraded (CT: metal +
noise, PET/SPECT: low dose, T2/MR: motion; a fraction ``none_fraction`` stays clean) and
misaligned with a known displacement. The random generator of a sample is seeded by
``(seed, stream, epoch, index)``, so a run is reproducible whatever the number of workers or
processes, and each epoch draws new degradations (``set_epoch``; the trainer calls it).

A sample is a dict of tensors::

    reference    (1, *spatial) float32 in [0, 1]   high-quality reference I_R
    moving       (1, *spatial)                     degraded, misaligned I'_D
    label        (1, *spatial)                     clean moving aligned to the reference, I_D
    displacement (ndim, *spatial)                  ground truth u, voxels: moving(x + u(x)) = label(x)
    class_index  ()  int64                          index in data.degrade.DEGRADATION_CLASSES
    reference_misaligned (1, *spatial)             I'_R: the reference moved exactly like I'_D (L_moda)
    moving_clean (1, *spatial)                     I_fine: the clean moving image misaligned like I'_D;
                                                   W(I_fine, φ) is the fusion target (Eq. 11–12)
  colour datasets (Harvard; folders whose cohort holds a colour moving image) add, for every sample
  so that batches collate:
    cbcr         (2, *spatial)  chroma of the moving image, misaligned like ``moving``
    label_cbcr   (2, *spatial)  chroma aligned to the reference (the target of L_crcb)
    is_color     ()  float32    0 for a grayscale moving image (chroma then neutral 0.5)

Three sources: ``HarvardPairs`` (2D PNG pairs), ``PhantomPairs`` (data.phantoms, 2D slices or
3D crops) and ``FolderPairs`` (NIfTI case folders: BraTS-, SynthRAD- and FDG-PET/CT-like).
``build_datasets(data, seed=..., spatial_dims=...)`` returns (train, validation) for a config's ``data`` section.
"""

from __future__ import annotations

import math
import string
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from napari_unifuse.engine.job import is_first_process
from napari_unifuse.errors import InputError
from napari_unifuse.training import harvard

if TYPE_CHECKING:
    from napari_unifuse.io import ImageVolume

# Moving modality -> its degradation (paper §4.1: T2 motion, CT metal + noise, PET low dose).
MODALITY_DEGRADATION = {"t2": "motion", "mr": "motion", "ct": "metal", "pet": "lowdose", "spect": "lowdose"}
TRAIN_STREAM, VALIDATION_STREAM = 0, 1
NEUTRAL_CHROMA = 0.5
DEFAULT_SEVERITY = (0.25, 0.75)
DEFAULT_VAL_FRACTION = 0.15


@dataclass(frozen=True)
class CleanPair:
    """One aligned, clean pair before synthesis (spatial axes first, like io.ImageVolume)."""

    reference: np.ndarray  # (*spatial) float32 [0, 1]
    label: np.ndarray  # (*spatial) float32 [0, 1], or (y, x, 3) RGB for PET/SPECT pseudo-colour
    degradation: str  # what make_pair applies to the label (unless the draw says "none")
    spacing: tuple[float, ...]  # mm per voxel: the motion / metal physics and the rotation use it
    label_metadata: dict = field(default_factory=dict)  # e.g. the CT window ("intensity_mapping")

    @property
    def is_rgb(self) -> bool:
        return self.label.ndim == self.reference.ndim + 1


def sample_rng(seed: int, stream: int, epoch: int, index: int, redraw: int = 0) -> np.random.Generator:
    # The first draw keeps the seed it always had, so that samples which never needed a redraw
    # (and the checkpoints trained on them) stay as they were.
    return np.random.default_rng([seed, stream, epoch, index] + ([redraw] if redraw else []))


# How many times a sample whose crop has no room for a metal insert is drawn again (crop,
# degradation, severity and misalignment), each from its own seed, before it trains as "none".
METAL_REDRAWS = 8


# Normalised intensity above which a reference voxel counts as anatomy when placing crops.
CROP_FOREGROUND = 0.05


def random_crop(arrays: list[np.ndarray], size: tuple[int, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random window of every array (spatial axes first), centred on a random voxel of
    the first array's anatomy (uniform when it has none), kept inside the image.

    Uniform windows of a head image are often mostly air: wasted steps, and a CT crop with no
    tissue deep enough for a metal insert cannot be degraded at all. A crop larger than the image raises.
    """
    spatial = arrays[0].shape[: len(size)]
    if any(s < c for s, c in zip(spatial, size)):
        raise InputError(f"crop {size} is larger than the image {spatial}", "data.crop")
    anatomy = arrays[0].reshape(*spatial, -1).max(axis=-1) > CROP_FOREGROUND
    candidates = np.flatnonzero(anatomy)
    if candidates.size:
        centre = np.unravel_index(int(rng.choice(candidates)), spatial)
        starts = [int(np.clip(x - c // 2, 0, s - c)) for x, s, c in zip(centre, spatial, size)]
    else:
        starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(spatial, size)]
    window = tuple(slice(start, start + c) for start, c in zip(starts, size))
    return [np.ascontiguousarray(a[window]) for a in arrays]


class _RecordingMisalignment:
    """Draws like the config's misalignment (``data.misalign.misalignment_from_options``) and keeps
    the draw, to misalign the reference and the clean label the same way."""

    def __init__(self, options: dict) -> None:
        from napari_unifuse.data.misalign import misalignment_from_options

        self.random = misalignment_from_options(options)
        self.last = None

    def draw(self, shape, rng, spacing=None):
        self.last = self.random.draw(shape, rng, spacing)
        return self.last


class SyntheticPairDataset(Dataset):
    """Base class: subclasses provide ``__len__`` and ``clean_pair(index, rng)``.

    ``severity`` (lo, hi): each sample's degradation severity is uniform in it.
    ``misalignment``: ``data.misalign.misalignment_from_options``'s options: RandomMisalignment's
    keyword arguments for the ``large`` regime, and ``regime`` or ``regimes`` (weights).
    ``whole_image_degradations``: degradations synthesised on the whole clean image before the
    crop, as a scanner makes them, instead of on the crop. Motion needs it: its ghosts are copies
    of the whole field of view, while on a 32-voxel crop of a 1 mm head a movement of up to 10 mm
    shifts a third of the crop, a stronger artefact than the whole volume shows (on a 176³ T2 the
    spectral slope of a 32³ window rises by 0.22 when the motion is made on the window, by 0.07
    when it is made on the volume; bench/probe_statistics_resampling.py). Metal stays on the
    crop, so that every "metal" crop holds metal.
    """

    with_color = False

    def __init__(
        self,
        *,
        seed: int,
        stream: int,
        none_fraction: float,
        crop: tuple[int, ...] | None = None,
        severity: tuple[float, float] = DEFAULT_SEVERITY,
        misalignment: dict[str, float] | None = None,
        whole_image_degradations: tuple[str, ...] = (),
    ) -> None:
        from napari_unifuse.data.degrade import DEGRADATION_CLASSES

        if not 0.0 <= none_fraction <= 1.0:
            raise InputError(f"none_fraction must be in [0, 1], got {none_fraction}", "data.none_fraction")
        if len(severity) != 2 or not 0.0 <= severity[0] <= severity[1] <= 1.0:
            raise InputError(f"severity must be [low, high] within [0, 1], got {severity}", "data.severity")
        self.seed = seed
        self.stream = stream
        self.none_fraction = none_fraction
        self.crop = tuple(crop) if crop else None
        self.severity = tuple(float(v) for v in severity)
        self.misalignment = dict(misalignment or {})
        unknown = sorted(set(whole_image_degradations) - set(DEGRADATION_CLASSES))
        if unknown:
            raise InputError(f"unknown degradations {unknown}; known: {list(DEGRADATION_CLASSES)}",
                             "data.whole_image_degradations")
        self.whole_image_degradations = tuple(whole_image_degradations)
        _RecordingMisalignment(self.misalignment)  # fails now, not in a worker, on a bad option
        self.epoch = 0
        self.metal_fallbacks = 0  # samples of this process made without metal for want of room (__getitem__)

    def case_names(self) -> list[str]:
        """The cases (patients) this split's samples come from; none for generated pairs."""
        return []

    def _refuse_motion_without_movement(self, degradations: set[str]) -> None:
        """Motion's movements scale with the severity (data.degrade): with a high bound of 0 every
        sample labelled motion would be clean, and the classifier would learn a wrong label."""
        if "motion" in degradations and self.severity[1] == 0.0 and self.none_fraction < 1.0:
            raise InputError(f"severity {list(self.severity)} draws no movement for motion, so its samples would be "
                             "clean yet labelled motion: give a high bound above 0", "data.severity")

    def set_epoch(self, epoch: int) -> None:
        """Validation datasets ignore this: their samples are the same at every evaluation."""
        if self.stream == TRAIN_STREAM:
            self.epoch = epoch

    def clean_pair(self, index: int, rng: np.random.Generator) -> CleanPair:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The sample of ``index`` this epoch.

        A crop with no tissue deep enough for the metal insert it drew is drawn again from the next
        seed, up to METAL_REDRAWS times; after that the sample is made without metal and labelled
        "none" (a warning counts them), so that a sample labelled metal always holds metal and one
        unlucky crop cannot stop a run, which would hit it again on --resume.
        """
        from napari_unifuse.data.metal import NoRoomForMetal

        for redraw in range(METAL_REDRAWS + 1):
            try:
                return self._sample(index, sample_rng(self.seed, self.stream, self.epoch, index, redraw))
            except NoRoomForMetal:
                continue
        self.metal_fallbacks += 1
        if math.log10(self.metal_fallbacks).is_integer():  # 1, 10, 100, ...: counted, not one line per sample
            warnings.warn(f"{self.metal_fallbacks} sample(s) so far found no tissue deep enough for a metal "
                          f"insert in {METAL_REDRAWS + 1} crops and trained as 'none'; a larger data.crop avoids it",
                          stacklevel=2)
        return self._sample(index, sample_rng(self.seed, self.stream, self.epoch, index), metal_allowed=False)

    def _sample(self, index: int, rng: np.random.Generator, metal_allowed: bool = True) -> dict[str, torch.Tensor]:
        from napari_unifuse.data.color import rgb_to_ycbcr
        from napari_unifuse.data.misalign import warp_array
        from napari_unifuse.data.pairs import MISALIGNMENT_ORDER, degrade_label, make_pair
        from napari_unifuse.io import Geometry, ImageVolume

        clean = self.clean_pair(index, rng)
        if not metal_allowed and clean.degradation == "metal":
            clean = replace(clean, degradation="none")
        reference, label = clean.reference, clean.label
        ndim = reference.ndim
        geometry = Geometry(np.asarray(clean.spacing, dtype=np.float64), np.zeros(ndim), np.eye(ndim))
        degraded = None
        # Two orders of the same draws: a config without whole-image degradations keeps the samples
        # (and so the checkpoints) it always made.
        if clean.degradation in self.whole_image_degradations:
            task = "none" if rng.random() < self.none_fraction else clean.degradation
            severity = float(rng.uniform(*self.severity))
            whole = ImageVolume(label, geometry, dict(clean.label_metadata), is_rgb=clean.is_rgb)
            degraded = degrade_label(whole, task, rng, severity)
            if self.crop is not None:
                reference, label, degraded_array = random_crop([reference, label, degraded.array], self.crop, rng)
                degraded = replace(degraded, array=degraded_array)
        else:
            if self.crop is not None:
                reference, label = random_crop([reference, label], self.crop, rng)
            task = "none" if rng.random() < self.none_fraction else clean.degradation
            severity = float(rng.uniform(*self.severity))
        recorder = _RecordingMisalignment(self.misalignment)
        pair = make_pair(
            ImageVolume(reference, geometry),
            ImageVolume(label, geometry, dict(clean.label_metadata), is_rgb=clean.is_rgb),
            task,
            rng,
            severity=severity,
            misalignment=recorder,
            degraded=degraded,
        )
        moving = np.asarray(pair.moving.array, dtype=np.float32)
        inverse = recorder.last.inverse_displacement()
        moving_clean = np.clip(warp_array(label, inverse, order=MISALIGNMENT_ORDER), 0.0, 1.0)
        sample = {
            "reference": _tensor(reference),
            "displacement": torch.from_numpy(np.asarray(pair.displacement, dtype=np.float32)),
            "class_index": torch.tensor(int(pair.class_index), dtype=torch.int64),
            # I'_R for L_moda (Eq. 4): the reference moved exactly like the moving image.
            "reference_misaligned": _tensor(warp_array(reference, inverse)),
        }
        if clean.is_rgb:
            moving_ycbcr, label_ycbcr = rgb_to_ycbcr(moving), rgb_to_ycbcr(label)
            sample["moving"], sample["label"] = _tensor(moving_ycbcr[..., 0]), _tensor(label_ycbcr[..., 0])
            sample["moving_clean"] = _tensor(rgb_to_ycbcr(moving_clean)[..., 0])
            sample["cbcr"] = torch.from_numpy(np.moveaxis(moving_ycbcr[..., 1:], -1, 0).copy())
            sample["label_cbcr"] = torch.from_numpy(np.moveaxis(label_ycbcr[..., 1:], -1, 0).copy())
            sample["is_color"] = torch.tensor(1.0)
        else:
            sample["moving"], sample["label"] = _tensor(moving), _tensor(label)
            sample["moving_clean"] = _tensor(moving_clean)
            if self.with_color:
                # Neutral chroma so that grey and colour samples share one batch.
                neutral = torch.full((2, *reference.shape), NEUTRAL_CHROMA)
                sample.update(cbcr=neutral, label_cbcr=neutral.clone(), is_color=torch.tensor(0.0))
        return sample


def _tensor(array: np.ndarray) -> torch.Tensor:
    """(*spatial) array -> (1, *spatial) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]


def _resize(image: np.ndarray, size: tuple[int, ...] | None) -> np.ndarray:
    """Resize the leading spatial axes (a trailing colour axis is kept) with anti-aliasing."""
    if size is None or tuple(image.shape[: len(size)]) == tuple(size):
        return image
    from skimage.transform import resize

    output_shape = tuple(size) + image.shape[len(size):]
    return resize(image, output_shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


class HarvardPairs(SyntheticPairDataset):
    """Harvard AANLIB 2D pairs (``training.harvard``); PET/SPECT fuse Y and carry CbCr."""

    with_color = True

    def __init__(
        self,
        pairs: list[harvard.HarvardPair],
        *,
        size: tuple[int, int] | None = None,
        **synthesis: Any,
    ) -> None:
        super().__init__(**synthesis)
        if not pairs:
            raise InputError("no Harvard pairs in this split", "data")
        self.pairs = list(pairs)
        self.size = tuple(size) if size else None
        self._cache: dict[int, CleanPair] = {}

    def case_names(self) -> list[str]:
        return [str(case) for case in sorted({pair.case for pair in self.pairs})]

    def __len__(self) -> int:
        return len(self.pairs)

    def clean_pair(self, index: int, rng: np.random.Generator) -> CleanPair:
        if index not in self._cache:
            pair = self.pairs[index]
            reference, moving = harvard.read_harvard_pair(pair)
            self._cache[index] = CleanPair(
                reference=_resize(reference, self.size),
                label=_resize(moving, self.size),
                degradation=MODALITY_DEGRADATION[pair.modality],
                spacing=_harvard_spacing(reference.shape, self.size),
            )
        return self._cache[index]


def _harvard_spacing(native: tuple[int, ...], size: tuple[int, ...] | None) -> tuple[float, ...]:
    """The mm per pixel of a Harvard pair of ``native`` (height, width) resized to ``size``: the
    atlas PNGs carry no spacing, taken as 1 mm per pixel at the native 256²."""
    return tuple(r / n for r, n in zip(native, size or native))


# Which phantom modality is the reference and which the moving one, per task (paper §4.1).
PHANTOM_TASKS: dict[str, tuple[str, str]] = {
    "t1-t2": ("t1", "t2"),  # T2 with motion artefacts onto T1
    "mr-ct": ("t1", "ct"),  # CT with metal artefacts + noise onto MRI
    "ct-pet": ("ct", "pet"),  # low-dose PET onto CT
}


PHANTOM_INTENSITY = {"t1": "mr", "t2": "mr", "ct": "ct", "pet": "pet"}


class PhantomPairs(SyntheticPairDataset):
    """Brain phantoms (data.phantoms): random 3D crops, or random axial slices for 2D models.

    ``length`` samples per epoch; each draws a task from ``tasks`` and a random window.
    """

    def __init__(
        self,
        *,
        length: int,
        spatial_dims: int,
        shapes: tuple[tuple[int, int, int], ...],
        tasks: tuple[str, ...] = tuple(PHANTOM_TASKS),
        shape_weights: tuple[float, ...] | None = None,
        **synthesis: Any,
    ) -> None:
        super().__init__(**synthesis)
        if not shapes:
            raise InputError("give at least one phantom shape", "data.shapes")
        if shape_weights is not None and (len(shape_weights) != len(shapes) or min(shape_weights) < 0
                                          or sum(shape_weights) <= 0):
            raise InputError(f"shape_weights must give one non-negative weight per shape ({len(shapes)}), "
                             f"not all zero; got {list(shape_weights)}", "data.shape_weights")
        unknown = sorted(set(tasks) - set(PHANTOM_TASKS))
        if unknown:
            raise InputError(f"unknown phantom tasks {unknown}; known: {sorted(PHANTOM_TASKS)}", "data.tasks")
        if spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims}", "data")
        self.length = int(length)
        self.spatial_dims = spatial_dims
        self.shapes = tuple(tuple(int(side) for side in shape) for shape in shapes)
        self.tasks = tuple(tasks)
        self._refuse_motion_without_movement({moving_degradation(PHANTOM_TASKS[task][1]) for task in self.tasks})
        self.shape_probabilities = (None if shape_weights is None
                                    else np.asarray(shape_weights, dtype=np.float64) / sum(shape_weights))
        self._volumes: dict[tuple[int, ...], dict[str, Any]] | None = None

    def __len__(self) -> int:
        return self.length

    def _phantoms(self, shape: tuple[int, ...]) -> dict[str, Any]:
        # Built lazily so that each DataLoader worker makes its own copy once.
        if self._volumes is None:
            from napari_unifuse.data.phantoms import make_brain_phantoms
            from napari_unifuse.io import normalize_intensity

            modalities = sorted({m for task in self.tasks for m in PHANTOM_TASKS[task]})
            self._volumes = {}
            for size in self.shapes:
                volumes = make_brain_phantoms(shape=size, modalities=tuple(modalities))
                # Model inputs are [0, 1] (CT through the standard HU window, PET by percentiles);
                # the CT window goes along so the metal simulation works in Hounsfield units.
                self._volumes[size] = {}
                for name, volume in volumes.items():
                    normalized, mapping = normalize_intensity(volume, PHANTOM_INTENSITY[name])
                    self._volumes[size][name] = (normalized.array.astype(np.float32), tuple(volume.geometry.spacing),
                                                 {"intensity_mapping": mapping.to_dict()})
        return self._volumes[shape]

    def clean_pair(self, index: int, rng: np.random.Generator) -> CleanPair:
        # With several phantom sizes each sample draws one, uniformly unless weighted (a single size
        # draws nothing, so its samples are those it always was).
        if len(self.shapes) == 1:
            shape = self.shapes[0]
        elif self.shape_probabilities is None:
            shape = self.shapes[int(rng.integers(len(self.shapes)))]
        else:
            shape = self.shapes[int(rng.choice(len(self.shapes), p=self.shape_probabilities))]
        volumes = self._phantoms(shape)
        reference_name, moving_name = PHANTOM_TASKS[self.tasks[int(rng.integers(len(self.tasks)))]]
        (reference, spacing, _), (label, _, label_metadata) = volumes[reference_name], volumes[moving_name]
        if self.spatial_dims == 2:
            # An axial slice from the central 60 % of the head, where there is tissue.
            depth = reference.shape[0]
            z = int(rng.integers(int(0.2 * depth), max(int(0.8 * depth), int(0.2 * depth) + 1)))
            reference, label, spacing = reference[z], label[z], spacing[1:]
        return CleanPair(reference=reference, label=label, degradation=MODALITY_DEGRADATION[moving_name],
                         spacing=spacing, label_metadata=label_metadata)


# Documented layouts of folders of aligned cases: <root>/<case>/<file>; {case} is the folder name.
FOLDER_LAYOUTS: dict[str, dict[str, str]] = {
    "brats": {"reference": "{case}_t1.nii.gz", "moving": "{case}_t2.nii.gz", "reference_modality": "mr",
              "moving_modality": "t2"},
    "synthrad": {"reference": "mr.nii.gz", "moving": "ct.nii.gz", "reference_modality": "mr", "moving_modality": "ct"},
    "fdg-petct": {"reference": "CT.nii.gz", "moving": "PET.nii.gz", "reference_modality": "ct",
                  "moving_modality": "pet"},
}


FOLDER_LAYOUT_KEYS = ("reference", "moving", "reference_modality", "moving_modality")


def moving_degradation(modality: str) -> str:
    """The degradation trained on a moving image of ``modality``: io's modality names and aliases
    (io.normalize.MODALITY_ALIASES: t1, flair, pt, nm, ...) in any case; "none" for "auto"."""
    from napari_unifuse.io.normalize import MODALITY_ALIASES

    key = str(modality).lower()
    return MODALITY_DEGRADATION.get(MODALITY_ALIASES.get(key, key), "none")


def folder_layout(data: dict[str, Any]) -> dict[str, str]:
    """The file patterns and modalities of a ``folders`` section: a named ``layout`` or the four
    FOLDER_LAYOUT_KEYS, never both (the layout would silently replace the keys given beside it).

    The modalities must be io's (any case, aliases included), and the moving one must name a
    degradation, unless ``none_fraction`` is 1 and no sample is degraded anyway."""
    from napari_unifuse.io.normalize import MODALITIES

    if "layout" in data:
        given = [key for key in FOLDER_LAYOUT_KEYS if key in data]
        if given:
            raise InputError(f"layout {data['layout']!r} sets {', '.join(FOLDER_LAYOUT_KEYS)}: give the layout "
                             f"or your own {', '.join(given)}, not both", "data")
        if data["layout"] not in FOLDER_LAYOUTS:
            raise InputError(f"unknown layout {data['layout']!r}; known: {sorted(FOLDER_LAYOUTS)}", "data.layout")
        return FOLDER_LAYOUTS[data["layout"]]
    missing = [key for key in FOLDER_LAYOUT_KEYS if key not in data]
    if missing:
        raise InputError(f"folders without a layout need {missing}", "data")
    layout = {key: str(data[key]) for key in FOLDER_LAYOUT_KEYS}
    for key in ("reference", "moving"):
        _refuse_unknown_placeholders(key, layout[key])
    for key in ("reference_modality", "moving_modality"):
        if layout[key].lower() not in MODALITIES:
            raise InputError(f"unknown {key} {layout[key]!r}; use one of {', '.join(MODALITIES)}", "data")
    if moving_degradation(layout["moving_modality"]) == "none" and data.get("none_fraction") != 1:
        raise InputError(f"moving_modality {layout['moving_modality']!r} picks no degradation to train on: use ct "
                         "(metal), mr, t1, t2, flair, pd, mri (motion), pet, pt, spect or nm (low dose), or "
                         "none_fraction: 1 to train on clean pairs only", "data")
    return layout


def _refuse_unknown_placeholders(key: str, pattern: str) -> None:
    """A file pattern may hold {case} alone: folder_cases fills in nothing else."""
    try:
        unknown = [name for _, name, _, _ in string.Formatter().parse(pattern) if name not in (None, "case")]
        held = "{" + unknown[0] + "}" if unknown else None
    except ValueError:
        held = "a lone brace"
    if held:
        raise InputError(f"data.{key} {pattern!r} holds {held}: the only placeholder is {{case}}, the case "
                         "folder's name (write a literal brace twice)", "data")


# Folders named when some sub-folders are skipped: enough to spot a naming slip.
SKIPPED_CASES_NAMED = 5


def _count(names: list, singular: str, plural: str) -> str:
    return f"{len(names)} {singular if len(names) == 1 else plural}"


def _named(names: list[str]) -> str:
    return ", ".join(names[:SKIPPED_CASES_NAMED]) + (", ..." if len(names) > SKIPPED_CASES_NAMED else "")


def _warn_once_per_job(message: str) -> None:
    """A warning of the start-up checks, from the first process alone: every process of a torchrun
    job (numbered by its RANK) builds the datasets and finds the same."""
    if is_first_process():
        warnings.warn(message, stacklevel=3)


@contextmanager
def _case_named(name: str) -> Iterator[None]:
    """An InputError raised inside names the case it concerns, which a cohort's file paths do not
    always make plain (``ref.nii.gz`` in every folder), and messages from deep inside never do."""
    try:
        yield
    except InputError as error:
        raise InputError(f"case {name}: {error.problem}", error.source) from error


def folder_cases(root: str | Path, layout: dict[str, str]) -> list[tuple[str, Path, Path]]:
    """(case, reference path, moving path) for every sub-folder of ``root`` holding both images (files,
    or DICOM series folders).

    The others are counted and named in a warning, those holding one of the two files (a case
    with a naming slip, CT vs ct) apart from those holding neither (``survival_info``: not a case)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("data folder not found", root)
    cases, lacking_one, holding_neither = [], [], []
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    for folder in folders:
        reference = folder / layout["reference"].format(case=folder.name)
        moving = folder / layout["moving"].format(case=folder.name)
        # A file, or a folder (a DICOM series, which read_image reads whole, as fuse and view do).
        if reference.exists() and moving.exists():
            cases.append((folder.name, reference, moving))
        elif reference.exists() or moving.exists():
            lacking_one.append(folder.name)
        else:
            holding_neither.append(folder.name)
    if not cases:
        raise InputError(f"no case folder holds both {layout['reference']} and {layout['moving']}", root)
    reasons = ([f"{_count(lacking_one, 'holds', 'hold')} only one of {layout['reference']} and {layout['moving']} "
                f"({_named(lacking_one)})"] if lacking_one else []) + (
               [f"{_count(holding_neither, 'holds', 'hold')} neither ({_named(holding_neither)})"]
               if holding_neither else [])
    if reasons:
        _warn_once_per_job(f"{root}: {len(lacking_one) + len(holding_neither)} of {len(folders)} sub-folders are "
                           f"skipped: {'; '.join(reasons)}")
    return cases


def _image_header(path: Path) -> ImageVolume:
    """``path`` as io.read_image places it (an ImageVolume), without decoding its voxels where the
    format allows: ``checked_cases`` checks the settings against every case before it decodes
    any, which for hundreds of volumes takes minutes. The array is a zero-strided stand-in of the
    image's shape, in the file's axis order. nibabel reads NIfTI headers alone and SimpleITK NRRD
    and MetaImage ones, as io.read_image reads each; DICOM series, pictures (small anyway), 4-D
    files and colour images are read whole."""
    import SimpleITK as sitk

    from napari_unifuse.io import Geometry, ImageVolume, read_image
    from napari_unifuse.io.readers import itk_source, readable_format

    file_format = readable_format(path)
    if file_format == "nifti":
        header = _nifti_header(path)
        return header if header is not None else read_image(path)
    if file_format == "itk":
        reader = sitk.ImageFileReader()
        try:
            with itk_source(path) as name:
                reader.SetFileName(name)
                reader.ReadImageInformation()
        except RuntimeError:
            pass  # io.read_image below says what is wrong with the file
        else:
            if reader.GetDimension() in (2, 3) and reader.GetNumberOfComponents() == 1:
                shape = tuple(int(side) for side in reader.GetSize())[::-1]
                return ImageVolume(np.broadcast_to(np.float32(0), shape), Geometry.from_sitk(reader), {}, str(path))
    return read_image(path)


def _nifti_header(path: Path) -> ImageVolume | None:
    """A grey 3-D or axial 2-D NIfTI's header as io.read_image places it: by nibabel's affine (the
    sform, else the qform) in mm. SimpleITK's reading can differ (a negative stored pixdim, which
    it gives as a negative spacing; forms that disagree, of which it may take the other), and these
    checks must judge the pair that trains, which is read as ``unifuse fuse`` reads it. None for
    any other file (a slice off the axial plane, 4-D, colour, unreadable): read_image reads it whole."""
    from napari_unifuse.io import Geometry, ImageVolume
    from napari_unifuse.io.readers import in_an_axial_plane, load_nifti, nifti_affine_mm

    try:
        image: Any = load_nifti(path)  # the header alone: the voxels load on first use
    except Exception:  # noqa: BLE001 - read_image says what is wrong with the file
        return None
    ndim = len(image.shape)
    if ndim not in (2, 3) or image.get_data_dtype().names is not None:
        return None
    affine = nifti_affine_mm(image)
    if ndim == 2 and not in_an_axial_plane(affine):
        return None
    return ImageVolume(np.broadcast_to(np.float32(0), image.shape[::-1]), Geometry.from_ras_affine(affine, ndim),
                       {}, str(path))


def _stored_in_another_order(image: ImageVolume) -> bool:
    """Whether ``image`` is a volume whose file stores its axes in another order than the world's
    (a coronal or sagittal NIfTI), which ``FolderPairs`` reorients."""
    return image.ndim == 3 and image.geometry.world_axis_order() != (0, 1, 2)


def _training_shape(reference: ImageVolume) -> tuple[int, ...]:
    """The spatial shape a case trains at: in world axis order, as ``FolderPairs`` reads it (from
    the geometry: a header's stand-in array is not transposed), and a one-slice volume as its
    slice, a 2-D image, as ``unifuse fuse`` fuses it (engine.input_checks.model_dimensions)."""
    from napari_unifuse.io.image import single_slice_axis_of

    shape = tuple(reference.spatial_shape)
    if _stored_in_another_order(reference):
        shape = tuple(shape[axis] for axis in reference.geometry.world_axis_order())
    axis = single_slice_axis_of(shape)
    return shape[:axis] + shape[axis + 1:] if axis is not None else shape


def _training_spacing(reference: ImageVolume) -> tuple[float, ...]:
    """The mm per voxel a case trains with: its reference's, which ``reference`` holds in world axis
    order, less the slice axis of a one-slice volume, which trains as its slice."""
    spacing = [float(side) for side in reference.geometry.spacing]
    if reference.single_slice_axis is not None:
        del spacing[reference.single_slice_axis]
    return tuple(spacing)


# Why a CT moving image whose samples draw metal needs square pixels (data.degrade.Metal's scan).
METAL_NEEDS_SQUARE_PIXELS = "the metal artefacts of a CT moving image are simulated on square pixels only"


def _rectangular_pixels(spacing: tuple[float, ...]) -> str | None:
    """How the pixels of the plane the CT simulation scans (the last two axes) are not square, or None."""
    if spacing[-2] == spacing[-1]:  # data.degrade.Metal compares them exactly too
        return None
    return f"{spacing[-1]:g}×{spacing[-2]:g} mm (x×y)"


def _how_the_file_lists(reference: ImageVolume) -> str:
    """How a size in world axis order relates to the one the case's file header lists."""
    if _stored_in_another_order(reference):
        stored = "×".join(str(side) for side in reversed(reference.spatial_shape))
        return (f" in world axis order, as training reads it (its file lists {stored}, its axes stored in "
                "another order)")
    return ", x first as nibabel and the file's header list them"


def _in_file_order(shape: tuple[int, ...]) -> str:
    """An array-order (z, y, x) shape as file headers, nibabel and ITK list it: x first."""
    return "×".join(str(side) for side in reversed(shape)) + (" (x×y×z)" if len(shape) == 3 else " (x×y)")


def _in_array_order(shape: tuple[int, ...]) -> str:
    """A shape as data.crop lists it: array order, z first."""
    return f"{list(shape)} ({'z, y, x' if len(shape) == 3 else 'y, x'})"


# What training makes of a moving image that covers only part of its reference (engine.inference.overlap_warnings).
TRAINING_OUTSIDE_THE_MOVING_IMAGE = "the label is 0 there and the network learns to fuse onto an empty image"


def _overlapping_cases(cases: list[tuple[str, Path, Path]], headers: dict[str, tuple[ImageVolume, ImageVolume]],
                       root: Path) -> list[tuple[str, Path, Path]]:
    """The cases whose moving image reaches their reference in space; the others are skipped with
    a warning that names them (a constant label would train the network to ignore the moving
    image), like the folders that lack a file. Partial coverage is warned about, case by case."""
    from napari_unifuse.engine.inference import overlap_warnings

    kept, apart = [], []
    for case in cases:
        reference, moving = headers[case[0]]
        if reference.ndim != moving.ndim:
            kept.append(case)  # a slice paired with a volume: resampled in 3-D when read (clean_pair)
            continue
        try:
            problems = overlap_warnings(reference, moving, outside=TRAINING_OUTSIDE_THE_MOVING_IMAGE)
        except InputError as error:
            apart.append(f"{case[0]} ({error.problem})")
            continue
        for problem in problems:
            _warn_once_per_job(f"{root}: case {case[0]}: {problem}")
        kept.append(case)
    if apart and not kept:
        raise InputError(f"no case's moving image overlaps its reference in space: {_named(apart)}", root)
    if apart:
        _warn_once_per_job(f"{root}: {len(apart)} of {len(cases)} cases are skipped, their moving image lying "
                           f"outside their reference: {'; '.join(apart[:SKIPPED_CASES_NAMED])}")
    return kept


def checked_cases(cases: list[tuple[str, Path, Path]], spatial_dims: int, crop: tuple[int, ...] | None,
                  root: Path, *, metal_drawn: bool = False,
                  sides: NetworkSides | None = None) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """The cases fit to train on, and those of them whose moving image is in colour, checked
    before the first step (every case: one that fails mid-run costs the steps before it and saves
    no checkpoint): first from their headers, so that a setting that fits no case is refused at
    once, then every kept case's voxels, read whole one case at a time and let go.

    Cases whose moving image misses the reference are skipped (warned); a colour reference, a model
    of other dimensions than the images, cases of 2-D and 3-D images mixed, a case smaller than
    ``crop``, cases of different sizes without a crop (their samples cannot share a batch), or of a
    size the network cannot train on (``sides``) without a crop, a
    file that cannot be read whole or holds no finite voxel (as fusion refuses it), a blank image
    and, where samples draw metal (``metal_drawn``), pixels the CT simulation cannot scan are
    refused, naming the case and its size, in world axis order as training reads it, x first.
    What the readers noted about a file (NaN voxels filled, a DICOM slice missing: fusion warns of
    them too) is warned about, naming the case."""
    from napari_unifuse.engine.input_checks import model_dimensions
    from napari_unifuse.io import read_image

    headers = {}
    for name, reference, moving in cases:
        with _case_named(name):
            headers[name] = (_image_header(reference), _image_header(moving))
            if headers[name][0].is_rgb:
                # Its colour axis would be taken for a spatial one at the first sample.
                raise InputError("the reference image is in colour: training reads a grey reference (the image "
                                 "the moving one is fused onto); save it as greyscale or remove the case", reference)
    cases = _overlapping_cases(cases, headers, root)
    dimensions = {name: model_dimensions(headers[name][0]) for name, _, _ in cases}
    shapes = {name: _training_shape(headers[name][0]) for name, _, _ in cases}
    reference_of = {name: reference for name, reference, _ in cases}
    one_slice = " (a one-slice volume is a 2-D image, as unifuse fuse reads it)"
    if len(set(dimensions.values())) > 1:
        # The fewer kind is the odd one out: usually one stray file in a cohort of the other.
        counts = {dims: list(dimensions.values()).count(dims) for dims in set(dimensions.values())}
        odd_dims = min(counts, key=lambda dims: (counts[dims], dims != spatial_dims))
        odd = [name for name, dims in dimensions.items() if dims == odd_dims]
        listed = ", ".join(f"{name}: {reference_of[name].name} {_in_file_order(shapes[name])}"
                           for name in odd[:SKIPPED_CASES_NAMED])
        other_dims = next(dims for dims in counts if dims != odd_dims)
        slices = any(headers[name][0].single_slice_axis is not None for name in dimensions)
        raise InputError(f"cases mix 2-D and 3-D images: {len(odd)} of {len(cases)} "
                         f"{'is' if len(odd) == 1 else 'are'} {odd_dims}-D ({listed}), the others "
                         f"{other_dims}-D{one_slice if slices else ''}; train each kind in a run of its own", root)
    image_dims = next(iter(dimensions.values()))
    if image_dims != spatial_dims:
        slices = any(headers[name][0].single_slice_axis is not None for name in dimensions)
        raise InputError(f"model.spatial_dims is {spatial_dims} but the images are {image_dims}D"
                         f"{one_slice if slices else ''}: set model.spatial_dims: {image_dims}",
                         reference_of[next(iter(dimensions))])
    smallest = _smallest_sides(shapes)
    if crop is not None:
        if misfit := _smaller_than_crop(shapes, crop):
            name, shape = misfit
            raise InputError(f"case {name} is {_in_file_order(shape)} voxels{_how_the_file_lists(headers[name][0])},"
                             f" smaller than data.crop {_in_array_order(crop)} = {_in_file_order(crop)}; a data.crop "
                             f"of at most {_in_array_order(smallest)} fits every case", reference_of[name])
    elif len(set(shapes.values())) > 1:
        (first, first_shape), (other, other_shape) = next(
            ((a, shapes[a]), (b, shapes[b])) for a in shapes for b in shapes if shapes[a] != shapes[b])
        # Batch size 1 is no way out: the network also needs every side a multiple of its size_multiple.
        raise InputError(f"cases differ in size ({first} is {_in_file_order(first_shape)}, {other} "
                         f"{_in_file_order(other_shape)}) and data.crop is not set, so their samples cannot share "
                         f"a batch: set data.crop, random windows of one size (at most {_in_array_order(smallest)} "
                         "fits every case)", root)
    elif sides:
        shape = next(iter(shapes.values()))  # one size: every case's
        sides.refuse(shape, f"the cases train whole at {_in_file_order(shape)} voxels, data.crop not being set",
                     "set data.crop, random windows of such a size (e.g. {fit}, in array order)", root)
    for name, reference, moving in cases:
        with _case_named(name):
            for path in (reference, moving):
                image = read_image(path)  # refuses a truncated file and one without a finite voxel
                if image.array.min() == image.array.max():
                    # As a label missing the reference would, a blank image trains the network to ignore it.
                    raise InputError(f"the image holds one value everywhere ({image.array.flat[0]:g}): a blank "
                                     "image teaches the network nothing of its pair; remove the case", path)
                if metal_drawn and path == reference:
                    # Else the run stops at the case's first metal sample, maybe epochs in.
                    if pixels := _rectangular_pixels(_training_spacing(image.in_world_axis_order())):
                        raise InputError(f"its in-plane pixels are {pixels}, and {METAL_NEEDS_SQUARE_PIXELS}: "
                                         "resample the case's images to square in-plane pixels or remove the case",
                                         path)
                for note in image.metadata.get("warnings", []):
                    _warn_once_per_job(f"{root}: case {name}: {path.name}: {note}")
    return cases, [name for name, _, _ in cases if headers[name][1].is_rgb]


def _smallest_sides(shapes: dict[Any, tuple[int, ...]]) -> tuple[int, ...]:
    """The largest window that fits in every one of ``shapes``."""
    return tuple(int(side) for side in np.min(list(shapes.values()), axis=0))


def _smaller_than_crop(shapes: dict[Any, Any], crop: tuple[int, ...]) -> tuple[Any, Any] | None:
    """The first (key, shape) of ``shapes`` smaller than ``crop`` along an axis, or None."""
    return next(((key, shape) for key, shape in shapes.items() if any(side < c for side, c in zip(shape, crop))),
                None)


def check_harvard_pairs(pairs: list[harvard.HarvardPair], crop: tuple[int, ...] | None,
                        size: tuple[int, ...] | None, root: Path, *, batched: bool = True,
                        metal_drawn: bool = False, sides: NetworkSides | None = None) -> None:
    """Every pair readable, not blank, and its two images of one size (``harvard.pair_shape``), and
    the sizes they train at fit to share a batch: ``size`` resizes every pair to it, ``crop`` must
    fit in every pair, and, when ``batched``, pairs of different sizes need one of the two; without
    a crop, the size they train at must be one the network trains on (``sides``). Where
    CT samples draw metal (``metal_drawn``), ``size`` must keep a CT pair's pixels square. Checked
    before the first step, as ``checked_cases`` checks a folder's cases."""
    native = {pair: harvard.pair_shape(pair) for pair in pairs}  # every pair checked, resized or not
    if metal_drawn and size:
        for pair, shape in native.items():
            pixels = _rectangular_pixels(_harvard_spacing(shape, size))
            if MODALITY_DEGRADATION[pair.modality] == "metal" and pixels:
                raise InputError(f"data.size {_in_array_order(size)} resizes {pair.name}, {_in_file_order(shape)} "
                                 f"pixels of 1 mm, to pixels of {pixels}, and {METAL_NEEDS_SQUARE_PIXELS}: give "
                                 "data.size the pair's aspect ratio, set data.crop instead, or remove the pair",
                                 pair.reference_path)
    shapes = dict.fromkeys(native, size) if size else native
    smallest = _smallest_sides(shapes)
    if crop is not None:
        if misfit := _smaller_than_crop(shapes, crop):
            pair, shape = misfit
            raise InputError(f"{pair.name} is {_in_file_order(shape)}{' (data.size)' if size else ''}, "
                             f"smaller than data.crop {_in_array_order(crop)}; a data.crop of at most "
                             f"{_in_array_order(smallest)} fits every pair", pair.reference_path)
    elif batched and len(set(shapes.values())) > 1:
        # The rarer size is the odd one out: usually a stray file in a folder of the other.
        counts = {shape: list(shapes.values()).count(shape) for shape in set(shapes.values())}
        common = max(counts, key=counts.__getitem__)
        odd = next(pair for pair, shape in shapes.items() if shape != common)
        typical = next(pair for pair, shape in shapes.items() if shape == common)
        raise InputError(f"pairs differ in size ({odd.name} is {_in_file_order(shapes[odd])} where {counts[common]} "
                         f"of {len(shapes)}, {typical.name} among them, are {_in_file_order(common)}) and neither "
                         "data.crop nor data.size is set, so their samples cannot share a batch: set data.size "
                         f"(e.g. {common[0]}) to resize every pair, or data.crop (at most {_in_array_order(smallest)} "
                         "fits every pair)", root)
    elif sides and size:
        sides.refuse(size, _in_array_order(size), "give e.g. {fit}", "data.size")
    elif sides:
        pair, shape = next(iter(shapes.items()))  # one size: every pair's
        sides.refuse(shape, f"the pairs ({pair.name} among them) train whole at {_in_file_order(shape)} pixels, "
                     "neither data.crop nor data.size being set", "set data.crop (e.g. {fit}, y, x) or data.size",
                     root)


def refuse_empty_validation(validation: list, count: int, val_fraction: float, root: Any) -> None:
    """Training picks its best checkpoint on the validation split (and logs its scores), so an
    empty one would leave a run with no best checkpoint and scores of NaN."""
    if validation:
        return
    remedy = ("add cases: training needs at least 2, one held out for validation" if count < 2 else
              "set data.val_fraction above 0 (e.g. 0.15; at least one case is then held out)")
    raise InputError(f"the validation split is empty ({count} case{'s' if count != 1 else ''}, val_fraction "
                     f"{val_fraction:g}): the run validates on held-out cases and keeps the best checkpoint by "
                     f"them; {remedy}", root)


def split_by_case(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split of whole cases; at least one case each side when there are two or more."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}", "data.val_fraction")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(round(val_fraction * len(items)))
    if val_fraction > 0 and len(items) > 1:
        n_val = min(max(n_val, 1), len(items) - 1)
    validation = sorted(order[:n_val].tolist())
    return [items[i] for i in range(len(items)) if i not in set(validation)], [items[i] for i in validation]


class FolderPairs(SyntheticPairDataset):
    """Aligned NIfTI pairs in case folders; volumes are read once, normalised, cropped at random.

    Volumes train in world axis order (``ImageVolume.in_world_axis_order``), as every fusion entry
    point fuses them: the network is not invariant to the order of its axes, so a coronal file
    trains like its axial twin, and the CT simulation scans the world's axial planes.
    ``build_datasets`` hands it the cases ``checked_cases`` kept; one-slice volumes train as 2-D images.
    ``with_color``: grey samples carry neutral chroma too, for a cohort with colour moving images."""

    def __init__(
        self,
        cases: list[tuple[str, Path, Path]],
        layout: dict[str, str],
        *,
        samples_per_case: int = 1,
        with_color: bool = False,
        **synthesis: Any,
    ) -> None:
        super().__init__(**synthesis)
        if not cases:
            raise InputError("no cases in this split", "data")
        self.with_color = with_color
        self.cases = list(cases)
        self.layout = layout
        self._refuse_motion_without_movement({moving_degradation(layout["moving_modality"])})
        self.samples_per_case = int(samples_per_case)
        self._cache: dict[int, CleanPair] = {}

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def case_names(self) -> list[str]:
        return [name for name, _, _ in self.cases]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The sample, or an InputError naming its case: one a cohort's check could not foresee
        stops the run, and the user must know which case to fix."""
        with _case_named(self.cases[index // self.samples_per_case][0]):
            return super().__getitem__(index)

    def clean_pair(self, index: int, rng: np.random.Generator) -> CleanPair:
        case_index = index // self.samples_per_case
        if case_index not in self._cache:
            from napari_unifuse.io import normalize_intensity, read_image, resample_to_reference

            _, reference_path, moving_path = self.cases[case_index]
            reference = read_image(reference_path).in_world_axis_order()
            moving = read_image(moving_path).in_world_axis_order()
            if not moving.on_grid_of(reference):
                moving = resample_to_reference(moving, reference)
            reference_normalized, _ = normalize_intensity(reference, self.layout["reference_modality"])
            moving_normalized, mapping = normalize_intensity(moving, self.layout["moving_modality"])
            # A one-slice volume trains as its slice, a 2-D image, as `unifuse fuse` fuses it
            # (engine.input_checks.model_dimensions); the moving image is on its grid by now.
            slice_axis = reference.single_slice_axis
            reference_array, label_array = reference_normalized.array, moving_normalized.array
            if slice_axis is not None:
                reference_array, label_array = (np.take(array, 0, axis=slice_axis)
                                                for array in (reference_array, label_array))
            self._cache[case_index] = CleanPair(
                reference=np.asarray(reference_array, dtype=np.float32),
                label=np.asarray(label_array, dtype=np.float32),
                degradation=moving_degradation(self.layout["moving_modality"]),
                spacing=_training_spacing(reference),
                label_metadata={"intensity_mapping": mapping.to_dict()},
            )
        return self._cache[case_index]


@dataclass(frozen=True)
class NetworkSides:
    """The sides a network trains on: multiples of ``multiple``, at least ``smallest``
    (training.trainer.trainable_sides). Checked before the first step, which would otherwise
    stop with the network's own message, naming no setting."""

    multiple: int
    smallest: int

    def refuse(self, shape: tuple[int, ...], what: str, remedy: str, source: Any) -> None:
        """Refuse ``shape`` (array order), called ``what``, unless every side fits; ``remedy``
        may hold ``{fit}``, the nearest shape below it that fits."""
        if all(side % self.multiple == 0 and side >= self.smallest for side in shape):
            return
        fit = [max(self.smallest, side // self.multiple * self.multiple) for side in shape]
        raise InputError(f"{what}: not sides the network trains on (multiples of {self.multiple}, at least "
                         f"{self.smallest}); {remedy.format(fit=fit)}", source)


def _size(value: Any, spatial_dims: int, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    size = (int(value),) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != spatial_dims or min(size) < 1:
        raise InputError(f"{what} must be one size or {spatial_dims} sizes, got {value!r}", "data")
    return size


COMMON_DATA_KEYS = {"kind", "none_fraction", "severity", "misalignment", "crop", "whole_image_degradations",
                    "extra_sources"}
# What an extra source inherits from the section that lists it, unless it sets its own.
INHERITED_DATA_KEYS = ("none_fraction", "severity", "misalignment", "crop", "whole_image_degradations")


class MixedPairs(ConcatDataset):
    """The samples of several sources one after the other (``data.extra_sources``).

    ``set_epoch`` reaches every source. When one of them carries chroma (Harvard), the grey ones
    get neutral chroma too, so that samples of all sources share a batch."""

    def __init__(self, sources: list[SyntheticPairDataset]) -> None:
        super().__init__(sources)
        if any(source.with_color for source in sources):
            for source in sources:
                source.with_color = True

    def set_epoch(self, epoch: int) -> None:
        for source in self.datasets:
            cast(SyntheticPairDataset, source).set_epoch(epoch)

    def case_names(self) -> list[str]:
        """Each source's cases, those of ``extra_sources[k]`` named so (two sources may share a name)."""
        return [name if number == 0 else f"extra_sources[{number - 1}]:{name}"
                for number, source in enumerate(self.datasets)
                for name in cast(SyntheticPairDataset, source).case_names()]


DATA_KEYS = {
    "harvard": {"root", "tasks", "val_fraction", "split_seed", "size"},
    "phantom": {"shape", "shapes", "shape_weights", "tasks", "train_length", "val_length"},
    "folders": {"root", "layout", "reference", "moving", "reference_modality", "moving_modality",
                "val_fraction", "split_seed", "samples_per_case"},
}


def build_datasets(data: dict[str, Any], *, seed: int, spatial_dims: int, batched: bool = True,
                   sides: NetworkSides | None = None,
                   ) -> tuple[SyntheticPairDataset | MixedPairs, SyntheticPairDataset | MixedPairs]:
    """(train, validation) datasets for a config's ``data`` section. ``batched``: the samples must
    share batches (training), so Harvard pairs of several sizes need data.crop or data.size; a
    caller reading them one at a time (``unifuse evaluate``) passes False. ``sides``: the sides the
    network trains on, which every sample's shape (data.crop, data.size or the images') must have.

    ``extra_sources``: a list of further ``data`` sections (any kind, no ``extra_sources`` of their
    own) whose samples are appended to both splits (``MixedPairs``); each inherits
    none_fraction, severity, misalignment and crop from this section unless it sets them, and the
    k-th draws its samples with seed + k.

    every kind: none_fraction 0.2, severity [0.25, 0.75], misalignment {RandomMisalignment
              keyword arguments}, crop (one size or one per axis), whole_image_degradations
              [] (e.g. [motion]: synthesised on the whole image, then cropped)
    harvard:  root, tasks [CT-MRI, PET-MRI, SPECT-MRI], val_fraction 0.15, split_seed 0, size
              (resize, e.g. 128)
    phantom:  shape [64, 64, 64] (or shapes: several sizes of the whole-head phantom, one drawn per
              sample, so that crops see the anatomy at several voxel sizes; shape_weights: how
              often each is drawn, uniform by default), tasks [t1-t2, mr-ct, ct-pet],
              train_length 256, val_length 16
    folders:  root, layout (brats | synthrad | fdg-petct) or reference/moving patterns with
              reference_modality/moving_modality, val_fraction, split_seed, samples_per_case
    """
    extras = data.get("extra_sources") or []
    if not isinstance(extras, list) or not all(isinstance(extra, dict) for extra in extras):
        raise InputError("data.extra_sources must be a list of data sections", "data.extra_sources")
    if not extras:
        return _build_source(data, seed=seed, spatial_dims=spatial_dims, batched=batched, sides=sides)
    if any("extra_sources" in extra for extra in extras):
        raise InputError("an extra source cannot list extra sources of its own", "data.extra_sources")
    inherited = {key: data[key] for key in INHERITED_DATA_KEYS if key in data}
    # Each source its own seed: the k-th sample of every source would otherwise draw the same
    # degradation, severity and misalignment.
    splits = [_build_source(data, seed=seed, spatial_dims=spatial_dims, batched=batched, sides=sides)] + [
        _build_source({**inherited, **extra}, seed=seed + number, spatial_dims=spatial_dims,
                      where=f"data.extra_sources[{number - 1}]", batched=batched, sides=sides)
        for number, extra in enumerate(extras, start=1)]
    return MixedPairs([train for train, _ in splits]), MixedPairs([val for _, val in splits])


def narrowed_validation(data: dict[str, Any], *, seed: int, spatial_dims: int, task: str, regime: str,
                        length: int) -> SyntheticPairDataset | MixedPairs:
    """The validation split of a config's ``data`` section with one task and one misalignment
    regime, and at least ``length`` samples: the samples beyond the config's ``val_length`` come
    from the same validation stream (the first ones stay as they were; training never draws from
    it), so that a larger sample narrows an estimate's interval."""
    from napari_unifuse.data.misalign import LARGE_REGIME_OPTIONS

    # The large regime's options shape only that regime (a section drawing another one refuses them).
    misalignment = {key: value for key, value in (data.get("misalignment") or {}).items()
                    if regime == "large" and key in LARGE_REGIME_OPTIONS}
    misalignment["regime"] = regime
    narrowed = {**data, "tasks": [task], "misalignment": misalignment,
                "val_length": max(int(data.get("val_length", 16)), length)}
    return build_datasets(narrowed, seed=seed, spatial_dims=spatial_dims)[1]


def _build_source(data: dict[str, Any], *, seed: int, spatial_dims: int, where: str = "data",
                  batched: bool = True, sides: NetworkSides | None = None,
                  ) -> tuple[SyntheticPairDataset, SyntheticPairDataset]:
    """``build_datasets`` for one source, the section at ``where`` (its ``extra_sources``, if any,
    left to the caller)."""
    kind = data.get("kind")
    if kind not in DATA_KEYS:
        raise InputError(f"unknown data.kind {kind!r}; use harvard, phantom or folders", "data")
    unknown = sorted(set(data) - DATA_KEYS[kind] - COMMON_DATA_KEYS)
    if unknown:
        raise InputError(f"unknown keys for data.kind {kind}: {unknown}", "data")
    if "root" in DATA_KEYS[kind] and data.get("root") is None:
        # --data-root sets the main section's root only.
        remedy = f"set {where}.root" + (" or pass --data-root" if where == "data" else "")
        raise InputError(f"data.kind {kind} reads its images from a folder: {remedy}", where)
    split_seed = int(data.get("split_seed", 0))
    val_fraction = float(data.get("val_fraction", DEFAULT_VAL_FRACTION))
    none_fraction = float(data.get("none_fraction", 0.2))
    common = {
        "seed": seed,
        "none_fraction": none_fraction,
        "crop": _size(data.get("crop"), spatial_dims, "data.crop"),
        "severity": tuple(data.get("severity", DEFAULT_SEVERITY)),
        "misalignment": data.get("misalignment"),
        "whole_image_degradations": tuple(data.get("whole_image_degradations", ())),
    }
    if sides and common["crop"]:
        sides.refuse(common["crop"], _in_array_order(common["crop"]), "give e.g. {fit}", f"{where}.crop")
    if kind == "harvard":
        if spatial_dims != 2:
            raise InputError("the Harvard pairs are 2D: set model.spatial_dims: 2", "data")
        pairs = harvard.index_harvard(data["root"], tuple(data.get("tasks", harvard.HARVARD_TASKS)))
        size = _size(data.get("size"), 2, "data.size")
        check_harvard_pairs(pairs, common["crop"], size, Path(data["root"]), batched=batched,
                            metal_drawn=none_fraction < 1, sides=sides)
        train_pairs, val_pairs = harvard.split_cases(pairs, val_fraction, split_seed)
        refuse_empty_validation(val_pairs, len({pair.case for pair in pairs}), val_fraction, data["root"])
        return (
            HarvardPairs(train_pairs, stream=TRAIN_STREAM, size=size, **common),
            HarvardPairs(val_pairs, stream=VALIDATION_STREAM, size=size, **common),
        )
    if kind == "phantom":
        if "shape" in data and "shapes" in data:
            raise InputError("give data.shape or data.shapes, not both", "data")
        shapes = data["shapes"] if "shapes" in data else [data.get("shape", (64, 64, 64))]
        if sides and not common["crop"]:
            for shape in shapes:  # a 2-D model trains on axial slices (PhantomPairs)
                sides.refuse(tuple(shape)[-spatial_dims:], f"the phantom of shape {list(shape)} trains whole at "
                             f"{list(shape)[-spatial_dims:]}, {where}.crop not being set",
                             f"set {where}.crop (e.g. {{fit}}) or give another shape",
                             f"{where}.{'shapes' if 'shapes' in data else 'shape'}")
        weights = data.get("shape_weights")
        options = {"spatial_dims": spatial_dims, "shapes": tuple(tuple(int(v) for v in shape) for shape in shapes),
                   "tasks": tuple(data.get("tasks", PHANTOM_TASKS)),
                   "shape_weights": None if weights is None else tuple(float(w) for w in weights)}
        return (
            PhantomPairs(stream=TRAIN_STREAM, length=int(data.get("train_length", 256)), **options, **common),
            PhantomPairs(stream=VALIDATION_STREAM, length=int(data.get("val_length", 16)), **options, **common),
        )
    if kind == "folders":
        layout = folder_layout(data)
        metal_drawn = moving_degradation(layout["moving_modality"]) == "metal" and none_fraction < 1
        cases, colour_cases = checked_cases(folder_cases(data["root"], layout), spatial_dims, common["crop"],
                                            Path(data["root"]), metal_drawn=metal_drawn, sides=sides)
        train_cases, val_cases = split_by_case(cases, val_fraction, split_seed)
        refuse_empty_validation(val_cases, len(cases), val_fraction, data["root"])
        # A colour moving image among grey ones (a PET/SPECT in pseudo-colour): every sample of both
        # splits carries chroma, so that they share a batch (see MixedPairs).
        options = {"layout": layout, "samples_per_case": int(data.get("samples_per_case", 1)),
                   "with_color": bool(colour_cases)}
        return (
            FolderPairs(train_cases, stream=TRAIN_STREAM, **options, **common),
            FolderPairs(val_cases, stream=VALIDATION_STREAM, **options, **common),
        )
    raise AssertionError(kind)  # DATA_KEYS lists exactly the kinds handled above
