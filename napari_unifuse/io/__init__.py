"""Reading and writing medical images with their geometry (see docs/architecture.md, `io`)."""

from napari_unifuse.io.fields import read_displacement, write_displacement
from napari_unifuse.io.image import Geometry, ImageVolume
from napari_unifuse.io.nifti_xforms import placement_metadata
from napari_unifuse.io.normalize import IntensityMapping, normalize_intensity
from napari_unifuse.io.readers import read_image
from napari_unifuse.io.resample import grid_coverage, resample_to_reference, resample_to_spacing
from napari_unifuse.io.writers import write_image

__all__ = [
    "Geometry",
    "ImageVolume",
    "IntensityMapping",
    "grid_coverage",
    "normalize_intensity",
    "placement_metadata",
    "read_displacement",
    "read_image",
    "resample_to_reference",
    "resample_to_spacing",
    "write_displacement",
    "write_image",
]
