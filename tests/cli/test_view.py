"""`unifuse view` (the README's first command) and `napari -w napari-unifuse` open the workbench on data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from napari_unifuse.cli import main
from napari_unifuse.cli import view as view_module
from napari_unifuse.cli.view import PLUGIN, WORKBENCH, open_workbench
from napari_unifuse.errors import InputError

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


def _write_2d_pair(folder):
    from napari_unifuse._napari_io import volume_from_layer_data
    from napari_unifuse.data.samples import mri_ct_metal_2d
    from napari_unifuse.io import write_image

    return [str(write_image(volume_from_layer_data(data, kwargs), folder / f"{role}.nii.gz"))
            for role, (data, kwargs, _) in zip(("mri", "ct"), mri_ct_metal_2d())]


def test_view_given_files_and_a_sample_runs_the_files_not_the_sample(qtbot, tmp_path):
    """Positional files are "reference first, then moving", also when --sample adds its pair."""
    paths = _write_2d_pair(tmp_path)
    viewer = open_workbench(paths, "mri_ct_metal_2d", show=False)
    try:
        assert {"reference", "moving", "label"} <= set(roles(viewer))  # the sample is there too
        panel = viewer.window.dock_widgets[f"{WORKBENCH} ({PLUGIN})"].run_panel
        assert (panel.reference.value, panel.moving.value) == ("mri", "ct")
        # The sample's ground truth and degradation belong to the sample's pair, not to the files.
        assert (panel.ground_truth.value, panel.task.value) == ("none", "auto")
    finally:
        viewer.close()


def _bad_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "notes.txt").write_text("not DICOM")
    (tmp_path / "empty").mkdir()
    return {
        "missing": (tmp_path / "missing.nii.gz", "file not found"),
        "unknown type": (tmp_path / "notes.txt", "unknown file type '.txt'; supported: .nii"),
        "folder without DICOM": (tmp_path / "pngs", "no DICOM series found in this folder"),
        "empty folder": (tmp_path / "empty", "no DICOM series found in this folder"),
    }


@pytest.mark.parametrize("case", ["missing", "unknown type", "folder without DICOM", "empty folder"])
def test_view_refuses_a_bad_path_in_one_line_before_any_window_opens(case, tmp_path, monkeypatch, capsys):
    import napari

    def no_viewer(*args, **kwargs):
        raise AssertionError("a viewer was created for a path that cannot be opened")

    monkeypatch.setattr(napari, "Viewer", no_viewer)
    monkeypatch.setattr(napari, "run", lambda *args, **kwargs: None)
    good = _write_2d_pair(tmp_path)[0]
    bad, explanation = _bad_paths(tmp_path)[case]
    assert main(["view", good, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"unifuse view: error: {bad}: {explanation}"), err
    assert len(err.splitlines()) == 1, err



@pytest.mark.parametrize("platform", [None, "xcb", "wayland"])
def test_view_without_a_display_is_refused_in_one_line_before_qt_aborts(platform, monkeypatch, capsys):
    """Over ssh without X forwarding, Qt aborted the process (SIGABRT) advising to reinstall."""
    import napari

    def no_viewer(*args, **kwargs):
        raise AssertionError("a viewer was created without a display")

    monkeypatch.setattr(napari, "Viewer", no_viewer)
    monkeypatch.setattr(view_module.sys, "platform", "linux")
    for variable in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(variable, raising=False)
    if platform is not None:
        monkeypatch.setenv("QT_QPA_PLATFORM", platform)
    assert main(["view"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unifuse view: error: no display to open napari's window on") and "xvfb-run" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # a platform that needs no display
    view_module.check_display()


def test_view_without_a_qt_binding_is_refused_in_one_line_before_napari_builds_anything(monkeypatch, capsys):
    """Without the optional [qt] extra napari printed three chained tracebacks. qtpy is imported
    afresh with every binding unimportable, so it raises its own QtBindingsNotFoundError."""
    import napari

    def no_viewer(*args, **kwargs):
        raise AssertionError("a viewer was created without a Qt binding")

    monkeypatch.setattr(napari, "Viewer", no_viewer)
    monkeypatch.delitem(sys.modules, "qtpy")
    bindings = ("PyQt5", "PySide2", "PyQt6", "PySide6")
    for name in [name for name in sys.modules if name.split(".")[0] in bindings] + list(bindings):
        monkeypatch.setitem(sys.modules, name, None)  # the submodules too: an import finds them first
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert main(["view"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unifuse view: error: napari's window needs a Qt binding and none is installed"), err
    assert 'pip install "napari-unifuse[qt]"' in err and len(err.splitlines()) == 1, err

def test_view_turns_napari_refusing_a_path_into_the_reader_explanation(qtbot, tmp_path, monkeypatch):
    """A path that passed the check but that napari then refuses (deleted meanwhile) gets the
    package's explanation, and the half-built viewer is closed."""
    import napari

    real_check = view_module.check_openable
    calls = []

    def check_passes_first_time(path):
        calls.append(path)
        if len(calls) > 1:
            real_check(path)

    monkeypatch.setattr(view_module, "check_openable", check_passes_first_time)
    missing = str(tmp_path / "gone.nii.gz")
    with pytest.raises(InputError, match="gone.nii.gz: file not found"):
        open_workbench([missing], None, show=False)
    assert calls == [missing, missing]
    assert napari.current_viewer() is None


def test_view_keeps_a_corrupt_file_a_notification_in_the_viewer(qtbot, tmp_path):
    """The README's promise: a file of a supported type that cannot be read opens the viewer and says why there."""
    from napari.utils.notifications import notification_manager

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file")
    messages = []

    def record(notification) -> None:
        messages.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    try:
        viewer = open_workbench([str(corrupt)], None, show=False)
    finally:
        notification_manager.notification_ready.disconnect(record)
    try:
        assert len(viewer.layers) == 0
        assert any(message.startswith(f"Could not open {corrupt}") for message in messages), messages
    finally:
        viewer.close()


@pytest.mark.parametrize(("signum", "said"), [(signal.SIGTERM, "terminated"),
                                              (signal.SIGHUP, "terminated (its terminal closed)")])
def test_view_stopped_by_sigterm_or_sighup_says_so_in_one_line_with_its_status(signum, said):
    """As every command does (README): napari's exception hook met the signal inside Qt's event loop
    and exited with 1 and "Closed by KeyboardInterrupt". The signal comes once the window is open, on
    the display pytest-xvfb gives (Qt's offscreen platform has no OpenGL for a shown canvas)."""
    script = (
        "import os, sys\n"
        "from qtpy.QtCore import QTimer\n"
        "from napari_unifuse.cli import main, view\n"
        "open_workbench = view.open_workbench\n"
        "def open_then_signal(*args, **kwargs):\n"
        "    viewer = open_workbench(*args, **kwargs)\n"
        f"    QTimer.singleShot(0, lambda: os.kill(os.getpid(), {int(signum)}))\n"
        "    return viewer\n"
        "view.open_workbench = open_then_signal\n"
        "sys.exit(main())\n"
    )
    completed = subprocess.run([sys.executable, "-c", script, "view", "--sample", "mri_ct_metal_2d"],
                               capture_output=True, text=True, timeout=180,
                               env={**os.environ, "QT_QPA_PLATFORM": "xcb"})
    assert completed.returncode == 128 + signum, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines()[-1] == f"unifuse view: {said}", completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr and "KeyboardInterrupt" not in completed.stderr, completed.stderr


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
