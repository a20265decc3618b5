"""Screenshots of the UniFuse workbench on the bundled 3D and 2D sample pairs (docs/images/), in
windows of 1280×800 and 1920×1080 pixels; each checks that the canvas keeps at least half the
window. The 1920×1080 3D shot shows the review: the workbench has gone to the first suspicious
slice and the quality map it flags most is shown over the fused image.

Run headless with ``xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python docs/make_screenshots.py
[--pair-2d DIR]``.
``--pair-2d`` takes a folder written by ``unifuse synth`` (reference.png, moving.png, label.png),
e.g. a Harvard SPECT-MRI pair, for the 2D shot instead of the bundled 2D phantom. Uses the first
bundled checkpoint of the right dimensionality, else the untrained small preset (labelled as such
in the plot title and the checkpoint box). Prints the click-to-layers time of each run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import napari
from qtpy.QtWidgets import QApplication

from napari_unifuse._qt.analysis import UNTRAINED

IMAGES = Path(__file__).parent / "images"
PLUGIN, WORKBENCH = "napari-unifuse", "UniFuse workbench"
SMALL, LARGE = (1280, 800), (1920, 1080)
# file name -> (sample, dimensionality, window size, go to the first suspicious slice)
SHOTS = {
    "workbench_3d_1280x800.png": ("t1_t2_motion_3d", 3, SMALL, False),
    "workbench_3d_1920x1080.png": ("t1_t2_motion_3d", 3, LARGE, True),
    "workbench_2d.png": ("mri_ct_metal_2d", 2, LARGE, False),
}
MIN_CANVAS_FRACTION = 0.5


def _wait(workbench, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while workbench.worker is not None and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)


def open_synth_pair(viewer: napari.Viewer, folder: Path) -> None:
    """A `unifuse synth` folder, with the roles sample data carries so the workbench picks them."""
    for role, file_name in (("reference", "reference.png"), ("moving", "moving.png"), ("label", "label.png")):
        (layer,) = viewer.open(str(folder / file_name), plugin=PLUGIN)
        layer.metadata["unifuse"]["role"] = role
        layer.visible = role != "label"


def _settle() -> None:
    for _ in range(30):
        QApplication.processEvents()
        time.sleep(0.01)


def screenshot(file_name: str, sample: str | Path, ndim: int, size: tuple[int, int], review: bool,
               runs_root: Path) -> float:
    viewer = napari.Viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*size)
    if isinstance(sample, Path):
        open_synth_pair(viewer, sample)
    else:
        viewer.open_sample(PLUGIN, sample)
    _, workbench = viewer.window.add_plugin_dock_widget(PLUGIN, WORKBENCH)
    _settle()
    form = workbench.run_panel
    form.output_root.value = str(runs_root)
    bundled = [name for name in form.checkpoint.choices if f"{ndim}d" in str(name)]
    form.checkpoint.value = bundled[0] if bundled else UNTRAINED
    form.run_button.clicked()
    _wait(workbench)
    if workbench.outcome is None:
        raise SystemExit(f"{sample}: the run failed; see the notifications")
    seconds = workbench.last_run_seconds
    if ndim == 3:
        viewer.dims.set_current_step(0, viewer.layers[workbench.results.names.fused].data.shape[0] // 2)
    workbench.qc_panel.quiver_stride.value = 6 if ndim == 3 else 8
    # The untrained preset predicts a zero field (its flow head starts at zero): no arrows until trained.
    print(f"{sample}: largest predicted displacement {abs(workbench.outcome.result.displacement).max():.2f} voxels")
    viewer.layers[workbench.results.names.folding].visible = False
    quality = workbench.outcome.result.quality
    if review and quality is not None:
        _show_first_suspicious(viewer, workbench, quality)
    _settle()
    canvas = viewer.window._qt_viewer.canvas.native
    fraction = canvas.width() / window.width()
    print(f"{file_name}: window {window.width()}×{window.height()}, canvas {canvas.width()}×{canvas.height()} "
          f"({fraction:.0%} of the width)")
    if (window.width(), window.height()) != size or fraction < MIN_CANVAS_FRACTION:
        raise SystemExit(f"{file_name}: the canvas keeps {fraction:.0%} of a {window.width()}×{window.height()} "
                         f"window; it must keep at least {MIN_CANVAS_FRACTION:.0%} of {size[0]}×{size[1]}")
    IMAGES.mkdir(exist_ok=True)
    viewer.screenshot(str(IMAGES / file_name), canvas_only=False, flash=False)
    viewer.close()
    return seconds


def _show_first_suspicious(viewer: napari.Viewer, workbench, quality) -> None:
    """What a reviewer does: from the middle slice, the next suspicious one, with the map that flags
    it shown over the fused image."""
    viewer.dims.set_current_step(0, viewer.layers[workbench.results.names.fused].data.shape[0] // 2)
    target = workbench.go_to_suspicious(+1)
    if target is None:
        print("no slice is flagged by the quality maps: the review shot shows the middle slice")
        return
    worst = max(quality.slice_scores, key=lambda name: float(quality.slice_scores[name][target]))
    viewer.layers[workbench.results.names.quality_map(worst)].visible = True
    viewer.layers.selection.active = viewer.layers[workbench.results.names.quality_map(worst)]
    workbench.tabs.setCurrentIndex(workbench.tabs.indexOf(workbench.annotation_panel.native))
    print(f"review shot: slice {target}, {quality.dominant_problem(target)} ({worst} map shown)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair-2d", type=Path, help="a `unifuse synth` output folder for the 2D shot")
    parser.add_argument("--only", nargs="+", choices=sorted(SHOTS), help="make only these shots")
    args = parser.parse_args()
    shots: dict[str, tuple[str | Path, int, tuple[int, int], bool]] = {
        name: shot for name, shot in SHOTS.items() if not args.only or name in args.only}
    if args.pair_2d and "workbench_2d.png" in shots:
        shots["workbench_2d.png"] = (args.pair_2d, 2, LARGE, False)
    with TemporaryDirectory() as runs_root:
        for file_name, (sample, ndim, size, review) in shots.items():
            seconds = screenshot(file_name, sample, ndim, size, review, Path(runs_root))
            print(f"{sample}: click to all layers {seconds:.1f} s -> docs/images/{file_name}")


if __name__ == "__main__":
    main()
