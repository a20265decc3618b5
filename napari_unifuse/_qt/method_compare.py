"""Two fusion methods on the same pair, one after the other, their layers side by side.

The workbench's "Methods" tab: pick a method and another to compare it with (``engine.methods``;
trained methods use their bundled weights), press "Run both". The pair, device and tile size are
the run form's. Each method's fused and aligned images become layers whose names end in
``· <method>``, with the method in their metadata, and napari's grid mode (``viewer.canvas.grid``) puts them side by side
(one grid cell per layer), so a reviewer can flick between methods. The annotations made while
comparing record the method chosen under "annotations about". A failed or cancelled comparison
ends in one notification, like the main run; once the workbench is closed (:meth:`release`) a
comparison still running adds nothing, and the main run puts the viewer back out of grid mode
(:meth:`leave_side_by_side`) so that its overlays sit on its fused image.

Nothing here computes: the engine fuses, in a napari worker thread, as for the main run.
"""

from __future__ import annotations

from dataclasses import dataclass

from magicgui import widgets
from napari.qt.threading import create_worker

from napari_unifuse._napari_io import LAYER_METADATA_KEY, volume_to_layer_data
from napari_unifuse._qt.notifications import WorkerFailed, report_error, reports_errors, show_warnings
from napari_unifuse._qt.run_panel import OUTPUT_ROLE, ProgressRelay, RunPanel
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import OPTION_SEPARATOR, load_method, methods_for_dimensions
from napari_unifuse.engine.progress import CancelToken, ProgressCallback
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume

ACTION = "Compare methods"
# Alignment variants offered beside the plain names (engine.methods.split_name).
_VARIANTS = {"mmif-amin": ("sitk", "none")}


@dataclass(frozen=True)
class MethodRun:
    method: str
    result: FusionResult


def method_choices(ndim: int) -> list[str]:
    """Every method available for ``ndim``-D images, with the alignment variants that exist."""
    choices = []
    for name in methods_for_dimensions(ndim):
        choices.append(name)
        choices += [f"{name}{OPTION_SEPARATOR}{option}" for option in _VARIANTS.get(name, ())]
    return choices


def run_methods(methods: list[str], reference: ImageVolume, moving: ImageVolume, device: str,
                tile_size: int | None, progress: ProgressCallback, cancel: CancelToken,
                engines: dict[tuple, FusionEngine]) -> list[MethodRun]:
    """Each method's fusion of the pair, in turn (``engines`` caches loaded methods across runs)."""
    runs = []
    for name in methods:
        cancel.raise_if_cancelled()  # before loading: a method takes seconds to load, wasted once cancelled
        key = (name, reference.ndim, device, tile_size)
        if key not in engines:
            progress(f"load {name}", 0, 1)
            engines[key] = FusionEngine(load_method(name, spatial_dims=reference.ndim), device=device,
                                        tile_size=tile_size)
        result = engines[key].run_fusion(reference, moving, progress=lambda stage, done, total, n=name:
                                         progress(f"{n}: {stage}", done, total), cancel=cancel)
        runs.append(MethodRun(name, result))
    return runs


class MethodComparePanel(widgets.Container):
    def __init__(self, viewer, run_panel: RunPanel, annotation_panel=None) -> None:
        self.viewer = viewer
        self.run_panel = run_panel
        self.annotation_panel = annotation_panel
        # Choices follow the reference's dimensionality; a callable, since napari's reset_choices
        # (on every layer change) re-reads them.
        choices = self._choices()
        self.first = widgets.ComboBox(label="method", choices=self._choices, value="unifuse")
        self.second = widgets.ComboBox(label="versus", choices=self._choices,
                                       value="mmif-amin" if "mmif-amin" in choices else choices[1])
        self.run_button = widgets.PushButton(text="Run both")
        self.cancel_button = widgets.PushButton(text="Cancel", enabled=False)
        self.about = widgets.ComboBox(label="annotations about", choices=[self.first.value, self.second.value],
                                      tooltip="Flags made in the Annotate tab record this method")
        self.status = widgets.Label(value="")
        super().__init__(widgets=[
            self.first, self.second,
            widgets.Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
            self.about, self.status,
        ])
        self.worker = None
        self.runs: list[MethodRun] = []
        self._cancel: CancelToken | None = None
        self._engines: dict[tuple, FusionEngine] = {}
        self._released = False
        # Whether grid mode was on before the comparison turned it on; None while no comparison is side by side.
        self._grid_before_comparison: bool | None = None
        self._relay = ProgressRelay()
        self._relay.progressed.connect(self._show_progress)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.about.changed.connect(self._annotate_about)
        for combo in (self.first, self.second):
            combo.changed.connect(self._offer_about)
        run_panel.reference.changed.connect(self._match_dimensions)

    def _choices(self, _widget=None) -> list[str]:
        """The methods that take images of the reference's dimensionality (2D before there is one)."""
        name = self.run_panel.reference.value
        if not name or name not in self.viewer.layers:
            return method_choices(2)
        layer = self.viewer.layers[name]
        return method_choices(layer.ndim)  # napari counts an RGB image's spatial axes only

    def _match_dimensions(self, _value=None) -> None:
        for combo in (self.first, self.second):
            combo.reset_choices()

    def _offer_about(self, _value=None) -> None:
        self.about.choices = list(dict.fromkeys([self.first.value, self.second.value]))

    def _annotate_about(self, value=None) -> None:
        if self.annotation_panel is not None:
            self.annotation_panel.method.value = self.about.value

    @reports_errors(ACTION)
    def start(self) -> None:
        if self.worker is not None:
            raise InputError("a comparison is already running; wait for it or press Cancel")
        methods = list(dict.fromkeys([self.first.value, self.second.value]))
        selection = self.run_panel.selection()  # the clear message when the form is incomplete
        request = selection.request
        self._cancel = cancel = CancelToken()
        worker = create_worker(self._compute, methods, request, cancel)
        worker.returned.connect(lambda outcome: self._finish(outcome, selection))
        worker.finished.connect(self._finished)
        self.worker = worker
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = "starting…"
        worker.start()

    def _compute(self, methods, request, cancel) -> list[MethodRun] | WorkerFailed:
        try:
            return run_methods(methods, request.reference, request.moving, request.device, request.tile_size,
                               self._relay.progressed.emit, cancel, self._engines)
        except Exception as error:  # noqa: BLE001 - reported on the GUI thread by _finish
            return WorkerFailed(error, ACTION)

    def _show_progress(self, stage: str, done: int, total: int) -> None:
        self.status.value = f"{stage} {done}/{total}"

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
            self.status.value = "cancelling at the next tile…"

    def release(self) -> None:
        """The workbench is closing: cancel a running comparison, and let its result add nothing, for good."""
        self._released = True
        self.cancel()

    def _finished(self) -> None:
        self.worker, self._cancel = None, None
        self.run_button.enabled, self.cancel_button.enabled = True, False
        if not self.status.value.startswith("done"):  # `returned` (which says "done") comes before `finished`
            self.status.value = "stopped"

    def _finish(self, outcome: list[MethodRun] | WorkerFailed, selection) -> None:
        if self._released:  # closed while the worker ran: its viewer is no longer ours to change
            return
        if isinstance(outcome, WorkerFailed):
            report_error(outcome.error, outcome.action)
            return
        self.runs = outcome
        self.show(outcome, selection.reference_name, selection.moving_name)
        self.status.value = "done: " + ", ".join(
            f"{run.method} {sum(run.result.provenance['timings_s'].values()):.1f} s" for run in outcome)

    def show(self, runs: list[MethodRun], reference_name: str, moving_name: str) -> None:
        """Each run's fused and aligned layers, named by method, in grid mode side by side."""
        for run in runs:
            for role, volume in (("aligned", run.result.aligned), ("fused", run.result.fused)):
                name = f"{role} [{moving_name} → {reference_name}] · {run.method}"
                data, kwargs, _ = volume_to_layer_data(volume, name)
                info = kwargs["metadata"][LAYER_METADATA_KEY]
                info.update(role=OUTPUT_ROLE, method=run.method, provenance_method=run.result.provenance["method"])
                if name in self.viewer.layers:
                    self.viewer.layers.remove(name)
                self.viewer.add_image(data, **kwargs, visible=role == "fused")
            show_warnings(f"{run.method}: {warning}" for warning in run.result.warnings)
        if self._grid_before_comparison is None:  # a second comparison must not record the grid the first turned on
            self._grid_before_comparison = self.viewer.canvas.grid.enabled
        self.viewer.canvas.grid.enabled = True
        self._annotate_about()

    def leave_side_by_side(self) -> None:
        """Give grid mode back the state it had before a comparison turned it on (the main run's
        overlays must share its fused image's cell); nothing to do when no comparison is shown."""
        if self._grid_before_comparison is None:
            return
        self.viewer.canvas.grid.enabled = self._grid_before_comparison
        self._grid_before_comparison = None
