"""FusionEngine with a randomly initialised small UniFuse: shapes, grids, colour, fallbacks, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine import inference
from napari_unifuse.engine.alignment_guard import METADATA_KEY
from napari_unifuse.engine.inference import (
    CLASSIFY_STAGE,
    FUSE_KEPT_STAGE,
    NETWORK,
    FusionEngine,
    _prepare,
    _slices_onto,
    fallback_plan,
)
from napari_unifuse.engine.methods import load_method, method_for_network
from napari_unifuse.engine.outputs import output_file_names, quality_file_names, write_fusion_outputs
from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.errors import Cancelled, InputError, UniFuseError
from napari_unifuse.io import Geometry, ImageVolume, read_image, resample_to_reference
from napari_unifuse.io.readers import WITHOUT_POSITION
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import load_checkpoint, save_checkpoint
from napari_unifuse.model.mi_refinement import never_cancelled


@pytest.fixture(scope="module")
def model_2d() -> UniFuse:
    torch.manual_seed(0)
    return UniFuse(UniFuseConfig.small(spatial_dims=2))


@pytest.fixture(scope="module")
def model_3d() -> UniFuse:
    torch.manual_seed(1)
    return UniFuse(UniFuseConfig.small(spatial_dims=3))


def blob(shape: tuple[int, ...], centre_shift: float = 0.0) -> np.ndarray:
    """A smooth bright ellipsoid on a dark background, values in [0, 1]."""
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    radius = sum((g - centre_shift) ** 2 for g in grids)
    return np.exp(-3 * radius).astype(np.float32)


# What each allocator says: torch's host allocator raises a plain RuntimeError.
OUT_OF_MEMORY = {torch.cuda.OutOfMemoryError: "CUDA out of memory (simulated)",
                 RuntimeError: "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory "
                               "(simulated)",
                 MemoryError: "Unable to allocate 4.00 GiB for an array (simulated)"}


class CountingModel(nn.Module):
    """Delegates to a real UniFuse; counts calls and runs out of "memory" above a tile side."""

    def __init__(self, model: UniFuse, max_side: int | None = None,
                 error: type[Exception] = torch.cuda.OutOfMemoryError) -> None:
        super().__init__()
        self.model, self.max_side, self.error, self.tile_shapes = model, max_side, error, []
        self.config = model.config

    def initial_alignment(self, moving, reference, spacing=None, check_cancelled=never_cancelled):
        return self.model.initial_alignment(moving, reference, spacing, check_cancelled)

    def refine(self, moving, reference, initial, *, fixed_field=False, class_probs=None):
        """The per-tile network pass the engine makes."""
        self.tile_shapes.append(tuple(moving.shape[2:]))
        if self.max_side is not None and max(moving.shape[2:]) > self.max_side:
            raise self.error(OUT_OF_MEMORY[self.error])
        return self.model.refine(moving, reference, initial, fixed_field=fixed_field, class_probs=class_probs)

    def classify(self, moving, reference):
        return self.model.classify(moving, reference)


def test_rgb_moving_gives_rgb_fused_on_the_reference_grid(model_2d):
    reference = ImageVolume(blob((24, 20)), Geometry(np.array([1.0, 1.0]), np.array([0.0, 0.0]), np.eye(2)))
    red = np.zeros((18, 16, 3), dtype=np.uint8)
    red[..., 0] = (255 * blob((18, 16), 0.1)).astype(np.uint8)
    moving = ImageVolume(red, Geometry(np.array([1.4, 1.3]), np.array([-1.0, 0.5]), np.eye(2)), is_rgb=True)

    result = FusionEngine(model_2d, device="cpu").run_fusion(reference, moving)

    assert result.fused.is_rgb and result.fused.array.shape == (24, 20, 3)
    assert result.aligned.is_rgb and result.aligned.array.shape == (24, 20, 3)
    assert result.fused.geometry.allclose(reference.geometry)
    assert result.displacement.shape == (2, 24, 20) and result.displacement.dtype == np.float32
    # The moving image's red chroma is carried into the fused image where the moving image lies.
    fused_chroma = rgb_to_ycbcr(result.fused.array)
    assert fused_chroma[8:16, 6:14, 2].mean() > 0.55  # Cr above neutral grey
    assert result.output_extension == "mha"  # colour on a reference that is no raster file: MetaImage keeps both
    assert list(result.class_probs) == list(DEGRADATION_CLASSES)
    assert sum(result.class_probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.slice_class_probs.shape == (1, len(DEGRADATION_CLASSES))
    assert result.provenance["intensity_mappings"]["moving"]["method"] == "luma"


def test_tiled_3d_run_on_anisotropic_grids(model_3d):
    reference_geometry = Geometry(np.array([2.0, 1.2, 0.9]), np.array([10.0, -20.0, 5.0]), np.eye(3))
    reference = ImageVolume(blob((14, 12, 12)), reference_geometry)
    ct_like = (blob((10, 14, 12), 0.1) * 1500 - 1000).astype(np.int16)  # air to bone, in HU
    moving = ImageVolume(ct_like, Geometry(np.array([2.6, 1.0, 0.9]), np.array([11.0, -19.0, 5.5]), np.eye(3)))
    calls = []

    result = FusionEngine(model_3d, device="cpu", tile_size=8).run_fusion(
        reference, moving, progress=lambda *report: calls.append(report))

    assert result.fused.array.shape == (14, 12, 12) and not result.fused.is_rgb
    assert 0.0 <= result.fused.array.min() and result.fused.array.max() <= 1.0
    assert result.aligned.array.dtype == np.int16  # back in the moving image's units (HU)
    assert result.provenance["intensity_mappings"]["moving"]["modality"] == "ct"
    assert result.aligned.geometry.allclose(reference_geometry)
    assert result.displacement.shape == (3, 14, 12, 12)
    tile_count = result.provenance["tile_count"]
    assert tile_count > 1
    assert [call for call in calls if call[0] == "fuse"] == [("fuse", k, tile_count) for k in range(tile_count + 1)]
    # One row per z slice (padded slices dropped), each a probability distribution.
    assert result.slice_class_probs.shape == (14, len(DEGRADATION_CLASSES))
    np.testing.assert_allclose(result.slice_class_probs.sum(axis=1), 1.0, atol=1e-5)
    assert result.output_extension == "nii.gz"
    # The tiles run a second time only when the guard kept another field than the network's.
    second_pass = {FUSE_KEPT_STAGE} if result.alignment_guard.kept != NETWORK else set()
    # The moving image is on another grid: its degradation is read there first.
    assert set(result.provenance["timings_s"]) == {"validate", "normalise", "classify", "resample",
                                                   "initial alignment", "fuse", "guard", "compose", "quality",
                                                   *second_pass}
    assert result.provenance["degradation_read_on"]["shape"] == [10, 14, 12]


@pytest.mark.parametrize("requested, expected_tile", [(None, [8, 8]), (16, [16, 16])])
def test_checkpoints_run_in_tiles_of_their_training_crop_unless_told(model_2d, tmp_path, requested,
                                                                      expected_tile):
    path = save_checkpoint(model_2d, tmp_path / "cropped.safetensors",
                           {"training_config": {"data": {"kind": "harvard", "crop": 8}}})
    image = ImageVolume(blob((16, 16)), Geometry.identity(2))
    result = FusionEngine(path, device="cpu", tile_size=requested).run_fusion(image, image)
    assert result.provenance["tile_shape"] == expected_tile


def test_a_weights_file_copied_without_its_sidecar_says_its_calibrations_are_unknown(model_2d, tmp_path):
    path = save_checkpoint(model_2d, tmp_path / "copied.safetensors",
                           {"training_config": {"data": {"kind": "harvard", "crop": 8}}})
    image = ImageVolume(blob((16, 16)), Geometry.identity(2))
    with_sidecar = FusionEngine(path, device="cpu").run_fusion(image, image, quality=False)
    assert not any("sidecar" in warning for warning in with_sidecar.warnings)

    path.with_suffix(".json").unlink()
    lone = FusionEngine(path, device="cpu").run_fusion(image, image, quality=False)
    notes = [warning for warning in lone.warnings if "no sidecar copied.json" in warning]
    assert len(notes) == 1 and "training crop" in notes[0] and notes[0] in lone.provenance["warnings"]
    assert lone.provenance["tile_shape"] == [16, 16]  # the crop it was trained on is lost with the sidecar


CALIBRATED = {"training_config": {"data": {"kind": "harvard", "crop": 8}},
              METADATA_KEY: {"weigh_network_field": False}, "fusion_balance": {"max_mean_weight": 0.05}}


def test_a_network_passed_with_its_checkpoints_metadata_fuses_exactly_as_the_checkpoint_by_name(tmp_path):
    """checkpoint_info was only recorded: the in-memory network ran whole, weighed its own field and
    was not balanced, 0.18 off the checkpoint loaded by name on a Harvard pair."""
    torch.manual_seed(2)
    path = save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=2)), tmp_path / "net.safetensors", CALIBRATED)
    reference = ImageVolume(blob((16, 16)), Geometry.identity(2))
    moving = ImageVolume(np.clip(1.0 - blob((16, 16), 0.1), 0, 1), Geometry.identity(2))
    by_name = FusionEngine(path, device="cpu").run_fusion(reference, moving, quality=False)
    network, metadata = load_checkpoint(path)
    engine = FusionEngine(network, device="cpu", checkpoint_info=metadata)
    in_memory = engine.run_fusion(reference, moving, quality=False)
    assert not engine.weigh_network_field and in_memory.fusion_balance is not None
    for name in ("tile_shape", "tile_count", "network_field_weighed", "fusion_balance", "alignment_guard"):
        assert in_memory.provenance[name] == by_name.provenance[name], name
    np.testing.assert_array_equal(in_memory.fused.array, by_name.fused.array)
    np.testing.assert_array_equal(in_memory.aligned.array, by_name.aligned.array)
    np.testing.assert_array_equal(in_memory.displacement, by_name.displacement)
    assert in_memory.warnings == by_name.warnings == []


def test_a_network_passed_in_memory_without_metadata_says_so_as_a_weights_file_without_its_sidecar(tmp_path):
    torch.manual_seed(2)
    path = save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=2)), tmp_path / "net.safetensors", CALIBRATED)
    image = ImageVolume(blob((16, 16)), Geometry.identity(2))
    bare = FusionEngine(load_checkpoint(path)[0], device="cpu").run_fusion(image, image, quality=False)
    notes = [warning for warning in bare.warnings if "passed in memory" in warning]
    assert len(notes) == 1 and notes[0] in bare.provenance["warnings"]
    assert "training crop and calibrations" in notes[0] and "checkpoint_info" in notes[0]
    path.with_suffix(".json").unlink()
    lone = FusionEngine(path, device="cpu").run_fusion(image, image, quality=False)
    [sidecar_note] = [warning for warning in lone.warnings if "no sidecar" in warning]
    # One warning, worded alike: what is missing, then the same consequence.
    assert notes[0].split(": ", 1)[1].rsplit("; ", 1)[0] == sidecar_note.split(": ", 1)[1].rsplit("; ", 1)[0]


def test_another_checkpoints_metadata_is_refused_naming_the_config_fields_that_differ(model_3d, tmp_path):
    """The 2-D Harvard network with the 3-D phantom's metadata ran silently, its fused image up to 0.85
    off the checkpoint by name, its class evidence read with the 3-D calibration."""
    torch.manual_seed(2)
    path = save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=2)), tmp_path / "net.safetensors", CALIBRATED)
    network = load_checkpoint(path)[0]
    other_metadata = load_checkpoint(save_checkpoint(model_3d, tmp_path / "other.safetensors", CALIBRATED))[1]
    with pytest.raises(InputError, match=r"^checkpoint_info describes a network of another config \(spatial_dims: "
                                         r"3 there, 2 in the network; matching_range: 12 there, 32 in the network\), "
                                         r"so it is another checkpoint's metadata; pass the metadata load_checkpoint "
                                         r"returned beside this network"):
        FusionEngine(network, device="cpu", checkpoint_info=other_metadata)


@pytest.mark.parametrize(("metadata", "refusal"), [
    ({"method": "bsafusion"}, r"^checkpoint_info describes bsafusion weights but the network is a unifuse one, so "
                              r"it is another checkpoint's metadata; pass the metadata load_checkpoint returned"),
    ({"method": "unifuse", "config": "small"}, r"^checkpoint_info's config is not a unifuse config \(it is a str, not "
                                               r"named fields\); pass the metadata load_checkpoint returned"),
    ({"config": {"spatial_dims": 2, "depth": 3}}, r"^checkpoint_info's config is not a unifuse config \(UniFuseConfig: "
                                                  r"unknown config fields \['depth'\]\)"),
])
def test_metadata_of_another_method_or_no_config_is_refused(model_2d, metadata, refusal):
    with pytest.raises(InputError, match=refusal):
        FusionEngine(model_2d, device="cpu", checkpoint_info=metadata)


def test_metadata_recording_a_network_is_refused_for_a_method_that_runs_none():
    with pytest.raises(InputError, match=r"^checkpoint_info describes unifuse weights but the identity\+average "
                                         r"method runs no network"):
        FusionEngine(load_method("identity+average"), device="cpu", checkpoint_info={"method": "unifuse"})


@pytest.mark.parametrize("checkpoint_info", ["unifuse-2d-harvard", [("crop", 8)]])
def test_checkpoint_info_that_is_not_a_dict_is_an_input_error_saying_what_it_takes(model_2d, checkpoint_info):
    with pytest.raises(InputError, match=r"^checkpoint_info is .* \(a (str|list)\), not a checkpoint's metadata: it "
                                         r"takes the dict load_checkpoint returns beside the network"):
        FusionEngine(model_2d, device="cpu", checkpoint_info=checkpoint_info)


def test_a_record_without_method_or_config_is_kept_as_the_workbenchs_untrained_model_passes_it(model_2d):
    note = {"name": "untrained (small preset)", "note": "random weights (seed 0); outputs are not meaningful"}
    engine = FusionEngine(model_2d, device="cpu", checkpoint_info=note)
    assert engine.checkpoint_info == {"name": note["name"], "note": note["note"]}
    assert engine.checkpoint_warnings == []


@pytest.mark.parametrize("tile_size", ["64", (64, 128), 0, True])
def test_a_tile_size_that_is_not_a_positive_whole_number_is_an_input_error(model_2d, tile_size):
    with pytest.raises(InputError, match=r"^tile_size must be one positive whole number of voxels") as error:
        FusionEngine(model_2d, device="cpu", tile_size=tile_size)
    assert "--tile-size" not in str(error.value)


def test_arrays_given_for_images_are_an_input_error_saying_how_to_wrap_them(model_2d):
    image = blob((16, 16))
    with pytest.raises(InputError, match=r"the reference image is not an ImageVolume \(got numpy.ndarray\): "
                                         r"wrap arrays in ImageVolume\(array, Geometry"):
        FusionEngine(model_2d, device="cpu").run_fusion(image, image)


def test_reader_warnings_of_in_memory_images_name_the_role_not_none():
    with_nan = blob((16, 16))
    with_nan[0, :3] = np.nan
    reference = ImageVolume(with_nan, Geometry.identity(2))
    moving = ImageVolume(with_nan.copy(), Geometry.identity(2), {}, "moving.nii.gz")
    result = FusionEngine(load_method("identity+average"), device="cpu").run_fusion(reference, moving, quality=False)
    notes = [warning for warning in result.warnings if "non-finite values" in warning]
    assert [note.split(": ", 1)[0] for note in notes] == ["reference", "moving.nii.gz"]


def test_an_rgb_moving_image_is_aligned_as_float_colour_in_0_1_as_the_provenance_says():
    """The docstring promised the moving image's own units: an 8-bit RGB image comes back float32 in [0, 1]."""
    grey = (255 * blob((16, 16))).astype(np.uint8)
    colour = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    result = FusionEngine(load_method("identity+average"), device="cpu").run_fusion(
        ImageVolume(grey, Geometry.identity(2)), ImageVolume(colour, Geometry.identity(2), is_rgb=True),
        quality=False)
    aligned = result.aligned.array
    assert result.aligned.is_rgb and aligned.dtype == np.float32 and 0 <= aligned.min() <= aligned.max() <= 1
    np.testing.assert_allclose(aligned, colour / 255.0, atol=1e-5)  # the identity kept, the colour as given
    assert "RGB: float32 in [0, 1]" in result.provenance["outputs"]["aligned"]


def test_a_float64_moving_image_past_float32s_range_comes_back_finite_and_said():
    """Eight voxels at 1e39, finite in float64, were written as +inf into aligned.nii.gz with exit 0."""
    values = 50.0 + 50.0 * blob((16, 16)).astype(np.float64)
    values[:2, :4] = 1e39
    moving = ImageVolume(values, Geometry.identity(2), {}, "moving.nii.gz")
    result = FusionEngine(load_method("identity+average"), device="cpu").run_fusion(
        ImageVolume(blob((16, 16)), Geometry.identity(2)), moving, quality=False)
    aligned = result.aligned.array
    assert aligned.dtype == np.float32 and np.isfinite(aligned).all()
    assert aligned.max() == np.finfo(np.float32).max
    [warning] = [w for w in result.warnings if "float32's range" in w]
    assert warning.startswith("moving.nii.gz: 8 voxels beyond") and warning in result.provenance["warnings"]


@pytest.mark.parametrize("error", list(OUT_OF_MEMORY), ids=["cuda", "torch-host", "numpy"])
def test_out_of_memory_retries_with_smaller_tiles(model_2d, error):
    image = ImageVolume(blob((16, 8)), Geometry.identity(2))
    flaky = CountingModel(model_2d, max_side=8, error=error)

    result = FusionEngine(flaky, device="cpu").run_fusion(image, image)

    assert flaky.tile_shapes[0] == (16, 8)  # the whole input was tried first
    assert all(max(shape) <= 8 for shape in flaky.tile_shapes[1:]) and len(flaky.tile_shapes) > 2
    assert result.provenance["tile_shape"] == [8, 8]
    assert any(warning.startswith("the 'fuse' stage ran out of memory") for warning in result.warnings)
    assert result.warnings == result.provenance["warnings"]


def test_out_of_memory_at_the_smallest_tile_the_model_takes_is_a_clear_error(model_2d):
    """The fallback halves the tile down to the smallest the network takes (model.costs.minimum_size,
    4 for the 2-D small config, whose pooling pads a short grid) and no further; the error, with no
    smaller tile left, asks for memory, not a smaller --tile-size."""
    image = ImageVolume(blob((16, 16)), Geometry.identity(2))
    exhausted = CountingModel(model_2d, max_side=0)
    with pytest.raises(UniFuseError, match="'fuse' stage even with .* the smallest tiles this model takes") as error:
        FusionEngine(exhausted, device="cpu").run_fusion(image, image)
    assert "--tile-size" not in str(error.value)
    assert sorted(set(exhausted.tile_shapes)) == [(4, 4), (8, 8), (16, 16)]


def test_out_of_memory_outside_the_tiles_names_the_stage_and_the_size(model_2d, monkeypatch):
    import napari_unifuse.engine.inference as inference

    def exhausted(*args, **kwargs):
        raise MemoryError(OUT_OF_MEMORY[MemoryError])

    monkeypatch.setattr(inference, "quality_maps", exhausted)
    image = ImageVolume(blob((16, 24)), Geometry.identity(2))
    with pytest.raises(UniFuseError, match=r"computer ran out of memory during the 'quality' stage on a 16x24 pair"
                                           r" \(384 voxels\); free memory \(close other programs; in napari, layers"
                                           r" you no longer need\).*Nothing was written"):
        FusionEngine(model_2d, device="cpu").run_fusion(image, image)


def test_errors_that_are_not_out_of_memory_pass_through(model_2d, monkeypatch):
    import napari_unifuse.engine.inference as inference

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a full memory")

    monkeypatch.setattr(inference, "quality_maps", broken)
    image = ImageVolume(blob((16, 24)), Geometry.identity(2))
    with pytest.raises(RuntimeError, match="a bug"):
        FusionEngine(model_2d, device="cpu").run_fusion(image, image)


def test_cuda_fallback_plan_halves_tiles_then_moves_to_cpu():
    plan = fallback_plan(torch.device("cuda"), (64, 48), 32, smallest_side=8)
    assert plan == [
        (torch.device("cuda"), 32), (torch.device("cuda"), 16), (torch.device("cuda"), 8),
        (torch.device("cpu"), 32),
    ]
    assert fallback_plan(torch.device("cpu"), (16, 8), None, 8)[-1] == (torch.device("cpu"), 8)
    assert fallback_plan(torch.device("cpu"), (64, 64), None, 16)[-1] == (torch.device("cpu"), 16)


def _pressing_cancel_at_check(token: CancelToken, press_at: int, checks: list[int], check_cancelled):
    """``check_cancelled`` as the engine passes it, with Cancel pressed just before its call
    ``press_at``; ``checks`` counts the calls."""

    def check() -> None:
        checks.append(1)
        if len(checks) == press_at:
            token.cancel()
        check_cancelled()

    return check


def test_a_cancel_during_the_structural_matching_stops_it_at_its_next_step(model_2d, monkeypatch):
    token, checks = CancelToken(), []
    matching = UniFuse.initial_alignment

    def cancelled_while_matching(self, moving, reference, spacing=None, check_cancelled=never_cancelled):
        return matching(self, moving, reference, spacing,
                        _pressing_cancel_at_check(token, 5, checks, check_cancelled))

    monkeypatch.setattr(UniFuse, "initial_alignment", cancelled_while_matching)
    image = ImageVolume(blob((32, 32)), Geometry.identity(2))
    with pytest.raises(Cancelled):
        FusionEngine(model_2d, device="cpu").run_fusion(image, image, quality=False, cancel=token)
    assert len(checks) == 5  # the matching checks throughout (dozens of times) and stopped at once


def test_a_cancel_during_the_dense_refinement_stops_it_at_its_next_step(model_2d, monkeypatch):
    token, checks = CancelToken(), []
    refinement = inference.refine_dense

    def cancelled_while_refining(reference, moving, start, check_cancelled=never_cancelled):
        return refinement(reference, moving, start, _pressing_cancel_at_check(token, 5, checks, check_cancelled))

    monkeypatch.setattr(inference, "refine_dense", cancelled_while_refining)
    method = method_for_network(model_2d)
    method.checkpoint_metadata = {METADATA_KEY: {"weigh_dense_refinement": True}}
    image = ImageVolume(blob((32, 32)), Geometry.identity(2))
    with pytest.raises(Cancelled):
        FusionEngine(method, device="cpu").run_fusion(image, image, quality=False, cancel=token)
    assert len(checks) == 5  # of 60 Adam steps


def test_cancel_after_first_tile_stops_before_the_next_tile(model_2d):
    image = ImageVolume(blob((24, 16)), Geometry.identity(2))
    counting = CountingModel(model_2d)
    engine = FusionEngine(counting, device="cpu", tile_size=8)

    def cancel_after_first_tile(stage, done, total):
        if stage == "fuse" and done == 1:
            token.cancel()

    token = CancelToken()
    with pytest.raises(Cancelled):
        engine.run_fusion(image, image, progress=cancel_after_first_tile, cancel=token)
    assert len(counting.tile_shapes) == 1


def test_outputs_on_a_sheared_grid_go_to_metaimage_which_keeps_the_shear(model_3d, tmp_path):
    """A gantry-tilted CT read at its slice positions: NIfTI would hold the shear in its sform only,
    and ITK tools, which read the qform, showed the outputs upright (mm off the input)."""
    tilt = np.deg2rad(15)
    direction = np.array([[np.cos(tilt), 0, 0], [np.sin(tilt), 1, 0], [0, 0, 1]])  # slice axis leans along y
    geometry = Geometry(np.array([2.5, 1.0, 1.0]), np.zeros(3), direction)
    assert geometry.is_sheared and not Geometry(np.ones(3), np.zeros(3), np.eye(3)).is_sheared
    image = ImageVolume(blob((10, 12, 12)), geometry)
    result = FusionEngine(model_3d, device="cpu").run_fusion(image, image, quality=False)
    assert result.output_extension == "mha"
    written = write_fusion_outputs(result, tmp_path)
    fused = read_image(written["fused.mha"])
    assert fused.geometry.allclose(geometry)


def test_a_cancelled_3d_run_leaves_no_simpleitk_registration_running(model_3d):
    """SimpleITK registers on a thread of its own from the resampling on; a run cancelled before it
    waits for that field stops it instead of leaving it to burn a core for the rest of its course."""
    reference = ImageVolume(blob((64, 64, 64)), Geometry.identity(3))
    moving = ImageVolume(blob((64, 64, 64), centre_shift=0.1), Geometry.identity(3))
    token = CancelToken()

    def cancel_when_classifying(stage, done, total):
        if stage == CLASSIFY_STAGE and done == 0:
            assert registrations()  # SimpleITK has started and is still at work
            token.cancel()

    def registrations():
        return [thread for thread in threading.enumerate() if thread.name == "unifuse-simpleitk" and thread.is_alive()]

    with pytest.raises(Cancelled):
        FusionEngine(model_3d, device="cpu").run_fusion(reference, moving, progress=cancel_when_classifying,
                                                         cancel=token)
    assert not registrations()


@pytest.mark.parametrize(
    ("reference", "moving", "message"),
    [
        (ImageVolume(blob((8, 8, 8)), Geometry.identity(3)), ImageVolume(blob((8, 8)), Geometry.identity(2)),
         "both must be 2D or both 3D"),
        (ImageVolume(np.zeros((8, 8, 3), np.uint8), Geometry.identity(2), is_rgb=True),
         ImageVolume(blob((8, 8, 8)), Geometry.identity(3)), "reference is an RGB 2D image"),
        (ImageVolume(blob((8, 8)), Geometry.identity(2)),
         ImageVolume(np.full((8, 8), np.nan, np.float32), Geometry.identity(2), source="nan.nii.gz"),
         "NaN or infinite"),
        (ImageVolume(np.zeros((0, 8), np.float32), Geometry.identity(2), source="empty.nii.gz"),
         ImageVolume(blob((8, 8)), Geometry.identity(2)), "empty"),
    ],
    ids=["2d-vs-3d", "rgb-vs-3d", "nan-only", "empty"],
)
def test_bad_inputs_raise_input_errors(model_2d, reference, moving, message):
    with pytest.raises(InputError, match=message):
        FusionEngine(model_2d, device="cpu").run_fusion(reference, moving)


def test_a_3d_model_refuses_2d_images(model_3d):
    image = ImageVolume(blob((8, 8)), Geometry.identity(2))
    with pytest.raises(InputError, match="is a 3D model but the images are 2D"):
        FusionEngine(model_3d, device="cpu").run_fusion(image, image)


def test_failed_write_leaves_no_outputs(model_2d, tmp_path, monkeypatch):
    image = ImageVolume(blob((8, 8)), Geometry.identity(2))
    result = FusionEngine(model_2d, device="cpu").run_fusion(image, image)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("napari_unifuse.engine.outputs.write_displacement", disk_full)
    with pytest.raises(InputError, match=r"displacement.nii.gz: cannot be written \(No space left on device\)"):
        write_fusion_outputs(result, tmp_path / "case")
    assert not (tmp_path / "case").exists()  # no stray files, no staging folder, not even the folder it made

    monkeypatch.undo()
    written = write_fusion_outputs(result, tmp_path / "case")
    assert sorted(written) == sorted([*output_file_names("nii.gz"), *quality_file_names(result.quality)])
    assert sorted(path.name for path in (tmp_path / "case").iterdir()) == sorted(written)


def test_tiles_share_one_structural_matching_of_the_whole_input(model_2d):
    """A pair shifted by (8, -5) voxels, run in tiles of 64 voxels: every tile of the head reports
    the shift, also those whose own content would have to come from beyond their edge."""
    from napari_unifuse.data.misalign import warp_array
    from napari_unifuse.data.phantoms import make_brain_phantom_slices

    slices = make_brain_phantom_slices((128, 128), ("t1", "t2"))
    shift = np.array([8.0, -5.0])
    # moving(x + shift) = T2(x): the moving image is the T2 slice moved by -shift.
    t2 = slices["t2"].array
    moving = warp_array(t2, -shift.reshape(2, 1, 1) * np.ones((2, *t2.shape)), order=1)
    geometry = Geometry.identity(2)
    result = FusionEngine(model_2d, device="cpu", tile_size=64).run_fusion(
        ImageVolume(slices["t1"].array, geometry), ImageVolume(moving, geometry))
    assert result.provenance["tile_count"] > 1
    head = slices["t1"].array > 0.05
    error = np.linalg.norm(result.displacement - shift.reshape(2, 1, 1), axis=0)[head]
    assert np.median(error) < 1.0 and np.percentile(error, 95) < 2.5


def test_the_class_is_read_before_the_initial_move_and_the_tiles_get_the_moved_image():
    """The classify stage reads the moving image unmoved; the tiles get it moved by the initial
    field, which the class read on them would see interpolated."""
    from napari_unifuse.data.misalign import warp_array
    from napari_unifuse.model.warp import warp

    image = blob((32, 32))
    moving = warp_array(image, np.full((2, 32, 32), 3.0, np.float32), order=1)
    geometry = Geometry.identity(2)
    recording = ClassifyRecording(_statistics_head(2))
    FusionEngine(recording, device="cpu").run_fusion(ImageVolume(image, geometry), ImageVolume(moving, geometry),
                                                     quality=False)
    [(unmoved, _, _)] = recording.classified
    moved, field = recording.tiles[0]
    assert field.abs().max() > 1.0 and not torch.allclose(unmoved, moved, atol=1e-2)
    torch.testing.assert_close(warp(unmoved, field), moved)


class ClassifyRecording(CountingModel):
    """Records what the engine's classify stage read, and each tile's moved image, field and routing."""

    def __init__(self, model):
        super().__init__(model)
        self.classified, self.tiles, self.routed = [], [], []

    def classify(self, moving, reference):
        read = super().classify(moving, reference)
        self.classified.append((moving, reference, read))
        return read

    def refine(self, moving, reference, initial, *, fixed_field=False, class_probs=None):
        self.tiles.append((moving, initial))
        self.routed.append(class_probs)
        return super().refine(moving, reference, initial, fixed_field=fixed_field, class_probs=class_probs)


def _statistics_head(spatial_dims):
    import dataclasses

    config = dataclasses.replace(UniFuseConfig.small(spatial_dims), readout_patch_statistics=True,
                                 classifier_statistics_only=True, statistics_before_alignment=True)
    torch.manual_seed(0)
    return UniFuse(config).eval()


@pytest.mark.parametrize("on_reference_grid", [False, True], ids=["coarser grid", "same grid"])
def test_the_degradation_is_read_on_the_moving_image_as_given_and_routes_every_tile(on_reference_grid):
    """Interpolation smooths what the head reads (noise, ghosts, streaks): the moving image is
    classified as given, on its own grid before the resampling and before any move, and every tile
    is routed by that reading, which is the result's class."""
    model = _statistics_head(2)
    reference = ImageVolume(blob((32, 32)), Geometry.identity(2))
    moving = (ImageVolume(blob((32, 32), 0.1) ** 2, Geometry.identity(2)) if on_reference_grid
              else ImageVolume(blob((24, 24)) ** 2, Geometry(np.array([1.3, 1.3]), np.zeros(2), np.eye(2))))
    recording = ClassifyRecording(model)
    result = FusionEngine(recording, device="cpu").run_fusion(reference, moving, quality=False)
    [(moving_read, reference_read, (own, own_slices))] = recording.classified
    # The moving image as normalised on its own grid (24² and 32² are multiples of 8: no padding),
    # and the reference resampled onto that grid.
    np.testing.assert_allclose(moving_read[0, 0].numpy(), _prepare(moving, "auto").luma.array, atol=1e-6)
    np.testing.assert_allclose(
        reference_read[0, 0].numpy(),
        resample_to_reference(_prepare(reference, "auto").luma, moving).array, atol=1e-6)
    np.testing.assert_allclose(list(result.class_probs.values()), own[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(result.slice_class_probs, own_slices[0].numpy(), atol=1e-6)
    assert recording.routed and all(torch.allclose(p, own, atol=1e-6) for p in recording.routed)
    assert result.provenance["degradation_read_on"] == {
        "shape": list(moving.spatial_shape), "spacing_mm": list(moving.geometry.spacing), "coarse_copy": None}


def test_a_checkpoint_calibrated_for_it_also_reads_motion_on_a_coarse_copy(tmp_path):
    """With a ``coarse_readout`` section, a fine moving volume is read again on an anti-aliased
    copy of the section's spacing, and motion takes the larger of the two readings."""
    from napari_unifuse.engine.coarse_readout import CoarseReadout
    from napari_unifuse.model.checkpoint import set_metadata_section

    model = _statistics_head(3)
    path = save_checkpoint(model, tmp_path / "head.safetensors")
    set_metadata_section(path, "coarse_readout", {"spacing_mm": 2.8, "classes": ["motion"]})
    engine = FusionEngine(path, device="cpu")
    recording = ClassifyRecording(engine.method.network)
    engine.method.network = recording
    volume = blob((24, 24, 24))
    reference = ImageVolume(volume, Geometry.identity(3))
    moving = ImageVolume(np.roll(volume, 2, axis=0) ** 2, Geometry.identity(3))
    result = engine.run_fusion(reference, moving, quality=False)
    native, coarse = (read for _, _, read in recording.classified)
    assert [tuple(m.shape[2:]) for m, _, _ in recording.classified] == [(24, 24, 24), (12, 12, 12)]  # 9³ padded
    expected = CoarseReadout(2.8, ("motion",)).combine(native[0][0].numpy(), coarse[0][0].numpy(), DEGRADATION_CLASSES)
    np.testing.assert_allclose(list(result.class_probs.values()), expected, atol=1e-5)
    read_on = result.provenance["degradation_read_on"]
    assert read_on["coarse_copy"]["shape"] == [9, 9, 9] and read_on["coarse_copy"]["classes"] == ["motion"]
    # Voxels as coarse as the section's spacing are read once.
    coarse_voxels = ImageVolume(volume, Geometry(np.full(3, 2.8), np.zeros(3), np.eye(3)))
    recording.classified.clear()
    engine.run_fusion(coarse_voxels, coarse_voxels, quality=False)
    assert len(recording.classified) == 1


def test_per_slice_probabilities_read_on_a_thicker_moving_grid_land_on_the_reference_slices():
    """Each reference slice takes the moving slices' probabilities at its position along the moving
    z axis (linearly interpolated); a slice outside the moving field of view takes the whole
    image's."""
    reference = ImageVolume(np.zeros((12, 4, 4), np.float32), Geometry.identity(3))
    # Moving slices of 2 mm from z = 0 to z = 8 mm: reference slices 0..8 lie inside, 9.. outside
    # (the last moving slice's half-voxel ends at z = 9 mm).
    moving = ImageVolume(np.zeros((5, 4, 4), np.float32),
                         Geometry(np.array([2.0, 1.0, 1.0]), np.zeros(3), np.eye(3)))
    per_slice = np.stack([np.linspace(0, 1, 5), 1 - np.linspace(0, 1, 5)], axis=1)
    overall = np.array([0.3, 0.7])
    mapped = _slices_onto(per_slice, overall, moving, reference)
    z = np.arange(9) / 2
    np.testing.assert_allclose(mapped[:9], np.stack([z / 4, 1 - z / 4], axis=1), atol=1e-6)
    np.testing.assert_allclose(mapped[10:], np.broadcast_to(overall, (2, 2)), atol=1e-6)


def test_a_constant_moving_image_fuses_with_a_warning_in_the_result_and_the_provenance(model_2d):
    reference = ImageVolume(blob((32, 32)), Geometry.identity(2))
    moving = ImageVolume(np.zeros((32, 32), np.float32), Geometry.identity(2))
    result = FusionEngine(model_2d, device="cpu").run_fusion(reference, moving)
    assert any("moving image is constant (0 everywhere)" in warning for warning in result.warnings)
    assert result.provenance["warnings"] == result.warnings
    informative = FusionEngine(model_2d, device="cpu").run_fusion(reference, ImageVolume(blob((32, 32), 0.1),
                                                                                         Geometry.identity(2)))
    assert not any("constant" in warning for warning in informative.warnings)


def test_a_one_colour_picture_is_a_constant_moving_image(model_2d):
    """Its R, G and B differ, which hid that every pixel has the same colour."""
    reference = ImageVolume(blob((32, 32)), Geometry.identity(2))
    orange = ImageVolume(np.broadcast_to(np.array([255, 128, 0], np.uint8), (32, 32, 3)).copy(),
                         Geometry.identity(2), is_rgb=True)
    result = FusionEngine(model_2d, device="cpu").run_fusion(reference, orange, quality=False)
    assert any("moving image is constant (colour (255, 128, 0) everywhere)" in warning for warning in result.warnings)


def test_one_file_given_as_both_images_is_said_and_two_files_are_not(tmp_path):
    from PIL import Image

    from napari_unifuse.engine.methods import load_method
    from napari_unifuse.io import read_image

    yy, xx = np.indices((48, 48))
    disk = (200 * ((yy - 24) ** 2 + (xx - 24) ** 2 < 15**2)).astype(np.uint8)
    Image.fromarray(disk).save(tmp_path / "mri.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "mri.png").read_bytes())
    (tmp_path / "link.png").symlink_to(tmp_path / "mri.png")
    engine = FusionEngine(load_method("identity+average", spatial_dims=2), device="cpu")

    def warnings_for(moving: str) -> list[str]:
        result = engine.run_fusion(read_image(tmp_path / "mri.png"), read_image(tmp_path / moving), quality=False)
        return [warning for warning in result.warnings if "both the reference and the moving image" in warning]

    assert len(warnings_for("mri.png")) == 1 and len(warnings_for("link.png")) == 1
    assert warnings_for("copy.png") == []  # a copy gets its own warning ("hold the same image"), not this one
    # It promises only what holds for every method: UniFuse restores and blends, changing the image
    # fused with itself by up to 60 grey levels, which "the fused image is that image" denied.
    [warning] = warnings_for("mri.png")
    assert "nothing to align" in warning and "the fused image is that image" not in warning


def test_a_one_slice_nifti_reference_with_a_whole_volume_is_not_said_to_lie_in_another_plane(tmp_path):
    """The volume resampled onto the slice kept the volume's NIfTI header, whose height (its first
    slice's, 10 mm below) the plane check took for the moving slice's."""
    import nibabel as nib

    volume = np.random.default_rng(0).random((20, 24, 12)).astype(np.float32)  # nibabel order (x, y, z)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = (-15.0, -18.0, -12.0)
    nib.Nifti1Image(volume, affine).to_filename(tmp_path / "volume.nii.gz")
    slice_affine = affine.copy()
    slice_affine[2, 3] += 5 * 2.0  # the volume's sixth slice
    nib.Nifti1Image(volume[:, :, 5:6], slice_affine).to_filename(tmp_path / "slice.nii.gz")
    reference, moving = read_image(tmp_path / "slice.nii.gz"), read_image(tmp_path / "volume.nii.gz")
    assert reference.single_slice_axis == 0 and moving.spatial_shape == (12, 24, 20)
    result = FusionEngine(load_method("identity+average"), device="cpu").run_fusion(reference, moving, quality=False)
    assert not [warning for warning in result.warnings if "different planes" in warning]
    np.testing.assert_allclose(result.aligned.array[0], volume[:, :, 5].T, atol=1e-5)  # the slice's own plane


class SliceRoughnessReader(CountingModel):
    """Reads "noise" on each slice along the tile's axis 0, from its in-plane roughness: a stand-in
    for a head whose per-slab readings follow a slice-localised artefact."""

    def classify(self, moving, reference):
        tile = moving[0, 0]
        roughness = (tile[:, 2:, :] - 2 * tile[:, 1:-1, :] + tile[:, :-2, :]).abs().mean(dim=(1, 2))
        noisy = roughness / (roughness + 0.05)
        per_slice = torch.zeros(1, tile.shape[0], len(DEGRADATION_CLASSES))
        per_slice[0, :, 0], per_slice[0, :, 1] = noisy, 1 - noisy
        return per_slice.mean(dim=1), per_slice


@pytest.mark.parametrize("axes, flipped", [((2, 1, 0), False), ((1, 0, 2), False), ((2, 1, 0), True)],
                         ids=["sagittal-first", "coronal-first", "sagittal-first, S flipped"])
def test_per_slice_probabilities_follow_a_local_artefact_whatever_the_moving_axis_order(model_3d, axes, flipped):
    """Noise in the first 4 of 12 thick (2 mm) axial slices of the moving image lands on reference
    slices 0-7 whether the moving volume is stored axial-first or in another axis order: the head
    reads slices along the moving axis that runs along the reference's axis 0."""
    reference = ImageVolume(blob((24, 24, 24)), Geometry.identity(3))
    thick = blob((12, 24, 24))
    thick[:4] += np.random.default_rng(0).normal(0, 0.3, thick[:4].shape).astype(np.float32)
    axial_geometry = Geometry(np.array([2.0, 1.0, 1.0]), np.array([0.5, 0.0, 0.0]), np.eye(3))
    axial = ImageVolume(thick, axial_geometry)
    if flipped:  # the same voxels, stored from the top slice down
        thick = thick[::-1]
        axial_geometry = Geometry(axial_geometry.spacing, np.array([22.5, 0.0, 0.0]), np.diag([-1.0, 1.0, 1.0]))
    stored = ImageVolume(np.ascontiguousarray(thick.transpose(axes)), axial_geometry.transposed(axes))

    engine = FusionEngine(SliceRoughnessReader(model_3d), device="cpu")

    def profile(moving: ImageVolume) -> np.ndarray:
        _, per_slice, _ = engine._read_degradation(moving, reference, lambda *_: None, CancelToken(), [])
        return per_slice[:, 0]

    axial_profile, stored_profile = profile(axial), profile(stored)
    assert axial_profile[:7].min() > 0.8 and axial_profile[9:].max() < 0.2
    np.testing.assert_allclose(stored_profile, axial_profile, atol=1e-4)


def test_a_modality_guessed_from_ambiguous_intensities_is_a_warning_of_the_run(model_2d):
    """io.normalize marks a guess it cannot be sure of (values below -500 without CT's air peak:
    PET undershoot, or real-valued MR); the user must read that, not only the provenance."""
    rng = np.random.default_rng(0)
    reference = ImageVolume(blob((32, 32)), Geometry.identity(2))
    undershoot = (blob((32, 32)) * 20000 + rng.normal(0, 1500, (32, 32))).astype(np.float32)
    moving = ImageVolume(undershoot, Geometry.identity(2), source="pet.nii.gz")
    result = FusionEngine(model_2d, device="cpu").run_fusion(reference, moving, quality=False)
    (guess,) = [w for w in result.warnings if "give the modality" in w]
    assert guess.startswith("pet.nii.gz: ")
    assert result.provenance["warnings"] == result.warnings


def test_two_colour_images_say_whose_colours_the_fused_image_carries(model_2d):
    """Only one image's chroma can be carried: a PET reference's colour where the moving PET is dark
    came out grey, with nothing said."""
    red = np.zeros((24, 20, 3), dtype=np.uint8)
    red[..., 0] = (255 * blob((24, 20), 0.1)).astype(np.uint8)
    green = red[..., [1, 0, 2]].copy()
    reference = ImageVolume(red, Geometry.identity(2), source="pet_reference.png", is_rgb=True)
    moving = ImageVolume(green, Geometry.identity(2), is_rgb=True)
    result = FusionEngine(model_2d, device="cpu").run_fusion(reference, moving, quality=False)
    (said,) = [w for w in result.warnings if "both images are in colour" in w]
    assert said.startswith("pet_reference.png: ") and "coloured by the moving image alone" in said
    grey_reference = ImageVolume(blob((24, 20)), Geometry.identity(2))
    single = FusionEngine(model_2d, device="cpu").run_fusion(grey_reference, moving, quality=False)
    assert not [w for w in single.warnings if "both images are in colour" in w]


def test_an_8_bit_colour_reference_in_model_units_is_the_luma_the_model_fused(model_2d):
    """The workbench scores fusion metrics against the reference in model units: a uint8 RGB PET
    reference, taken as 0-255 luma, saturated into a three-valued mask (gain 0.026 against 0.136)."""
    red = np.zeros((24, 20, 3), dtype=np.uint8)
    red[..., 0] = (255 * blob((24, 20), 0.1)).astype(np.uint8)
    reference = ImageVolume(red, Geometry.identity(2), is_rgb=True)
    moving = ImageVolume(blob((24, 20)), Geometry.identity(2))
    result = FusionEngine(model_2d, device="cpu").run_fusion(reference, moving, quality=False)
    as_float = ImageVolume(red / np.float32(255), Geometry.identity(2), is_rgb=True)
    units = result.in_model_units("reference", reference)
    np.testing.assert_allclose(units, result.in_model_units("reference", as_float), atol=1e-6)
    assert len(np.unique(units)) > 10 and units.max() < 1


def _nifti_file(path, array, zooms, affine=None):
    """``array`` (z, y, x) saved as NIfTI: oriented by ``affine`` (RAS), or without orientation
    (qform and sform codes 0) when there is none."""
    import nibabel as nib

    image = nib.Nifti1Image(array.astype(np.float32).transpose(), affine)
    image.header.set_zooms(zooms)
    if affine is None:
        image.set_qform(None, code=0)
        image.set_sform(None, code=0)
    nib.save(image, path)
    return path


def _oriented_head(path, shape=(26, 22, 24), spacing=1.3):
    """An off-centre blob on a grid of its own, oriented (codes 1), centred near the world's origin
    where nibabel's guess centres a NIfTI without orientation; values 100-1100 as a CT's."""
    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", (6.0, -4.0, 9.0), degrees=True).as_matrix() * spacing
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape[::-1]) - 1) / 2 + [2.0, -1.5, 1.0]
    return _nifti_file(path, 100.0 + 1000.0 * blob(shape, centre_shift=0.3), (spacing,) * 3, affine)


@pytest.mark.parametrize("reference_shape", [(20, 24, 22), (1, 24, 22)], ids=["volume", "one slice"])
def test_simpleitk_resamples_the_moving_image_through_the_field_onto_the_aligned_one_beside_an_unoriented_reference(
        tmp_path, reference_shape):
    """A NIfTI reference without orientation (codes 0) and an oriented moving image on another grid:
    the package places the reference by nibabel's guess (centred), ITK at origin 0. The field was
    written as ``u`` alone (zero here), so SimpleITK's resample through it put the moving image where
    ITK places it against the reference's other placement (correlation -0.02 with aligned.nii.gz)."""
    from napari_unifuse.engine.methods import load_method

    reference_path = _nifti_file(tmp_path / "reference.nii.gz", 1000.0 * blob(reference_shape), (1.0, 1.2, 1.5))
    moving_path = _oriented_head(tmp_path / "moving.nii.gz")
    reference, moving = read_image(reference_path), read_image(moving_path)
    spatial_dims = 2 if reference.single_slice_axis is not None else 3
    engine = FusionEngine(load_method("identity+average", spatial_dims=spatial_dims), device="cpu")
    result = engine.run_fusion(reference, moving, quality=False)
    np.testing.assert_array_equal(result.moving_itk_placement, np.eye(4))  # oriented: placed alike
    written = write_fusion_outputs(result, tmp_path / "run")

    field = sitk.ReadImage(str(written["displacement.nii.gz"]), sitk.sitkVectorFloat64)
    # ITK reads a one-slice field with its slice axis moved (io.fields) and placed by explicit forms:
    # there the resample holds onto the field's grid, the grid's points where the package has them.
    onto = sitk.ReadImage(str(reference_path))
    if spatial_dims == 2:
        onto = sitk.Image(field.GetSize(), sitk.sitkFloat32)
        onto.CopyInformation(field)
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(moving_path)), onto,
                                                  sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0))
    aligned = sitk.GetArrayFromImage(sitk.ReadImage(str(written["aligned.nii.gz"])))
    if spatial_dims == 2:
        theirs = np.transpose(theirs, (2, 0, 1))  # the field's ITK axes (slice, x, y) back to (z, y, x)
    overlap = (theirs > 0) & (aligned > 0)
    assert overlap.mean() > 0.5
    assert np.corrcoef(theirs[overlap], aligned[overlap])[0, 1] > 0.99


def test_the_field_of_oriented_images_is_written_as_before(tmp_path):
    """Images every tool places alike: the recorded placement is the identity and the field is
    ``u`` in the reference's frame, bit for bit what it was without a moving placement."""
    from napari_unifuse.engine.methods import load_method
    from napari_unifuse.io.fields import write_displacement

    reference_path = _oriented_head(tmp_path / "reference.nii.gz", (20, 24, 22), 1.1)
    reference, moving = read_image(reference_path), read_image(_oriented_head(tmp_path / "moving.nii.gz"))
    result = FusionEngine(load_method("identity+average", spatial_dims=3), device="cpu").run_fusion(
        reference, moving, quality=False)
    result.displacement = blob((3, 20, 24, 22)) * 2.0  # a field that is not zero, as the network's
    written = write_fusion_outputs(result, tmp_path / "run")["displacement.nii.gz"]
    before = write_displacement(result.displacement, reference.geometry, tmp_path / "before.nii.gz",
                                reference_metadata=result.fused.metadata)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(before))))


def test_two_signed_pictures_without_position_are_written_where_their_pixels_fit(model_2d, tmp_path):
    """A DICOM picture without position (a screenshot) is a picture like a PNG, but its signed pixels
    do not fit one: the outputs go to MetaImage, which holds them, instead of failing at aligned.png."""
    picture = {WITHOUT_POSITION: True}
    reference = ImageVolume((blob((24, 20)) * 1000 - 200).astype(np.int16), Geometry.identity(2), dict(picture))
    moving = ImageVolume((blob((24, 20), 0.1) * 1000 - 200).astype(np.int16), Geometry.identity(2), dict(picture))

    result = FusionEngine(model_2d, device="cpu").run_fusion(reference, moving)
    written = write_fusion_outputs(result, tmp_path)

    assert result.aligned.array.dtype == np.int16 and result.output_extension == "mha"
    aligned = read_image(written["aligned.mha"])
    np.testing.assert_array_equal(aligned.array, result.aligned.array)
