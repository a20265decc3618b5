"""The alignment guard: identity unless an estimate reliably improves the multimodal similarity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unifuse.data.misalign import warp_array
from napari_unifuse.engine import inference
from napari_unifuse.engine.alignment_guard import (
    GAIN_NOISE_FACTOR,
    IDENTITY,
    LARGE_MOTION_VOXELS,
    MAX_SAMPLES,
    METADATA_KEY,
    MIN_CREDIBLE_MOTION_VOXELS,
    _block_histograms,
    choose_displacement,
    credible_motion_floor,
    similarity_blur,
    weighs_dense_refinement,
    weighs_network_field,
)
from napari_unifuse.engine.inference import (
    CLASSICAL_STAGE,
    DENSE,
    DENSE_STAGE,
    MATCHING,
    NETWORK,
    SIMPLEITK,
    FusionEngine,
)
from napari_unifuse.engine.methods import load_method, method_for_network
from napari_unifuse.engine.outputs import PROVENANCE_FILE, write_fusion_outputs
from napari_unifuse.errors import CheckpointError
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import read_metadata
from napari_unifuse.model.mi_refinement import joint_mutual_information, linear_bins, soft_mutual_information
from napari_unifuse.model.smoothing import gaussian_blur

SHIFT = (6.0, 8.0)  # 10 voxels: above the credible-motion floor, below the large-motion rule


def multimodal_pair(shape: tuple[int, ...], seed: int = 0, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(MR-like, PET-like) images of one head, aligned: four tissue classes that the two
    modalities order differently (no monotonic map between them), the PET-like one blurred."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    head = (grid**2).sum(0) < 0.8
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    tissue = np.digitize(texture, np.quantile(texture[head], [0.25, 0.5, 0.75]))
    mr = np.where(head, np.array([0.25, 0.5, 0.75, 1.0])[tissue], 0.0)
    pet = ndimage.gaussian_filter(np.where(head, np.array([0.9, 0.2, 0.6, 0.4])[tissue], 0.0), 1.5)
    mr, pet = (np.clip(image + noise * rng.normal(size=shape), 0, 1).astype(np.float32) for image in (mr, pet))
    return mr, pet


def constant_field(shape: tuple[int, ...], vector: tuple[float, ...]) -> np.ndarray:
    return np.broadcast_to(np.array(vector, np.float32).reshape(-1, *[1] * len(shape)), (len(shape), *shape)).copy()


def shifted(image: np.ndarray, vector: tuple[float, ...]) -> np.ndarray:
    """``image`` moved by ``vector``: the field ``vector`` takes it back (samples it at x + vector)."""
    return warp_array(image, -constant_field(image.shape, vector)).astype(np.float32)


def test_an_aligned_pair_keeps_the_identity_against_zero_and_wrong_fields():
    mr, pet = multimodal_pair((96, 96))
    zero = np.zeros((2, 96, 96), np.float32)
    unchanged = choose_displacement(pet, mr, {MATCHING: zero, NETWORK: zero})
    assert unchanged.kept == IDENTITY and all(c.gain == 0.0 for c in unchanged.challenges)

    wrong = constant_field((96, 96), SHIFT)
    decision = choose_displacement(pet, mr, {MATCHING: wrong, NETWORK: wrong})
    assert decision.kept == IDENTITY
    assert decision.scores[MATCHING] < decision.scores[IDENTITY]
    assert decision.message.startswith("kept identity: no reliable improvement")


def test_a_ten_voxel_shift_is_corrected_by_the_better_estimate():
    mr, pet = multimodal_pair((96, 96))
    moved = shifted(pet, SHIFT)
    correct = constant_field((96, 96), SHIFT)

    network_off = choose_displacement(moved, mr, {MATCHING: correct, NETWORK: correct + 0.7})
    assert network_off.kept == MATCHING
    first = network_off.challenges[0]
    assert (first.challenger, first.incumbent) == (MATCHING, IDENTITY)
    assert first.gain > GAIN_NOISE_FACTOR * first.noise

    # The matching 10 % short: the network's fine correction of it still competes (and wins).
    matching_partial = choose_displacement(moved, mr, {MATCHING: 0.9 * correct, NETWORK: correct})
    assert matching_partial.kept == NETWORK
    assert matching_partial.challenges[1].incumbent == MATCHING
    assert matching_partial.message.startswith("kept network: mutual information +")


def test_a_gain_within_the_noise_keeps_the_identity():
    correct = constant_field((96, 96), SHIFT)
    clean_mr, clean_pet = multimodal_pair((96, 96), seed=1)
    assert choose_displacement(shifted(clean_pet, SHIFT), clean_mr, {MATCHING: correct}).kept == MATCHING

    mr, pet = multimodal_pair((96, 96), seed=1, noise=0.6)
    decision = choose_displacement(shifted(pet, SHIFT), mr, {MATCHING: correct})
    challenge = decision.challenges[0]
    assert 0.0 < challenge.gain < GAIN_NOISE_FACTOR * challenge.noise  # better, but not reliably so
    assert decision.kept == IDENTITY


def test_a_motion_below_the_credible_floor_keeps_the_identity_however_large_its_gain():
    """Across modalities the similarity's own bias is several voxels, so a small correction is not
    accepted even when the images clearly prefer it; the message says why."""
    vector = (0.0, MIN_CREDIBLE_MOTION_VOXELS - 3.0)
    mr, pet = multimodal_pair((96, 96), seed=1)
    decision = choose_displacement(shifted(pet, vector), mr, {MATCHING: constant_field((96, 96), vector)})
    challenge = decision.challenges[0]
    assert challenge.gain > GAIN_NOISE_FACTOR * challenge.noise
    assert decision.magnitudes[MATCHING] == pytest.approx(MIN_CREDIBLE_MOTION_VOXELS - 3.0, abs=0.01)
    assert decision.kept == IDENTITY
    assert f"less than {MIN_CREDIBLE_MOTION_VOXELS:g} voxels" in decision.message


def test_a_lower_floor_lets_a_reliable_small_correction_through_and_still_stops_an_unreliable_one():
    """Where the similarity can be trusted (a checkpoint's calibrated floor), the same 5-voxel
    correction that the default floor refuses is kept; the k rule still applies to it."""
    vector = (0.0, MIN_CREDIBLE_MOTION_VOXELS - 3.0)
    field = constant_field((96, 96), vector)
    mr, pet = multimodal_pair((96, 96), seed=1)
    decision = choose_displacement(shifted(pet, vector), mr, {MATCHING: field}, min_credible_motion=1.5)
    assert decision.kept == MATCHING and decision.min_credible_motion == 1.5
    assert decision.to_dict()["min_credible_motion_voxels"] == 1.5

    # Below the lower floor, and noisy: identity, and the message names the floor in force.
    tiny = (0.0, 1.0)
    below = choose_displacement(shifted(pet, tiny), mr, {MATCHING: constant_field((96, 96), tiny)},
                                min_credible_motion=1.5)
    assert below.kept == IDENTITY and "less than 1.5 voxels" in below.message
    noisy_mr, noisy_pet = multimodal_pair((96, 96), seed=1, noise=0.6)
    unreliable = choose_displacement(shifted(noisy_pet, SHIFT), noisy_mr, {MATCHING: constant_field((96, 96), SHIFT)},
                                     min_credible_motion=1.5)
    assert unreliable.kept == IDENTITY and "noise" in unreliable.message


THICK_SLICES = (5.0, 1.0, 1.0)  # mm per array axis: 5 mm slices of 1 mm pixels


def test_a_through_plane_shift_on_thick_slices_counts_by_its_size_in_mm():
    """1.5 slices of 5 mm is 7.5 mm: seven and a half in-plane voxels, above a floor of 2. Counted
    in voxels of the grid it was 1.5, and the guard refused it however clearly the images preferred it."""
    vector = (1.5, 0.0, 0.0)
    mr, pet = multimodal_pair((32, 64, 64), seed=1)
    moved, field = shifted(pet, vector), {MATCHING: constant_field(mr.shape, vector)}

    in_grid_voxels = choose_displacement(moved, mr, field, min_credible_motion=2.0)
    assert in_grid_voxels.challenges[0].gain > GAIN_NOISE_FACTOR * in_grid_voxels.challenges[0].noise
    assert in_grid_voxels.kept == IDENTITY

    in_mm = choose_displacement(moved, mr, field, min_credible_motion=2.0, spacing=THICK_SLICES)
    assert in_mm.magnitudes[MATCHING] == pytest.approx(7.5, abs=1e-4)
    assert in_mm.kept == MATCHING
    assert in_mm.to_dict()["motion_unit"].startswith("voxels of the finest axis (1 mm)")
    assert in_mm.to_dict()["min_credible_motion_mm"] == 2.0


def test_a_refusal_on_thick_slices_states_the_floor_in_mm():
    """An in-plane motion of 1 mm is under a floor of 2 finest voxels: the message gives the floor
    in mm and the voxels it counts, not a grid voxel that means 5 mm through the slices."""
    vector = (0.0, 0.0, 1.0)
    mr, pet = multimodal_pair((32, 64, 64), seed=1)
    decision = choose_displacement(shifted(pet, vector), mr, {MATCHING: constant_field(mr.shape, vector)},
                                   min_credible_motion=2.0, spacing=THICK_SLICES)
    assert decision.kept == IDENTITY
    assert "less than 2 mm (2 voxels of the finest axis, 1 mm)" in decision.message


@pytest.mark.parametrize(("shape", "vector", "spacing"), [
    ((96, 96), SHIFT, (0.8, 0.8)),
    ((96, 96), (0.0, MIN_CREDIBLE_MOTION_VOXELS - 3.0), (1.0, 1.0)),
    ((40, 40, 40), (0.5, 1.0, 1.5), (1.49, 1.49, 1.49)),
])
def test_an_isotropic_grid_decides_exactly_as_without_its_spacing(shape, vector, spacing):
    """The finest voxel of an isotropic grid is its voxel: the same motions to the bit, the same
    decision; only the message and provenance add the size in mm."""
    mr, pet = multimodal_pair(shape, seed=1)
    moved = shifted(pet, vector)
    estimates = {MATCHING: constant_field(shape, vector), NETWORK: constant_field(shape, vector) * 0.9}
    for floor in (MIN_CREDIBLE_MOTION_VOXELS, 1.5):
        without = choose_displacement(moved, mr, estimates, min_credible_motion=floor)
        given = choose_displacement(moved, mr, estimates, min_credible_motion=floor, spacing=spacing)
        assert (given.kept, given.scores, given.magnitudes, given.challenges) == (
            without.kept, without.scores, without.magnitudes, without.challenges)
    assert given.to_dict()["motion_unit"] == f"voxels of {spacing[0]:g} mm"


@pytest.mark.parametrize("spacing", [(1.0,), (1.0, 0.0), (1.0, float("nan"))])
def test_a_spacing_that_does_not_fit_the_grid_is_refused(spacing):
    mr, pet = multimodal_pair((32, 32))
    with pytest.raises(ValueError, match="spacing must give a size > 0"):
        choose_displacement(pet, mr, {MATCHING: np.zeros((2, 32, 32), np.float32)}, spacing=spacing)


@pytest.mark.parametrize(("metadata", "expected"), [
    ({}, MIN_CREDIBLE_MOTION_VOXELS),
    ({METADATA_KEY: {"calibration": "no floor recorded"}}, MIN_CREDIBLE_MOTION_VOXELS),
    ({METADATA_KEY: {"min_credible_motion_voxels": 1.5}}, 1.5),
    ({METADATA_KEY: {"min_credible_motion_voxels": 0}}, 0.0),
])
def test_a_checkpoint_may_carry_its_own_floor(metadata, expected):
    assert credible_motion_floor(metadata) == expected


@pytest.mark.parametrize(("metadata", "expected"), [
    ({}, 0.0),
    ({METADATA_KEY: {"min_credible_motion_voxels": 2}}, 0.0),
    ({METADATA_KEY: {"similarity_blur_voxels": 1}}, 1.0),
])
def test_a_checkpoint_may_ask_the_guard_to_blur_both_images(metadata, expected):
    assert similarity_blur(metadata) == expected


def test_the_guard_scores_both_images_blurred_when_asked():
    """A blur of sigma s is the guard on both images blurred first, the same scores to the digit;
    the scores differ from the sharp images' and the provenance says which were scored."""
    mr, pet = multimodal_pair((96, 96), seed=1)
    moving = shifted(pet, SHIFT)
    candidates = {MATCHING: constant_field((96, 96), SHIFT)}
    blurred = choose_displacement(moving, mr, candidates, blur_voxels=1.5)
    by_hand = choose_displacement(*(gaussian_blur(torch.from_numpy(image)[None, None], 1.5)[0, 0].numpy()
                                    for image in (moving, mr)), candidates)
    sharp = choose_displacement(moving, mr, candidates)
    assert blurred.scores == by_hand.scores and blurred.kept == by_hand.kept == MATCHING
    assert blurred.scores[MATCHING] != pytest.approx(sharp.scores[MATCHING], abs=1e-3)
    assert blurred.to_dict()["blur_voxels"] == 1.5 and "sigma 1.5 voxels" in blurred.to_dict()["similarity"]
    assert sharp.to_dict()["blur_voxels"] == 0.0 and "blurred" not in sharp.to_dict()["similarity"]


@pytest.mark.parametrize(("key", "value", "reader"), [
    *(("min_credible_motion_voxels", value, credible_motion_floor) for value in (-1.0, float("nan"), "1.5", True, [1.5])),
    *(("similarity_blur_voxels", value, similarity_blur) for value in (-0.5, float("inf"), "1", False)),
    *(("weigh_network_field", value, weighs_network_field) for value in ("false", 0, None)),
    *(("weigh_dense_refinement", value, weighs_dense_refinement) for value in ("true", 1, None)),
])
def test_a_malformed_guard_setting_in_a_sidecar_is_refused(key, value, reader, tmp_path, untrained):
    with pytest.raises(ValueError, match=key):
        reader({METADATA_KEY: {key: value}})
    method = method_for_network(untrained)
    method.checkpoint = tmp_path / "other.safetensors"
    method.checkpoint_metadata = {METADATA_KEY: {key: value}}
    with pytest.raises(CheckpointError, match=f"other.safetensors.*{key}"):
        FusionEngine(method, device="cpu")


@pytest.mark.parametrize("section", ["yes", True, [2.0], 2.0])
@pytest.mark.parametrize("reader", [credible_motion_floor, similarity_blur, weighs_network_field,
                                    weighs_dense_refinement])
def test_a_guard_section_that_is_not_an_object_is_refused_not_ignored(section, reader):
    with pytest.raises(ValueError, match=f"{METADATA_KEY} must be an object of settings"):
        reader({METADATA_KEY: section})


def test_a_large_correction_needs_less_evidence_than_a_small_one():
    """k guards against the small spurious motions of fitted fields; a 14-voxel correction (above
    LARGE_MOTION_VOXELS) is kept once its gain clears one noise unit, and a noisier one is not."""
    large = constant_field((96, 96), (0.0, 14.0))
    assert np.abs(large[1]).mean() > LARGE_MOTION_VOXELS
    mr, pet = multimodal_pair((96, 96), seed=1, noise=0.3)
    decision = choose_displacement(shifted(pet, (0.0, 14.0)), mr, {MATCHING: large})
    challenge = decision.challenges[0]
    assert challenge.noise < challenge.gain < GAIN_NOISE_FACTOR * challenge.noise
    assert decision.kept == MATCHING

    mr, pet = multimodal_pair((96, 96), seed=2, noise=0.6)
    decision = choose_displacement(shifted(pet, (0.0, 14.0)), mr, {MATCHING: large})
    assert decision.challenges[0].gain < decision.challenges[0].noise
    assert decision.kept == IDENTITY


def test_bootstrap_block_histograms_give_the_soft_mutual_information_of_the_sample():
    rng = np.random.default_rng(0)
    reference, moving = rng.uniform(0, 1, (2, 500)).astype(np.float32)
    blocks = rng.integers(0, 7, 500)
    bins = linear_bins(torch.from_numpy(reference))
    whole_sample = torch.ones(1, 7, dtype=torch.float64) @ _block_histograms(bins, moving, blocks, 7)
    expected = soft_mutual_information(linear_bins(torch.from_numpy(reference)[None]), torch.ones(1, 500),
                                       torch.from_numpy(moving)[None])
    np.testing.assert_allclose(joint_mutual_information(whole_sample).numpy(), expected.numpy(), rtol=1e-4)


def test_too_little_shared_tissue_keeps_the_identity():
    mr, _ = multimodal_pair((96, 96))
    empty = np.zeros_like(mr)
    decision = choose_displacement(empty, mr, {MATCHING: constant_field((96, 96), SHIFT)})
    assert decision.kept == IDENTITY and decision.challenges == () and decision.samples == 0
    assert "too little tissue" in decision.message


def test_volumes_are_scored_on_a_capped_sample():
    mr, pet = multimodal_pair((64, 64, 64))  # about 98 000 voxels of tissue
    vector = (2.0, *SHIFT)
    decision = choose_displacement(shifted(pet, vector), mr, {MATCHING: constant_field(mr.shape, vector)})
    assert decision.kept == MATCHING
    assert 0 < decision.samples <= MAX_SAMPLES < np.count_nonzero(mr)


# ---- in the engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained() -> UniFuse:
    """Zero-initialised output heads: restored = the moving image moved by the field."""
    torch.manual_seed(0)
    return UniFuse(UniFuseConfig.small(spatial_dims=2))


def test_engine_keeps_the_identity_for_an_aligned_pair_and_returns_the_image_unchanged(untrained, tmp_path):
    mr, pet = multimodal_pair((96, 96))
    # PET in its own units: a grey surround, and hot voxels above the 99.9th percentile window.
    uptake = 2.0 + 10.0 * pet
    uptake[40:42, 50:52] = 40.0
    reference = ImageVolume(mr, Geometry.identity(2))
    moving = ImageVolume(uptake.astype(np.float32), Geometry.identity(2))

    result = FusionEngine(untrained, device="cpu").run_fusion(reference, moving, moving_modality="pet")

    assert result.alignment_guard.kept == IDENTITY
    assert not result.displacement.any()
    np.testing.assert_allclose(result.aligned.array, uptake, rtol=1e-5, atol=1e-4)
    write_fusion_outputs(result, tmp_path)
    provenance = json.loads((tmp_path / PROVENANCE_FILE).read_text())
    assert provenance["alignment_guard"]["kept"] == IDENTITY
    assert provenance["alignment_guard"]["message"] == result.alignment_guard.message


def test_engine_corrects_a_ten_voxel_shift_and_outputs_follow_the_kept_field(untrained):
    mr, pet = multimodal_pair((96, 96))
    moving = ImageVolume(shifted(pet, SHIFT), Geometry.identity(2))

    result = FusionEngine(untrained, device="cpu").run_fusion(ImageVolume(mr, Geometry.identity(2)), moving)

    assert result.alignment_guard.kept in (MATCHING, NETWORK)
    assert result.provenance["alignment_guard"]["kept"] == result.alignment_guard.kept
    head = mr > 0
    error = np.linalg.norm(result.displacement - constant_field(mr.shape, SHIFT), axis=0)[head].mean()
    assert error < 1.0
    # The aligned image is the moving image moved by the reported field (no restoration to do).
    expected = warp_array(moving.array, result.displacement, mode="grid-constant")  # model.warp pads with 0
    np.testing.assert_allclose(result.aligned.array, expected, atol=1e-4)


@pytest.fixture(scope="module")
def untrained_3d() -> UniFuse:
    torch.manual_seed(0)
    return UniFuse(UniFuseConfig.small(spatial_dims=3))


def test_the_engine_uses_the_checkpoints_floor_and_blur(untrained, tmp_path):
    """The 2-D engine with a 5-voxel misalignment: refused under the default floor, kept under a
    checkpoint floor of 1.5 voxels, and the provenance records the floor and the blur used."""
    vector = (0.0, MIN_CREDIBLE_MOTION_VOXELS - 3.0)
    mr, pet = multimodal_pair((96, 96))
    reference = ImageVolume(mr, Geometry.identity(2))
    moving = ImageVolume(shifted(pet, vector), Geometry.identity(2))

    default = FusionEngine(untrained, device="cpu").run_fusion(reference, moving, quality=False)
    method = method_for_network(untrained)
    method.checkpoint_metadata = {METADATA_KEY: {"min_credible_motion_voxels": 1.5, "similarity_blur_voxels": 1.0}}
    calibrated = FusionEngine(method, device="cpu").run_fusion(reference, moving, quality=False)

    assert default.alignment_guard.kept == IDENTITY
    assert default.provenance["alignment_guard"]["min_credible_motion_voxels"] == MIN_CREDIBLE_MOTION_VOXELS
    assert default.provenance["alignment_guard"]["blur_voxels"] == 0.0
    assert calibrated.alignment_guard.kept in (MATCHING, NETWORK)
    assert calibrated.provenance["alignment_guard"]["min_credible_motion_voxels"] == 1.5
    assert calibrated.provenance["alignment_guard"]["blur_voxels"] == 1.0
    head = mr > 0
    error = np.linalg.norm(calibrated.displacement - constant_field(mr.shape, vector), axis=0)[head].mean()
    assert error < 1.0


def test_the_bundled_3d_checkpoint_carries_a_calibrated_floor_and_the_2d_one_does_not():
    assert credible_motion_floor(read_metadata("unifuse-3d-phantom")) < MIN_CREDIBLE_MOTION_VOXELS
    assert "calibrate_guard_floor.py" in read_metadata("unifuse-3d-phantom")[METADATA_KEY]["calibration"]
    assert credible_motion_floor(read_metadata("unifuse-2d-harvard")) == MIN_CREDIBLE_MOTION_VOXELS


def test_the_bundled_3d_checkpoint_carries_a_calibrated_blur_and_the_2d_one_does_not():
    assert similarity_blur(read_metadata("unifuse-3d-phantom")) > 0
    assert "probe_guard_blur.py" in read_metadata("unifuse-3d-phantom")[METADATA_KEY]["similarity_blur_calibration"]
    assert similarity_blur(read_metadata("unifuse-2d-harvard")) == 0


def _no_matching(monkeypatch) -> None:
    """The structural matching finds nothing, so only SimpleITK can align the pair."""
    monkeypatch.setattr(UniFuse, "initial_alignment",
                        lambda self, moving, reference, spacing=None, check_cancelled=None: moving.new_zeros(
                            moving.shape[0], moving.dim() - 2, *moving.shape[2:]))


def test_in_3d_simpleitk_competes_with_the_matching_and_the_network_refines_the_winner(untrained_3d, monkeypatch):
    _no_matching(monkeypatch)
    shift = (4.0, 6.0, 8.0)  # 10.8 voxels
    mr, pet = multimodal_pair((48, 48, 48))
    moving = ImageVolume(shifted(pet, shift), Geometry.identity(3))

    result = FusionEngine(untrained_3d, device="cpu").run_fusion(ImageVolume(mr, Geometry.identity(3)), moving,
                                                                   quality=False)

    initial = result.provenance["initial_alignment"]
    assert initial["kept"] == SIMPLEITK
    assert CLASSICAL_STAGE in result.provenance["timings_s"]
    assert result.alignment_guard.kept in (SIMPLEITK, NETWORK)
    head = mr > 0
    error = np.linalg.norm(result.displacement - constant_field(mr.shape, shift), axis=0)[head].mean()
    assert error < 1.5  # of a 10.8-voxel shift that the matching left untouched


def test_the_3d_engine_counts_motion_in_the_reference_grids_finest_voxels(untrained_3d, monkeypatch):
    """The engine passes the reference's spacing to both guard decisions: a 1.5-slice shift of 5 mm
    slices, which the matching finds (SimpleITK finds nothing), is kept under a floor of 2."""
    vector = (1.5, 0.0, 0.0)
    monkeypatch.setattr(UniFuse, "initial_alignment",
                        lambda self, moving, reference, spacing=None, check_cancelled=None: torch.from_numpy(
                            constant_field(tuple(moving.shape[2:]), vector))[None])
    monkeypatch.setattr(inference, "register_sitk", 
                        lambda reference, moving, geometry, stop: np.zeros((3, *reference.shape), np.float32))
    mr, pet = multimodal_pair((32, 64, 64), seed=1)
    geometry = Geometry(np.array(THICK_SLICES), np.zeros(3), np.eye(3))
    method = method_for_network(untrained_3d)
    method.checkpoint_metadata = {METADATA_KEY: {"min_credible_motion_voxels": 2, "weigh_network_field": False}}

    result = FusionEngine(method, device="cpu").run_fusion(
        ImageVolume(mr, geometry), ImageVolume(shifted(pet, vector), geometry), quality=False)

    assert result.provenance["initial_alignment"]["motion_unit"].startswith("voxels of the finest axis (1 mm)")
    assert result.alignment_guard.kept == MATCHING
    assert result.provenance["alignment_guard"]["mean_displacement_voxels"][MATCHING] == pytest.approx(7.5, abs=1e-4)


def test_the_same_3d_pair_gives_the_same_result_on_every_run(untrained_3d):
    """SimpleITK competes in 3-D, and the guard picks between fields by small margins: a field that
    moved from run to run (SimpleITK's wall-clock seed, its threads' summing order) changed which
    one was kept and what a clinician saw on re-opening the same pair."""
    mr, pet = multimodal_pair((40, 40, 40), seed=2)
    reference = ImageVolume(mr, Geometry.identity(3))
    moving = ImageVolume(shifted(pet, (1.5, -2.0, 3.0)), Geometry.identity(3))
    engine = FusionEngine(untrained_3d, device="cpu")
    first, second = (engine.run_fusion(reference, moving, quality=False) for _ in range(2))

    assert first.provenance["initial_alignment"] == second.provenance["initial_alignment"]
    assert first.alignment_guard.kept == second.alignment_guard.kept
    np.testing.assert_array_equal(first.displacement, second.displacement)
    np.testing.assert_array_equal(first.fused.array, second.fused.array)


def test_simpleitk_registers_on_its_own_thread_while_the_classify_stage_runs(untrained_3d, monkeypatch):
    """SimpleITK runs on one ITK thread (for repeatability), so the engine starts it as soon as
    the pair is on one grid and reads the degradation meanwhile."""
    import threading

    classify_started = threading.Event()
    seen: dict[str, object] = {}
    read_class = FusionEngine._classify_on_grid

    def classify_on_grid(self, *args, **kwargs):
        classify_started.set()
        return read_class(self, *args, **kwargs)

    def register(reference, moving, geometry, stop):
        seen["overlapped"] = classify_started.wait(timeout=30)  # never set if the stages ran in turn
        seen["thread"] = threading.current_thread().name
        return np.zeros((3, *reference.shape), dtype=np.float32)

    monkeypatch.setattr(FusionEngine, "_classify_on_grid", classify_on_grid)
    monkeypatch.setattr(inference, "register_sitk", register)
    mr, pet = multimodal_pair((32, 32, 32))
    result = FusionEngine(untrained_3d, device="cpu").run_fusion(
        ImageVolume(mr, Geometry.identity(3)), ImageVolume(pet, Geometry.identity(3)), quality=False)

    assert seen == {"overlapped": True, "thread": "unifuse-simpleitk"}
    assert "initial_alignment" in result.provenance  # the zero field was weighed against the matching's
    assert CLASSICAL_STAGE in result.provenance["timings_s"]


def test_a_failed_simpleitk_registration_leaves_the_matching_with_a_warning(untrained_3d, monkeypatch):
    """SimpleITK handed a constant volume (the engine does not start it on a constant input):
    its optimiser has nothing to follow and ITK throws."""
    mr, pet = multimodal_pair((32, 32, 32))
    register = inference.register_sitk
    monkeypatch.setattr(inference, "register_sitk", lambda reference, moving, geometry, stop: register(
        reference, np.zeros_like(moving), geometry, stop=stop))

    result = FusionEngine(untrained_3d, device="cpu").run_fusion(
        ImageVolume(mr, Geometry.identity(3)), ImageVolume(pet, Geometry.identity(3)), quality=False)

    assert "initial_alignment" not in result.provenance
    failures = [warning for warning in result.warnings if "SimpleITK registration failed" in warning]
    assert len(failures) == 1 and "ITK ERROR" not in failures[0] and ".hxx" not in failures[0]
    assert result.alignment_guard.kept in (IDENTITY, MATCHING, NETWORK)


def test_2d_images_are_not_registered_by_simpleitk(untrained, monkeypatch):
    monkeypatch.setattr(inference, "register_sitk", lambda *a, **k: pytest.fail("SimpleITK ran on a 2-D pair"))
    mr, pet = multimodal_pair((64, 64))

    result = FusionEngine(untrained, device="cpu").run_fusion(
        ImageVolume(mr, Geometry.identity(2)), ImageVolume(pet, Geometry.identity(2)), quality=False)

    assert "initial_alignment" not in result.provenance


def test_mmif_amin_leaves_a_co_registered_pair_alone_and_corrects_a_ten_voxel_shift():
    """MMIF-AMIN's default alignment (the matching) runs under the guard, as UniFuse's does:
    unguarded, it moved co-registered Harvard pairs by 2.5-6.6 px on average."""
    mr, pet = multimodal_pair((96, 96))
    engine = FusionEngine(load_method("mmif-amin"), device="cpu")  # the bundled weights
    reference = ImageVolume(mr, Geometry.identity(2))

    aligned = engine.run_fusion(reference, ImageVolume(pet, Geometry.identity(2)), quality=False)
    assert aligned.alignment_guard.kept == IDENTITY and not aligned.displacement.any()
    assert aligned.provenance["alignment_guard"]["kept"] == IDENTITY

    moved = engine.run_fusion(reference, ImageVolume(shifted(pet, SHIFT), Geometry.identity(2)), quality=False)
    assert moved.alignment_guard.kept == MATCHING
    error = np.linalg.norm(moved.displacement - constant_field(mr.shape, SHIFT), axis=0)[mr > 0].mean()
    assert error < 1.5


def _recording_passes(method) -> list[bool]:
    """The ``fixed_field`` flag of every tile prediction ``method`` makes from now on."""
    passes: list[bool] = []
    predict = method.predict_tile

    def recording(*args, fixed_field, **kwargs):
        passes.append(fixed_field)
        return predict(*args, fixed_field=fixed_field, **kwargs)

    method.predict_tile = recording
    return passes


def test_without_the_network_field_the_guard_decides_first_and_the_network_runs_once(untrained):
    """A checkpoint whose FA never beat the matching says so; the engine then runs the network once,
    on the field the guard kept, and gives what the two-pass run gives when its guard kept that field."""
    mr, pet = multimodal_pair((96, 96))
    reference, moving = ImageVolume(mr, Geometry.identity(2)), ImageVolume(shifted(pet, SHIFT), Geometry.identity(2))
    runs = {}
    for weighed in (True, False):
        method = method_for_network(untrained)
        method.checkpoint_metadata = {METADATA_KEY: {"weigh_network_field": weighed}}
        passes = _recording_passes(method)
        runs[weighed] = FusionEngine(method, device="cpu").run_fusion(reference, moving, quality=False), passes

    (two_pass, two_passes), (one_pass, one_passes) = runs[True], runs[False]
    assert two_pass.alignment_guard.kept == MATCHING and two_passes == [False, True]
    assert one_pass.alignment_guard.kept == MATCHING and one_passes == [True]
    assert NETWORK not in one_pass.alignment_guard.scores
    assert two_pass.provenance["network_field_weighed"] and not one_pass.provenance["network_field_weighed"]
    assert "fuse (kept field)" not in one_pass.provenance["timings_s"]
    np.testing.assert_array_equal(one_pass.displacement, two_pass.displacement)
    np.testing.assert_array_equal(one_pass.fused.array, two_pass.fused.array)
    np.testing.assert_array_equal(one_pass.aligned.array, two_pass.aligned.array)


def test_the_caller_can_weigh_the_network_field_against_the_checkpoint(untrained):
    mr, pet = multimodal_pair((96, 96))
    method = method_for_network(untrained)
    method.checkpoint_metadata = {METADATA_KEY: {"weigh_network_field": False}}
    passes = _recording_passes(method)

    result = FusionEngine(method, device="cpu", weigh_network_field=True).run_fusion(
        ImageVolume(mr, Geometry.identity(2)), ImageVolume(pet, Geometry.identity(2)), quality=False)

    assert NETWORK in result.alignment_guard.scores and passes[0] is False
    assert result.provenance["network_field_weighed"]


def test_the_bundled_unifuse_checkpoints_say_their_network_field_never_won():
    """A checkpoint weighs FA's field unless its sidecar says, with the command behind it, that it
    never beat the initial alignment; a retrained checkpoint must show that again."""
    assert weighs_network_field({}) and weighs_network_field({METADATA_KEY: {"min_credible_motion_voxels": 2}})
    for name in ("unifuse-2d-harvard", "unifuse-3d-phantom"):
        metadata = read_metadata(name)
        assert not weighs_network_field(metadata)
        assert "bench/" in metadata[METADATA_KEY]["network_field_evidence"]


def test_the_guard_weighs_the_dense_refinement_of_the_initial_field_where_the_checkpoint_says_so(
        untrained, monkeypatch):
    """The refinement starts from the matching's field and competes after the initial one: with no
    matching, a refinement that finds the 10-voxel shift is kept, and the outputs follow it; a
    checkpoint that does not ask for it (the default) never runs it."""
    _no_matching(monkeypatch)
    mr, pet = multimodal_pair((96, 96))
    reference, moving = ImageVolume(mr, Geometry.identity(2)), ImageVolume(shifted(pet, SHIFT), Geometry.identity(2))
    starts = []

    def finds_the_shift(reference_image, moving_image, start, check_cancelled):
        starts.append(start.copy())
        return constant_field(mr.shape, SHIFT)

    monkeypatch.setattr(inference, "refine_dense", finds_the_shift)
    results = {}
    for weighed in (False, True):
        method = method_for_network(untrained)
        method.checkpoint_metadata = {METADATA_KEY: {"weigh_network_field": False,
                                                     **({"weigh_dense_refinement": True} if weighed else {})}}
        results[weighed] = FusionEngine(method, device="cpu").run_fusion(reference, moving, quality=False)

    default, refined = results[False], results[True]
    assert len(starts) == 1 and not starts[0].any()  # run once, from the (zero) matching field
    assert default.alignment_guard.kept == IDENTITY and DENSE not in default.alignment_guard.scores
    assert not default.provenance["dense_refinement_weighed"] and DENSE_STAGE not in default.provenance["timings_s"]
    assert refined.alignment_guard.kept == DENSE and refined.provenance["dense_refinement_weighed"]
    assert [c["challenger"] for c in refined.provenance["alignment_guard"]["challenges"]] == [MATCHING, DENSE]
    assert DENSE_STAGE in refined.provenance["timings_s"]
    np.testing.assert_allclose(refined.displacement, constant_field(mr.shape, SHIFT), atol=1e-5)
    expected = warp_array(moving.array, refined.displacement, mode="grid-constant")
    np.testing.assert_allclose(refined.aligned.array, expected, atol=1e-4)


def test_a_dense_refinement_that_gains_nothing_leaves_the_initial_field(untrained):
    """The real refinement on a pair the matching already aligns: whatever it adds, the guard keeps
    the matching's field unless the refinement reliably beats it."""
    mr, pet = multimodal_pair((96, 96))
    method = method_for_network(untrained)
    method.checkpoint_metadata = {METADATA_KEY: {"weigh_network_field": False, "weigh_dense_refinement": True}}
    result = FusionEngine(method, device="cpu").run_fusion(
        ImageVolume(mr, Geometry.identity(2)), ImageVolume(shifted(pet, SHIFT), Geometry.identity(2)), quality=False)

    challenge = result.alignment_guard.challenges[-1]
    assert challenge.challenger == DENSE
    assert challenge.accepted == (challenge.gain > GAIN_NOISE_FACTOR * challenge.noise)
    head = mr > 0
    error = np.linalg.norm(result.displacement - constant_field(mr.shape, SHIFT), axis=0)[head].mean()
    assert error < 1.0


def test_the_bundled_checkpoints_say_whether_the_dense_refinement_pays_and_why():
    """Off unless a sidecar asks for it: the 3-D checkpoint does (it lowered CT -> PET's residuals on
    its training seeds), the 2-D one says it does not (it made a mild atlas pair worse than doing
    nothing); each names the command that showed it."""
    assert not weighs_dense_refinement({})
    for name, weighed in (("unifuse-3d-phantom", True), ("unifuse-2d-harvard", False)):
        metadata = read_metadata(name)
        assert weighs_dense_refinement(metadata) is weighed
        assert "dense-refinement" in metadata[METADATA_KEY]["dense_refinement_evidence"]


def test_a_refusal_gives_each_estimate_its_own_reason_when_the_floor_and_the_noise_both_refused():
    """The matching's 5-voxel correction gains far more than k× the noise but is under the floor; a
    wrong 9-voxel field loses. Saying no estimate gained more than k× the noise would be false for the
    matching: the message says which was refused by the floor and which by the noise."""
    vector = (0.0, MIN_CREDIBLE_MOTION_VOXELS - 3.0)
    mr, pet = multimodal_pair((96, 96), seed=1)
    decision = choose_displacement(shifted(pet, vector), mr, {
        MATCHING: constant_field((96, 96), vector),
        NETWORK: constant_field((96, 96), (MIN_CREDIBLE_MOTION_VOXELS + 1.0, 0.0)),
    })
    matching, network = decision.challenges
    assert decision.kept == IDENTITY
    assert matching.gain > GAIN_NOISE_FACTOR * matching.noise and network.gain < 0.0
    assert decision.message == (
        f"kept identity: no reliable improvement ({MATCHING} moves the tissue by less than "
        f"{MIN_CREDIBLE_MOTION_VOXELS:g} voxels, within what this similarity can confirm across modalities; "
        f"{NETWORK} gained no more than {GAIN_NOISE_FACTOR:g}× the similarity's noise)")


def test_a_refused_large_move_is_quoted_the_one_noise_unit_it_missed_not_k():
    """A move of more than LARGE_MOTION_VOXELS needs one noise unit; the message quoted k for it."""
    from napari_unifuse.engine.alignment_guard import LARGE_MOTION_FACTOR, Challenge, GuardDecision

    large, small = LARGE_MOTION_VOXELS + 3.0, MIN_CREDIBLE_MOTION_VOXELS + 1.0
    alone = GuardDecision(IDENTITY, {}, {IDENTITY: 0.0, MATCHING: large},
                          (Challenge(MATCHING, IDENTITY, 0.005, 0.01, LARGE_MOTION_FACTOR, False),),
                          GAIN_NOISE_FACTOR, 1000, 50)
    assert alone.message == ("kept identity: no reliable improvement (no estimate gained more than "
                             f"{LARGE_MOTION_FACTOR:g}× the similarity's noise)")
    both = GuardDecision(IDENTITY, {}, {IDENTITY: 0.0, MATCHING: large, NETWORK: small},
                         (Challenge(MATCHING, IDENTITY, 0.005, 0.01, LARGE_MOTION_FACTOR, False),
                          Challenge(NETWORK, IDENTITY, 0.02, 0.01, GAIN_NOISE_FACTOR, False)),
                         GAIN_NOISE_FACTOR, 1000, 50)
    assert both.message == ("kept identity: no reliable improvement (no estimate gained more than the "
                            f"similarity's noise times its bar ({MATCHING} {LARGE_MOTION_FACTOR:g}×, "
                            f"{NETWORK} {GAIN_NOISE_FACTOR:g}×))")


def test_every_challenge_records_the_bar_its_gain_was_held_to():
    vector = (0.0, MIN_CREDIBLE_MOTION_VOXELS + 1.0)
    mr, pet = multimodal_pair((96, 96), seed=1)
    decision = choose_displacement(shifted(pet, vector), mr, {MATCHING: constant_field((96, 96), vector)})
    assert [challenge.required for challenge in decision.challenges] == [GAIN_NOISE_FACTOR]
    assert decision.to_dict()["challenges"][0]["required"] == GAIN_NOISE_FACTOR
