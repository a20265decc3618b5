"""Classical baselines a user would pick instead of UniFuse: registration, then a fusion rule.

Registration (each returns a dense field in the project convention, docs/architecture.md: ``u``
of shape ``(ndim, *spatial)`` in reference voxels, array-axis order, sampling ``moving`` at
``x + u(x)`` aligns it):

* ``identity`` -- no registration (``u = 0``): what fusing the raw pair gives.
* ``sitk`` -- SimpleITK: rigid (Euler, Mattes MI, 3-level pyramid), then a cubic B-spline (Mattes
  MI, L-BFGS-B) on top of it; the composite is evaluated on the reference grid from the two
  transforms' parameters (``rigid_bspline_displacement``: the B-spline's tensor-product basis is
  separable along the grid's axes, so a 160³ field takes 0.1 s where ITK's point-by-point
  ``TransformToDisplacementField`` took 1.5-1.9 s and a file round trip 0.6 s more).
* ``ants`` -- ANTsPy ``ants.registration(type_of_transform="SyN")`` (affine + SyN), the forward
  transforms composed into one field by ``ants.apply_transforms(compose=...)``; seeded and on one
  ITK thread, so that it repeats itself as ``sitk`` does.
* ``matching`` -- UniFuse's own parameter-free first step alone (``model.matching``: MIND block
  matching, robust rigid fit, smooth local correction, with the paper preset's step and range), so
  that an evaluation shows what the trained network adds to it.
* ``dense`` -- the matching, then a dense instance optimisation on MIND descriptors
  (``model.dense_refinement``, ConvexAdam's Adam stage): the classical bar for a learned fine
  alignment on small non-rigid residuals.

ANTs's field maps a reference (fixed) point ``p`` to the moving point ``p + d(p)``, ``d`` in LPS
mm with x/y/z components: exactly the on-disk displacement format, so it is converted with
``io.fields.read_displacement`` (as is any other SimpleITK transform, ``sitk_transform_to_displacement``)
rather than a second copy of that conversion. Every method's
aligned image is then ``data.misalign.warp_array(moving, u)``, so methods differ only by their
field, never by their interpolator.

Fusion rules (images in [0, 1] on one grid): ``max``, ``average`` and ``wavelet`` -- an n-D
discrete wavelet decomposition (PyWavelets ``wavedecn``) whose approximation is averaged and whose
detail coefficients keep the one of larger magnitude (the classical DWT max-abs rule, Li,
Manjunath & Mitra 1995).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pywt
import SimpleITK as sitk
import torch

from napari_unifuse.data.misalign import warp_array
from napari_unifuse.errors import Cancelled, InputError, RegistrationError, UniFuseError
from napari_unifuse.io import ImageVolume
from napari_unifuse.io.fields import read_displacement
from napari_unifuse.io.image import Geometry
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.dense_refinement import dense_refinement
from napari_unifuse.model.matching import structural_matching
from napari_unifuse.model.mi_refinement import never_cancelled

REGISTRATION_METHODS = ("identity", "sitk", "ants", "matching", "dense")
FUSION_RULES = ("max", "average", "wavelet")

# Rigid stage: coarse-to-fine pyramid (shrink factors / smoothing sigmas in voxels), the usual
# SimpleITK recipe; Mattes MI works across modalities (MR/CT/PET).
_RIGID_SHRINK = (4, 2, 1)
_RIGID_SMOOTH = (2.0, 1.0, 0.0)
_RIGID_ITERATIONS = 200
_BSPLINE_SHRINK = (2, 1)
_BSPLINE_SMOOTH = (1.0, 0.0)
_BSPLINE_ITERATIONS = 50
# L-BFGS-B stops once the cost improves by less than this many machine epsilons ("moderate
# accuracy" is 1e7); 1e9 halves the B-spline time on 32³ phantoms at the same NCC (0.981).
_BSPLINE_COST_CONVERGENCE = 1e9
_MI_BINS = 32
# Random voxels per metric evaluation, a fixed budget like elastix's NumberOfSpatialSamples rather
# than a fraction: ITK's B-spline metric costs ~5 µs per sample, so a fraction would make 160³
# volumes take hours. A fixed seed makes runs repeatable; it must not be 0, which SimpleITK reads as
# sitkWallClock (a new sample set every run: fields 2.5-3.7 voxels apart on one 96³ pair).
_RIGID_SAMPLES = 20_000
_BSPLINE_SAMPLES = 5_000
_SAMPLING_SEED = 20_251
# ANTs's own copy of ITK reads its thread count from this variable, once: the first time it runs in
# the process.
_ITK_THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
# Control-point intervals of the B-spline mesh per axis: the synthetic misalignment has 5 control
# points across an axis, i.e. 4 intervals.
DEFAULT_BSPLINE_MESH = 4
_WAVELET = "db2"
_WAVELET_LEVELS = 3


@dataclass(frozen=True)
class Registration:
    """One registration's result on the reference grid."""

    method: str
    displacement: np.ndarray  # (ndim, *spatial) float32, reference voxels, array-axis order
    aligned: np.ndarray  # moving sampled at x + u(x), float32
    seconds: float


def ants_available() -> bool:
    """Whether ANTsPy (package ``antspyx``) imports in this environment."""
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


def available_registration_methods() -> tuple[str, ...]:
    return tuple(method for method in REGISTRATION_METHODS if method != "ants" or ants_available())


def register(
    method: str, reference: np.ndarray, moving: np.ndarray, geometry: Geometry | None = None
) -> Registration:
    """Register ``moving`` onto ``reference`` (same grid, ``geometry``; identity when None)."""
    if method not in REGISTRATION_METHODS:
        raise InputError(f"unknown registration {method!r}; choose from {', '.join(REGISTRATION_METHODS)}",
                         "registration")
    reference, moving = _check_pair(reference, moving)
    geometry = geometry or Geometry.identity(reference.ndim)
    if geometry.ndim != reference.ndim:
        raise InputError(f"a {geometry.ndim}D geometry does not fit {reference.ndim}D images", "registration")
    start = time.perf_counter()
    displacement = _REGISTER[method](reference, moving, geometry)
    aligned = warp_array(moving, displacement)
    return Registration(method, displacement, aligned, time.perf_counter() - start)


def register_identity(reference: np.ndarray, moving: np.ndarray, geometry: Geometry) -> np.ndarray:
    return np.zeros((reference.ndim, *reference.shape), dtype=np.float32)


def register_sitk(
    reference: np.ndarray, moving: np.ndarray, geometry: Geometry, *, bspline_mesh: int = DEFAULT_BSPLINE_MESH,
    reference_mask: np.ndarray | None = None, stop: threading.Event | None = None,
) -> np.ndarray:
    """Rigid (Euler) then B-spline, both by Mattes mutual information; returns ``u`` in voxels.
    The same pair gives the same field on every run (fixed sampling seed, one ITK thread).
    ``reference_mask`` (boolean, the reference's shape): where the metric samples the reference,
    e.g. its tissue; everywhere when None. ``stop``: once set, the optimiser stops at its next
    iteration and ``Cancelled`` is raised (a run in the background that was cancelled or interrupted)."""
    with _one_itk_thread():
        return _register_sitk(reference, moving, geometry, bspline_mesh, reference_mask, stop)


@contextmanager
def _one_itk_thread() -> Iterator[None]:
    """ITK's Mattes metric adds up its threads' sums in no fixed order, so on several threads the
    same seeded registration lands on a different field each run (1.2-1.3 voxels apart on a 96³
    pair; 0.0 on one thread, for 1.5x the time). SimpleITK reads the thread count when a
    registration is built and run, from this process-wide default, so it is set around both."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _register_sitk(reference: np.ndarray, moving: np.ndarray, geometry: Geometry, bspline_mesh: int,
                   reference_mask: np.ndarray | None, stop: threading.Event | None) -> np.ndarray:
    fixed = ImageVolume(reference, geometry).to_sitk()
    moved = ImageVolume(moving, geometry).to_sitk()
    mask = None
    if reference_mask is not None:
        if reference_mask.shape != reference.shape:
            raise InputError(f"mask shape {reference_mask.shape} differs from the reference's {reference.shape}",
                             "reference_mask")
        mask = ImageVolume(reference_mask.astype(np.uint8), geometry).to_sitk()
    euler = sitk.Euler2DTransform() if reference.ndim == 2 else sitk.Euler3DTransform()
    initial = sitk.CenteredTransformInitializer(fixed, moved, euler,
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    rigid_stage = _mattes_registration(_RIGID_SHRINK, _RIGID_SMOOTH, reference.shape, _RIGID_SAMPLES, mask)
    rigid_stage.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=_RIGID_ITERATIONS, relaxationFactor=0.5)
    rigid_stage.SetOptimizerScalesFromPhysicalShift()
    rigid_stage.SetInitialTransform(initial, inPlace=False)
    rigid = _execute(rigid_stage, fixed, moved, stop)

    bspline = sitk.BSplineTransformInitializer(fixed, [bspline_mesh] * reference.ndim)
    bspline_stage = _mattes_registration(_BSPLINE_SHRINK, _BSPLINE_SMOOTH, reference.shape, _BSPLINE_SAMPLES, mask)
    bspline_stage.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=_BSPLINE_ITERATIONS,
                                       costFunctionConvergenceFactor=_BSPLINE_COST_CONVERGENCE)
    # ITK applies the optimised transform first, then the moving initial one: p -> rigid(bspline(p)).
    bspline_stage.SetMovingInitialTransform(rigid)
    bspline_stage.SetInitialTransform(bspline, inPlace=True)
    _execute(bspline_stage, fixed, moved, stop)
    return rigid_bspline_displacement(rigid, bspline, fixed, geometry)


def _execute(stage: sitk.ImageRegistrationMethod, fixed: sitk.Image, moved: sitk.Image,
             stop: threading.Event | None = None) -> sitk.Transform:
    """``stage.Execute`` with ITK's exception (a constant image, samples that left the overlap)
    turned into a message for the user: its last line names the cause without ITK's source path.
    ``stop`` is polled at every iteration (and on entering each pyramid level)."""
    if stop is not None:
        def stop_when_asked() -> None:
            if stop.is_set():
                stage.StopRegistration()

        for event in (sitk.sitkIterationEvent, sitk.sitkMultiResolutionIterationEvent):
            stage.AddCommand(event, stop_when_asked)
    try:
        transform = stage.Execute(fixed, moved)
    except RuntimeError as error:
        raise RegistrationError("SimpleITK", str(error).strip().splitlines()[-1].split("): ")[-1]) from error
    if stop is not None and stop.is_set():
        raise Cancelled("the SimpleITK registration was stopped")
    return transform


def sitk_transform_to_displacement(transform: sitk.Transform, fixed: sitk.Image, geometry: Geometry) -> np.ndarray:
    """A SimpleITK transform as a dense field on ``fixed``'s grid in the project convention (through
    the on-disk format, so that ``io.fields.read_displacement`` does the one LPS-mm conversion)."""
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(fixed)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    field = to_field.Execute(transform)
    with tempfile.TemporaryDirectory(prefix="unifuse-sitk-") as folder:
        path = Path(folder) / "displacement.mha"
        sitk.WriteImage(field, str(path))
        return read_displacement(path, geometry)


def rigid_bspline_displacement(rigid: sitk.Transform, bspline: sitk.BSplineTransform, fixed: sitk.Image,
                               geometry: Geometry) -> np.ndarray:
    """``p -> rigid(bspline(p))`` (ITK's order: the B-spline first) as a dense field on ``fixed``'s
    grid in the project convention, without evaluating the transforms point by point.

    A cubic B-spline's displacement is a tensor product of per-axis weights, and when the control
    grid's axes follow the image grid's (``BSplineTransformInitializer`` builds them from it: the
    same axes, permuted or flipped) each axis's weights depend on that axis's index alone: three
    small matrix products give the field. The rigid part is affine, so the composite's displacement
    is an affine function of the index plus a fixed mix of the B-spline's components. A control grid
    oblique to the image goes through ``sitk_transform_to_displacement`` instead."""
    ndim = fixed.GetDimension()
    shape = fixed.GetSize()[::-1]
    coefficients = bspline.GetCoefficientImages()  # one per x/y/z component
    control = Geometry.from_sitk(coefficients[0])
    control_size = coefficients[0].GetSize()[::-1]
    # Continuous control-grid index (array order) = index_map @ image index + index_offset.
    control_linear = control.direction * control.spacing
    index_map = np.linalg.solve(control_linear, geometry.direction * geometry.spacing)
    index_offset = np.linalg.solve(control_linear, geometry.origin - control.origin)
    follows = np.abs(index_map).argmax(axis=1)  # control axis a runs along image axis follows[a]
    crosstalk = np.abs(index_map)
    crosstalk[np.arange(ndim), follows] = 0
    # Crosstalk arises from the control direction's single-precision storage; below 1e-4 of a
    # control interval across the whole grid it is below what ITK's own evaluation resolves.
    if sorted(follows) != list(range(ndim)) or (crosstalk @ np.array(shape)).max() > 1e-4:
        return sitk_transform_to_displacement(sitk.CompositeTransform([rigid, bspline]), fixed, geometry)
    weights = [_cubic_bspline_weights(index_offset[a] + index_map[a, follows[a]] * np.arange(shape[follows[a]]),
                                      control_size[a]) for a in range(ndim)]
    control_axes, image_axes = "abc"[:ndim], "xyz"[:ndim]
    product = (",".join(image_axes[follows[a]] + control_axes[a] for a in range(ndim))
               + f",{control_axes}->{image_axes}")
    # B-spline displacement per world component (array order), mm.
    bspline_mm = [np.einsum(product, *weights, sitk.GetArrayViewFromImage(image).astype(np.float32), optimize=True)
                  for image in coefficients[::-1]]
    matrix, offset = _affine_parts(rigid, ndim)
    linear = geometry.direction * geometry.spacing
    inverse = np.linalg.inv(linear)
    # u(i) = linear⁻¹ (rigid(world(i) + b(i)) - world(i)) = constant + slope @ i + mix @ b(i).
    constant = inverse @ ((matrix - np.eye(ndim)) @ geometry.origin + offset)
    slope = inverse @ (matrix - np.eye(ndim)) @ linear
    mix = inverse @ matrix
    field = np.empty((ndim, *shape), dtype=np.float32)
    for component in range(ndim):
        field[component] = constant[component]
        for axis in range(ndim):
            field[component] += (slope[component, axis] * np.arange(shape[axis], dtype=np.float32)).reshape(
                [-1 if k == axis else 1 for k in range(ndim)])
        for source in range(ndim):
            field[component] += np.float32(mix[component, source]) * bspline_mm[source]
    return field


def _cubic_bspline_weights(position: np.ndarray, size: int) -> np.ndarray:
    """ITK's cubic B-spline interpolation weights: row ``n`` holds the weights of the ``size``
    control points at continuous index ``position[n]`` (support ``floor(x) - 1 .. floor(x) + 2``).
    A row whose support leaves the control grid is zero: ITK leaves such points unmoved."""
    start = np.floor(position).astype(np.int64) - 1
    inside = (start >= 0) & (start + 3 <= size - 1)
    weights = np.zeros((position.size, size), dtype=np.float32)
    rows = np.flatnonzero(inside)
    for k in range(4):
        distance = np.abs(position[rows] - (start[rows] + k))
        weights[rows, start[rows] + k] = np.where(distance < 1, (4 - 6 * distance**2 + 3 * distance**3) / 6,
                                                  (2 - distance) ** 3 / 6)
    return weights


def _affine_parts(transform: sitk.Transform, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """An affine SimpleITK transform (Euler, here) as ``x -> matrix @ x + offset`` in array order,
    read off the images of the origin and the unit vectors."""
    offset = np.array(transform.TransformPoint((0.0,) * ndim))
    columns = [np.array(transform.TransformPoint(tuple(unit))) - offset for unit in np.eye(ndim)]
    return np.stack(columns, axis=1)[::-1, ::-1], offset[::-1]


def register_ants(reference: np.ndarray, moving: np.ndarray, geometry: Geometry) -> np.ndarray:
    """ANTsPy SyN (affine + symmetric normalisation); returns ``u`` in voxels. A pair ANTs cannot
    register (e.g. a constant image) raises ``RegistrationError``, as the SimpleITK one does."""
    if not ants_available():
        raise UniFuseError("ANTsPy is not installed (pip install antspyx); the 'ants' registration is unavailable")
    import ants

    with _repeatable_ants(ants), tempfile.TemporaryDirectory(prefix="unifuse-ants-") as folder:
        fixed = ants.from_sitk(ImageVolume(reference, geometry).to_sitk())
        moved = ants.from_sitk(ImageVolume(moving, geometry).to_sitk())
        try:
            result = ants.registration(fixed, moved, type_of_transform="SyN", outprefix=f"{folder}/reg_")
        except RuntimeError as error:  # ANTs prints its ITK exception itself and raises only an exit code
            raise RegistrationError("ANTs", str(error).strip()) from error
        composed = ants.apply_transforms(fixed, moved, result["fwdtransforms"], compose=f"{folder}/fwd_")
        if composed is None:
            raise UniFuseError("ANTs did not write the composed forward transform")
        return read_displacement(composed, geometry)


@contextmanager
def _repeatable_ants(ants: ModuleType) -> Iterator[None]:
    """A fixed seed for ANTs's metric sampling (else drawn from the clock) and one ITK thread (else
    the metric's sums arrive in no fixed order): with neither, three runs on one 96² pair gave fields
    up to 2.7 px apart; with both, bitwise the same. antspy's ``set_ants_deterministic`` does the
    same but also reseeds NumPy's and Python's global generators, so this sets only what
    ``ants.registration`` reads (``ants.config._random_seed``, passed as ``--random-seed``) and the
    thread variable, and restores both. ANTs's ITK reads the variable the first time it runs in the
    process (``ants.from_sitk`` already counts), so it is set around all of ANTs's work, every call."""
    previous_seed, previous_threads = ants.config._random_seed, os.environ.get(_ITK_THREADS_VARIABLE)
    ants.config._random_seed = _SAMPLING_SEED
    os.environ[_ITK_THREADS_VARIABLE] = "1"
    try:
        yield
    finally:
        ants.config._random_seed = previous_seed
        if previous_threads is None:
            os.environ.pop(_ITK_THREADS_VARIABLE, None)
        else:
            os.environ[_ITK_THREADS_VARIABLE] = previous_threads


def _batch(array: np.ndarray, channels: bool = False) -> torch.Tensor:
    """A numpy image (*spatial), or with ``channels`` a field (ndim, *spatial), as the float32
    (1, C, *spatial) batch torch's models take."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor[None] if channels else tensor[None, None]


def register_matching(reference: np.ndarray, moving: np.ndarray, geometry: Geometry) -> np.ndarray:
    config = UniFuseConfig.paper(reference.ndim)
    return structural_matching(_batch(moving), _batch(reference), config.matching_step,
                               config.matching_range)[0].numpy()


def refine_dense(reference: np.ndarray, moving: np.ndarray, start: np.ndarray,
                 check_cancelled: Callable[[], None] = never_cancelled) -> np.ndarray:
    """``start`` (ndim, *spatial), voxels, refined by the dense MIND instance optimisation
    (``model.dense_refinement``) of ``moving`` onto ``reference`` ([0, 1], same grid), which calls
    ``check_cancelled`` at every step (what it raises stops it)."""
    return dense_refinement(_batch(moving), _batch(reference), _batch(start, channels=True),
                            check_cancelled)[0].numpy()


def register_dense(reference: np.ndarray, moving: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The matching, then a dense MIND instance optimisation at full resolution (ConvexAdam's Adam
    stage, ``model.dense_refinement``): the classical bar for small non-rigid residuals."""
    return refine_dense(reference, moving, register_matching(reference, moving, geometry))


_REGISTER: dict[str, Callable[[np.ndarray, np.ndarray, Geometry], np.ndarray]] = {
    "identity": register_identity,
    "sitk": register_sitk,
    "ants": register_ants,
    "matching": register_matching,
    "dense": register_dense,
}


def _mattes_registration(shrink: tuple[int, ...], smooth: tuple[float, ...], shape: tuple[int, ...],
                         samples: int, mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    stage = sitk.ImageRegistrationMethod()
    stage.SetMetricAsMattesMutualInformation(numberOfHistogramBins=_MI_BINS)
    if mask is not None:
        stage.SetMetricFixedMask(mask)
    stage.SetMetricSamplingStrategy(stage.RANDOM)
    stage.SetMetricSamplingPercentage(min(1.0, samples / float(np.prod(shape))), _SAMPLING_SEED)
    stage.SetInterpolator(sitk.sitkLinear)
    # Small images cannot be shrunk as far: keep every pyramid level at least 8 voxels a side.
    levels = [(f, s) for f, s in zip(shrink, smooth) if min(shape) // f >= 8] or [(1, 0.0)]
    stage.SetShrinkFactorsPerLevel([f for f, _ in levels])
    stage.SetSmoothingSigmasPerLevel([s for _, s in levels])
    stage.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return stage


def _check_pair(reference: object, moving: object) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, image in (("reference", reference), ("moving", moving)):
        array = np.asarray(image, dtype=np.float32)
        if array.ndim not in (2, 3):
            raise InputError(f"expected a 2D or 3D grey image, got shape {array.shape}", name)
        if not np.isfinite(array).all():
            raise InputError("the image contains NaN or infinite values", name)
        arrays.append(array)
    if arrays[0].shape != arrays[1].shape:
        raise InputError(f"the images must share one grid, got {arrays[0].shape} and {arrays[1].shape}",
                         "registration")
    return arrays[0], arrays[1]


# ---- fusion rules ---------------------------------------------------------------------------------
def fuse_max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(a, b)


def fuse_average(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a + b) / 2


def fuse_wavelet(a: np.ndarray, b: np.ndarray, wavelet: str = _WAVELET, levels: int = _WAVELET_LEVELS) -> np.ndarray:
    """n-D DWT fusion: average the approximation, keep the larger-magnitude detail coefficient."""
    level = min(levels, pywt.dwtn_max_level(a.shape, wavelet))
    coefficients_a = pywt.wavedecn(a, wavelet, level=level)
    coefficients_b = pywt.wavedecn(b, wavelet, level=level)
    fused = [(coefficients_a[0] + coefficients_b[0]) / 2]
    for details_a, details_b in zip(coefficients_a[1:], coefficients_b[1:]):
        fused.append({key: np.where(np.abs(details_a[key]) >= np.abs(details_b[key]), details_a[key], details_b[key])
                      for key in details_a})
    # waverecn pads odd sizes by one; crop back to the input grid.
    return pywt.waverecn(fused, wavelet)[tuple(slice(0, n) for n in a.shape)]


_FUSE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "max": fuse_max,
    "average": fuse_average,
    "wavelet": fuse_wavelet,
}


def fuse_classical(rule: str, reference: np.ndarray, aligned: np.ndarray) -> np.ndarray:
    """Fuse two [0, 1] images on one grid with a classical rule; float32 clipped to [0, 1]."""
    if rule not in FUSION_RULES:
        raise InputError(f"unknown fusion rule {rule!r}; choose from {', '.join(FUSION_RULES)}", "fusion")
    a, b = _check_pair(reference, aligned)
    return np.clip(_FUSE[rule](a, b), 0.0, 1.0).astype(np.float32)


def grid_geometry(spacing: tuple[float, ...] | None, ndim: int) -> Geometry:
    """The voxel grid the engine works on (the reference's spacing, no origin or rotation), for
    a registration whose field is wanted in voxels of that grid."""
    spacing_array = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    return Geometry(spacing_array, np.zeros(ndim), np.eye(ndim))
