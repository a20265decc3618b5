"""The UniFuse workbench: run the model on two layers, review the result, flag failures, save.

Layout: the run form on top; below it tabs for review controls, metrics and annotations; the
per-slice degradation plot docks beside the viewer. The model runs in a napari ``thread_worker``
(the viewer stays responsive); progress arrives through a Qt signal, which Qt delivers on the GUI
thread, and Cancel sets the engine's CancelToken, honoured before the next tile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from magicgui import widgets
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from napari_unifuse._qt.analysis import RunOutcome, build_engine, run_and_analyse, slice_metrics
from napari_unifuse._qt.annotation_panel import AnnotationPanel
from napari_unifuse._qt.method_compare import MethodComparePanel
from napari_unifuse._qt.metrics_panel import MetricsPanel
from napari_unifuse._qt.notifications import report_error, reports_errors, show_warnings
from napari_unifuse._qt.outputs import ResultLayers, viewed_slice
from napari_unifuse._qt.plots import ProbabilityPlot
from napari_unifuse._qt.qc_panel import QCPanel
from napari_unifuse._qt.run_panel import RunPanel, RunSelection
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.outputs import write_fusion_outputs
from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.errors import InputError, UniFuseError
from napari_unifuse.io import ImageVolume, write_image

PLOT_DOCK_NAME = "UniFuse degradation per slice"
# Review maps saved beside the engine's five outputs (float maps: NIfTI, or MHA for 2D PNG runs).
MAP_FILES = ("alignment_error", "jacobian_determinant", "folding")


@dataclass(frozen=True)
class _RunFailed:
    """A worker's error handed back as a value: napari relays a raised exception as a traceback
    notification (and superqt re-raises a returned exception), but the user should see one line."""

    error: Exception


class _ProgressRelay(QObject):
    """Carries ``progress(stage, done, total)`` from the worker thread to the GUI thread."""

    progressed = Signal(str, int, int)


class UniFuseWorkbench(QWidget):
    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.run_panel = RunPanel(napari_viewer)
        self.results = ResultLayers(napari_viewer)
        self.qc_panel = QCPanel(self.results)
        self.metrics_panel = MetricsPanel()
        self.annotation_panel = AnnotationPanel(napari_viewer)
        self.plot = ProbabilityPlot()
        self.save_button = widgets.PushButton(text="Save outputs", enabled=False,
                                              tooltip="Write fused / aligned / field / maps + provenance.json "
                                                      "into the run folder")
        tabs = QTabWidget()
        tabs.addTab(self.qc_panel.native, "Review")
        tabs.addTab(self.metrics_panel, "Metrics")
        tabs.addTab(self.annotation_panel.native, "Annotate")
        self.method_compare = MethodComparePanel(napari_viewer, self.run_panel, self.annotation_panel)
        tabs.addTab(self.method_compare.native, "Methods")
        layout = QVBoxLayout(self)
        layout.addWidget(self.run_panel.native)
        layout.addWidget(tabs)
        layout.addWidget(self.save_button.native)
        napari_viewer.window.add_dock_widget(self.plot, name=PLOT_DOCK_NAME, area="right")

        self.outcome: RunOutcome | None = None
        self.selection: RunSelection | None = None
        self.worker = None
        self.last_run_seconds: float | None = None
        self._cancel: CancelToken | None = None
        self._engines: dict[tuple, FusionEngine] = {}
        self._relay = _ProgressRelay()
        self._relay.progressed.connect(self._show_progress)

        self.run_panel.run_button.changed.connect(self.start_run)
        self.run_panel.cancel_button.changed.connect(self.cancel_run)
        self.save_button.changed.connect(self.save_outputs)
        for widget in (self.run_panel.reference, self.run_panel.moving, self.run_panel.checkpoint,
                       self.run_panel.checkpoint_file, self.run_panel.output_root):
            widget.changed.connect(self._select_run)
        napari_viewer.dims.events.current_step.connect(self._on_slice_changed)
        self._select_run()

    # ---- run selection -------------------------------------------------------------------------
    def _select_run(self, _value=None) -> None:
        """Follow the form: the run folder, and the annotations already made in it."""
        try:
            self.selection = self.run_panel.selection()
        except UniFuseError:
            self.selection = None  # incomplete form: the Run button explains what is missing
            self.run_panel.folder_label.value = "(choose a reference and a moving image)"
            return
        self.run_panel.folder_label.value = str(self.selection.folder)
        self.annotation_panel.set_run(self.selection.folder, Path(self.run_panel.output_root.value),
                                      self.viewer.layers[self.selection.reference_name])

    # ---- running -------------------------------------------------------------------------------
    @reports_errors("Run UniFuse")
    def start_run(self) -> None:
        if self.worker is not None:
            raise InputError("a run is already in progress; wait for it or press Cancel", "Run UniFuse")
        selection = self.run_panel.selection()  # raises the clear message when the form is incomplete
        self._cancel = cancel = CancelToken()
        started = time.perf_counter()
        worker = create_worker(self._compute, selection, cancel)
        worker.returned.connect(lambda outcome: self._finish_run(outcome, selection, started))
        worker.finished.connect(self._run_finished)
        self.worker = worker
        worker.start()
        self.run_panel.set_running(True)
        self.run_panel.status.value = "starting…"

    def _compute(self, selection: RunSelection, cancel: CancelToken) -> RunOutcome | _RunFailed:
        """Worker thread: load (or reuse) the engine, fuse, compute the review maps."""
        try:
            return self._fuse_and_analyse(selection, cancel)
        except Exception as error:  # noqa: BLE001 - reported on the GUI thread by _finish_run
            return _RunFailed(error)

    def _fuse_and_analyse(self, selection: RunSelection, cancel: CancelToken) -> RunOutcome:
        request = selection.request
        key = (request.checkpoint, request.reference.ndim, request.device, request.tile_size)
        if key not in self._engines:
            self._relay.progressed.emit("load model", 0, 1)
            self._engines[key] = build_engine(request.checkpoint, request.reference.ndim, request.device,
                                              request.tile_size)
        return run_and_analyse(request, self._engines[key], self._relay.progressed.emit, cancel)

    def cancel_run(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
            self.run_panel.status.value = "cancelling at the next tile…"

    def _show_progress(self, stage: str, done: int, total: int) -> None:
        self.run_panel.progress.max = max(total, 1)
        self.run_panel.progress.value = done
        unit = f" tile {done}/{total}" if stage == "fuse" else ""
        self.run_panel.status.value = f"{stage}{unit}"

    def _run_finished(self) -> None:
        self.worker = None
        self._cancel = None
        self.run_panel.set_running(False)
        if self.run_panel.status.value != "done":  # `returned` (which sets "done") comes before `finished`
            self.run_panel.status.value = "stopped"

    def _finish_run(self, outcome: RunOutcome | _RunFailed, selection: RunSelection, started: float) -> None:
        if isinstance(outcome, _RunFailed):
            report_error(outcome.error, "Run UniFuse")
        else:
            self._show_outcome(outcome, selection, started)

    def _show_outcome(self, outcome: RunOutcome, selection: RunSelection, started: float) -> None:
        self.outcome, self.selection = outcome, selection
        self.results.show(outcome, selection.reference_name, selection.moving_name)
        result = outcome.result
        self.annotation_panel.method = result.provenance["method"]["name"]
        self.plot.show_probabilities(result.slice_class_probs, result.class_names, selection.request.task)
        self.metrics_panel.show_metrics(volume=outcome.volume_metrics)
        self._on_slice_changed()
        self.save_button.enabled = True
        self.last_run_seconds = time.perf_counter() - started
        self.run_panel.status.value = "done"
        show_warnings(outcome.notes)
        if selection.request.checkpoint.startswith("untrained"):
            show_warnings(["These outputs come from an UNTRAINED model (random weights): use them only to "
                           "try the workbench, never for reading."])
        show_info(f"UniFuse finished in {self.last_run_seconds:.1f} s; outputs are in the layer list. "
                  "Press 'Save outputs' to write them.")

    def _on_slice_changed(self, _event=None) -> None:
        if self.outcome is None or self.results.names.fused not in self.viewer.layers:
            return
        fused = self.viewer.layers[self.results.names.fused]
        axis, index = viewed_slice(self.viewer, fused)
        z_index = index if axis == 0 else 0
        if axis not in (None, 0):  # viewing sagittal/coronal: the plot is along z, follow the cursor's z
            z_index = int(round(fused.world_to_data(self.viewer.dims.point[-fused.ndim:])[0]))
        self.plot.set_slice(z_index)
        self.metrics_panel.show_metrics(slice_values=slice_metrics(self.outcome, axis, index))

    # ---- saving --------------------------------------------------------------------------------
    @reports_errors("Save outputs")
    def save_outputs(self) -> dict[str, Path]:
        if self.outcome is None or self.selection is None:
            raise InputError("run UniFuse first; there is nothing to save yet", "Save outputs")
        folder = self.selection.folder
        result = self.outcome.result
        map_suffix = "mha" if result.output_extension == "png" else "nii.gz"
        maps = dict(zip(MAP_FILES, (self.outcome.error_map, self.outcome.jacobian, self.outcome.folding)))
        inputs = {Path(v.source).resolve() for v in (self.selection.request.reference, self.selection.request.moving)
                  if v.source and Path(v.source).exists()}
        planned = [folder / f"{name}.{map_suffix}" for name in maps]
        if any(path.resolve() in inputs for path in planned) or folder.resolve() in {p.parent for p in inputs}:
            raise InputError("the run folder holds an input image; choose another runs folder so inputs are never "
                             "overwritten", folder)
        written = write_fusion_outputs(result, folder)
        for (name, array), path in zip(maps.items(), planned):
            write_image(ImageVolume(array, result.fused.geometry, {"role": name}), path)
            written[path.name] = path
        show_info(f"Saved {len(written)} files to {folder}")
        return written
