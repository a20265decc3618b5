"""The QC report names the slices the moving image barely reaches: no evidence of alignment there."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.quality import quality_maps
from napari_unifuse.engine.report import report_page
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.io import Geometry, ImageVolume

SLICES = 6
OUTSIDE_LINE = "outside the moving image's field of view: not evidence of alignment, no moving data there."


def partial_coverage_result(field_of_view: np.ndarray | None) -> FusionResult:
    """A constructed run on a SLICES × 24 × 24 grid whose moving image reaches ``field_of_view`` (None: all)."""
    shape = (SLICES, 24, 24) if field_of_view is None else field_of_view.shape
    yy, xx = np.indices(shape[-2:])
    head = np.broadcast_to(((yy - 12) ** 2 + (xx - 12) ** 2 < 81).astype(np.float32), shape)
    reference = 0.6 * head
    moving = 0.4 * head * (1 if field_of_view is None else field_of_view)
    fused = 0.5 * (reference + moving)
    geometry = Geometry(np.ones(len(shape)), np.zeros(len(shape)), np.eye(len(shape)))
    probabilities = np.tile([0.7, 0.1, 0.1, 0.1], (shape[0] if len(shape) == 3 else 1, 1))
    return FusionResult(
        fused=ImageVolume(fused.astype(np.float32), geometry), aligned=ImageVolume(moving.astype(np.float32), geometry),
        displacement=np.zeros((len(shape), *shape), np.float32), class_names=DEGRADATION_CLASSES,
        class_probs=dict(zip(DEGRADATION_CLASSES, probabilities[0].tolist())), slice_class_probs=probabilities,
        output_extension="nii.gz", provenance={"checkpoint": {"name": "constructed"}},
        quality=quality_maps(reference, moving, moving, fused, field_of_view=field_of_view))


def page(result: FusionResult, folder) -> str:
    return report_page(result, folder, reference=result.fused, moving=result.aligned, annotations=[])


def test_the_slices_mostly_outside_the_moving_image_are_named_under_the_verdict(tmp_path):
    inside = np.ones((SLICES, 24, 24), bool)
    inside[:2] = False  # slices 0-1 wholly outside
    inside[4, :16] = False  # slice 4 two thirds outside
    inside[5, :6] = False  # slice 5 a quarter outside: mostly covered, not named
    text = page(partial_coverage_result(inside), tmp_path)
    assert f"<p class=flag>3 of {SLICES} slices (0-1, 4) lie more than half {OUTSIDE_LINE}</p>" in text
    assert text.index(OUTSIDE_LINE) < text.index('<section id="inputs">')


def test_an_image_mostly_outside_the_moving_image_is_said_to_be(tmp_path):
    inside = np.zeros((24, 24), bool)
    inside[:, :8] = True
    assert f"More than half of the image lies {OUTSIDE_LINE}" in page(partial_coverage_result(inside), tmp_path)


@pytest.mark.parametrize("covered", [None, "most"], ids=["full", "most-of-every-slice"])
def test_a_moving_image_covering_most_of_every_slice_adds_no_line(tmp_path, covered):
    inside = None
    if covered == "most":
        inside = np.ones((SLICES, 24, 24), bool)
        inside[:, :10] = False
    assert OUTSIDE_LINE not in page(partial_coverage_result(inside), tmp_path)
