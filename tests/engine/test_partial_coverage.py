"""A moving image that covers only part of the reference grid: its missing part is no image, so the
alignment must not slide the covered part into it, and the run must say what the outputs hold there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unifuse.data.phantoms import make_brain_phantoms
from napari_unifuse.engine import uncertainty
from napari_unifuse.engine.alignment_guard import choose_displacement
from napari_unifuse.engine.inference import (
    FusionEngine,
    moved_beyond_field_of_view_warnings,
    moving_field_of_view,
)
from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.engine.quality import INVENTED, LOST, RESTORATION_CHANGE, UNCERTAINTY, QualityMaps
from napari_unifuse.engine.uncertainty import uncertainty_on_matching_level
from napari_unifuse.io import Geometry, ImageVolume

SIDE = 32
FIRST_COVERED_SLICE = SIDE // 2
SPACING = 4.0


def grid(origin_z: float = 0.0) -> Geometry:
    return Geometry(np.full(3, SPACING), np.array([origin_z, 0.0, 0.0]), np.eye(3))


def upper_half() -> np.ndarray:
    """The field of view of a moving image holding slices FIRST_COVERED_SLICE.. of a SIDE³ grid."""
    inside = np.zeros((SIDE,) * 3, bool)
    inside[FIRST_COVERED_SLICE:] = True
    return inside


@pytest.fixture(scope="module")
def half_coverage_run():
    """T1 reference; T2 moving image shifted 2 voxels in x, holding only the reference's upper half of
    slices on the same grid: the true displacement is 2 voxels in x and none through-plane."""
    phantoms = make_brain_phantoms((SIDE,) * 3, ("t1", "t2"))
    reference = ImageVolume(phantoms["t1"].array, grid())
    shifted = ndimage.shift(phantoms["t2"].array, (0, 0, 2), order=1)
    moving = ImageVolume(np.ascontiguousarray(shifted[FIRST_COVERED_SLICE:]), grid(SPACING * FIRST_COVERED_SLICE))
    result = FusionEngine("unifuse-3d-phantom").run_fusion(reference, moving, uncertainty_passes=0)
    return reference, result


def test_half_coverage_is_not_slid_through_plane(half_coverage_run):
    """The matching saw the reference's tissue outside the moving image against the moving image's zeros,
    and slid the covered half 2.3 voxels (9 mm) through-plane on average to fill it; SimpleITK's
    field, near the truth, could not beat it by the guard's margin."""
    reference, result = half_coverage_run
    covered_tissue = upper_half() & (reference.array > 0.05 * reference.array.max())
    through_plane = np.abs(result.displacement[0][covered_tissue])
    assert through_plane.mean() < 0.75, result.alignment_guard.message
    assert abs(result.displacement[2][covered_tissue].mean() - 2.0) < 0.75  # the true in-plane shift is found


def test_half_coverage_warnings_and_quality_say_what_is_true(half_coverage_run):
    _, result = half_coverage_run
    assert not any("is empty" in warning or "reference alone" in warning for warning in result.warnings)
    outside = result.quality.to_dict()["outside_moving"]
    assert outside["slices"] == list(range(FIRST_COVERED_SLICE))
    assert outside["per_slice"][:FIRST_COVERED_SLICE] == [1.0] * FIRST_COVERED_SLICE
    assert outside["per_slice"][FIRST_COVERED_SLICE:] == [0.0] * (SIDE - FIRST_COVERED_SLICE)


def test_a_field_that_moves_tissue_past_the_field_of_view_is_warned_of():
    inside = upper_half()
    slid = np.zeros((3, *inside.shape), np.float32)
    slid[0] = 6.0  # each voxel shows the moving image 6 slices further up: 6 slices below it get tissue
    (warning,) = moved_beyond_field_of_view_warnings(inside, slid, (SPACING,) * 3)
    assert f"up to {6 * SPACING:.0f} mm past where its header places its field of view" in warning
    assert f"slices {FIRST_COVERED_SLICE - 6}-{FIRST_COVERED_SLICE - 1}" in warning
    assert warning.endswith("expected when the patient moved between the scans; check the alignment there before "
                            "trusting those slices")
    # A share of the uncovered part, as the sentence says (it gave the whole grid's: half of this).
    assert f"onto {100 * 6 / FIRST_COVERED_SLICE:.0f} % of the part of the reference grid it does not cover" in warning
    slightly = slid.copy()
    slightly[0] = 2.0  # within a few voxels: the edge of any field
    assert moved_beyond_field_of_view_warnings(inside, slightly, (SPACING,) * 3) == []
    assert moved_beyond_field_of_view_warnings(None, slid, (SPACING,) * 3) == []


def test_the_field_of_view_is_none_where_the_moving_image_reaches_every_voxel():
    """Full coverage must run exactly as before: no mask anywhere."""
    reference = ImageVolume(np.zeros((SIDE,) * 3, np.float32), grid())
    larger = ImageVolume(np.zeros((SIDE + 4,) * 3, np.float32), grid(-2 * SPACING))
    assert moving_field_of_view(larger, reference) is None
    half = ImageVolume(np.zeros((SIDE - FIRST_COVERED_SLICE, SIDE, SIDE), np.float32),
                       grid(SPACING * FIRST_COVERED_SLICE))
    np.testing.assert_array_equal(moving_field_of_view(half, reference), upper_half())


def test_the_guard_scores_only_inside_the_field_of_view():
    """The truth (2 voxels in x) against the same plus a 4-slice slide, which moves tissue into the
    uncovered half: scored there too, the slide beat the identity first and the truth could not beat
    it by the guard's margin; inside the field of view the truth wins."""
    phantoms = make_brain_phantoms((SIDE,) * 3, ("t1", "t2"))
    inside = upper_half()
    moving = np.where(inside, ndimage.shift(phantoms["t2"].array, (0, 0, 2), order=1), 0.0).astype(np.float32)
    true = np.zeros((3, *inside.shape), np.float32)
    true[2] = 2.0
    slid = true.copy()
    slid[0] = 4.0
    estimates = {"slid": slid, "true": true}
    assert choose_displacement(moving, phantoms["t1"].array, estimates, min_credible_motion=0.0).kept == "slid"
    decision = choose_displacement(moving, phantoms["t1"].array, estimates, min_credible_motion=0.0,
                                   field_of_view=inside)
    assert decision.kept == "true", decision.message


def test_quality_maps_give_each_slice_its_part_outside_the_moving_image():
    maps = {name: np.zeros((SIDE, 4, 4), np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE)}
    thresholds = dict.fromkeys(maps, 0.5)
    inside = np.ones((SIDE, 4, 4), bool)
    inside[:3] = False
    inside[3, :2] = False  # half of slice 3
    quality = QualityMaps.from_maps(maps, thresholds, field_of_view=inside)
    assert quality.outside_moving.tolist()[:5] == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert quality.slices_outside_moving() == [0, 1, 2]
    assert quality.to_dict()["outside_moving"]["slices"] == [0, 1, 2]
    full = QualityMaps.from_maps(maps, thresholds)
    assert "outside_moving" not in full.to_dict() and full.slices_outside_moving() == []


def test_slices_the_moving_image_does_not_reach_do_not_set_the_typical_score():
    """Slices without moving data lose no structure (score 0); counted in the typical slice they
    pulled its score down, and aligned slices inside the field of view were flagged as lost (16
    of a 46 % coverage pair's, none on the full-coverage control)."""
    slices = 20
    outside = np.r_[np.ones(12), np.zeros(8)]  # the first 12 slices hold no moving data
    lost_scores = np.r_[np.zeros(12), np.linspace(0.05, 0.07, 8)]  # inside: a steady share, as on any slice
    empty = np.zeros((slices, 4, 4), np.float32)
    maps = QualityMaps(invented=empty, lost=empty, restoration_change=empty, uncertainty_mm=None,
                       thresholds={"lost": 0.1}, slice_scores={"lost": lost_scores.astype(np.float32)},
                       suspicion=lost_scores.astype(np.float32), outside_moving=outside)
    assert maps.suspicious_slices() == []
    whole = QualityMaps(invented=empty, lost=empty, restoration_change=empty, uncertainty_mm=None,
                        thresholds={"lost": 0.1}, slice_scores={"lost": lost_scores.astype(np.float32)},
                        suspicion=lost_scores.astype(np.float32))
    assert whole.suspicious_slices() == list(range(12, 20))  # the same scores, every slice counted typical


# ---- the alignment uncertainty: its passes see the reference as the alignment estimates saw it ----
UNCERTAINTY_PASSES = 2


@pytest.fixture(scope="module")
def phantom_engine():
    return FusionEngine("unifuse-3d-phantom")


@pytest.fixture(scope="module")
def shifted_pair():
    """The T1 reference and the T2 moving image shifted 2 voxels in x, whole, on the reference grid."""
    phantoms = make_brain_phantoms((SIDE,) * 3, ("t1", "t2"))
    return phantoms["t1"].array, ndimage.shift(phantoms["t2"].array, (0, 0, 2), order=1).astype(np.float32)


def quality_uncertainty(engine, reference, moving, field_of_view):
    """The uncertainty map ``FusionEngine._quality`` computes for a zero kept field."""
    prediction = {"displacement": np.zeros((3, *reference.shape), np.float32), "restored": moving,
                  "fused": reference}
    return engine._quality(ImageVolume(reference, grid()), moving, prediction, UNCERTAINTY_PASSES, CancelToken(),
                           field_of_view).uncertainty_mm


def direct_uncertainty(engine, reference, moving):
    """The same passes run directly against ``reference`` as given."""
    spread, _ = uncertainty_on_matching_level(
        torch.from_numpy(np.ascontiguousarray(reference, np.float32))[None, None], torch.from_numpy(moving)[None, None],
        torch.zeros(1, 3, *reference.shape), (SPACING,) * 3, engine.config.matching_step, passes=UNCERTAINTY_PASSES)
    return spread


def test_full_coverage_uncertainty_is_measured_against_the_whole_reference(phantom_engine, shifted_pair):
    reference, moving = shifted_pair
    np.testing.assert_array_equal(quality_uncertainty(phantom_engine, reference, moving, None),
                                  direct_uncertainty(phantom_engine, reference, moving))


def test_partial_coverage_uncertainty_is_measured_against_the_blanked_reference(phantom_engine, shifted_pair):
    """Against the whole reference, the copies' zeros met its tissue beyond the slab: the spread of
    another problem than the one whose field was kept."""
    reference, moving = shifted_pair
    inside = upper_half()
    covered = np.where(inside, moving, 0.0).astype(np.float32)
    measured = quality_uncertainty(phantom_engine, reference, covered, inside)
    np.testing.assert_array_equal(measured, direct_uncertainty(phantom_engine, np.where(inside, reference, 0.0),
                                                               covered))
    assert not np.array_equal(measured, direct_uncertainty(phantom_engine, reference, covered))


def test_a_half_coverage_run_gives_the_uncertainty_passes_the_blanked_reference(monkeypatch, phantom_engine,
                                                                              shifted_pair):
    references = []
    matching = uncertainty.local_matching

    def recording(moved, reference, *args):
        references.append(reference.numpy().copy())
        return matching(moved, reference, *args)

    monkeypatch.setattr(uncertainty, "local_matching", recording)
    reference, moving = shifted_pair
    result = phantom_engine.run_fusion(ImageVolume(reference, grid()),
                                       ImageVolume(np.ascontiguousarray(moving[FIRST_COVERED_SLICE:]),
                                                   grid(SPACING * FIRST_COVERED_SLICE)),
                                       uncertainty_passes=UNCERTAINTY_PASSES)
    assert result.quality.uncertainty_mm is not None
    assert len(references) == UNCERTAINTY_PASSES + 1  # 32³ at 4 mm is its own matching level: the grid's slices
    for seen in references:
        assert not seen[0, 0, :FIRST_COVERED_SLICE].any()  # no tissue where the moving image has none
        assert seen[0, 0, FIRST_COVERED_SLICE:].max() > 0.5


def test_the_uncertainty_flags_no_slice_the_moving_image_does_not_reach():
    """Where the moving image has no data the passes are blind and the map holds the probe's shift:
    those slices were flagged for misalignment though outside_moving already names them."""
    empty = np.zeros((20, 4, 4), np.float32)
    uncertainty_scores = np.r_[np.full(6, 0.9), np.linspace(0.0, 0.002, 14)].astype(np.float32)

    def maps(outside_moving):
        return QualityMaps(invented=empty, lost=empty, restoration_change=empty, uncertainty_mm=empty,
                           thresholds={UNCERTAINTY: 1.0}, slice_scores={UNCERTAINTY: uncertainty_scores},
                           suspicion=uncertainty_scores, outside_moving=outside_moving)

    assert maps(np.r_[np.ones(6), np.zeros(14)]).suspicious_slices() == []
    assert maps(None).suspicious_slices() == list(range(6))  # the same scores where it reaches every slice
