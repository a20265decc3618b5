"""Registration metrics: similarity of an aligned image to its label, and displacement-field regularity.

Displacement fields follow the project convention (docs/architecture.md): ``u`` of shape
``(ndim, *spatial)`` in voxels, components in array-axis order, mapping x → x + u(x).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from skimage.metrics import structural_similarity

from napari_unifuse.errors import InputError
from napari_unifuse.metrics._inputs import check_images

# skimage's default SSIM window (7 per axis) and its half-width, cropped like skimage's own mean.
_SSIM_WINDOW = 7
_SSIM_CROP = (_SSIM_WINDOW - 1) // 2

# Learn2Reg drops two voxels at every face before its Jacobian statistics (evaluation/utils.py),
# where its zero-padded central differences are wrong.
_LEARN2REG_BORDER = 2

# Volumes are scored in axial slabs of about this many voxels: at once, 3-D SSIM took 160 bytes a
# voxel and the Jacobian 120 (8 and 6 GB on a 512×512×200 CT grid). Slabs padded by as many planes
# as the computation reaches give the same values.
_SLAB_VOXELS = 2**23


def _axial_slabs(depth: int, plane: int, halo: int, start: int = 0, stop: int | None = None
                 ) -> Iterator[tuple[slice, slice]]:
    """(core, padded) slices along axis 0 that tile ``start:stop`` in cores of about ``_SLAB_VOXELS``
    voxels (at least ``4 · halo`` planes, so that the halos cost little), each padded by ``halo``
    planes where the volume has them."""
    stop = depth if stop is None else stop
    thickness = max(4 * halo, 1, _SLAB_VOXELS // max(plane, 1))
    for first in range(start, stop, thickness):
        last = min(first + thickness, stop)
        yield slice(first, last), slice(max(first - halo, 0), min(last + halo, depth))


def registration_metrics(
    aligned: object, label: object, mask: object | None = None, *, data_range: float | None = None
) -> dict[str, float]:
    """MSE, NCC and SSIM of an aligned image (or volume) to its label, optionally inside a mask.

    * ``mse``: mean squared difference in the inputs' units (the project's [0, 1] intensities, the
      scale of UniFuse's alignment table).
    * ``ncc``: global normalised cross-correlation (Pearson's r) over the voxels; NaN if either
      image is constant there.
    * ``ssim``: scikit-image ``structural_similarity`` (7-voxel uniform window, 2D or 3D) with the
      given ``data_range``, 1.0 ([0, 1] images) when none is given; with a mask, the SSIM map
      is averaged over the mask after cropping the 3-voxel border that skimage also leaves out of its mean. NaN where the
      window does not fit (an axis under 7 voxels, a volume of 2–6 slices say), as ``fusion_metrics``
      scores a metric whose window does not fit: the other metrics still apply. A one-slice volume
      is a 2D image: pass its slice.

    ``mask`` is a boolean array of the same shape selecting the voxels to score (e.g. the head).
    Integer images outside [0, 1] (8-bit grey levels, say) are refused without a ``data_range``:
    scored as [0, 1] intensities, their SSIM came out wrong (0.38 for 0.43) without a word.
    """
    aligned_f, label_f = check_images(("aligned", "label"), aligned, label)
    if data_range is None:
        _refuse_integer_grey_levels(("aligned", "label"), (aligned, label), (aligned_f, label_f))
        data_range = 1.0
    if data_range <= 0:
        raise InputError(f"data_range must be positive, got {data_range}")
    if mask is None:
        selected = np.ones(aligned_f.shape, dtype=bool)
    else:
        selected = np.asarray(mask)
        if selected.shape != aligned_f.shape:
            raise InputError(f"mask shape {selected.shape} differs from image shape {aligned_f.shape}", "mask")
        selected = selected.astype(bool)
        if not selected.any():
            raise InputError("the mask selects no voxels", "mask")

    # Without a mask, views: indexing with an all-true mask would copy both images.
    x, y = (aligned_f.reshape(-1), label_f.reshape(-1)) if mask is None else (aligned_f[selected], label_f[selected])
    dx, dy = x - x.mean(), y - y.mean()
    norm = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    ncc = float(np.sum(dx * dy) / norm) if norm > 0 else float("nan")
    del dx, dy  # before the SSIM's maps
    window_fits = min(aligned_f.shape) >= _SSIM_WINDOW
    return {"mse": float(np.mean((x - y) ** 2)), "ncc": ncc,
            "ssim": _masked_ssim(aligned_f, label_f, selected, data_range) if window_fits else float("nan")}


def _refuse_integer_grey_levels(names: tuple[str, ...], originals: tuple[object, ...],
                                checked: tuple[np.ndarray, ...]) -> None:
    """Refuse an integer image with values outside [0, 1], which the default data range misreads."""
    for name, original, data in zip(names, originals, checked, strict=True):
        low, high = float(data.min()), float(data.max())
        if np.issubdtype(np.asarray(original).dtype, np.integer) and (low < 0 or high > 1):
            raise InputError(f"integer intensities span [{low:g}, {high:g}]; the registration metrics take [0, 1] "
                             "images (divide 8-bit grey levels by 255) or the images' data_range "
                             "(data_range=255 for 8-bit grey levels)", name)


def _masked_ssim(aligned: np.ndarray, label: np.ndarray, selected: np.ndarray, data_range: float) -> float:
    """skimage's SSIM map averaged over the ``selected`` voxels of its interior (``_SSIM_CROP`` from
    every face); a volume's map is computed slab by slab, each padded by the window's half-width."""
    total, count = 0.0, 0
    for ssim_map, chosen in _interior_ssim_maps(aligned, label, selected, data_range):
        total += float(ssim_map[chosen].sum())
        count += int(chosen.sum())
    return total / count if count else float("nan")


def _interior_ssim_maps(aligned: np.ndarray, label: np.ndarray, selected: np.ndarray, data_range: float
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(SSIM map, ``selected``) over the interior, whole for an image and per axial slab for a volume."""
    inplane = (slice(_SSIM_CROP, -_SSIM_CROP),) * (aligned.ndim - 1)
    if aligned.ndim == 2:
        _, ssim_map = structural_similarity(aligned, label, data_range=data_range, full=True)
        interior = (slice(_SSIM_CROP, -_SSIM_CROP), *inplane)
        yield ssim_map[interior], selected[interior]
        return
    depth = aligned.shape[0]
    for core, padded in _axial_slabs(depth, aligned[0].size, _SSIM_CROP, _SSIM_CROP, depth - _SSIM_CROP):
        _, ssim_map = structural_similarity(aligned[padded], label[padded], data_range=data_range, full=True)
        within = slice(core.start - padded.start, core.stop - padded.start)
        yield ssim_map[(within, *inplane)], selected[(core, *inplane)]


def end_point_error(u: object, truth: object, mask: object | None = None,
                    spacing: Sequence[float] | None = None) -> float:
    """Mean end-point error |u(x) - truth(x)| over the grid, or over ``mask`` only: in voxels, or
    in mm with ``spacing`` (the voxel size along each array axis, the fields' component order).

    Where neither image shows anything (the background of a head), no registration can see the
    true field, so an error there says more about extrapolation than about alignment; a ``mask``
    of the tissue scores where a reader looks. On thick slices a voxel along the slice axis is
    several in-plane voxels long: only the error in mm weighs the axes as a reader sees them.
    """
    field, true_field = _check_displacement(u), _check_displacement(truth)
    if field.shape != true_field.shape:
        raise InputError(f"field shape {field.shape} differs from the true field's {true_field.shape}",
                         "displacement")
    difference = field - true_field
    if spacing is not None:
        sizes = np.asarray(spacing, dtype=np.float64)
        if sizes.shape != (field.shape[0],) or not (np.all(np.isfinite(sizes)) and np.all(sizes > 0)):
            raise InputError(f"expected {field.shape[0]} positive voxel sizes, got {list(spacing)}", "spacing")
        difference *= sizes.reshape(-1, *(1,) * (field.ndim - 1))
    error = np.linalg.norm(difference, axis=0)
    if mask is None:
        return float(error.mean())
    selected = np.asarray(mask, dtype=bool)
    if selected.shape != error.shape:
        raise InputError(f"mask shape {selected.shape} differs from the field's grid {error.shape}", "mask")
    if not selected.any():
        raise InputError("the mask selects no voxels", "mask")
    return float(error[selected].mean())


def _check_displacement(u: object, to_float64: bool = True) -> np.ndarray:
    """``u`` checked as a finite (ndim, *spatial) field; float64, or with ``to_float64=False`` in its
    own floating dtype (no whole-field copy for a caller that converts it piece by piece)."""
    field = np.asarray(u)
    if to_float64 or not np.issubdtype(field.dtype, np.floating):
        field = field.astype(np.float64, copy=False)
    spatial_dims = field.ndim - 1
    if spatial_dims not in (2, 3) or field.shape[0] != spatial_dims:
        raise InputError(
            f"expected a displacement field of shape (ndim, *spatial) with ndim 2 or 3, got {field.shape}",
            "displacement",
        )
    if min(field.shape[1:]) < 1:
        raise InputError(f"each spatial axis needs at least one voxel, got {field.shape[1:]}", "displacement")
    if not np.isfinite(field).all():
        raise InputError("the displacement field contains NaN or infinite values", "displacement")
    return field


def jacobian_determinant(u: object) -> np.ndarray:
    """det(∂φ/∂x) of φ(x) = x + u(x) at every voxel, same spatial shape as ``u`` (float64).

    ∂u/∂x by central differences (``np.gradient``; one-sided at the border), 0 along an axis of one
    voxel (a 1×N picture, a one-slice volume): nothing varies across it, so det J is that of the
    field over the other axes. 1 means volume is kept, > 1 local expansion, < 1 compression,
    ≤ 0 folding.
    """
    field = _check_displacement(u, to_float64=False)
    if field.shape[0] == 2:
        return _determinant_of_gradients(field.astype(np.float64, copy=False))
    # Slab by slab, each padded by the one plane a central difference reaches: the same values.
    determinant = np.empty(field.shape[1:], dtype=np.float64)
    for core, padded in _axial_slabs(field.shape[1], field[0, 0].size, halo=1):
        within = slice(core.start - padded.start, core.stop - padded.start)
        determinant[core] = _determinant_of_gradients(field[:, padded].astype(np.float64))[within]
    return determinant


def _determinant_of_gradients(field: np.ndarray) -> np.ndarray:
    # J[component][axis]; the determinant is expanded by hand: np.linalg.det over one small matrix
    # per voxel takes 3 s on a 176 x 216 x 180 field, the expansion a tenth of that.
    ndim = field.shape[0]
    jacobian = [_gradient(field[component]) for component in range(ndim)]
    for axis in range(ndim):
        jacobian[axis][axis] += 1.0
    if ndim == 2:
        (a, b), (c, d) = jacobian
        return a * d - b * c
    (a, b, c), (d, e, f), (g, h, i) = jacobian
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def _gradient(values: np.ndarray) -> list[np.ndarray]:
    """∂values/∂axis along every axis (``np.gradient``); 0 along an axis of one voxel, which has no
    neighbour to difference with."""
    return [np.gradient(values, axis=axis) if extent > 1 else np.zeros_like(values)
            for axis, extent in enumerate(values.shape)]


class JacobianRegularity(NamedTuple):
    """Learn2Reg's two regularity figures of a field, from one determinant map."""

    folding_percentage: float
    sd_log_jacobian: float


def jacobian_regularity(determinant: np.ndarray) -> JacobianRegularity:
    """Folding percentage and SDlogJ of a ``jacobian_determinant`` map, Learn2Reg style.

    Both leave out the 2-voxel border where the central differences are one-sided, along the axes
    of more than one voxel (across one voxel there are no differences to leave out). Folding: the
    percentage of voxels with det J ≤ 0. SDlogJ: std(log(clip(det J + 3, 1e-9, 1e9))), exactly as
    Learn2Reg's evaluation computes it; the +3 offset and the clipping are part of the official
    script (MDL-UzL/L2R evaluation.py) and keep folded voxels finite, so values are comparable with
    Learn2Reg leaderboards and smaller than std(log det J) of a non-folding field; exactly 0 for a
    constant determinant (the identity's).
    Both are NaN (undefined, not an error) where an axis of 2 to 4 voxels leaves no interior: a
    3-pixel-tall picture is fused and scored on everything else.
    """
    determinant = np.asarray(determinant, dtype=np.float64)
    cropped = [extent > 1 for extent in determinant.shape]
    if any(crop and extent <= 2 * _LEARN2REG_BORDER for crop, extent in zip(cropped, determinant.shape, strict=True)):
        return JacobianRegularity(folding_percentage=float("nan"), sd_log_jacobian=float("nan"))
    interior = determinant[tuple(slice(_LEARN2REG_BORDER, -_LEARN2REG_BORDER) if crop else slice(None)
                                 for crop in cropped)]
    log_jacobian = np.log(np.clip(interior + 3.0, 1e-9, 1e9))
    # A constant determinant (the identity's, a uniform scaling's) varies not at all; std's rounded
    # mean would report 2.2e-16 for it instead.
    spread = 0.0 if np.ptp(log_jacobian) == 0 else float(log_jacobian.std())
    return JacobianRegularity(folding_percentage=float(100.0 * np.mean(interior <= 0)), sd_log_jacobian=spread)


def folding_percentage(u: object) -> float:
    """Percentage of voxels with det J ≤ 0 (folding), Learn2Reg style (``jacobian_regularity``)."""
    return jacobian_regularity(jacobian_determinant(u)).folding_percentage


def sd_log_jacobian(u: object) -> float:
    """SDlogJ exactly as Learn2Reg's evaluation computes it (``jacobian_regularity``)."""
    return jacobian_regularity(jacobian_determinant(u)).sd_log_jacobian
