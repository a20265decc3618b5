"""`unifuse view` (the README's first command) and `napari -w napari-unifuse` open the workbench on data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_unifuse.cli.view import PLUGIN, WORKBENCH, open_workbench

pytestmark = pytest.mark.gui


def roles(viewer) -> list[str]:
    return [layer.metadata.get("unifuse", {}).get("role") for layer in viewer.layers]


def test_view_without_paths_loads_the_default_sample_and_docks_the_workbench(qtbot):
    viewer = open_workbench([], None, show=False)
    try:
        assert {"reference", "moving", "label"} <= set(roles(viewer))
        assert all(layer.data.ndim == 3 for layer in viewer.layers)
        assert type(viewer.window.dock_widgets[f"{WORKBENCH} ({PLUGIN})"]).__name__ == "UniFuseWorkbench"
    finally:
        viewer.close()


def test_view_opens_files_through_the_plugin_reader(qtbot, tmp_path):
    from napari_unifuse._napari_io import volume_from_layer_data
    from napari_unifuse.data.samples import mri_ct_metal_2d
    from napari_unifuse.io import write_image

    paths = [write_image(volume_from_layer_data(data, kwargs), tmp_path / f"{role}.nii.gz")
             for role, (data, kwargs, _) in zip(("mri", "ct"), mri_ct_metal_2d())]
    viewer = open_workbench([str(path) for path in paths], None, show=False)
    try:
        assert [layer.data.shape for layer in viewer.layers] == [(128, 128), (128, 128)]
        assert [layer.metadata["unifuse"]["source"] for layer in viewer.layers] == [str(path) for path in paths]
        assert type(viewer.window.dock_widgets[f"{WORKBENCH} ({PLUGIN})"]).__name__ == "UniFuseWorkbench"
    finally:
        viewer.close()


def test_napari_finds_the_installed_plugin_widget_in_a_fresh_process():
    """What `napari -w napari-unifuse` does, minus the event loop: discovery through the entry point."""
    script = (
        "import napari\n"
        "viewer = napari.Viewer(show=False)\n"
        f"_, widget = viewer.window.add_plugin_dock_widget({PLUGIN!r})\n"
        "print(type(widget).__name__)\n"
        "viewer.close()\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "UniFuseWorkbench"
