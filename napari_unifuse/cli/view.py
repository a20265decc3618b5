"""`unifuse view`: napari with the UniFuse workbench docked and data (or a bundled sample) loaded."""

from __future__ import annotations

import argparse

PLUGIN = "napari-unifuse"
WORKBENCH = "UniFuse workbench"
SAMPLES = ("t1_t2_motion_3d", "ct_pet_lowdose_3d", "mri_ct_metal_2d")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "view",
        help="open napari with the UniFuse workbench (and a bundled sample pair unless files are given)",
    )
    parser.add_argument("paths", nargs="*", help="images to open (reference first, then moving)")
    parser.add_argument(
        "--sample",
        choices=SAMPLES,
        default=None,
        help=f"bundled sample pair to load (default when no paths are given: {SAMPLES[0]})",
    )
    parser.set_defaults(func=run)


def open_workbench(paths: list[str], sample: str | None, show: bool = True):
    """Build the viewer; separated from `run` so tests can drive it without an event loop."""
    import napari

    viewer = napari.Viewer(show=show)
    for path in paths:
        viewer.open(path, plugin=PLUGIN)
    if sample or not paths:
        viewer.open_sample(PLUGIN, sample or SAMPLES[0])
    viewer.window.add_plugin_dock_widget(PLUGIN, WORKBENCH)
    return viewer


def run(args: argparse.Namespace) -> int:
    import napari

    open_workbench(args.paths, args.sample)
    napari.run()
    return 0
