"""A map that flags most of every slice of a volume: no slice stands out from a volume flagged
throughout, so the volume itself is named (quality.json, the report's verdict) rather than the
headline saying nothing is flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.outputs import write_fusion_outputs
from napari_unifuse.engine.quality import (
    INVENTED,
    LOST,
    MIN_SLICES_FOR_BASELINE,
    RESTORATION_CHANGE,
    UNCERTAINTY,
    WHOLE_VOLUME_LEVEL,
    QualityMaps,
)
from napari_unifuse.engine.report import report_page, write_index
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.io import Geometry, ImageVolume

SLICES = 16
WHOLE_VOLUME_LINE = ("The alignment uncertainty flags 99.0 % of a typical slice of this volume: no slice stands out "
                     "because every slice is affected; do not trust this run's alignment.")


def maps_flagging(share_per_slice: np.ndarray, side: int = 10) -> QualityMaps:
    """Quality maps of len(share_per_slice) slices of side × side voxels whose uncertainty flags the
    first share × side² voxels of each slice (threshold 1 mm) and whose fidelity maps flag nothing."""
    shape = (len(share_per_slice), side, side) if len(share_per_slice) > 1 else (side, side)
    uncertainty = np.zeros((len(share_per_slice), side * side), np.float32)
    for index, share in enumerate(share_per_slice):
        uncertainty[index, : round(share * side * side)] = 2.0
    maps = {name: np.zeros(shape, np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE)}
    maps[UNCERTAINTY] = uncertainty.reshape(shape)
    return QualityMaps.from_maps(maps, {INVENTED: 0.1, LOST: 0.1, RESTORATION_CHANGE: 0.1, UNCERTAINTY: 1.0})


def test_a_volume_flagged_throughout_is_named_though_no_slice_stands_out():
    quality = maps_flagging(np.full(SLICES, 0.99))
    assert quality.suspicious_slices() == []  # every slice alike: none stands out, as the per-slice rule says
    assert quality.whole_volume_flags() == {UNCERTAINTY: pytest.approx(0.99)}
    summary = json.loads(json.dumps(quality.to_dict()))
    assert summary["whole_volume"]["typical_slice_score"] == {UNCERTAINTY: pytest.approx(0.99)}
    assert summary["whole_volume"]["level"] == WHOLE_VOLUME_LEVEL


@pytest.mark.parametrize("share", [0.14, 0.5], ids=["bundled-sample-like", "at-the-level"])
def test_an_ordinary_volume_gets_no_whole_volume_verdict(share):
    quality = maps_flagging(np.full(SLICES, share))
    assert quality.whole_volume_flags() == {}
    assert "whole_volume" not in quality.to_dict()


def test_the_typical_slice_is_one_the_moving_image_reaches():
    """Slices beyond the moving image hold the probe's shift, not a measurement: they do not make
    a volume untrustworthy when the slices it reaches are fine."""
    shares = np.r_[np.full(12, 1.0), np.full(12, 0.05)]
    quality = maps_flagging(shares)
    quality.outside_moving = np.r_[np.ones(12), np.zeros(12)]
    assert quality.whole_volume_flags() == {}
    quality.outside_moving = np.r_[np.zeros(12), np.ones(12)]
    assert quality.whole_volume_flags() == {UNCERTAINTY: pytest.approx(1.0)}


@pytest.mark.parametrize("slices", [1, MIN_SLICES_FOR_BASELINE - 1], ids=["one-image", "short-volume"])
def test_without_a_typical_slice_each_slice_is_flagged_on_its_own(slices):
    """One image, or too few slices for a typical one: the flag level alone decides, so a map that
    flags most of it already flags every slice."""
    quality = maps_flagging(np.full(slices, 0.99))
    assert quality.suspicious_slices() == list(range(slices))
    assert quality.whole_volume_flags() == {}
    assert "whole_volume" not in quality.to_dict()


def result_of(quality: QualityMaps) -> FusionResult:
    """A constructed run with these quality maps, whose inputs and outputs are one grey volume."""
    shape = quality.invented.shape
    volume = ImageVolume(np.full(shape, 0.5, np.float32), Geometry(np.ones(3), np.zeros(3), np.eye(3)))
    probabilities = np.tile([0.7, 0.1, 0.1, 0.1], (shape[0], 1))
    return FusionResult(
        fused=volume, aligned=volume, displacement=np.zeros((3, *shape), np.float32), class_names=DEGRADATION_CLASSES,
        class_probs=dict(zip(DEGRADATION_CLASSES, probabilities[0].tolist())), slice_class_probs=probabilities,
        output_extension="nii.gz", provenance={"checkpoint": {"name": "constructed"}}, quality=quality)


def page_of(quality: QualityMaps) -> str:
    result = result_of(quality)
    return report_page(result, ".", reference=result.fused, moving=result.aligned, annotations=[])


def test_the_report_verdict_says_the_volume_is_flagged_throughout():
    flagged_throughout = page_of(maps_flagging(np.full(SLICES, 0.99)))
    assert f"<p><span class=flag>{WHOLE_VOLUME_LINE}</span></p>" in flagged_throughout
    assert "No slice is flagged" not in flagged_throughout
    ordinary = page_of(maps_flagging(np.full(SLICES, 0.14)))
    assert "<p>No slice is flagged by the quality maps.</p>" in ordinary and "every slice is affected" not in ordinary


def test_the_index_names_the_problem_of_a_map_flagging_the_whole_volume(tmp_path):
    write_fusion_outputs(result_of(maps_flagging(np.full(SLICES, 0.99))), tmp_path / "runs" / "noise")
    write_fusion_outputs(result_of(maps_flagging(np.full(SLICES, 0.14))), tmp_path / "runs" / "ordinary")
    page = write_index(tmp_path / "runs").read_text(encoding="utf-8")
    rows = {row.split("<td>")[1].split("<")[0].strip(): row for row in page.split("<tr>")[2:]}
    assert "<td>misalignment (whole volume)</td>" in rows["noise"]
    assert "whole volume" not in rows["ordinary"]


def test_slices_flagged_on_their_own_are_listed_after_the_whole_volume():
    quality = maps_flagging(np.full(SLICES, 0.99))
    quality.invented[3, :5, :5] = 1.0  # a quarter of slice 3: it stands out from the others' nothing
    quality = QualityMaps.from_maps(quality.maps(), quality.thresholds)
    assert quality.suspicious_slices() == [3]
    assert (f"<span class=flag>{WHOLE_VOLUME_LINE}</span> <span class=flag>1 of {SLICES} slices flagged</span>: "
            "3 (hallucinated structure).") in page_of(quality)
