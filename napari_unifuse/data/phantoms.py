"""Multimodal 3D/2D head phantoms built from the MNI152 template that ships with nilearn (offline).

Anatomy. nilearn bundles the skull-stripped ICBM152 2009a template at 1 mm (197 x 233 x 189) with
its grey- and white-matter probability maps and a brain mask. Inside the brain, CSF is what GM and
WM leave over (``mask - GM - WM``); the skull-stripped template has no head around the brain, so
we add concentric shells by distance from the brain: a 2 mm CSF rim (subarachnoid space), 6 mm of
skull, 3 mm of subcutaneous fat and 2 mm of skin/muscle. Every voxel holds tissue *fractions*
(summing to 1 with air), so partial volume comes for free and images of any resolution are made
by anti-aliased resampling of the fractions, then mixing tissue values.

Contrasts.
* MR (T1w, T2w, PDw): spin-echo signal ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)`` with BrainWeb's
  1.5 T tissue parameters (Kwan, Evans & Pike, IEEE TMI 1999; Aubert-Broche et al., NeuroImage
  2006): CSF 2569/329 ms/1.0, GM 833/83/0.86, WM 500/70/0.77, fat 350/70/1.0, muscle/skin
  900/47/1.0; cortical bone has no spin-echo signal (T2 of ~0.5 ms << TE), so BrainWeb, and we,
  give it PD = 0. Sequences: T1w TR 540 / TE 10 ms (short TR so T1 recovery differs, short TE so
  T2 hardly weights), T2w TR 3500 / TE 100 ms (long TR removes T1 weighting, long TE lets the long
  CSF T2 dominate), PDw TR 3500 / TE 15 ms (long TR, short TE: only PD is left); typical clinical
  1.5 T spin-echo settings. Signals are in [0, 1] (PD <= 1).
* CT in Hounsfield units: air -1000, fat -100, CSF 10, WM 25, GM 40, skin/muscle 40, skull 1100
  (a mix of cortical tables, ~1500-1900 HU, and diploe, ~400-800 HU).
* FDG-PET, relative uptake with GM = 1: WM 0.25 (GM:WM = 4:1), CSF 0, skin/muscle 0.15, fat and
  bone 0.05; blurred with a 5 mm FWHM Gaussian PSF (a modern brain PET scanner, 4-6 mm).
* Perfusion SPECT (HMPAO/ECD), relative with GM = 1: WM 0.45 (GM:WM ~ 2.2:1), CSF 0, scalp low;
  10 mm FWHM PSF (typical SPECT resolution).

Geometry. The head is cropped to its bounding box (plus a small margin) and fitted into the target
shape with isotropic voxels, keeping its proportions; the spacing follows (e.g. ~3.4 mm for 64^3,
~1.4 mm for 160^3). World coordinates are MNI millimetres in LPS, so phantoms of different shapes
overlay exactly in napari. Everything is deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from nilearn import datasets
from scipy import ndimage, sparse
from scipy.interpolate import interp1d

from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

# Tissues in the order of the fraction maps; "air" is whatever is left over.
TISSUES = ("csf", "gm", "wm", "bone", "fat", "skin")
# Outer radius (mm from the brain surface) of each added shell, inside out.
_SHELLS_MM = (("csf", 2.0), ("bone", 8.0), ("fat", 11.0), ("skin", 13.0))
# Air kept around the head in the field of view, mm per side.
_FOV_MARGIN_MM = 4.0


@dataclass(frozen=True)
class SpinEcho:
    """A spin-echo MR sequence; tissue values follow from T1, T2 and PD."""

    repetition_ms: float
    echo_ms: float


# BrainWeb 1.5 T parameters: (T1 ms, T2 ms, PD). Bone: no signal (PD 0; T1/T2 then irrelevant).
_RELAXATION = {
    "csf": (2569.0, 329.0, 1.0),
    "gm": (833.0, 83.0, 0.86),
    "wm": (500.0, 70.0, 0.77),
    "bone": (1.0, 1.0, 0.0),
    "fat": (350.0, 70.0, 1.0),
    "skin": (900.0, 47.0, 1.0),
    "air": (1.0, 1.0, 0.0),
}
_SEQUENCES = {
    "t1": SpinEcho(repetition_ms=540.0, echo_ms=10.0),
    "t2": SpinEcho(repetition_ms=3500.0, echo_ms=100.0),
    "pd": SpinEcho(repetition_ms=3500.0, echo_ms=15.0),
}
_HOUNSFIELD = {"csf": 10.0, "gm": 40.0, "wm": 25.0, "bone": 1100.0, "fat": -100.0, "skin": 40.0, "air": -1000.0}
_FDG_UPTAKE = {"csf": 0.0, "gm": 1.0, "wm": 0.25, "bone": 0.05, "fat": 0.05, "skin": 0.15, "air": 0.0}
_PERFUSION = {"csf": 0.0, "gm": 1.0, "wm": 0.45, "bone": 0.05, "fat": 0.05, "skin": 0.1, "air": 0.0}
_PSF_FWHM_MM = {"pet": 5.0, "spect": 10.0}
_UNITS = {"t1": "a.u. (PD = 1)", "t2": "a.u. (PD = 1)", "pd": "a.u. (PD = 1)", "ct": "HU",
          "pet": "relative uptake (GM = 1)", "spect": "relative perfusion (GM = 1)"}

MODALITIES = ("t1", "t2", "pd", "ct", "pet", "spect")


def _spin_echo_signal(tissue: str, sequence: SpinEcho) -> float:
    t1, t2, pd = _RELAXATION[tissue]
    return pd * (1.0 - np.exp(-sequence.repetition_ms / t1)) * np.exp(-sequence.echo_ms / t2)


def tissue_values(modality: str) -> dict[str, float]:
    """The pure-tissue intensity of every tissue (and air) in ``modality``."""
    if modality in _SEQUENCES:
        return {t: float(_spin_echo_signal(t, _SEQUENCES[modality])) for t in (*TISSUES, "air")}
    table = {"ct": _HOUNSFIELD, "pet": _FDG_UPTAKE, "spect": _PERFUSION}.get(modality)
    if table is None:
        raise InputError(f"unknown phantom modality {modality!r}; use one of {MODALITIES}", "phantom")
    return dict(table)


# ---- the 1 mm anatomy (loaded once per process) -------------------------------------------------
@dataclass(frozen=True)
class _Anatomy:
    """1 mm maps in LPS-oriented (z, y, x) arrays, cropped around the head."""

    brain_fractions: dict[str, np.ndarray]  # csf, gm, wm inside the brain (float32)
    distance_mm: np.ndarray  # distance from the brain, 0 inside (float32)
    origin: np.ndarray  # world (LPS mm, array order) of index (0, 0, 0); spacing is 1 mm
    head_low: np.ndarray  # world bounding box of the head
    head_high: np.ndarray

    def fractions(self) -> dict[str, np.ndarray]:
        """The 1 mm fraction maps of ``TISSUES``; air is the rest (1 - their sum)."""
        out = {"gm": self.brain_fractions["gm"], "wm": self.brain_fractions["wm"]}
        covered = (self.distance_mm <= 0.0).astype(np.float32)  # the brain; shells start at its surface
        for shell, outer in _SHELLS_MM:
            # Partial volume across each shell's outer boundary: a 1 mm linear ramp in distance.
            within = np.clip(outer + 0.5 - self.distance_mm, 0.0, 1.0)
            out[shell] = within - covered
            covered = within
        out["csf"] = out["csf"] + self.brain_fractions["csf"]
        return out


def _lps_zyx(image) -> tuple[np.ndarray, Geometry]:
    """A nilearn image as a (z, y, x) float32 array with identity direction (LPS) and its geometry."""
    array = np.asarray(image.get_fdata(dtype=np.float32)).transpose()  # nibabel (i, j, k) -> (k, j, i)
    geometry = Geometry.from_ras_affine(image.affine)
    flips = np.diag(geometry.direction) < 0
    if not np.allclose(np.abs(geometry.direction), np.eye(3)):
        raise InputError("the MNI template is expected to be axis-aligned", "nilearn")
    origin = geometry.origin + np.where(flips, -(np.asarray(array.shape) - 1) * geometry.spacing, 0.0)
    array = np.flip(array, axis=tuple(np.flatnonzero(flips)))
    return np.ascontiguousarray(array), Geometry(geometry.spacing, origin, np.eye(3))


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    template_mask, geometry = _lps_zyx(datasets.load_mni152_brain_mask(resolution=1))
    gm, _ = _lps_zyx(datasets.load_mni152_gm_template(resolution=1))
    wm, _ = _lps_zyx(datasets.load_mni152_wm_template(resolution=1))
    if not np.allclose(geometry.spacing, 1.0):
        raise InputError(f"expected the 1 mm MNI template, got spacing {geometry.spacing}", "nilearn")
    brain = template_mask > 0.5
    total = gm + wm
    # GM + WM never exceeds 1 in this template; the guard keeps fractions valid if it ever did.
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0)
    gm, wm = gm * scale * brain, wm * scale * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)

    # Crop to the brain plus room for the shells on every side but the bottom: the MNI field of
    # view cuts the brainstem, and a real head scan goes on into the neck there rather than
    # closing a skull under it.
    corners = np.argwhere(brain)
    low, high = corners.min(axis=0), corners.max(axis=0)
    room = int(np.ceil(_SHELLS_MM[-1][1])) + 2
    crop = tuple(slice(a, b + 1) for a, b in zip(low, high))
    pad = ((0, room), (room, room), (room, room))
    origin = geometry.origin + low - np.array([0, room, room])
    gm, wm, csf, brain = (np.pad(a[crop], pad) for a in (gm, wm, csf, brain))
    distance = ndimage.distance_transform_edt(~brain).astype(np.float32)
    for array in (gm, wm, csf, distance):
        array.setflags(write=False)
    head = np.argwhere(distance <= _SHELLS_MM[-1][1] + 0.5)
    head_low, head_high = origin + head.min(axis=0), origin + head.max(axis=0)
    return _Anatomy({"csf": csf, "gm": gm, "wm": wm}, distance, origin, head_low, head_high)


# ---- resampling onto a target grid ------------------------------------------------------------
def _axis_resampling_matrix(
    n_source: int, source_origin: float, targets_mm: np.ndarray, sigma_mm: float
) -> sparse.csr_array:
    """(n_target, n_source) matrix: Gaussian anti-aliasing, then linear interpolation at the
    target positions, along one axis of the 1 mm maps; zero weight outside them.

    The target grid is axis-aligned with the 1 mm maps, so the 3D resampling is separable and
    three small matrix products replace filtering and interpolating millions of voxels."""
    blur = np.eye(n_source)
    if sigma_mm > 0:
        blur = ndimage.gaussian_filter1d(blur, sigma_mm, axis=0, mode="nearest")
    matrix = interp1d(np.arange(n_source), blur, axis=0, bounds_error=False, fill_value=0.0)(targets_mm - source_origin)
    return sparse.csr_array(matrix.astype(np.float32))


def _resample(volume: np.ndarray, matrices: list[sparse.csr_array]) -> np.ndarray:
    # The matrices are banded (a few Gaussian taps per row): sparse products cost ~20x less.
    for axis, matrix in enumerate(matrices):
        moved = np.moveaxis(volume, axis, 0)
        product = matrix @ moved.reshape(moved.shape[0], -1)
        volume = np.moveaxis(product.reshape(matrix.shape[0], *moved.shape[1:]), 0, axis)
    return np.ascontiguousarray(volume, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _fractions_on_grid(shape: tuple[int, ...], axial_mm: float | None) -> tuple[dict[str, np.ndarray], Geometry]:
    """Tissue fractions on the grid that fits the head into ``shape`` (3D, or a 2D axial plane)."""
    anatomy = _anatomy()
    extent = anatomy.head_high - anatomy.head_low + 1.0 + 2 * _FOV_MARGIN_MM
    centre = (anatomy.head_low + anatomy.head_high) / 2.0
    in_plane = slice(3 - len(shape), 3)  # all axes in 3D, (y, x) for a 2D slice
    spacing = float(np.max(extent[in_plane] / np.asarray(shape)))
    origin = centre[in_plane] - (np.asarray(shape) - 1) / 2.0 * spacing
    axes = [o + spacing * np.arange(n) for o, n in zip(origin, shape)]
    if axial_mm is not None:
        axes.insert(0, np.array([axial_mm]))
    # Partial volume of a voxel `spacing` wide from 1 mm maps: skimage's anti-aliasing rule.
    sigma_mm = max(0.0, (spacing - 1.0) / 2.0)
    matrices = [
        _axis_resampling_matrix(n, o, targets, sigma_mm)
        for n, o, targets in zip(anatomy.distance_mm.shape, anatomy.origin, axes)
    ]
    fractions = {t: _resample(f, matrices).reshape(shape) for t, f in anatomy.fractions().items()}
    # Air takes up the rest, also outside the 1 mm maps (where the matrices give no weight).
    fractions["air"] = 1.0 - sum(fractions.values())
    for array in fractions.values():
        array.setflags(write=False)
    geometry = Geometry(np.full(len(shape), spacing), origin, np.eye(len(shape)))
    return fractions, geometry


def _check_shape(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != ndim or min(shape) < 8:
        raise InputError(f"a {ndim}D phantom needs {ndim} sizes of at least 8 voxels, got {shape}", "phantom")
    return shape


def _check_modalities(modalities: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise InputError(f"unknown phantom modalities {unknown}; use some of {MODALITIES}", "phantom")
    return tuple(modalities)


def _images(
    fractions: dict[str, np.ndarray],
    geometry: Geometry,
    modalities: tuple[str, ...],
    psf_fwhm_mm: float | None,
) -> dict[str, ImageVolume]:
    images = {}
    for modality in modalities:
        values = tissue_values(modality)
        array = sum(np.float32(values[t]) * fractions[t] for t in (*TISSUES, "air"))
        fwhm = _PSF_FWHM_MM.get(modality, 0.0) if psf_fwhm_mm is None else psf_fwhm_mm
        if modality in _PSF_FWHM_MM and fwhm > 0:
            # The PSF in voxels of this grid; a 2D slice is blurred in-plane only.
            array = ndimage.gaussian_filter(array, fwhm / FWHM_PER_SIGMA / geometry.spacing, mode="nearest")
        metadata = {
            "modality": modality,
            "units": _UNITS[modality],
            "phantom": {"template": "MNI152 2009a (nilearn)", "tissue_values": values},
        }
        if modality in _PSF_FWHM_MM:
            metadata["phantom"]["psf_fwhm_mm"] = fwhm
        images[modality] = ImageVolume(np.asarray(array, dtype=np.float32), geometry, metadata)
    return images


def make_brain_phantoms(
    shape: tuple[int, int, int] = (64, 64, 64),
    modalities: tuple[str, ...] = ("t1", "t2", "pd", "ct", "pet"),
    *,
    psf_fwhm_mm: float | None = None,
) -> dict[str, ImageVolume]:
    """Co-registered 3D head phantoms, one ImageVolume per modality, on the same grid.

    ``psf_fwhm_mm`` overrides the PET/SPECT resolution (0: no blur). Arrays are fresh float32
    copies; the anatomy and the resampled tissue maps are cached per process.
    """
    fractions, geometry = _fractions_on_grid(_check_shape(shape, 3), None)
    return _images(fractions, geometry, _check_modalities(modalities), psf_fwhm_mm)


def make_brain_phantom_slices(
    shape: tuple[int, int] = (128, 128),
    modalities: tuple[str, ...] = ("t1", "t2", "pd", "ct", "pet"),
    *,
    axial_mm: float = 15.0,
    psf_fwhm_mm: float | None = None,
) -> dict[str, ImageVolume]:
    """One axial slice (MNI z = ``axial_mm``; default through the lateral ventricles and basal
    ganglia) of each contrast, as 2D ImageVolumes with square pixels fitted to the head."""
    fractions, geometry = _fractions_on_grid(_check_shape(shape, 2), float(axial_mm))
    return _images(fractions, geometry, _check_modalities(modalities), psf_fwhm_mm)


def brain_tissue_fractions(shape: tuple[int, ...]) -> dict[str, ImageVolume]:
    """The tissue fraction maps (``TISSUES`` and "air", summing to 1) behind the phantoms of
    ``shape`` (3D, or 2D for the default axial slice): ground truth for tissue-wise evaluation."""
    if len(shape) == 2:
        fractions, geometry = _fractions_on_grid(_check_shape(shape, 2), 15.0)
    else:
        fractions, geometry = _fractions_on_grid(_check_shape(shape, 3), None)
    return {
        tissue: ImageVolume(array.copy(), geometry, {"tissue": tissue, "units": "volume fraction"})
        for tissue, array in fractions.items()
    }
