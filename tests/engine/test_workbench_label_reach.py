"""The workbench scores a label as `unifuse fuse --label` does: a CT label on a smaller grid reads as air
where it does not reach, in its label metrics and its |aligned - label| map alike."""

from __future__ import annotations

import numpy as np

from napari_unifuse._qt.analysis import RunRequest, run_and_analyse
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.io import Geometry, ImageVolume

GRID = Geometry(np.ones(2), np.zeros(2), np.eye(2))


def test_a_ct_label_on_a_smaller_grid_is_air_where_it_does_not_reach_in_the_workbench():
    """The rows beyond the label are air in the aligned CT too: padded with 0 HU (water) they showed a
    1000 HU error and 1/3 in the label's units."""
    yy, xx = np.indices((48, 44))
    radius = np.hypot(yy - 24, xx - 22)
    ct = np.select([radius < 12, radius < 16], [40.0, 1000.0], -1000.0).astype(np.float32)
    request = RunRequest(ImageVolume(ct, GRID, source="reference"), ImageVolume(ct, GRID, source="moving"),
                         "untrained", device="cpu", label=ImageVolume(np.ascontiguousarray(ct[:41]), GRID))
    engine = FusionEngine(load_method("identity+average"), device="cpu")
    outcome = run_and_analyse(request, engine, lambda *_: None, CancelToken())
    np.testing.assert_array_equal(outcome.label_units[41:], 0.0)
    np.testing.assert_allclose(outcome.error_map[41:], 0.0, atol=1e-3)  # HU, after the inverse mapping
    np.testing.assert_allclose(outcome.label_units[:41], outcome.aligned_units[:41], atol=1e-5)
