"""The workbench's run form runs UniFuse only: a checkpoint file of another method is refused."""

from __future__ import annotations

import pytest

from napari_unifuse._qt.run_panel import FROM_FILE
from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.io import Geometry
from napari_unifuse.model.bsafusion import BSAFusion, BSAFusionConfig
from napari_unifuse.model.checkpoint import save_checkpoint

from .conftest import add_pair

pytestmark = pytest.mark.gui
RUN_TIMEOUT_MS = 120_000


def test_a_bsafusion_checkpoint_chosen_from_file_is_refused_in_one_line(make_napari_viewer, qtbot, tmp_path,
                                                                         notifications):
    """It ran BSAFusion and the workbench said "UniFuse finished"."""
    checkpoint = save_checkpoint(BSAFusion(BSAFusionConfig.small()), tmp_path / "bsa", {})
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2))
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    form.output_root.value, form.device.value = str(tmp_path / "runs"), "cpu"
    form.checkpoint.value, form.checkpoint_file.value = FROM_FILE, str(checkpoint)
    before = [layer.name for layer in viewer.layers]
    form.run_button.clicked()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.outcome is None and [layer.name for layer in viewer.layers] == before
    assert notifications == [("error", f"Run UniFuse: {checkpoint} holds bsafusion weights, not UniFuse ones; "
                                       "compare other methods in the Methods tab")]
    assert not (tmp_path / "runs").exists()
