"""resample_to_reference: put a moving image on the reference's voxel grid, in physical space."""

from __future__ import annotations

import SimpleITK as sitk

from napari_unifuse.errors import InputError
from napari_unifuse.io.image import ImageVolume

INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


def resample_to_reference(
    moving: ImageVolume, reference: ImageVolume, interpolation: str = "linear"
) -> ImageVolume:
    """Sample ``moving`` at the world position of every reference voxel (identity transform).

    The result has the reference's shape and geometry; points outside ``moving`` become 0.
    Linear interpolation returns float32; nearest keeps the pixel type (use it for label maps).
    ``source`` stays the moving file's, so writers still refuse to overwrite it.
    """
    if interpolation not in INTERPOLATORS:
        raise InputError(f"interpolation must be one of {sorted(INTERPOLATORS)}, got {interpolation!r}")
    if moving.ndim != reference.ndim:
        raise InputError(
            f"cannot resample a {moving.ndim}D image onto a {reference.ndim}D reference ({reference.source})",
            moving.source,
        )
    geometry = reference.geometry
    image = moving.to_sitk()
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in reversed(reference.spatial_shape)])
    resampler.SetOutputSpacing(geometry.itk_spacing)
    resampler.SetOutputOrigin(geometry.itk_origin)
    resampler.SetOutputDirection(geometry.itk_direction)
    resampler.SetInterpolator(INTERPOLATORS[interpolation])
    resampler.SetDefaultPixelValue(0.0)
    if interpolation == "linear":
        resampler.SetOutputPixelType(sitk.sitkVectorFloat32 if moving.is_rgb else sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampler.Execute(image))
    metadata = {**moving.metadata, "resampled_to": reference.source, "interpolation": interpolation}
    return ImageVolume(array, geometry, metadata, moving.source, moving.is_rgb)
