"""Screenshots of the UniFuse workbench on the bundled 3D and 2D sample pairs (docs/images/).

Run headless with ``xvfb-run -a .venv/bin/python docs/make_screenshots.py [--pair-2d DIR]``.
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
SHOTS = {"workbench_3d.png": ("t1_t2_motion_3d", 3), "workbench_2d.png": ("mri_ct_metal_2d", 2)}


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


def screenshot(file_name: str, sample: str | Path, ndim: int, runs_root: Path) -> float:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1700, 1000)
    if isinstance(sample, Path):
        open_synth_pair(viewer, sample)
    else:
        viewer.open_sample(PLUGIN, sample)
    _, workbench = viewer.window.add_plugin_dock_widget(PLUGIN, WORKBENCH)
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
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
    IMAGES.mkdir(exist_ok=True)
    viewer.screenshot(str(IMAGES / file_name), canvas_only=False, flash=False)
    viewer.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair-2d", type=Path, help="a `unifuse synth` output folder for the 2D shot")
    args = parser.parse_args()
    shots = dict(SHOTS)
    if args.pair_2d:
        shots["workbench_2d.png"] = (args.pair_2d, 2)
    with TemporaryDirectory() as runs_root:
        for file_name, (sample, ndim) in shots.items():
            seconds = screenshot(file_name, sample, ndim, Path(runs_root))
            print(f"{sample}: click to all layers {seconds:.1f} s -> docs/images/{file_name}")


if __name__ == "__main__":
    main()
