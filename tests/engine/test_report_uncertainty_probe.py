"""The QC report says when the alignment uncertainty probed UniFuse's structural matching rather
than the method's own alignment (engine.inference's quality stage probes every method with it)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.quality import quality_maps
from napari_unifuse.engine.report import report_page
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.io import Geometry, ImageVolume

PROBE_NOTE = "Probed with UniFuse's structural matching, not this method's alignment"


def result_of(method: dict[str, str]) -> FusionResult:
    """A constructed 2-D run of ``method`` (its provenance record) with an alignment uncertainty map."""
    yy, xx = np.indices((24, 24))
    head = ((yy - 12) ** 2 + (xx - 12) ** 2 < 81).astype(np.float32)
    reference, moving = 0.6 * head, 0.4 * head
    fused = 0.5 * (reference + moving)
    geometry = Geometry(np.ones(2), np.zeros(2), np.eye(2))
    spread = np.where(head > 0, 0.2, 1.5).astype(np.float32)
    return FusionResult(
        fused=ImageVolume(fused, geometry), aligned=ImageVolume(moving, geometry),
        displacement=np.zeros((2, 24, 24), np.float32), class_names=DEGRADATION_CLASSES,
        class_probs=dict.fromkeys(DEGRADATION_CLASSES, 0.25), slice_class_probs=np.full((1, 4), 0.25),
        output_extension="nii.gz", provenance={"method": method},
        quality=quality_maps(reference, moving, moving, fused, uncertainty_mm=spread, uncertainty_threshold_mm=1.0))


def uncertainty_section(result: FusionResult, folder) -> str:
    page = report_page(result, folder, reference=result.fused, moving=result.aligned, annotations=[])
    start = page.index('<section id="uncertainty">')
    return page[start:page.index("</section>", start)]


@pytest.mark.parametrize(("method", "alignment"), [
    ({"name": "identity+max", "registration": "identity", "rule": "max"}, "identity"),
    ({"name": "mmif-amin:none", "alignment": "none", "registration": "identity"}, "identity"),
    ({"name": "sitk+wavelet", "registration": "sitk", "rule": "wavelet"}, "sitk"),
    ({"name": "dense+average", "registration": "dense", "rule": "average"}, "dense"),
    ({"name": "bsafusion"}, "bsafusion"),
], ids=lambda value: value["name"] if isinstance(value, dict) else value)
def test_a_method_aligning_otherwise_is_told_the_probe_was_the_structural_matching(tmp_path, method, alignment):
    section = uncertainty_section(result_of(method), tmp_path)
    assert f"{PROBE_NOTE} ({alignment})" in section
    assert section.index(PROBE_NOTE) < section.index("Median")


@pytest.mark.parametrize("method", [
    {"name": "unifuse"},
    {"name": "matching+wavelet", "registration": "matching", "rule": "wavelet"},
    {"name": "mmif-amin", "alignment": "matching", "registration": "matching"},
], ids=lambda value: value["name"])
def test_a_method_aligning_by_the_structural_matching_gets_no_probe_note(tmp_path, method):
    section = uncertainty_section(result_of(method), tmp_path)
    assert "Median" in section
    assert PROBE_NOTE not in section
