"""The workbench's numbers (``_qt.analysis``, no Qt): what a chosen ground truth changes and what it must not."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse._qt.analysis import RunRequest, run_and_analyse, slice_metrics, volume_metrics
from napari_unifuse.engine.progress import CancelToken, ignore_progress
from napari_unifuse.io import ImageVolume, IntensityMapping

from .conftest import GEOMETRY_3D, ellipsoid_pair
from .test_review import SHAPE, KnownResultEngine, result_with_defects

LABEL_METRICS = ("MSE to label", "NCC to label", "SSIM to label")


def outcomes_without_and_with_a_label():
    reference, moving, label = ellipsoid_pair(SHAPE)
    moving = np.clip(moving, 0.0, 1.0)  # the fusion metrics take grey values in [0, 1], as the model's are
    engine = KnownResultEngine(result_with_defects(reference, moving))
    # The ground truth in other units than the aligned image (as a CT label is in HU): its display
    # window is not the aligned image's.
    label_volume = ImageVolume(1000.0 * label, GEOMETRY_3D)
    return [run_and_analyse(RunRequest(ImageVolume(reference, GEOMETRY_3D), ImageVolume(moving, GEOMETRY_3D),
                                       "untrained", label=chosen), engine, ignore_progress, CancelToken())
            for chosen in (None, label_volume)]


def test_choosing_a_ground_truth_leaves_the_fusion_metrics_alone():
    unlabelled, labelled = outcomes_without_and_with_a_label()
    for metrics_of in (volume_metrics, lambda outcome: slice_metrics(outcome, 0, SHAPE[0] // 2)):
        without_label, with_label = metrics_of(unlabelled), metrics_of(labelled)
        fusion_scores = {name: value for name, value in with_label.items()
                         if name not in LABEL_METRICS and not name.startswith("mean ")}  # the error map's kind differs
        assert fusion_scores == pytest.approx({name: without_label[name] for name in fusion_scores}, nan_ok=True)
        assert set(LABEL_METRICS) <= set(with_label)
        assert np.isfinite(without_label["Q_cc"])  # scores, not the NaN of a metric that does not apply
    np.testing.assert_array_equal(labelled.aligned_grey, unlabelled.aligned_grey)  # the checkerboard's too


def test_the_fusion_metrics_compare_the_fused_image_with_its_sources_in_the_units_it_fused_them_in():
    """The sources were stretched to their display windows while the fused image stayed in the
    model's units: a fused copy of the reference, as the model saw it, scored a gain over it."""
    reference, moving, _ = ellipsoid_pair(SHAPE)
    moving = np.clip(moving, 0.0, 1.0)
    scanner_reference = 40.0 + 150.0 * reference  # an 8-bit picture's range: its window is not the model's scale
    mapping = IntensityMapping("scale8bit", "png", 40.0, 295.0)
    result = result_with_defects(reference, moving)
    result.provenance["intensity_mappings"]["reference"] = mapping.to_dict()
    result.fused = ImageVolume(mapping.apply(scanner_reference), GEOMETRY_3D)  # the reference, as fused
    outcome = run_and_analyse(RunRequest(ImageVolume(scanner_reference, GEOMETRY_3D), ImageVolume(moving, GEOMETRY_3D),
                                         "untrained"), KnownResultEngine(result), ignore_progress, CancelToken())
    # A copy of one source gains nothing over the other (metrics.fusion_gain.ssim_gains).
    assert volume_metrics(outcome)["gain min"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(outcome.reference_units, result.fused.array, atol=1e-6)
