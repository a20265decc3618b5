"""DICOM series as scanners and PACS exports write them: tilted, repeated, mixed, colour, unnamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from npe2 import PluginManager

from napari_unifuse._napari_io import get_reader
from napari_unifuse.errors import InputError
from napari_unifuse.io import read_image

AXIAL = np.eye(3)
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # ITK direction, columns = axes
SPACING, SLICE_STEP = (0.8, 0.9), 2.5


def _write_slice(path: Path, pixels: np.ndarray, position, direction: np.ndarray, tags: dict[str, str]) -> Path:
    """One DICOM file of ``pixels`` (rows × columns) at ``position`` (LPS mm) in the plane of
    ``direction``'s first two columns; ``tags`` (series UID, instance number, ...) added."""
    image = sitk.GetImageFromArray(pixels[np.newaxis])
    image.SetSpacing((*SPACING, SLICE_STEP))
    image.SetDirection(direction.ravel().tolist())
    orientation = (*direction[:, 0], *direction[:, 1])
    for tag, value in {"0008|0060": "CT", "0008|103e": "test series",
                       "0020|0037": "\\".join(f"{v:.8f}" for v in orientation),
                       "0020|0032": "\\".join(f"{v:.6f}" for v in position), **tags}.items():
        image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # SimpleITK picks its writer by suffix: a name without .dcm is written as .dcm and renamed.
    staged = path if path.suffix == ".dcm" else path.with_name(path.name + ".dcm")
    writer.SetFileName(str(staged))
    writer.Execute(image)
    staged.rename(path)
    return path


def _write_stack(folder: Path, volume: np.ndarray, series_uid: str, positions=None, *, names=None,
                 first_instance: int = 1, tags: dict[str, str] | None = None) -> list[Path]:
    """Axial slices of ``volume`` (z, y, x) at ``positions`` (default: 2.5 mm apart along z)."""
    folder.mkdir(parents=True, exist_ok=True)
    if positions is None:
        positions = [(0.0, 0.0, SLICE_STEP * k) for k in range(len(volume))]
    files = []
    for k, (pixels, position) in enumerate(zip(volume, positions)):
        instance = first_instance + k
        name = names[k] if names is not None else f"{series_uid[-3:]}_{instance:03d}.dcm"
        files.append(_write_slice(folder / name, pixels, position, AXIAL, {
            "0020|000e": series_uid, "0020|0013": str(instance), "0008|0018": f"{series_uid}.{instance}",
            **(tags or {})}))
    return files


@pytest.fixture
def volume(rng) -> np.ndarray:
    return rng.integers(0, 1000, size=(12, 16, 14)).astype(np.int16)


def test_a_gantry_tilted_ct_places_each_slice_at_its_position_and_names_the_tilt(tmp_path, volume):
    tilt = np.deg2rad(15.0)
    positions = [(-12.0, -15.0 + k * SLICE_STEP * np.tan(tilt), 30.0 + k * SLICE_STEP) for k in range(len(volume))]
    _write_stack(tmp_path / "tilted", volume, "1.2.826.0.1.3680043.2.1125.3001", positions,
                 tags={"0018|1120": "15"})

    read = read_image(tmp_path / "tilted")

    np.testing.assert_array_equal(read.array, volume)
    for k, position in enumerate(positions):
        placed = (read.geometry.index_to_world @ [k, 0, 0, 1])[:3][::-1]  # array order → LPS x, y, z
        np.testing.assert_allclose(placed, position, atol=1e-4)
    (warning,) = read.metadata["warnings"]
    assert "gantry tilt of 15°" in warning and "(0018,1120) says 15°" in warning
    assert "7.43 mm off" in warning  # the last slice of an upright stack: 7.4 mm sideways, 1 mm along z
    assert "missing" not in warning  # equal gaps: nothing is missing


def test_slices_sharing_positions_are_refused_not_squeezed_into_one_volume(tmp_path, volume):
    folder = tmp_path / "dynamic"
    _write_stack(folder, volume, "1.2.826.0.1.3680043.2.1125.3002", names=[f"a_{k:03d}.dcm" for k in range(12)])
    _write_stack(folder, volume // 2, "1.2.826.0.1.3680043.2.1125.3002", names=[f"b_{k:03d}.dcm" for k in range(12)],
                 first_instance=13)

    with pytest.raises(InputError, match=r"24 of the 24 slices share their position .* \(12 distinct positions\)"
                                         r".*Export one phase"):
        read_image(folder)


def test_a_localizer_sharing_the_series_uid_is_left_out_with_a_warning_naming_it(tmp_path, volume, rng):
    folder = tmp_path / "with_localizer"
    series_uid = "1.2.826.0.1.3680043.2.1125.3003"
    _write_stack(folder, volume, series_uid)
    _write_slice(folder / "scout.dcm", rng.integers(0, 1000, size=(12, 20)).astype(np.int16), (5.0, -15.0, 60.0),
                 SAGITTAL, {"0020|000e": series_uid, "0020|0013": "99", "0008|0018": f"{series_uid}.99"})

    read = read_image(folder)

    np.testing.assert_array_equal(read.array, volume)
    (warning,) = read.metadata["warnings"]
    assert "1 file(s) of another orientation or image size left out" in warning and "scout.dcm" in warning


def test_a_one_frame_colour_dicom_is_a_2d_rgb_picture(tmp_path, rng):
    colours = rng.integers(0, 256, size=(16, 14, 3)).astype(np.uint8)
    image = sitk.GetImageFromArray(colours, isVector=True)
    image.SetMetaData("0008|0060", "US")
    path = tmp_path / "us" / "frame.dcm"
    path.parent.mkdir()
    sitk.WriteImage(image, str(path))

    for opened in (path, path.parent):
        read = read_image(opened)
        assert read.is_rgb and read.ndim == 2
        np.testing.assert_array_equal(read.array, colours)


def test_dicom_files_without_a_suffix_open_their_series_in_read_image_and_napari(tmp_path, volume):
    folder = tmp_path / "pacs_export"
    first_uid, second_uid = "1.2.826.0.1.3680043.2.1125.3004", "1.2.826.0.1.3680043.2.1125.3005"
    _write_stack(folder, volume, first_uid, names=[f"{first_uid}.{k + 1}" for k in range(12)])
    _write_stack(folder, volume[::-1].copy(), second_uid, names=[f"IM{k:04d}" for k in range(12)])
    (folder / "notes01").write_text("not an image\n")

    with pytest.raises(InputError, match=r"test series' \(12 files, e\.g\. IM0000\).*Open one file of the series"):
        read_image(folder)
    np.testing.assert_array_equal(read_image(folder / f"{first_uid}.3").array, volume)
    np.testing.assert_array_equal(read_image(folder / "IM0005").array, volume[::-1])
    assert get_reader(str(folder / "IM0005")) is not None
    PluginManager.instance().discover()  # napari offers our reader for such names (napari.yaml patterns)
    for name in ("IM0005", f"{first_uid}.3"):
        readers = PluginManager.instance().iter_compatible_readers([str(folder / name)])
        assert "napari-unifuse" in {reader.plugin_name for reader in readers}
    assert get_reader(str(folder / "notes01")) is None  # a file without a suffix that is not DICOM
    with pytest.raises(InputError, match="unknown file type"):
        read_image(folder / "notes01")



def _write_rescaled_stack(folder: Path, values: np.ndarray, slopes, intercepts, series_uid: str,
                          modality: str) -> None:
    """Axial slices of ``values`` stored as 16-bit integers, each with its own RescaleSlope and
    RescaleIntercept (PET scanners scale each slice to its own maximum)."""
    folder.mkdir()
    for k, (pixels, slope, intercept) in enumerate(zip(values, slopes, intercepts)):
        _write_slice(folder / f"IM{k:04d}.dcm", pixels.astype(np.float32), (0.0, 0.0, SLICE_STEP * k), AXIAL, {
            "0008|0060": modality, "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0008|0018": f"{series_uid}.{k + 1}", "0028|0100": "16", "0028|0101": "16", "0028|0102": "15",
            "0028|0103": "0", "0028|1053": repr(float(slope)), "0028|1052": repr(float(intercept))})


@pytest.mark.parametrize("slopes", [
    (1.0, 0.15625, 3.125, 21.875),  # an empty first slice stored with slope 1, fractional slopes after it
    (1.0, 2.0, 3.0, 1.0),  # whole slopes, but the later slices reach past what the first one's type holds
], ids=["fractional", "whole-but-varying"])
def test_a_pet_series_with_a_rescale_per_slice_keeps_each_slices_own_values(tmp_path, rng, slopes):
    stored = rng.integers(0, 32000, size=(4, 6, 5)).astype(float)
    stored[0] = 0.0
    stored[1:, 0, 0] = 32000  # the largest values: above 65535 once rescaled, except with slope 1
    values = stored * np.array(slopes)[:, None, None]
    _write_rescaled_stack(tmp_path / "pet", values, slopes, [0.0] * 4, "1.2.826.0.1.3680043.2.1125.3006", "PT")

    read = read_image(tmp_path / "pet")

    assert np.issubdtype(read.array.dtype, np.floating)
    np.testing.assert_allclose(read.array, values, rtol=1e-6)
    assert read.metadata["header"]["RescaleSlope"] == f"varies per slice: {min(slopes):g} to {max(slopes):g}"
    assert read.metadata["header"]["RescaleIntercept"] == "0"  # the same for every slice: as stated


def test_a_ct_series_with_one_whole_number_rescale_stays_integer(tmp_path, rng):
    values = rng.integers(-1024, 2000, size=(4, 6, 5)).astype(float)
    _write_rescaled_stack(tmp_path / "ct", values, [1.0] * 4, [-1024.0] * 4,
                          "1.2.826.0.1.3680043.2.1125.3007", "CT")

    read = read_image(tmp_path / "ct")

    assert np.issubdtype(read.array.dtype, np.integer)
    np.testing.assert_array_equal(read.array, values)
    assert read.metadata["header"]["RescaleSlope"] == "1"


def test_a_rescale_slope_that_is_not_a_number_is_refused_naming_the_file(tmp_path, rng):
    _write_rescaled_stack(tmp_path / "pet", rng.integers(0, 100, size=(3, 6, 5)) * 9.5, [9.5] * 3, [0.0] * 3,
                          "1.2.826.0.1.3680043.2.1125.3008", "PT")
    damaged = tmp_path / "pet" / "IM0001.dcm"
    slope_element = b"\x28\x00\x53\x10\x04\x00\x00\x00"  # (0028,1053), 4 bytes long, as GDCM writes it
    data = damaged.read_bytes()
    assert data.count(slope_element + b"9.5 ") == 1
    damaged.write_bytes(data.replace(slope_element + b"9.5 ", slope_element + b"n/a "))

    with pytest.raises(InputError, match=r"IM0001\.dcm has a RescaleSlope of 'n/a', which is not a number"):
        read_image(tmp_path / "pet")
