"""napari world placement, layer ↔ volume round trips, and the npe2 reader/writers."""

from __future__ import annotations

import json
import os

import imageio.v3 as imageio
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from napari.components import ViewerModel
from napari.layers import Image
from napari.utils.notifications import notification_manager
from npe2 import PluginManager
from PIL import Image as PILImage

from napari_unifuse._napari_io import get_reader, layer_to_volume, volume_to_layer_data, write_mha, write_nifti
from napari_unifuse.engine.annotations import InputHashes
from napari_unifuse.engine.outputs import PROVENANCE_FILE
from napari_unifuse.engine.overlays import input_fingerprint
from napari_unifuse.engine.provenance import describe_input, sha256_of_array, sha256_of_path
from napari_unifuse.errors import UniFuseError
from napari_unifuse.io import Geometry, ImageVolume, read_image
from napari_unifuse.io.image import STORED_AXIS_ORDER


def _layer(volume: ImageVolume) -> Image:
    data, kwargs, _ = volume_to_layer_data(volume)
    return Image(data, **kwargs)


def test_two_volumes_of_different_grids_overlay_in_world(tmp_path, oblique_sitk_image, rng):
    # An axis-aligned coarse volume and an oblique, finer one covering a different extent.
    coarse = sitk.GetImageFromArray(rng.normal(size=(6, 8, 10)).astype(np.float32))
    coarse.SetSpacing((2.0, 1.5, 4.0))
    coarse.SetOrigin((-10.0, 20.0, 5.0))
    fine = oblique_sitk_image(rng.normal(size=(9, 12, 7)).astype(np.float32), (0.5, 0.8, 1.2), (3.0, -7.0, 11.0), (20.0, -5.0, 40.0))
    for name, image in (("coarse", coarse), ("fine", fine)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.mha"))
        layer = _layer(read_image(tmp_path / f"{name}.mha"))
        shape = sitk.GetArrayViewFromImage(image).shape
        for index in [(0, 0, 0), tuple(n - 1 for n in shape), (2, 5, 1)]:
            expected = np.array(image.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]]))[::-1]
            np.testing.assert_allclose(layer.data_to_world(index), expected, atol=1e-9)

    # Flips are carried by the affine too (a typical RAS NIfTI is flipped in LPS).
    nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([-2.0, 3.0, 1.5, 1.0])).to_filename(tmp_path / "flipped.nii")
    flipped = read_image(tmp_path / "flipped.nii")
    reference = sitk.ReadImage(str(tmp_path / "flipped.nii"))
    expected = np.array(reference.TransformIndexToPhysicalPoint((3, 4, 5)))[::-1]
    np.testing.assert_allclose(_layer(flipped).data_to_world((5, 4, 3)), expected, atol=1e-9)


def test_layer_round_trip_is_exact_and_follows_a_moved_layer(tmp_path, oblique_sitk_image, rng):
    image = oblique_sitk_image(rng.normal(size=(4, 5, 6)).astype(np.float32), (0.3, 0.7, 1.9), (1.1, 2.2, 3.3), (7.0, 8.0, 9.0))
    sitk.WriteImage(image, str(tmp_path / "in.mha"))
    volume = read_image(tmp_path / "in.mha")
    layer = _layer(volume)

    back = layer_to_volume(layer)
    np.testing.assert_array_equal(back.geometry.index_to_world, volume.geometry.index_to_world)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.source == volume.source and back.metadata == volume.metadata

    layer.translate = (5.0, 0.0, -2.0)  # the user nudged the layer: the world placement wins
    moved = layer_to_volume(layer)
    for index in [(0, 0, 0), (3, 4, 5)]:
        np.testing.assert_allclose((moved.geometry.index_to_world @ [*index, 1])[:3], layer.data_to_world(index), atol=1e-9)


def test_plain_napari_layer_becomes_a_volume():
    layer = Image(np.zeros((5, 6)), scale=(0.5, 2.0), translate=(3.0, -1.0), rotate=30.0, name="plain")
    volume = layer_to_volume(layer)
    assert volume.source is None and volume.ndim == 2
    np.testing.assert_allclose((volume.geometry.index_to_world @ [4, 5, 1])[:2], layer.data_to_world((4, 5)), atol=1e-12)


def test_npe2_reader_reports_a_corrupt_file_as_a_notification(tmp_path, rng):
    good = tmp_path / "good.nii.gz"
    nib.Nifti1Image(rng.normal(size=(20, 20, 20)).astype(np.float32), np.eye(4)).to_filename(good)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder without DICOM is left to other readers
    PluginManager.instance().discover()  # make napari's open() see our manifest
    notification_manager.records.clear()
    viewer = ViewerModel()
    assert viewer.open(str(corrupt), plugin="napari-unifuse") == []  # no exception, no layer
    messages = [record.message for record in notification_manager.records]
    assert any(str(corrupt) in message and "NIfTI" in message for message in messages), messages

    layers = viewer.open(str(good), plugin="napari-unifuse")
    assert [layer.name for layer in layers] == ["good"]
    assert layers[0].metadata["unifuse"]["source"] == str(good)


def test_a_layer_edited_since_it_was_read_records_its_pixels_not_its_file(tmp_path, rng):
    """Provenance must describe the pixels a run fused: the file once they are the file's, else the array."""
    path = tmp_path / "moving.nii.gz"
    nib.Nifti1Image(rng.normal(size=(4, 5, 6)).astype(np.float32), np.eye(4)).to_filename(path)
    PluginManager.instance().discover()
    (layer,) = ViewerModel().open(str(path), plugin="napari-unifuse")
    unchanged = layer_to_volume(layer)
    assert unchanged.source == str(path) and not unchanged.metadata.get("warnings")
    assert describe_input(unchanged)["sha256"] == sha256_of_path(path)

    layer.data = layer.data[::-1].copy()  # edited in napari: other pixels, the same file behind the layer
    edited = layer_to_volume(layer)
    assert edited.source is None
    assert any(f"edited since it was read from {path}" in warning for warning in edited.metadata["warnings"])
    described = describe_input(edited)
    assert described["sha256"] is None and described["array_sha256"] == sha256_of_array(layer.data)
    # The run's flags are then tied to the edited pixels, not to the file read again.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / PROVENANCE_FILE).write_text(json.dumps({"inputs": {"moving": described}}))
    assert InputHashes.of_run(tmp_path / "run").moving == {sha256_of_array(layer.data)}

    layer.data = np.asarray(read_image(path).in_world_axis_order().array)  # the file's pixels again, in a new array
    assert layer_to_volume(layer).source == str(path)


def test_a_file_replaced_since_it_was_opened_records_the_pixels_read_not_the_new_file(tmp_path, rng):
    """A run fuses the layer's pixels: the file that now holds another image must not be named as its input."""
    path = tmp_path / "moving.nii.gz"
    read = rng.normal(size=(4, 5, 6)).astype(np.float32)
    nib.Nifti1Image(read, np.eye(4)).to_filename(path)
    PluginManager.instance().discover()
    (layer,) = ViewerModel().open(str(path), plugin="napari-unifuse")

    nib.Nifti1Image(read, np.eye(4)).to_filename(path)  # saved again, the same image: still the layer's file
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert layer_to_volume(layer).source == str(path)

    nib.Nifti1Image(read[::-1].copy(), np.eye(4)).to_filename(path)  # another image under the same name
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2 * 10**9))
    replaced = layer_to_volume(layer)
    assert replaced.source is None
    assert any(f"{path} changed on disk since it was opened" in warning for warning in replaced.metadata["warnings"])
    described = describe_input(replaced)
    assert described["sha256"] is None and described["array_sha256"] == sha256_of_array(layer.data)


def test_a_dicom_slice_rewritten_in_place_is_noticed_though_its_folder_is_unchanged(
        tmp_path, oblique_sitk_image, write_dicom_series, rng):
    image = oblique_sitk_image(rng.integers(0, 1000, size=(4, 6, 5)).astype(np.int16), (0.8, 0.9, 2.5),
                               (10.0, -20.0, 30.0), (0.0, 0.0, 0.0))
    files = write_dicom_series(image, tmp_path / "ct", "1.2.826.0.1.3680043.2.1125.8")
    PluginManager.instance().discover()
    (layer,) = ViewerModel().open(str(files[0]), plugin="napari-unifuse")
    folder_time = (tmp_path / "ct").stat().st_mtime_ns

    data = bytearray(files[1].read_bytes())
    data[-20:] = bytes(20)  # one slice's last pixels overwritten in place: the folder's time stays
    files[1].write_bytes(bytes(data))
    os.utime(files[1], ns=(files[1].stat().st_atime_ns, files[1].stat().st_mtime_ns + 10**9))
    assert (tmp_path / "ct").stat().st_mtime_ns == folder_time
    assert layer_to_volume(layer).source is None


@pytest.mark.parametrize(("shape", "frames"), [((3, 4, 5, 6), "3"), ((2, 3, 4, 5, 6), "2x3")])
def test_a_layer_of_frames_is_refused_as_its_file_would_be_with_how_to_take_one(shape, frames):
    """As the reader says of a 4D file: what the layer holds and how to make a layer of one frame."""
    layer = ViewerModel().add_image(np.zeros(shape, np.float32), name="dynamic PET")
    with pytest.raises(UniFuseError, match=rf"dynamic PET: this is a {len(shape)}D layer of shape "
                                           rf"\({', '.join(map(str, shape))}\) with {frames} frames \(volumes\) of "
                                           r"4x5x6 and a fusion takes one.*Split Stack"):
        layer_to_volume(layer)


def test_a_picture_napari_own_reader_opened_is_its_file_as_ours_reads_it_until_edited(tmp_path, rng):
    """Which reader opened a PNG (napari asks) must not change its run folder, flags or provenance."""
    path = tmp_path / "mri.png"
    imageio.imwrite(path, rng.integers(0, 255, size=(12, 16), dtype=np.uint8))
    PluginManager.instance().discover()
    (ours,) = ViewerModel().open(str(path), plugin="napari-unifuse")
    (napari_s,) = ViewerModel().open(str(path), plugin="napari")
    assert napari_s.source.path == str(path) and not napari_s.metadata  # nothing of ours to say where it came from
    opened = layer_to_volume(napari_s)
    assert opened.source == str(path)
    assert input_fingerprint(opened) == input_fingerprint(layer_to_volume(ours))
    assert describe_input(opened)["sha256"] == sha256_of_path(path)

    napari_s.data = napari_s.data[::-1].copy()  # edited in napari: its pixels, not the file, are the input
    assert layer_to_volume(napari_s).source is None
    imageio.imwrite(path, np.asarray(napari_s.data))  # the file rewritten to the pixels on screen: its again
    assert layer_to_volume(napari_s).source == str(path)


def test_npe2_writers_keep_the_layer_geometry(tmp_path):
    geometry = Geometry([2.0, 0.5, 0.75], [10.0, -3.0, 4.0], np.diag([1.0, -1.0, -1.0]))
    layer = _layer(ImageVolume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), geometry))
    data, meta, _ = layer.as_layer_data_tuple()

    (nifti_path,) = write_nifti(str(tmp_path / "saved"), data, meta)
    assert nifti_path.endswith(".nii.gz")
    np.testing.assert_allclose(read_image(nifti_path).geometry.index_to_world, geometry.index_to_world, atol=1e-6)
    (mha_path,) = write_mha(str(tmp_path / "saved.mha"), data, meta)
    reread = read_image(mha_path)
    np.testing.assert_array_equal(reread.array, data)
    np.testing.assert_allclose(reread.geometry.index_to_world, geometry.index_to_world, atol=1e-12)

    # A layer read from a file cannot be saved over that file.
    source_layer = _layer(reread)
    with pytest.raises(UniFuseError, match="overwrite"):
        write_mha(mha_path, *source_layer.as_layer_data_tuple()[:2])


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_napari_saves_a_labels_layer_through_our_writers_on_its_grid(tmp_path, suffix):
    """The run's "folding (det J <= 0)" mask is a Labels layer: napari found no writer for it."""
    geometry = Geometry([2.0, 0.5, 0.75], [10.0, -3.0, 4.0], np.diag([1.0, -1.0, -1.0]))
    mask = (np.arange(60).reshape(3, 4, 5) % 7 == 0).astype(np.uint8)
    PluginManager.instance().discover()
    viewer = ViewerModel()
    labels = viewer.add_labels(mask, name="folding", **geometry.napari_kwargs())
    viewer.layers.selection = {labels}

    (path,) = viewer.layers.save(str(tmp_path / f"folding{suffix}"), selected=True, plugin="napari-unifuse")
    (reopened,) = viewer.open(path, plugin="napari-unifuse")
    np.testing.assert_array_equal(reopened.data, mask)
    corner = np.array([2.0, 3.0, 4.0])
    np.testing.assert_allclose(reopened.data_to_world(corner), labels.data_to_world(corner), atol=1e-6)


@pytest.mark.parametrize("high", [1.0, 1.2], ids=["in-range", "out-of-range"])
def test_a_3d_colour_layer_is_refused_by_name_as_the_reader_refuses_its_file(rng, high):
    """Before its colour range is judged (the user would rescale it only to be refused again), and
    naming the layer: a layer has no file for ImageVolume's own check to name."""
    layer = Image(rng.uniform(0.0, high, (4, 10, 12, 3)).astype(np.float32), rgb=True, name="colour volume")
    with pytest.raises(UniFuseError, match=r"^colour volume: .*colour images are supported in 2D only: convert the "
                                           r"volume to grey values first"):
        layer_to_volume(layer)


def test_rgb_volume_becomes_an_rgb_layer_and_back(rng):
    colour = ImageVolume(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), Geometry([0.5, 0.25], [1.0, 2.0], np.eye(2)), is_rgb=True)
    layer = _layer(colour)
    assert layer.rgb and layer.ndim == 2
    np.testing.assert_allclose(layer.data_to_world((2, 4)), [2.0, 3.0])
    back = layer_to_volume(layer)
    assert back.is_rgb and back.ndim == 2
    np.testing.assert_array_equal(back.array, colour.array)


def test_napari_save_shows_why_our_writer_refused_and_writes_nothing(tmp_path, rng):
    source = tmp_path / "source.nii.gz"
    nib.Nifti1Image(rng.normal(size=(4, 5, 6)).astype(np.float32), np.eye(4)).to_filename(source)
    PluginManager.instance().discover()
    viewer = ViewerModel()
    (read,) = viewer.open(str(source), plugin="napari-unifuse")
    colour = viewer.add_image(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8), rgb=True, name="colour")
    before = source.read_bytes()

    # napari turns a ValueError from a writer into "no writer found"; our reason must get through.
    viewer.layers.selection = {read}
    with pytest.raises(UniFuseError, match="refusing to overwrite the file this image was read from"):
        viewer.layers.save(str(source), selected=True, plugin="napari-unifuse")
    assert source.read_bytes() == before
    viewer.layers.selection = {colour}
    with pytest.raises(UniFuseError, match="RGB images are saved as PNG, MHA or NRRD"):
        viewer.layers.save(str(tmp_path / "colour.nii.gz"), selected=True, plugin="napari-unifuse")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source.nii.gz"]


def test_every_file_of_a_dicom_series_opened_at_once_gives_one_layer_named_for_the_series(
        make_napari_viewer, tmp_path, oblique_sitk_image, write_dicom_series, rng):
    """napari reads the files of *File → Open Files* one by one; each .dcm opens its whole series."""
    image = oblique_sitk_image(rng.integers(0, 1000, size=(5, 12, 10)).astype(np.int16), (0.8, 0.9, 2.5),
                               (10.0, -20.0, 30.0), (0.0, 0.0, 0.0))
    files = write_dicom_series(image, tmp_path / "head_ct", "1.2.826.0.1.3680043.2.1125.7")
    viewer = make_napari_viewer()

    viewer.open([str(path) for path in files], stack=False, plugin="napari-unifuse")

    assert [layer.name for layer in viewer.layers] == ["io test series"]  # its SeriesDescription
    assert viewer.layers[0].data.shape == (5, 12, 10)


# nibabel voxel (i, j, k) → RAS mm, and the array axes (io's z, y, x order) the layer holds them in.
PERMUTED_GRIDS = {
    "coronal": (np.array([[1.0, 0, 0, -16], [0, 0, 2.0, -20], [0, 1.5, 0, -15], [0, 0, 0, 1]]), (1, 0, 2)),
    "sagittal": (np.array([[0, 0, 2.0, -28], [1.0, 0, 0, -16], [0, 1.5, 0, -15], [0, 0, 0, 1]]), (1, 2, 0)),
}


@pytest.mark.parametrize("plane", PERMUTED_GRIDS)
def test_a_coronal_or_sagittal_nifti_opens_in_napari_where_its_header_puts_it(make_napari_viewer, tmp_path, rng,
                                                                              plane):
    """napari draws a 3-D layer's (y, x) plane through its affine; with the file's axis permutation
    in the affine that plane was a line and vispy raised "Singular matrix", leaving a half-added layer."""
    affine, axes = PERMUTED_GRIDS[plane]
    path = tmp_path / f"{plane}.nii.gz"
    nib.Nifti1Image(rng.random((7, 5, 6)).astype(np.float32), affine).to_filename(path)
    viewer = make_napari_viewer()

    (layer,) = viewer.open(str(path), plugin="napari-unifuse")

    np.testing.assert_array_equal(layer.data, read_image(path).array.transpose(axes))
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    volume = layer_to_volume(layer)
    for index in [(0, 0, 0), (2, 3, 4), tuple(n - 1 for n in layer.data.shape)]:
        file_index = np.empty(3)
        file_index[list(axes)] = index  # the layer's axis j is the file array's axis axes[j]
        lps = ras_to_lps @ (affine @ [*file_index[::-1], 1.0])[:3]  # nibabel's (i, j, k) is io's order reversed
        np.testing.assert_allclose(layer.data_to_world(index), lps[::-1], atol=1e-9)
        np.testing.assert_allclose((volume.geometry.index_to_world @ [*index, 1.0])[:3], lps[::-1], atol=1e-9)


def _dicom_file(path, rng) -> None:
    """One DICOM slice at ``path``, whatever its name (SimpleITK picks the format from ``.dcm``)."""
    written = path.with_name("slice.dcm")
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 1000, (12, 10)).astype(np.int16)), str(written))
    written.rename(path)


def test_napari_offers_our_reader_for_dicom_file_names_beyond_dcm_and_not_for_movies(tmp_path, rng):
    """npe2 matches the name with its suffixes lower-cased: .IMA, .dicom and IM1 or I3 (DICOM media
    file IDs) must reach get_reader, which reads the content; .mp4 or .h5 must not."""
    manager = PluginManager.instance()
    manager.discover()

    def offered(name: str) -> bool:
        return "napari-unifuse.get_reader" in [reader.command for reader in manager.iter_compatible_readers(
            [str(tmp_path / name)])]

    dicom_names = ["PHANTOM.MR.HEAD.0002.0003.2026.12.06.IMA", "slice3.ima", "slice3.dicom", "I3", "IM1",
                   "IMAGE5", "IM0001", "1.2.840.99.1", "scan.DCM"]
    assert [name for name in dicom_names if not offered(name)] == []
    other_names = ["movie.mp4", "movie.MP4", "data.h5", "song.mp3", "notes.txt", "photo.tif", "IMAGE_EXPORT_1.txt"]
    assert [name for name in other_names if offered(name)] == []

    viewer = ViewerModel()
    for name in ("PHANTOM.MR.HEAD.0002.0003.2026.12.06.IMA", "I3"):
        _dicom_file(tmp_path / name, rng)
        (layer,) = viewer.open(str(tmp_path / name), plugin="napari-unifuse")
        assert layer.data.shape[-2:] == (12, 10)
        (tmp_path / name).unlink()
    (tmp_path / "IM1").write_text("not an image")  # claimed by its name, declined by its content
    assert get_reader(str(tmp_path / "IM1")) is None


def test_a_picture_napari_opened_with_its_alpha_channel_becomes_the_opaque_picture_with_the_readers_warning():
    """napari's own reader keeps a PNG's alpha: RGBA as a 4-channel rgb layer, grey + alpha as a
    (y, x, 2) layer it takes for 3D. Our reader drops the alpha and warns when it is see-through."""
    colour = np.arange(5 * 6 * 4, dtype=np.uint8).reshape(5, 6, 4)
    colour[..., 3] = 255
    colour[0, 0, 3] = 0  # one see-through pixel of 30
    rgba = layer_to_volume(Image(colour, rgb=True, name="rgba", scale=(0.5, 2.0)))
    assert rgba.is_rgb and rgba.ndim == 2
    np.testing.assert_array_equal(rgba.array, colour[..., :3])
    assert [warning.startswith("transparency ignored: 3.33 %") for warning in rgba.metadata["warnings"]] == [True]

    grey_alpha = np.stack([np.arange(30, dtype=np.uint8).reshape(5, 6), np.full((5, 6), 255, np.uint8)], axis=-1)
    layer = Image(grey_alpha, name="la", scale=(0.5, 2.0, 1.0), translate=(3.0, -1.0, 0.0))
    grey = layer_to_volume(layer)
    assert not grey.is_rgb and grey.ndim == 2
    np.testing.assert_array_equal(grey.array, grey_alpha[..., 0])
    np.testing.assert_allclose((grey.geometry.index_to_world @ [4, 5, 1])[:2], layer.data_to_world((4, 5, 0))[:2])
    assert "warnings" not in grey.metadata  # an opaque alpha is dropped without a word, as the reader does

    # A volume two voxels wide that our reader made stays that volume.
    thin = ImageVolume(grey_alpha, Geometry([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], np.eye(3)), source="thin.nii.gz")
    assert layer_to_volume(_layer(thin)).array.shape == (5, 6, 2)


def test_a_cmyk_picture_napari_opened_is_its_colours_not_cmy_with_k_as_alpha(tmp_path, rng):
    """napari's own reader keeps a CMYK JPEG's four ink channels: taken as RGBA, the picture fused
    with inverted colours and was called transparent wherever it holds no black ink."""
    path = tmp_path / "pet_cmyk.jpg"
    inks = rng.integers(0, 256, size=(40, 48, 4), dtype=np.uint8)  # over 30 a side, or napari takes it for 3D
    inks[..., 3] = 0  # no black ink anywhere: "100 % transparent" as alpha
    PILImage.frombytes("CMYK", (48, 40), inks.tobytes()).save(path, quality=95)
    PluginManager.instance().discover()
    (napari_s,) = ViewerModel().open(str(path), plugin="napari")
    assert napari_s.rgb and napari_s.data.shape == (40, 48, 4)

    opened = layer_to_volume(napari_s)

    assert opened.is_rgb and "warnings" not in opened.metadata
    np.testing.assert_array_equal(opened.array, read_image(path).array)
    assert opened.source == str(path)  # the file, as our reader reads it: same run folder and provenance


def test_the_napari_nifti_writer_refuses_a_sheared_layer_in_one_line_and_mha_keeps_it(tmp_path, rng):
    """A gantry-tilted layer saved as NIfTI was placed millimetres off by ITK-based tools, silently."""
    tilt = np.deg2rad(20.0)
    geometry = Geometry([2.5, 0.8, 0.8], [5.0, -20.0, 10.0], np.array([[np.cos(tilt), 0, 0], [np.sin(tilt), 1, 0],
                                                                        [0, 0, 1]]))
    data, meta, _ = _layer(ImageVolume(rng.random((4, 5, 6)).astype(np.float32), geometry)).as_layer_data_tuple()
    with pytest.raises(UniFuseError, match=r"^Could not save .*tilted\.nii\.gz: this image's grid is sheared .*\.mha$"):
        write_nifti(str(tmp_path / "tilted"), data, meta)
    (mha_path,) = write_mha(str(tmp_path / "tilted.mha"), data, meta)
    np.testing.assert_allclose(read_image(mha_path).geometry.index_to_world, geometry.index_to_world, atol=1e-6)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tilted.mha"]


@pytest.mark.parametrize("plane", PERMUTED_GRIDS)
def test_a_permuted_volume_opened_in_napari_carries_its_stored_order(tmp_path, rng, plane):
    """For the engine to record a workbench run on a coronal file as the CLI's (run_fusion's
    _record_stored_order): our reader reorients it before the engine sees it."""
    affine, axes = PERMUTED_GRIDS[plane]
    path = tmp_path / f"{plane}.nii.gz"
    nib.Nifti1Image(rng.random((7, 5, 6)).astype(np.float32), affine).to_filename(path)
    data, kwargs, _ = volume_to_layer_data(read_image(path))
    assert layer_to_volume(Image(data, **kwargs)).metadata[STORED_AXIS_ORDER] == list(axes)
    assert STORED_AXIS_ORDER not in read_image(path).metadata
