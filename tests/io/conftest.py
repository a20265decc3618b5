"""Builders of small real files for the io tests (each test writes into its own tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation


def _rotation(degrees: tuple[float, ...]) -> np.ndarray:
    """A proper rotation (det +1): 3 Euler angles in 3D, one angle in 2D."""
    if len(degrees) == 1:
        return Rotation.from_euler("z", degrees, degrees=True).as_matrix()[0, :2, :2]
    return Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()


def _oblique_sitk_image(array: np.ndarray, spacing_itk, origin_itk, degrees) -> sitk.Image:
    """A SimpleITK image with anisotropic spacing and a rotated (oblique) direction."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_itk)
    image.SetOrigin(origin_itk)
    image.SetDirection(_rotation(degrees).ravel().tolist())
    return image


def _write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, modality: str = "CT") -> list[Path]:
    """One file per slice with the tags GDCM needs to rebuild the geometry.

    Follows SimpleITK's "DicomSeriesFromArray" example: orientation from the direction's first two
    columns, ImagePositionPatient from each slice's physical origin.
    """
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    orientation = (d[0], d[3], d[6], d[1], d[4], d[7])
    common = {
        "0008|0021": "20250101",
        "0008|0031": "120000",
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0060": modality,
        "0008|103e": "io test series",
        "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{v:.8f}" for v in orientation),
        "0018|0050": f"{image.GetSpacing()[2]:.6f}",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        for tag, value in common.items():
            slice_image.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.8f}" for v in position))
        slice_image.SetMetaData("0020|0013", str(k + 1))
        slice_image.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        files.append(folder / f"{series_uid[-6:]}_{k:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(slice_image)
    return files


@pytest.fixture
def rotation():
    return _rotation


@pytest.fixture
def oblique_sitk_image():
    return _oblique_sitk_image


@pytest.fixture
def write_dicom_series():
    return _write_dicom_series


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def sampled_by_package_and_simpleitk(tmp_path):
    """``sample(reference, moving, u)``: the moving image (both read from files) sampled at the
    world point of each reference voxel x + u, as the package samples it, and by SimpleITK's resample
    through the field written for them; returns (package's, SimpleITK's, mask of the reference voxels
    whose point lies inside the moving image)."""
    from scipy.ndimage import map_coordinates

    from napari_unifuse.io import write_displacement
    from napari_unifuse.io.fields import itk_placement

    def sample(reference, moving, u):
        shape = reference.spatial_shape
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)
        world = np.einsum("ij,j...->i...", reference.geometry.index_to_world, np.concatenate([grid + u, grid[:1] ** 0]))
        at = np.einsum("ij,j...->i...", np.linalg.inv(moving.geometry.index_to_world), world)[:len(shape)]
        ours = map_coordinates(moving.array.astype(np.float64), at, order=1)
        path = write_displacement(u, reference.geometry, tmp_path / "displacement.nii.gz",
                                  reference_metadata=reference.metadata, moving_placement=itk_placement(moving))
        transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
        theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(moving.source)),
                                                      sitk.ReadImage(str(reference.source)), transform,
                                                      sitk.sitkLinear, 0.0))
        inside = np.all([(at[k] >= 0) & (at[k] <= moving.spatial_shape[k] - 1) for k in range(len(shape))], axis=0)
        return ours, theirs, inside

    return sample
