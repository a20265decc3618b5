"""What the saved error map's provenance says it holds: the restored and aligned moving image against
the ground truth (restoration and alignment error together), in the units the map is in."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse._qt.analysis import RunRequest, run_and_analyse
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.io import Geometry, ImageVolume

GRID = Geometry(np.ones(2), np.zeros(2), np.eye(2))


@pytest.mark.parametrize(("channels", "units"), [((), "in the moving image's units"),
                                                 ((3,), "in BT.601 luma [0, 1] of the colour moving image")])
def test_the_error_map_provenance_names_restoration_with_alignment_and_the_maps_units(channels, units):
    rng = np.random.default_rng(0)
    reference = rng.random((40, 40)).astype(np.float32)
    moving = (rng.random((40, 40, *channels)) * 255).astype(np.uint8)
    rgb = bool(channels)
    request = RunRequest(ImageVolume(reference, GRID, source="reference"),
                         ImageVolume(moving, GRID, source="moving", is_rgb=rgb), "untrained", device="cpu",
                         label=ImageVolume(moving, GRID, is_rgb=rgb))
    engine = FusionEngine(load_method("identity+average"), device="cpu")
    outcome = run_and_analyse(request, engine, lambda *_: None, CancelToken())
    description = outcome.result.provenance["review_maps"]["alignment_error"]
    assert "restoration and alignment error together" in description
    assert units in description
    if rgb:
        assert outcome.error_map.max() <= 1.0
