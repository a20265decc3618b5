"""The workbench with the checkpoints we ship: the right one is offered per dimensionality, and it runs."""

from __future__ import annotations

import pytest

from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.engine.provenance import sha256_of_path
from napari_unifuse.model.checkpoint import resolve_checkpoint

from .test_workbench import RUN_TIMEOUT_MS

pytestmark = pytest.mark.gui
PLUGIN = "napari-unifuse"


def test_the_bundled_checkpoint_follows_the_reference_and_runs_on_the_2d_sample(make_napari_viewer, qtbot,
                                                                                 tmp_path, notifications):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "t1_t2_motion_3d")
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    assert form.checkpoint.value == "unifuse-3d-phantom"

    viewer.layers.clear()
    viewer.open_sample(PLUGIN, "mri_ct_metal_2d")
    assert form.checkpoint.value == "unifuse-2d-harvard"

    form.output_root.value = str(tmp_path)
    form.device.value = "cpu"
    form.run_button.clicked()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.outcome is not None, notifications
    recorded = workbench.outcome.result.provenance["checkpoint"]
    assert recorded["name"] == "unifuse-2d-harvard"
    assert recorded["sha256"] == sha256_of_path(resolve_checkpoint("unifuse-2d-harvard"))
    assert workbench.outcome.result.fused.array.shape == viewer.layers[0].data.shape
    # The shipped 2-D head names metal on metal CTs and "none" on clean ones (its sidecar's
    # calibration, likelihood ratio 41): the sample's metal call is evidence, so neither the plot
    # nor the notification area carries a caveat.
    result = workbench.outcome.result
    assert result.predicted_class == "metal" and result.class_caveat is None
    assert "not evidence" not in workbench.plot.values_label.text()
    assert not any("not evidence of the artefact" in text for _, text in notifications), notifications
    # The sidecar's fusion balance acted, and the canvas says so beside the alignment guard's choice.
    assert result.fusion_balance is not None and result.provenance["fusion_balance"]["max_mean_weight"] == 0.3
    overlay = viewer.canvas.overlays["text"].text
    assert overlay.startswith(f"{workbench.results.names.fused}:\nalignment guard: ")
    assert result.fusion_balance.message in overlay
