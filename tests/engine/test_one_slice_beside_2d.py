"""A 2-D slice stored as a one-slice NIfTI volume (x, y, 1), as nibabel and FSL write it, beside a slice
stored as (x, y) or in colour (read as 2-D images): fused as the 2-D pair it is, placed by the headers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_unifuse.engine.inference import FusionEngine, one_slice_beside_2d
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, read_image
from napari_unifuse.io.readers import is_picture
from napari_unifuse.model import UniFuse, UniFuseConfig

# 0.9 mm pixels, x and y flipped, the plane at z = 42 mm and off the origin in x and y.
AFFINE = np.array([[-0.9, 0, 0, 30.0], [0, -0.9, 0, -20.0], [0, 0, 5.0, 42.0], [0, 0, 0, 1]])
SHAPE_XY = (40, 36)


@pytest.fixture(scope="module")
def engine() -> FusionEngine:
    torch.manual_seed(0)
    # No MI refinement: these tests are about how the pair is laid out, and it is the slow part.
    config = UniFuseConfig.from_dict({**UniFuseConfig.small(spatial_dims=2).to_dict(),
                                      "matching_mutual_information": False})
    return FusionEngine(UniFuse(config), device="cpu")


def blob(shift: float) -> np.ndarray:
    """A (x, y) slice as nibabel stores it: a bright blob off centre on a dim disc."""
    x, y = np.meshgrid(np.linspace(-1, 1, SHAPE_XY[0]), np.linspace(-1, 1, SHAPE_XY[1]), indexing="ij")
    disc = (x**2 + y**2 < 0.8).astype(np.float32)
    return (300 * disc + 700 * np.exp(-8 * ((x - shift) ** 2 + (y + 0.2) ** 2))).astype(np.float32)


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> dict[str, object]:
    """The same two slices saved both ways NIfTI tools save them, read back by the package's reader."""
    folder = tmp_path_factory.mktemp("slices")
    images = {"ct": blob(0.1), "mr": blob(-0.1)}
    read = {}
    for name, values in images.items():
        for layout, array in (("xy", values), ("xy1", values[:, :, None])):
            path = folder / f"{name}_{layout}.nii.gz"
            nib.save(nib.Nifti1Image(array, AFFINE), path)
            read[f"{name}_{layout}"] = read_image(path)
    colours = np.zeros((*SHAPE_XY, 1), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    scaled = np.round(images["mr"] / images["mr"].max() * 255).astype(np.uint8)
    colours["R"][..., 0], colours["G"][..., 0], colours["B"][..., 0] = scaled, scaled // 2, 255 - scaled
    nib.save(nib.Nifti1Image(colours, AFFINE), folder / "pet_rgb_xy1.nii.gz")
    read["pet_rgb_xy1"] = read_image(folder / "pet_rgb_xy1.nii.gz")
    return read


def test_the_reader_reads_the_layouts_as_the_bug_report_says(slices):
    assert slices["ct_xy"].ndim == 2 and slices["pet_rgb_xy1"].ndim == 2 and slices["pet_rgb_xy1"].is_rgb
    assert slices["ct_xy1"].array.shape == (1, SHAPE_XY[1], SHAPE_XY[0])


def test_a_one_slice_volume_is_placed_as_the_same_slice_stored_2d(slices):
    _, flat = one_slice_beside_2d(slices["ct_xy"], slices["mr_xy1"])
    np.testing.assert_array_equal(flat.array, slices["mr_xy"].array)
    assert flat.geometry.allclose(slices["mr_xy"].geometry)
    flat, _ = one_slice_beside_2d(slices["ct_xy1"], slices["mr_xy"])
    assert flat.geometry.allclose(slices["ct_xy"].geometry)
    assert one_slice_beside_2d(slices["ct_xy"], slices["mr_xy"]) is None
    assert one_slice_beside_2d(slices["ct_xy1"], slices["mr_xy1"]) is None


def test_a_one_slice_moving_image_beside_a_2d_reference_fuses_as_the_2d_pair(engine, slices):
    """Refused before: "the reference is 2D ... but the moving image is 3D (shape (1, 36, 40))"."""
    expected = engine.run_fusion(slices["ct_xy"], slices["mr_xy"], uncertainty_passes=0)
    result = engine.run_fusion(slices["ct_xy"], slices["mr_xy1"], uncertainty_passes=0)
    assert result.fused.array.shape == expected.fused.array.shape == slices["ct_xy"].array.shape
    np.testing.assert_allclose(result.fused.array, expected.fused.array, atol=1e-6)
    np.testing.assert_allclose(result.displacement, expected.displacement, atol=1e-6)
    assert result.provenance["inputs"]["moving"]["shape"] == [1, SHAPE_XY[1], SHAPE_XY[0]]
    assert result.provenance["single_slice"]["role"] == "moving"


def test_a_one_slice_reference_beside_a_2d_moving_image_gets_its_outputs_on_its_grid(engine, slices):
    reference = slices["ct_xy1"]
    expected = engine.run_fusion(slices["ct_xy"], slices["mr_xy"], uncertainty_passes=0)
    result = engine.run_fusion(reference, slices["mr_xy"], uncertainty_passes=0)
    assert result.fused.array.shape == reference.array.shape
    assert result.fused.geometry.allclose(reference.geometry)
    np.testing.assert_allclose(result.fused.array[0], expected.fused.array, atol=1e-6)
    assert result.displacement.shape == (3, *reference.array.shape) and not result.displacement[0].any()
    np.testing.assert_allclose(result.displacement[1:, 0], expected.displacement, atol=1e-6)
    assert result.quality.maps()["invented"].shape == reference.array.shape
    assert result.moving_itk_placement.shape == (4, 4)
    assert result.provenance["single_slice"]["role"] == "reference"


def test_a_colour_slice_beside_a_one_slice_grey_reference_is_fused_in_its_plane(engine, slices):
    """Refused before: "the reference is 3D (shape (1, 36, 40)) but the moving image is an RGB 2D image"."""
    expected = engine.run_fusion(slices["mr_xy"], slices["pet_rgb_xy1"], uncertainty_passes=0)
    result = engine.run_fusion(slices["mr_xy1"], slices["pet_rgb_xy1"], uncertainty_passes=0)
    # Colour images are 2-D throughout the package: the colour outputs stay on the slice's plane.
    assert result.fused.is_rgb and result.fused.geometry.allclose(slices["mr_xy"].geometry)
    np.testing.assert_allclose(result.fused.array, expected.fused.array, atol=1e-6)
    assert result.provenance["inputs"]["reference"]["shape"] == [1, SHAPE_XY[1], SHAPE_XY[0]]


def test_validate_takes_the_pair_run_fusion_fuses(engine, slices):
    reference, moving = engine.validate(slices["ct_xy1"], slices["mr_xy"])
    assert reference.array.shape == slices["ct_xy1"].array.shape and moving.ndim == 2


def test_a_one_slice_volume_outside_the_axial_plane_is_refused_in_one_line(engine, slices):
    coronal = ImageVolume(slices["mr_xy1"].array.reshape(SHAPE_XY[1], 1, SHAPE_XY[0]),
                          Geometry(np.ones(3), np.zeros(3), np.eye(3)), source="coronal.nii.gz")
    with pytest.raises(InputError, match=r"coronal, sagittal or oblique plane .*save both slices the same way") as error:
        engine.run_fusion(slices["ct_xy"], coronal)
    assert error.value.source == "coronal.nii.gz" and "\n" not in error.value.problem


def test_a_picture_beside_a_placed_one_slice_volume_is_refused_in_one_line(engine, slices):
    picture = ImageVolume(slices["mr_xy"].array, Geometry.identity(2), source="slice.PNG")
    with pytest.raises(InputError, match=r"is a picture \(a PNG or JPG, or a DICOM image without position\)"
                                         r".*save both images the same way") as error:
        engine.run_fusion(slices["ct_xy1"], picture)
    assert error.value.source == "slice.PNG" and "\n" not in error.value.problem


def test_a_whole_volume_beside_a_2d_image_is_still_refused(engine, slices):
    volume = ImageVolume(np.zeros((4, SHAPE_XY[1], SHAPE_XY[0]), np.float32), Geometry.identity(3))
    with pytest.raises(InputError, match="both must be 2D or both 3D"):
        engine.run_fusion(volume, slices["mr_xy"])


@pytest.mark.parametrize(("source", "picture"), [("a/b.png", True), ("B.JPG", True), ("c.jpeg", True),
                                                 ("d.nii.gz", False), (None, False)])
def test_is_picture_tells_pngs_and_jpgs_by_their_suffix(source, picture):
    assert is_picture(ImageVolume(np.zeros((4, 4), np.float32), Geometry.identity(2), source=source)) is picture
