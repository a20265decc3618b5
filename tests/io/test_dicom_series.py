"""DICOM series as scanners and PACS exports write them: tilted, repeated, mixed, colour, unnamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from npe2 import PluginManager
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian

from napari_unifuse._napari_io import get_reader
from napari_unifuse.errors import InputError
from napari_unifuse.io import read_image
from napari_unifuse.io.readers import dicom_series, holds_dicom, is_picture

AXIAL = np.eye(3)
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # ITK direction, columns = axes
SPACING, SLICE_STEP = (0.8, 0.9), 2.5


def _write_slice(path: Path, pixels: np.ndarray, position, direction: np.ndarray, tags: dict[str, str],
                 spacing=SPACING) -> Path:
    """One DICOM file of ``pixels`` (rows × columns) at ``position`` (LPS mm) in the plane of
    ``direction``'s first two columns, ``spacing`` (ITK order) apart; ``tags`` (series UID, instance
    number, ...) added."""
    image = sitk.GetImageFromArray(pixels[np.newaxis])
    image.SetSpacing((*spacing, SLICE_STEP))
    image.SetDirection(direction.ravel().tolist())
    orientation = (*direction[:, 0], *direction[:, 1])
    for tag, value in {"0008|0060": "CT", "0008|103e": "test series",
                       "0020|0037": "\\".join(f"{v:.8f}" for v in orientation),
                       "0020|0032": "\\".join(f"{v:.6f}" for v in position), **tags}.items():
        image.SetMetaData(tag, value)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    assert "1 file(s) of another orientation, image size or pixel spacing left out" in warning and "scout.dcm" in warning


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


# ---- multi-frame files, files that are no slice of a stack, DICOMDIR, files without a preamble -------------
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _item(**attributes) -> Dataset:
    """One item of a functional group sequence."""
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _write_enhanced(path: Path, stored: np.ndarray, positions, series_uid: str, *, rescales=None,
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), instance: int = 1) -> Path:
    """An enhanced CT file of ``stored`` (frames × rows × columns, 16-bit values), frame k at
    ``positions[k]`` (LPS mm) with ``rescales[k]`` (slope, intercept) in its per-frame functional
    groups, or one shared rescale of 1 and -1024; orientation and 0.8 × 0.9 mm pixels shared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = ENHANCED_CT
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = f"{series_uid}.{instance}"
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.update({"StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.4000", "SeriesInstanceUID": series_uid,
                    "Modality": "CT", "SeriesDescription": "enhanced", "InstanceNumber": instance,
                    "NumberOfFrames": len(stored), "Rows": stored.shape[1], "Columns": stored.shape[2],
                    "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16,
                    "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1})
    shared = _item(PlaneOrientationSequence=[_item(ImageOrientationPatient=list(orientation))],
                   PixelMeasuresSequence=[_item(PixelSpacing=[SPACING[1], SPACING[0]], SliceThickness=SLICE_STEP)])
    if rescales is None:
        shared.PixelValueTransformationSequence = [_item(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")]
    dataset.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k, position in enumerate(positions):
        frame = _item(PlanePositionSequence=[_item(ImagePositionPatient=list(position))])
        if rescales is not None:
            frame.PixelValueTransformationSequence = [_item(RescaleSlope=rescales[k][0], RescaleIntercept=rescales[k][1],
                                                            RescaleType="HU")]
        per_frame.append(frame)
    dataset.PerFrameFunctionalGroupsSequence = per_frame
    dataset.PixelData = stored.astype("<i2").tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def _world_positions(read) -> np.ndarray:
    """Where the read volume puts each slice's first pixel (LPS x, y, z)."""
    return np.array([(read.geometry.index_to_world @ [k, 0, 0, 1])[:3][::-1] for k in range(len(read.array))])


def test_an_enhanced_file_with_frames_out_of_order_is_stacked_by_their_positions(tmp_path, volume):
    # A sagittal stack: frames step along the normal -x, written in no order along it.
    order = [3, 0, 5, 1, 4, 2, 9, 6, 11, 7, 10, 8]
    positions = [(-SLICE_STEP * k, -10.0, 40.0) for k in order]
    path = _write_enhanced(tmp_path / "enh" / "frames.dcm", volume[order] + 1024, positions,
                           "1.2.826.0.1.3680043.2.1125.4001", orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))

    read = read_image(path)

    np.testing.assert_array_equal(read.array, volume)
    np.testing.assert_allclose(_world_positions(read), [(-SLICE_STEP * k, -10.0, 40.0) for k in range(12)], atol=1e-6)
    np.testing.assert_allclose(read.geometry.spacing, (SLICE_STEP, SPACING[1], SPACING[0]))
    assert "warnings" not in read.metadata


def test_an_enhanced_file_with_unevenly_spaced_frames_keeps_its_grid_and_warns(tmp_path, volume):
    heights = [SLICE_STEP * k for k in range(6)] + [SLICE_STEP * (k + 1) for k in range(6, 12)]  # one missing
    path = _write_enhanced(tmp_path / "enh" / "frames.dcm", volume + 1024, [(10.0, 20.0, 30.0 + z) for z in heights],
                           "1.2.826.0.1.3680043.2.1125.4002")

    read = read_image(path)

    np.testing.assert_array_equal(read.array, volume)
    np.testing.assert_allclose(read.geometry.spacing[1:], (SPACING[1], SPACING[0]))
    np.testing.assert_allclose(_world_positions(read)[0], (10.0, 20.0, 30.0))
    (warning,) = read.metadata["warnings"]
    assert "a gap of 5 mm between slices 5 and 6 where most are 2.5 mm apart; a slice may be missing" in warning


@pytest.mark.parametrize("frame_order", ["by echo", "interleaved"])
def test_an_enhanced_file_with_two_echoes_per_position_is_refused(tmp_path, volume, frame_order):
    heights = [0.0, SLICE_STEP, 2 * SLICE_STEP] * 2
    if frame_order == "interleaved":
        heights = sorted(heights)
    path = _write_enhanced(tmp_path / "enh" / "echoes.dcm", volume[:6] + 1024, [(0.0, 0.0, z) for z in heights],
                           "1.2.826.0.1.3680043.2.1125.4003")

    with pytest.raises(InputError, match=r"6 of the 6 slices share their position .* \(3 distinct positions\)"
                                         r".*Export one phase"):
        read_image(path)


def test_an_enhanced_file_applies_each_frames_own_rescale(tmp_path, rng):
    stored = rng.integers(0, 30000, size=(4, 6, 5))
    rescales = [(1.0, -1024.0), (0.5, 0.0), (2.0, 3.0), (21.875, -7.0)]
    path = _write_enhanced(tmp_path / "pet" / "frames.dcm", stored, [(0.0, 0.0, SLICE_STEP * k) for k in range(4)],
                           "1.2.826.0.1.3680043.2.1125.4004", rescales=rescales)

    read = read_image(path)

    expected = [pixels * slope + intercept for pixels, (slope, intercept) in zip(stored, rescales)]
    np.testing.assert_allclose(read.array, expected, rtol=1e-9)
    assert read.metadata["header"]["RescaleSlope"] == "varies per slice: 0.5 to 21.875"


def test_a_series_split_over_two_enhanced_files_is_refused_as_a_folder_and_each_file_reads_alone(tmp_path, volume):
    folder, series_uid = tmp_path / "enh", "1.2.826.0.1.3680043.2.1125.4005"
    halves = [(folder / "a.dcm", volume[:6], 0), (folder / "b.dcm", volume[6:], 6)]
    for instance, (path, frames, first) in enumerate(halves, start=1):
        _write_enhanced(path, frames + 1024, [(0.0, 0.0, SLICE_STEP * (first + k)) for k in range(6)], series_uid,
                        instance=instance)

    with pytest.raises(InputError, match=r"the series holds 2 multi-frame files \(a\.dcm, b\.dcm\), which do not "
                                         r"stack into one volume: open one file"):
        read_image(folder)
    for path, frames, first in halves:
        read = read_image(path)
        np.testing.assert_array_equal(read.array, frames)
        np.testing.assert_allclose(_world_positions(read)[0], (0.0, 0.0, SLICE_STEP * first))


def _without_position(path: Path) -> Path:
    """``path`` with its ImagePositionPatient and ImageOrientationPatient removed (a key image, a screenshot)."""
    dataset = dcmread(path)
    del dataset.ImagePositionPatient, dataset.ImageOrientationPatient
    dataset.save_as(path)
    return path


def test_a_key_image_without_a_position_is_left_out_of_its_series_and_opens_alone(tmp_path, volume):
    folder, series_uid = tmp_path / "ct", "1.2.826.0.1.3680043.2.1125.4006"
    shuffled = [4, 0, 9, 2, 11, 6, 1, 8, 3, 10, 5, 7]  # instance numbers that do not follow the positions
    for k, instance in enumerate(shuffled):
        _write_stack(folder, volume[k:k + 1], series_uid, [(0.0, 0.0, 30.0 + SLICE_STEP * k)],
                     names=[f"IM{k:04d}"], first_instance=instance + 1)
    key_image = np.full(volume.shape[1:], 3000, dtype=np.int16)
    _without_position(_write_stack(folder, key_image[np.newaxis], series_uid, [(0.0, 0.0, 0.0)], names=["KEY"],
                                   first_instance=99)[0])

    for opened in (folder, folder / "IM0003"):
        read = read_image(opened)
        np.testing.assert_array_equal(read.array, volume)
        np.testing.assert_allclose(_world_positions(read), [(0.0, 0.0, 30.0 + SLICE_STEP * k) for k in range(12)],
                                   atol=1e-6)
        (warning,) = read.metadata["warnings"]
        assert warning == "1 file without ImagePositionPatient (KEY) left out of the stack; the 12 slices of the stack are read"
    np.testing.assert_array_equal(np.squeeze(read_image(folder / "KEY").array), key_image)


def test_a_series_of_files_without_positions_is_refused_as_a_folder_and_each_file_reads_alone(tmp_path, volume):
    folder = tmp_path / "screenshots"
    files = _write_stack(folder, volume[:3], "1.2.826.0.1.3680043.2.1125.4007", names=["s0", "s1", "s2"])
    for path in files:
        _without_position(path)

    with pytest.raises(InputError, match=r"the series holds 3 files without ImagePositionPatient \(s0, s1, s2\), "
                                         r"which do not stack into one volume: open one file"):
        read_image(folder)
    np.testing.assert_array_equal(np.squeeze(read_image(folder / "s1").array), volume[1])


def test_colour_pictures_sharing_a_series_open_one_by_one_and_are_refused_as_a_folder(tmp_path, rng):
    folder, series_uid = tmp_path / "us", "1.2.826.0.1.3680043.2.1125.4008"
    folder.mkdir()
    pictures = rng.integers(0, 256, size=(3, 16, 14, 3)).astype(np.uint8)
    for k, colours in enumerate(pictures):
        image = sitk.GetImageFromArray(colours, isVector=True)
        for tag, value in {"0008|0060": "US", "0020|000e": series_uid, "0020|0013": str(k + 1),
                           "0008|0018": f"{series_uid}.{k + 1}"}.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"frame{k}.dcm"))
        writer.Execute(image)

    with pytest.raises(InputError, match=r"the series holds 3 colour pictures \(frame0\.dcm, frame1\.dcm, frame2\.dcm"
                                         r"\), which do not stack into one volume: open one file"):
        read_image(folder)
    for k, colours in enumerate(pictures):
        read = read_image(folder / f"frame{k}.dcm")
        assert read.is_rgb and read.ndim == 2
        np.testing.assert_array_equal(read.array, colours)
    # Each picture is its own image (napari opens each, provenance hashes that file), not the series.
    keyed = [dicom_series(folder / f"frame{k}.dcm") for k in range(3)]
    assert len({key for key, _ in keyed}) == 3
    assert [files for _, files in keyed] == [[str(folder / f"frame{k}.dcm")] for k in range(3)]


def test_a_dicom_file_without_its_preamble_opens_by_its_content(tmp_path, volume):
    files = _write_stack(tmp_path / "old", volume, "1.2.826.0.1.3680043.2.1125.4009",
                         names=[f"IM{k:04d}" for k in range(12)])
    for path in files:  # drop the 128-byte preamble and "DICM": the file starts with its meta group 0002
        path.write_bytes(path.read_bytes()[132:])
    assert files[0].read_bytes()[:2] == b"\x02\x00"

    assert holds_dicom(files[4])
    for opened in (files[4], files[4].parent):
        np.testing.assert_array_equal(read_image(opened).array, volume)


def test_a_dicomdir_is_refused_naming_the_series_folders_it_indexes(tmp_path, volume):
    source, series_uid = tmp_path / "source", "1.2.826.0.1.3680043.2.1125.4010"
    files = _write_stack(source, volume[:3], series_uid)
    file_set = FileSet()
    for path in files:
        dataset = dcmread(path)
        dataset.PatientID, dataset.StudyID, dataset.SeriesNumber = "anonymous", "1", 1
        dataset.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.4011"
        file_set.add(dataset)
    disc = tmp_path / "disc"
    file_set.write(disc)
    (series_folder,) = {Path(instance.path).parent.relative_to(disc).as_posix() for instance in file_set}

    for opened, problem in ((disc / "DICOMDIR", "is a DICOMDIR"), (disc, "holds no DICOM series itself but a DICOMDIR")):
        with pytest.raises(InputError, match=rf"{problem}, the index of a DICOM disc or export.*: open one of the series "
                                             rf"folders it lists instead: {series_folder} \(CT, 3 files\)"):
            read_image(opened)
    np.testing.assert_array_equal(read_image(disc / series_folder).array, volume[:3])
    # napari offers our reader for the disc's root, which says what to open, rather than no reader at all.
    (tmp_path / "empty").mkdir()
    assert get_reader(str(disc)) is not None and get_reader(str(tmp_path / "empty")) is None


def test_an_enhanced_file_with_frames_in_several_orientations_is_refused(tmp_path, volume):
    path = _write_enhanced(tmp_path / "localizer" / "planes.dcm", volume[:3] + 1024,
                           [(0.0, 0.0, SLICE_STEP * k) for k in range(3)], "1.2.826.0.1.3680043.2.1125.4012")
    dataset = dcmread(path)  # one orientation per frame: two axial frames and a coronal one
    del dataset.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    for frame, orientation in zip(dataset.PerFrameFunctionalGroupsSequence,
                                  [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)] * 2 + [(1.0, 0.0, 0.0, 0.0, 0.0, -1.0)]):
        frame.PlaneOrientationSequence = [_item(ImageOrientationPatient=list(orientation))]
    dataset.save_as(path)

    with pytest.raises(InputError, match=r"planes\.dcm: its 3 frames lie in 2 orientations .*export the frames of one "
                                         r"orientation"):
        read_image(path)


# ---- series as they come from real exports: float noise, mixed pixel types and spacings, damage, charsets ----------
def _rotated_about_z(sine: float) -> np.ndarray:
    """An ITK direction turned about z by the angle of ``sine`` (a nearly axial, oblique plane)."""
    cosine = np.sqrt(1 - sine**2)
    return np.array([[cosine, -sine, 0.0], [sine, cosine, 0.0], [0.0, 0.0, 1.0]])


def test_slices_whose_orientations_differ_by_float_noise_form_one_stack(tmp_path, volume):
    # Direction cosines of 0.000499 and 0.000501 lie on either side of a 3-decimal rounding boundary.
    folder, series_uid = tmp_path / "oblique", "1.2.826.0.1.3680043.2.1125.5001"
    for k, sine in enumerate([0.000499] * 7 + [0.000501] * 5):
        _write_slice(folder / f"IM{k:04d}", volume[k], (0.0, 0.0, SLICE_STEP * k), _rotated_about_z(sine),
                     {"0020|000e": series_uid, "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}"})

    read = read_image(folder)

    np.testing.assert_array_equal(read.array, volume)
    assert "warnings" not in read.metadata


def test_an_enhanced_file_whose_frame_orientations_differ_by_float_noise_is_one_volume(tmp_path, volume):
    path = _write_enhanced(tmp_path / "enh" / "frames.dcm", volume[:3] + 1024,
                           [(0.0, 0.0, SLICE_STEP * k) for k in range(3)], "1.2.826.0.1.3680043.2.1125.5002")
    dataset = dcmread(path)
    del dataset.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    for frame, sine in zip(dataset.PerFrameFunctionalGroupsSequence, [0.000499, 0.000501, 0.000499]):
        cosine = np.sqrt(1 - sine**2)
        frame.PlaneOrientationSequence = [_item(ImageOrientationPatient=[cosine, sine, 0.0, -sine, cosine, 0.0])]
    dataset.save_as(path)

    np.testing.assert_array_equal(read_image(path).array, volume[:3])


@pytest.mark.parametrize("first_slices", ["unsigned", "8-bit"])
def test_slices_stored_in_different_pixel_types_keep_every_slices_values(tmp_path, volume, first_slices):
    # The first slices unsigned (or 8-bit), the others signed 16-bit down to -500: read in the first
    # slices' type, -500 would wrap to 65036 (or 998 clip to 255).
    values = volume.astype(np.int32) - 500
    values[:3] = np.abs(values[:3]) // 4 if first_slices == "8-bit" else np.abs(values[:3])
    stored_first = np.uint8 if first_slices == "8-bit" else np.uint16
    folder, series_uid = tmp_path / "mixed_types", "1.2.826.0.1.3680043.2.1125.5003"
    for k, pixels in enumerate(values):
        _write_slice(folder / f"IM{k:04d}.dcm", pixels.astype(stored_first if k < 3 else np.int16),
                     (0.0, 0.0, SLICE_STEP * k), AXIAL,
                     {"0020|000e": series_uid, "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}"})

    np.testing.assert_array_equal(read_image(folder).array, values)


def _write_two_spacings(folder: Path, volume: np.ndarray, coarse_from: int) -> None:
    """``volume``'s slices, those from ``coarse_from`` on with pixels twice as large as the others'."""
    series_uid = "1.2.826.0.1.3680043.2.1125.5004"
    for k, pixels in enumerate(volume):
        spacing = tuple(2 * size for size in SPACING) if k >= coarse_from else SPACING
        _write_slice(folder / f"IM{k:04d}.dcm", pixels, (0.0, 0.0, SLICE_STEP * k), AXIAL,
                     {"0020|000e": series_uid, "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}"},
                     spacing=spacing)


def test_pixel_spacings_apart_by_four_decimal_rounding_are_one_stack(tmp_path, volume):
    # 0.46875 mm written in full by one tool and as 0.4688 by another: 1.07e-4 apart relative, 5e-5 mm.
    series_uid = "1.2.826.0.1.3680043.2.1125.5012"
    for k, pixels in enumerate(volume):
        size = 0.4688 if k % 2 else 0.46875
        _write_slice(tmp_path / "rounded" / f"IM{k:04d}.dcm", pixels, (0.0, 0.0, SLICE_STEP * k), AXIAL,
                     {"0020|000e": series_uid, "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}"},
                     spacing=(size, size))

    read = read_image(tmp_path / "rounded")

    np.testing.assert_array_equal(read.array, volume)
    assert not any("pixel spacing" in warning for warning in read.metadata.get("warnings", []))


def test_slices_of_another_pixel_spacing_are_left_out_naming_both_spacings(tmp_path, volume):
    _write_two_spacings(tmp_path / "two_spacings", volume, coarse_from=8)

    read = read_image(tmp_path / "two_spacings")

    np.testing.assert_array_equal(read.array, volume[:8])
    np.testing.assert_allclose(read.geometry.spacing[1:], SPACING[::-1])
    (warning,) = read.metadata["warnings"]
    assert ("4 file(s) of another orientation, image size or pixel spacing left out" in warning
            and "(4 of 14×16 pixels of 1.6×1.8 mm); the 8 slices of the largest stack (14×16 pixels of 0.8×0.9 mm)"
            in warning)


def test_a_series_split_evenly_between_two_pixel_spacings_is_refused_naming_them(tmp_path, volume):
    _write_two_spacings(tmp_path / "two_spacings", volume, coarse_from=6)

    with pytest.raises(InputError, match=r"mixes image orientations, sizes or pixel spacings in stacks of equal size: "
                                         r"6 of 14×16 pixels of 0\.8×0\.9 mm .*; 6 of 14×16 pixels of 1\.6×1\.8 mm"):
        read_image(tmp_path / "two_spacings")


def test_a_one_frame_dicom_without_any_position_is_a_picture_like_a_png(tmp_path, volume):
    placed = _write_stack(tmp_path / "placed", volume[:1], "1.2.826.0.1.3680043.2.1125.5005")[0]
    unplaced = _without_position(_write_stack(tmp_path / "screenshot", volume[:1], "1.2.826.0.1.3680043.2.1125.5006")[0])

    picture = read_image(unplaced)

    assert picture.ndim == 2 and is_picture(picture)
    np.testing.assert_array_equal(picture.array, volume[0])
    np.testing.assert_allclose(picture.geometry.index_to_world, np.eye(3))  # 1 mm pixels from the origin, as a PNG's
    (warning,) = picture.metadata["warnings"]
    assert "has no position" in warning and "stated pixel spacing of 0.8×0.9 mm places nothing" in warning
    scanner_slice = read_image(placed)
    assert scanner_slice.ndim == 3 and not is_picture(scanner_slice)


def test_a_damaged_slice_is_named_in_the_series_warning_and_when_opened_alone(tmp_path, volume):
    files = _write_stack(tmp_path / "ct", volume, "1.2.826.0.1.3680043.2.1125.5007")
    files[5].write_bytes(files[5].read_bytes()[:-300])  # cut off inside its pixel data
    (tmp_path / "ct" / "empty.dcm").write_bytes(b"")

    read = read_image(tmp_path / "ct")

    assert len(read.array) == 11
    assert (f"1 file(s) of the series could not be read (damaged or truncated, or compressed in a way GDCM does not "
            f"decode) and are left out: {files[5].name}; of its 12 files, 11 are read") in read.metadata["warnings"]
    with pytest.raises(InputError, match="holds a DICOM image that could not be read"):
        read_image(files[5])
    with pytest.raises(InputError, match="is not a DICOM file by its content"):
        read_image(tmp_path / "ct" / "empty.dcm")


def test_a_latin1_series_description_is_decoded_with_the_files_character_set(tmp_path, volume):
    files = _write_stack(tmp_path / "ct", volume[:3], "1.2.826.0.1.3680043.2.1125.5008")
    for path in files:
        dataset = dcmread(path)
        dataset.SpecificCharacterSet, dataset.SeriesDescription = "ISO_IR 100", "Schädel nativ"
        dataset.save_as(path)
    assert "Schädel".encode("latin-1") in files[0].read_bytes()

    assert read_image(tmp_path / "ct").metadata["header"]["SeriesDescription"] == "Schädel nativ"


def test_a_folder_whose_subfolders_hold_series_names_them(tmp_path, volume):
    export = tmp_path / "export"
    _write_stack(export / "PAT1" / "STUDY1" / "SER1", volume[:3], "1.2.826.0.1.3680043.2.1125.5009")
    _write_stack(export / "PAT1" / "STUDY1" / "SER2", volume[:3], "1.2.826.0.1.3680043.2.1125.5010")

    with pytest.raises(InputError, match=r"no DICOM series found in this folder, but subfolders hold DICOM files .*"
                                         r"open the series folder you want: PAT1/STUDY1/SER1, PAT1/STUDY1/SER2$"):
        read_image(export)
