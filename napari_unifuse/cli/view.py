"""`unifuse view`: napari with the UniFuse workbench docked and data (or a bundled sample) loaded."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from napari_unifuse.cli import TERMINATING_SIGNALS, Terminated, _signals_handled
from napari_unifuse.errors import InputError, UniFuseError

PLUGIN = "napari-unifuse"
WORKBENCH = "UniFuse workbench"
SAMPLES = ("t1_t2_motion_3d", "ct_pet_lowdose_3d", "mri_ct_metal_2d")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "view",
        help="open napari with the UniFuse workbench (and a bundled sample pair unless files are given)",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        type=os.path.expanduser,
        help="images (files or DICOM series folders) to open, reference first, then moving; they fill the "
             "workbench's reference and moving boxes, also when --sample is given",
    )
    parser.add_argument(
        "--sample",
        choices=SAMPLES,
        default=None,
        help=f"bundled sample pair to load (default when no paths are given: {SAMPLES[0]}); with paths, the "
             "sample is opened too, as extra layers, but the paths stay the pair to run",
    )
    parser.set_defaults(func=run)


def check_openable(path: str) -> None:
    """Raise the InputError that says why the package's reader cannot open ``path``, if it cannot.

    Cheap: the name, and for a folder GDCM's lists of series; no image is read (napari reads it
    next). A file of a supported type that is corrupt passes, and the viewer reports it."""
    from napari_unifuse.io.readers import dicom_series, readable_format

    if readable_format(path) == "dicom" and Path(path).is_dir():
        dicom_series(path)  # a folder of no series, or of several, is refused with its listing


def check_qt_binding() -> None:
    """Raise an InputError when no Qt binding (PyQt6, PySide6, ...) is installed: the ``qt`` extra is
    optional, and napari would fail with chained tracebacks only once it builds its window."""
    try:
        import qtpy  # noqa: F401 - qtpy raises QtBindingsNotFoundError (an ImportError) without a binding
    except ImportError as error:
        raise InputError(f"napari's window needs a Qt binding and none is installed ({error}): "
                         'pip install "napari-unifuse[qt]"; unifuse fuse needs none') from error


def check_display() -> None:
    """Raise an InputError when Linux has no display for Qt's default platforms (xcb, wayland): Qt
    would abort the process (SIGABRT) advising to reinstall the application. Another platform set in
    QT_QPA_PLATFORM (offscreen, vnc, ...) needs none."""
    if not sys.platform.startswith("linux"):
        return
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform and not platform.startswith(("xcb", "wayland")):
        return
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    raise InputError("no display to open napari's window on (neither DISPLAY nor WAYLAND_DISPLAY is set): run it "
                     "at the machine's screen, over ssh -X, or under xvfb-run; unifuse fuse needs no display")


def open_workbench(paths: list[str], sample: str | None, show: bool = True):
    """Build the viewer; separated from `run` so tests can drive it without an event loop.

    Every path, the Qt binding and the display are checked before the viewer is created: a problem
    raises InputError, no window opens."""
    for path in paths:
        check_openable(path)
    check_qt_binding()
    if show:
        check_display()
    import napari

    viewer = napari.Viewer(show=show)
    try:
        # The sample first, so that the files are the newest layers; the files then fill the boxes.
        if sample or not paths:
            viewer.open_sample(PLUGIN, sample or SAMPLES[0])
        opened = []
        for path in paths:
            opened += _open(viewer, path)
        _, workbench = viewer.window.add_plugin_dock_widget(PLUGIN, WORKBENCH)
    except BaseException:
        viewer.close()
        raise
    names = [layer.name for layer in opened if layer in viewer.layers and isinstance(layer, napari.layers.Image)]
    if names:
        # The workbench offers a sample's pair by its roles; given files are the pair the user asked for.
        # One file fills both boxes, as in an empty viewer: the next image opened becomes the moving one.
        panel = workbench.run_panel
        panel.reference.value, panel.moving.value = names[0], names[min(1, len(names) - 1)]
    return viewer


def _open(viewer, path: str) -> list:
    """``viewer.open`` with the package's reader; napari's own refusal becomes the reader's explanation."""
    try:
        return viewer.open(path, plugin=PLUGIN)
    except UniFuseError:
        raise
    except (OSError, ValueError) as error:
        check_openable(path)  # gone or changed since the check: say what is wrong now
        raise InputError(f"napari could not open it ({error})", path) from error


def run(args: argparse.Namespace) -> int:
    open_workbench(args.paths, args.sample)  # checks the paths before napari is even imported
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    stopped_by: list[int] = []

    def quit_event_loop(signum, frame) -> None:
        # Raised in here, inside Qt's event loop, Terminated would meet napari's exception hook, which
        # exits with status 1 and "Closed by KeyboardInterrupt": leave the loop, raise it after. By a
        # timer, which fires also when the signal comes just before the loop starts (exit() then does nothing).
        stopped_by.append(signum)
        QTimer.singleShot(0, QApplication.exit)

    with _signals_handled(quit_event_loop, *TERMINATING_SIGNALS):
        napari.run()
    if stopped_by:
        raise Terminated(stopped_by[0])
    return 0
