"""QualityMaps: per-slice scores, suspicious-slice navigation and the JSON summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_unifuse.engine.quality import INVENTED, LOST, RESTORATION_CHANGE, UNCERTAINTY, QualityMaps

THRESHOLDS = {INVENTED: 0.1, LOST: 0.1, RESTORATION_CHANGE: 0.1, UNCERTAINTY: 1.0}


def volume_maps(shape=(8, 20, 20)) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE, UNCERTAINTY)}


def test_slice_scores_are_flagged_fractions_and_suspicion_their_maximum():
    maps = volume_maps()
    maps[INVENTED][2, :5, :4] = 0.5  # 20 of 400 voxels
    maps[LOST][2, :2, :2] = 0.5  # 4 of 400
    maps[UNCERTAINTY][5, :10, :] = 2.0  # half the slice
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    assert quality.slice_scores[INVENTED][2] == pytest.approx(0.05)
    assert quality.slice_scores[LOST][2] == pytest.approx(0.01)
    assert quality.suspicion[2] == pytest.approx(0.05)
    assert quality.suspicion[5] == pytest.approx(0.5)
    assert quality.suspicion[0] == 0.0
    assert quality.suspicious_slices() == [2, 5]
    assert quality.dominant_problem(2) == "hallucinated structure"
    assert quality.dominant_problem(5) == "misalignment"
    assert quality.worst_slices(2) == [5, 2]


def test_a_value_at_the_threshold_is_not_flagged():
    maps = volume_maps()
    maps[RESTORATION_CHANGE][:] = THRESHOLDS[RESTORATION_CHANGE]
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    assert quality.suspicious_slices() == []
    assert quality.next_suspicious(3) is None


def test_next_and_previous_suspicious_slice_wrap_around():
    maps = volume_maps()
    for index in (1, 6):
        maps[LOST][index] = 1.0
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    assert quality.next_suspicious(0) == 1
    assert quality.next_suspicious(1) == 6
    assert quality.next_suspicious(6) == 1
    assert quality.next_suspicious(7, step=-1) == 6
    assert quality.next_suspicious(1, step=-1) == 6
    assert quality.dominant_problem(6) == "lost structure"


def test_a_2d_image_is_one_slice_and_uncertainty_is_optional():
    maps = {name: np.zeros((16, 16), np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE)}
    maps[RESTORATION_CHANGE][4:8, 4:8] = 0.3
    quality = QualityMaps.from_maps({**maps, UNCERTAINTY: None}, THRESHOLDS)
    assert quality.uncertainty_mm is None
    assert set(quality.slice_scores) == {INVENTED, LOST, RESTORATION_CHANGE}
    assert quality.suspicion.shape == (1,)
    assert quality.next_suspicious(0) == 0
    assert quality.dominant_problem(0) == "restoration change"


def test_summary_is_json_with_no_voxel_arrays():
    maps = volume_maps()
    maps[INVENTED][3, 0, 0:10] = 1.0
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    summary = json.loads(json.dumps(quality.to_dict()))
    assert summary["suspicious_slices"] == [3]
    assert summary["problems"] == {"3": "hallucinated structure"}
    assert summary["thresholds"] == THRESHOLDS
    assert len(summary["per_slice"][INVENTED]) == 8
    assert summary["maps"][UNCERTAINTY]["units"] == "mm"
    assert len(json.dumps(summary)) < 5000


def test_maps_of_different_shapes_are_refused():
    maps = volume_maps()
    maps[LOST] = np.zeros((8, 20, 21), np.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        QualityMaps.from_maps(maps, THRESHOLDS)
