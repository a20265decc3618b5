"""Degradation models: what turns a clean image into the degraded moving image of a training pair.

One small composable class per degradation the model learns to recognise and undo (UniFuse §4.1):
MRI motion (Shaw et al. 2020, via TorchIO), CT metal artifacts + noise (Zhang & Yu 2018, see
`metal.py`), low-dose PET/SPECT noise, and none. Each is called as `degradation(array, rng)` on a
2D (y, x) or 3D (z, y, x) float array and returns the same shape and dtype; everything random comes
from `rng`, so the same seed gives the same output, and the parameters actually drawn are left in
`last_params` (JSON-ready, for a pair's meta.json).

Intensity conventions:
* MR and PET/SPECT: normalised to [0, 1]; an input inside [0, 1] gives an output clipped to [0, 1].
* CT: Hounsfield units (the physics needs attenuation), output clipped to the 12-bit CT range
  [-1024, 3071]. A normalised CT is accepted with `hu_window=(lo, hi)`: x -> lo + x * (hi - lo)
  on the way in and back, clipped to [0, 1], on the way out.

`severity` in [0, 1] scales each model's physical parameters (documented on each class); 0 is the
mildest version of metal and low dose, not their absence (that is `NoDegradation`). Motion is the
exception: its movements scale with the severity, so at 0 nothing moves and the image comes back
unchanged (`unifuse synth` and training refuse it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torchio as tio
from scipy.ndimage import gaussian_filter

from napari_unifuse.classes import DEGRADATION_CLASSES
from napari_unifuse.data import metal as ct
from napari_unifuse.errors import InputError

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


class Degradation(ABC):
    """Base class: validates the input, keeps shape and dtype, records the sampled parameters."""

    name: ClassVar[str]

    def __init__(self, severity: float = 0.5) -> None:
        if not 0.0 <= float(severity) <= 1.0:
            raise InputError(f"severity must lie in [0, 1], got {severity}", type(self).__name__)
        self.severity = float(severity)
        self.last_params: dict | None = None

    @property
    def class_index(self) -> int:
        return DEGRADATION_CLASSES.index(self.name)

    def __call__(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim not in (2, 3):
            raise InputError(f"expected a 2D (y, x) or 3D (z, y, x) array, got shape {array.shape}", self.name)
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"expected a float array, got {array.dtype}", self.name)
        if not np.all(np.isfinite(array)):
            raise InputError("the array contains NaN or infinite values", self.name)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        degraded, params = self._apply(array.astype(np.float64), rng)
        self.last_params = {"name": self.name, "severity": self.severity, **params}
        return degraded.astype(array.dtype, copy=False)

    @abstractmethod
    def _apply(self, array: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """Degrade a float64 2D/3D array; return it and the parameters drawn."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(severity={self.severity})"


class NoDegradation(Degradation):
    """Identity: the "none" class, so clean inputs are a class the model learns to leave alone."""

    name = "none"

    def _apply(self, array: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        return array, {}


class MotionArtifact(Degradation):
    """Rigid head motion during an MRI acquisition: the k-space model of Shaw et al. (IEEE TMI 2020).

    k-space is split along the phase-encode axis (drawn among the in-plane axes y, x) into
    n + 1 segments, each filled from the image moved to a different pose; the unmoved image fills the
    k-space centre. This is TorchIO's `Motion` transform, called with parameters drawn here from `rng`
    rather than through `RandomMotion`, because (TorchIO 1.2) `RandomMotion` splits k-space along the
    last axis, which for a 2D image is the singleton one (no ghosting at all, only a shifted image),
    and it draws from torch's global generator.

    Severity s: n ~ U{1, 2, 3} movements at times ~ evenly spaced +-30 % (as TorchIO draws them);
    each rotates by up to 10 s degrees about each axis (2D: in-plane only) and translates by up to
    10 s mm per axis, magnitudes drawn in [1/2, 1] of that with random signs, so that severity orders
    the artifact strength. At s = 0 every movement is zero: the output is the input, to float
    rounding, with no artifact at all.

    No movement happens in the central ``CENTRE_BAND`` of k-space on either side of its centre (a
    time drawn there moves to the band's nearer edge). TorchIO fills the segment spanning t = 0.5
    with the unmoved image, but cuts segments at whole k-space lines, so a movement just after 0.5
    hands the centre line itself to a moved pose, and one near 0.5 splits the central lines between
    two poses. The image then appears moved as a whole (its head's centre of mass by 9 voxels on a
    128³ phantom with a movement at t = 0.502), while the pair's ground truth is the unmoved pose: the image was
    misaligned beyond its recorded field. With the band, the image appears where the truth is,
    within about a voxel.
    """

    name = "motion"
    MAX_ROTATION_DEG = 10.0
    MAX_TRANSLATION_MM = 10.0
    # Fraction of k-space (along the phase-encode axis) on each side of the centre acquired in the
    # unmoved pose: 8 of 128 lines.
    CENTRE_BAND = 1.0 / 16.0

    def __init__(self, severity: float = 0.5, *, voxel_size_mm: float | Sequence[float] = 1.0) -> None:
        super().__init__(severity)
        self.voxel_size_mm = voxel_size_mm

    def _apply(self, array: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        is_2d = array.ndim == 2
        phase_encode_axis = int(rng.choice([array.ndim - 2, array.ndim - 1]))
        # TorchIO splits k-space along its last axis, so the phase-encode axis goes last; a 2D
        # image gets a leading singleton axis, and in-plane rotation is rotation about that axis.
        moved_axes = np.swapaxes(array, phase_encode_axis, -1)
        volume = moved_axes[np.newaxis] if is_2d else moved_axes
        spacing = list(_voxel_size(self.voxel_size_mm, array.ndim, self.name))
        spacing[phase_encode_axis], spacing[-1] = spacing[-1], spacing[phase_encode_axis]
        if is_2d:
            spacing.insert(0, 1.0)

        n_movements = int(rng.integers(1, 4))
        step = 1.0 / (n_movements + 1)
        times = step * np.arange(1, n_movements + 1) + rng.uniform(-0.3 * step, 0.3 * step, n_movements)
        in_band = np.abs(times - 0.5) < self.CENTRE_BAND
        times[in_band] = 0.5 + np.where(times[in_band] < 0.5, -1.0, 1.0) * self.CENTRE_BAND
        rotation = self._signed_magnitudes(rng, (n_movements, 3), self.MAX_ROTATION_DEG)
        translation = self._signed_magnitudes(rng, (n_movements, 3), self.MAX_TRANSLATION_MM)
        if is_2d:
            rotation[:, 1:] = 0.0
            translation[:, 0] = 0.0

        tensor = torch.from_numpy(volume[np.newaxis].astype(np.float32))
        image = tio.ScalarImage(tensor=tensor, affine=np.diag([*spacing, 1.0]))
        motion = tio.Motion(degrees=rotation, translation=translation, times=times, image_interpolation="linear")
        moved = motion(image).data[0].numpy().astype(np.float64)
        degraded = np.swapaxes(moved[0] if is_2d else moved, phase_encode_axis, -1)
        params = {
            "phase_encode_axis": phase_encode_axis,
            "times": times.tolist(),
            # Rows are movements; columns the axes of the array with the phase-encode axis moved last
            # (2D: a leading singleton axis first), as TorchIO's Motion received them.
            "rotation_deg": rotation.tolist(),
            "translation_mm": translation.tolist(),
        }
        return _clip_if_unit_range(degraded, array), params

    def _signed_magnitudes(self, rng: np.random.Generator, shape: tuple[int, int], maximum: float) -> np.ndarray:
        scale = self.severity * maximum
        return rng.uniform(0.5 * scale, scale, shape) * rng.choice([-1.0, 1.0], shape)


class MetalArtifact(Degradation):
    """Metal implants in a head CT, re-scanned: streaks, photon starvation, beam hardening and noise.

    1-3 titanium or iron discs (2D) / spheres (3D) are put inside the head and the image is scanned
    again with a polychromatic 120 kVp parallel-beam scan and reconstructed by FBP (`metal.py`:
    Zhang & Yu 2018's simulation); the label for this input is the metal-free original. A scanner
    acquires axial slices, so a volume is scanned in the planes across `slice_axis`, the array axis
    that runs closest to the head's superior-inferior axis (0 for a volume stored axially, 1 for a
    coronal NIfTI: `Geometry.world_axis_order()[0]`); a 2D image is one axial slice. By default
    every slice is re-scanned, so noise and bone beam hardening are consistent through the volume;
    `metal_slices_only=True` re-scans only the slices through metal and leaves the others as they
    are (a 160^3 volume in a fraction of the time, for CPU-bound 3D training).

    Severity s: object radius up to 1.5 + 4.5 s mm (drawn in [1/2, 1] of it, at least one pixel);
    incident photons per ray 2e7 * 20^-s (2e7 -> 1e6, Zhang & Yu use 2e7); scatter-to-primary ratio
    0.02 s (what a scanner's anti-scatter grid and scatter correction leave: more biases the whole
    brain by tens of HU). `n_objects` fixes the count (default: drawn from 1-3), `voxel_size_mm` gives the
    physical size the attenuation needs (in-plane pixels must be square). With `hu_window` the input
    is that window mapped to [0, 1] and so is the output, clipped to it unless `clip_to_window` is
    False (what the scan makes beyond it, metal up to 3071 HU, is then kept above 1).
    """

    name = "metal"

    def __init__(
        self,
        severity: float = 0.5,
        *,
        voxel_size_mm: float | Sequence[float] = 1.0,
        hu_window: tuple[float, float] | None = None,
        n_objects: int | None = None,
        n_views: int = 360,
        metal_slices_only: bool = False,
        clip_to_window: bool = True,
        slice_axis: int = 0,
    ) -> None:
        super().__init__(severity)
        if n_objects is not None and n_objects < 1:
            raise InputError(f"n_objects must be at least 1, got {n_objects}", self.name)
        if slice_axis not in (0, 1, 2):
            raise InputError(f"slice_axis must be an axis of a volume (0, 1 or 2), got {slice_axis}", self.name)
        if hu_window is not None and not hu_window[0] < hu_window[1]:
            raise InputError(f"hu_window must be (low, high) with low < high, got {hu_window}", self.name)
        self.voxel_size_mm = voxel_size_mm
        self.hu_window = hu_window
        self.n_objects = n_objects
        self.n_views = n_views
        self.metal_slices_only = metal_slices_only
        self.clip_to_window = clip_to_window
        self.slice_axis = slice_axis

    def _apply(self, array: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        voxel_size = _voxel_size(self.voxel_size_mm, array.ndim, self.name)
        hu = array if self.hu_window is None else self.hu_window[0] + array * (self.hu_window[1] - self.hu_window[0])
        # The scan works on (slice, y, x) stacks: a volume's slice axis goes first, its other two keep
        # their order (an axial volume is not moved at all); a 2D image is a stack of one.
        if array.ndim == 2:
            slices, slice_voxel_size = hu[np.newaxis], (1.0, *voxel_size)
        else:
            stack_axes = (self.slice_axis, *(axis for axis in range(3) if axis != self.slice_axis))
            slices, slice_voxel_size = hu.transpose(stack_axes), tuple(voxel_size[axis] for axis in stack_axes)
        pixel_size = slice_voxel_size[-1]
        if slice_voxel_size[-2] != pixel_size:
            raise InputError(f"the CT simulation needs square in-plane pixels in its axial slices, got "
                             f"{slice_voxel_size[-2:]} mm", self.name)

        n_objects = self.n_objects or int(rng.integers(1, 4))
        max_radius = 1.5 + 4.5 * self.severity
        radii = np.maximum(rng.uniform(0.5 * max_radius, max_radius, n_objects), pixel_size)
        metal = str(rng.choice(ct.METALS))
        photons_per_ray = 2e7 * 20.0 ** (-self.severity)
        scatter_to_primary = 0.02 * self.severity

        metal_mask, objects = ct.place_metal_objects(slices, radii.tolist(), slice_voxel_size, rng)
        rescanned = np.flatnonzero(metal_mask.any(axis=(1, 2))) if self.metal_slices_only else slice(None)
        scanned = slices.copy()
        scanned[rescanned] = ct.simulate_ct_scan(
            slices[rescanned], metal_mask[rescanned], metal, photons_per_ray, scatter_to_primary,
            pixel_size, self.n_views, rng,
        )
        scanned = np.clip(scanned, ct.HU_MIN, ct.HU_MAX)
        if self.hu_window is not None:
            scanned = (scanned - self.hu_window[0]) / (self.hu_window[1] - self.hu_window[0])
            if self.clip_to_window:
                scanned = np.clip(scanned, 0.0, 1.0)
        # Back to the array's own axes, and so are the objects' centres.
        if array.ndim == 2:
            scanned = scanned[0]
            for metal_object in objects:
                metal_object["centre_voxel"] = metal_object["centre_voxel"][1:]
        else:
            array_axes = np.argsort(stack_axes)
            scanned = np.ascontiguousarray(scanned.transpose(array_axes))
            for metal_object in objects:
                metal_object["centre_voxel"] = [metal_object["centre_voxel"][axis] for axis in array_axes]
        params = {
            "metal": metal,
            "objects": objects,
            "photons_per_ray": photons_per_ray,
            "scatter_to_primary": scatter_to_primary,
            "n_views": self.n_views,
            "metal_slices_only": self.metal_slices_only,
            "slice_axis": self.slice_axis if array.ndim == 3 else None,
            # The Hounsfield window a normalised CT was mapped through (None: the input was in HU).
            "hu_window": None if self.hu_window is None else [float(bound) for bound in self.hu_window],
        }
        return scanned, params


class LowDose(Degradation):
    """Low-dose PET/SPECT: Poisson thinning of the counts, then the scanner's resolution.

    y = G_fwhm * [Poisson(x * c / DRF) * DRF / c], with c = `full_dose_counts` the expected counts of
    a voxel of intensity 1 at full dose and DRF the dose-reduction factor: the variance grows as DRF
    (Poisson), the mean is kept. The Gaussian G (FWHM `psf_fwhm_voxels`, 0 to skip) stands for the
    PSF and post-reconstruction filter, and turns the white count noise into PET's blobby texture.
    Negative inputs (interpolation undershoot) count as zero activity.

    Severity s: DRF = 4 * 5^s (4 to 20, i.e. 25 % to 5 % of the dose), unless `dose_reduction_factor`
    is given.
    """

    name = "lowdose"

    def __init__(
        self,
        severity: float = 0.5,
        *,
        dose_reduction_factor: float | None = None,
        full_dose_counts: float = 500.0,
        psf_fwhm_voxels: float = 1.5,
    ) -> None:
        super().__init__(severity)
        if dose_reduction_factor is not None and dose_reduction_factor < 1.0:
            raise InputError(f"dose_reduction_factor must be >= 1, got {dose_reduction_factor}", self.name)
        if full_dose_counts <= 0 or psf_fwhm_voxels < 0:
            raise InputError("full_dose_counts must be > 0 and psf_fwhm_voxels >= 0", self.name)
        self.dose_reduction_factor = dose_reduction_factor
        self.full_dose_counts = full_dose_counts
        self.psf_fwhm_voxels = psf_fwhm_voxels

    def _apply(self, array: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        reduction = self.dose_reduction_factor or 4.0 * 5.0**self.severity
        counts_per_unit = self.full_dose_counts / reduction
        degraded = rng.poisson(np.clip(array, 0.0, None) * counts_per_unit) / counts_per_unit
        if self.psf_fwhm_voxels > 0:
            degraded = gaussian_filter(degraded, sigma=self.psf_fwhm_voxels / FWHM_PER_SIGMA)
        params = {
            "dose_reduction_factor": float(reduction),
            "full_dose_counts": float(self.full_dose_counts),
            "psf_fwhm_voxels": float(self.psf_fwhm_voxels),
        }
        return _clip_if_unit_range(degraded, array), params


DEGRADATIONS: dict[str, type[Degradation]] = {
    cls.name: cls for cls in (NoDegradation, MotionArtifact, MetalArtifact, LowDose)
}


def make_degradation(name: str, severity: float = 0.5, **options) -> Degradation:
    """The degradation called `name` (one of DEGRADATION_CLASSES); `options` go to its constructor."""
    if name not in DEGRADATIONS:
        raise InputError(f"unknown degradation {name!r}; expected one of {DEGRADATION_CLASSES}", "degradation")
    return DEGRADATIONS[name](severity, **options)


def _voxel_size(voxel_size_mm: float | Sequence[float], ndim: int, source: str) -> tuple[float, ...]:
    sizes = (float(voxel_size_mm),) * ndim if np.isscalar(voxel_size_mm) else tuple(map(float, voxel_size_mm))
    if len(sizes) != ndim or min(sizes) <= 0:
        raise InputError(f"voxel_size_mm must be one positive size or {ndim} of them, got {voxel_size_mm}", source)
    return sizes


def _clip_if_unit_range(degraded: np.ndarray, original: np.ndarray) -> np.ndarray:
    # A normalised input stays a valid model input; an unnormalised one is left as is.
    if original.min() >= 0.0 and original.max() <= 1.0:
        return np.clip(degraded, 0.0, 1.0)
    return degraded
