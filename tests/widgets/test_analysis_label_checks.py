"""The workbench's ground truth is checked as `unifuse fuse --label` checks its file (``_qt.analysis``, no Qt)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from napari_unifuse._qt.analysis import run_and_analyse, volume_metrics
from napari_unifuse.engine.progress import CancelToken, ignore_progress

from .test_analysis import LABEL_METRICS, ct_run_with_a_label
from .test_review import KnownResultEngine


def test_a_ground_truth_layer_with_nan_voxels_is_scored_as_its_file_would_be_and_noted():
    """A layer made in napari reaches the run without a reader: its NaN voxels gave NaN label metrics
    and a NaN error map, with no note."""
    request, result, _ = ct_run_with_a_label()
    with_nan = request.label.array.copy()
    with_nan[:, :, -4:] = np.nan
    as_read = with_nan.copy()
    as_read[:, :, -4:] = -1000.0  # the reader's air: NaN in an image in Hounsfield units
    outcomes = [run_and_analyse(replace(request, label=replace(request.label, array=array)), KnownResultEngine(result),
                                ignore_progress, CancelToken()) for array in (with_nan, as_read)]
    layer, file = (volume_metrics(outcome) for outcome in outcomes)
    assert all(np.isfinite(layer[name]) and layer[name] == file[name] for name in LABEL_METRICS)
    assert np.isfinite(outcomes[0].error_map).all()
    replaced = with_nan.shape[0] * with_nan.shape[1] * 4
    assert f"CT truth (the label): non-finite values: {replaced} NaN voxels set to -1000 HU (air)" in outcomes[0].notes
