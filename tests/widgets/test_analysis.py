"""The workbench's numbers (``_qt.analysis``, no Qt): what a chosen ground truth changes and what it must not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import napari_unifuse._qt.analysis as analysis_module
from napari_unifuse._qt.analysis import (
    RunRequest,
    build_engine,
    engine_key,
    run_and_analyse,
    slice_metrics,
    volume_metrics,
)
from napari_unifuse.engine.progress import CancelToken, ignore_progress
from napari_unifuse.errors import CheckpointError, InputError
from napari_unifuse.io import ImageVolume, IntensityMapping
from napari_unifuse.metrics import registration_metrics
from napari_unifuse.model.bsafusion import BSAFusion, BSAFusionConfig
from napari_unifuse.model.checkpoint import save_checkpoint

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


# The engine's CT window: a CT in HU reaches the model as (HU + 1000) / 3000, clipped to [0, 1].
CT_WINDOW = IntensityMapping("window", "ct", -1000.0, 2000.0)


def ct_run_with_a_label():
    """A CT run (aligned image in HU) whose ground truth has -3024 scanner padding and metal, as
    clinical CTs do: the label's 0.5-99.5 percentile display window is far from the CT window."""
    reference, moving, label = ellipsoid_pair(SHAPE)
    moving_hu, label_hu = -1000.0 + 1800.0 * np.clip(moving, 0.0, 1.0), -1000.0 + 1800.0 * label
    label_hu[:, :, :6] = -3024.0  # outside the scanner's field of view
    label_hu[SHAPE[0] // 2, 20:24, 20:24] = 3071.0  # metal
    result = result_with_defects(reference, np.clip(moving, 0.0, 1.0))
    result.aligned = ImageVolume(moving_hu.astype(np.float32), GEOMETRY_3D)
    result.provenance["intensity_mappings"]["moving"] = CT_WINDOW.to_dict()
    request = RunRequest(ImageVolume(reference, GEOMETRY_3D, source="T1"), ImageVolume(moving_hu, GEOMETRY_3D,
                         source="CT"), "untrained", label=ImageVolume(label_hu.astype(np.float32), GEOMETRY_3D,
                                                                      source="CT truth"))
    return request, result, (CT_WINDOW.apply(moving_hu), CT_WINDOW.apply(label_hu))


def test_the_label_metrics_are_those_of_unifuse_fuse_in_the_models_units_not_the_labels_display_window():
    """The Metrics tab scored the aligned image in the label's display window (MSE 0.0255, NCC 0.898,
    SSIM 0.653 on a padded CT) where `unifuse fuse --label` wrote MSE 0.0174, NCC 0.800, SSIM 0.702."""
    request, result, (aligned_units, label_units) = ct_run_with_a_label()
    outcome = run_and_analyse(request, KnownResultEngine(result), ignore_progress, CancelToken())
    expected = registration_metrics(aligned_units, label_units)
    volume = volume_metrics(outcome)
    assert {name: volume[f"{name.upper()} to label"] for name in expected} == pytest.approx(expected, rel=1e-5)
    middle = SHAPE[0] // 2
    expected_slice = registration_metrics(aligned_units[middle], label_units[middle])
    on_slice = slice_metrics(outcome, 0, middle)
    assert {name: on_slice[f"{name.upper()} to label"] for name in expected_slice} == pytest.approx(expected_slice,
                                                                                                  rel=1e-5)
    # The error map stays |aligned − label| in the moving image's own units (HU here).
    np.testing.assert_allclose(outcome.error_map, np.abs(result.aligned.array - request.label.array), atol=1e-3)


def test_a_ground_truth_that_misses_the_reference_is_refused_before_the_fusion():
    """It was scored against the zeros of resampling outside it, without a word."""
    request, result, _ = ct_run_with_a_label()
    far = replace(request.label, geometry=replace(GEOMETRY_3D, origin=GEOMETRY_3D.origin + 500.0))

    class NoFusionExpected:
        def run_fusion(self, *args, **kwargs):
            raise AssertionError("the pair was fused")

    with pytest.raises(InputError, match=r"^CT truth: the label does not overlap the reference \(T1\) in space"):
        run_and_analyse(replace(request, label=far), NoFusionExpected(), ignore_progress, CancelToken())


def test_a_ground_truth_covering_under_half_the_reference_is_a_note():
    request, result, _ = ct_run_with_a_label()
    # Shifted by three quarters of the x extent (48 voxels of 1 mm): a quarter of the grid covered.
    shifted = replace(request.label, geometry=replace(GEOMETRY_3D, origin=GEOMETRY_3D.origin + [0.0, 0.0, 36.0]))
    outcome = run_and_analyse(replace(request, label=shifted), KnownResultEngine(result), ignore_progress,
                              CancelToken())
    assert any(note.startswith("CT truth: the label covers only 25 % of the reference grid in space")
               for note in outcome.notes)


def test_a_checkpoint_file_retrained_in_place_is_cached_as_another_model(tmp_path):
    """The workbench cached engines by the checkpoint's path: after ``train --resume`` rewrote
    ``last.safetensors`` a run kept the old weights, and recorded them in the new model's folder."""
    checkpoint = tmp_path / "last.safetensors"
    checkpoint.write_bytes(b"weights of step 4")
    volume = ImageVolume(np.zeros((6, 8, 8), np.float32), GEOMETRY_3D)
    request = RunRequest(volume, volume, str(checkpoint))
    before = engine_key(request)
    assert engine_key(request) == before  # the same file: the loaded engine is reused

    checkpoint.write_bytes(b"weights of step 9, retrained")

    assert engine_key(request) != before
    bundled = replace(request, checkpoint="unifuse-3d-phantom")
    assert engine_key(bundled) == engine_key(bundled)


def test_a_checkpoint_of_another_method_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    """The run form's "from file…" took a BSAFusion checkpoint and ran BSAFusion, reported as UniFuse."""
    checkpoint = save_checkpoint(BSAFusion(BSAFusionConfig.small()), tmp_path / "bsa", {})
    built = []
    monkeypatch.setattr(analysis_module, "FusionEngine", lambda *args, **kwargs: built.append(args))
    with pytest.raises(CheckpointError, match=r"bsa\.safetensors holds bsafusion weights, not UniFuse ones; "
                                              r"compare other methods in the Methods tab$"):
        build_engine(str(checkpoint), 2, "cpu", None)
    assert built == []
