"""Two fusion methods on the same pair, one after the other, their layers side by side.

The workbench's "Methods" tab: pick a method and another to compare it with (``engine.methods``;
the method of the run form's checkpoint runs with it, e.g. a researcher's own UniFuse, the others
with their bundled weights), press "Run both". The pair, device and tile size are
the run form's. Each method's fused and aligned images become layers whose names end in
``· <method>``, with the method in their metadata, and napari's grid mode (``viewer.canvas.grid``) puts them side by side
(one grid cell per visible layer), so a reviewer can flick between methods. Only the comparison on
screen and its pair's inputs are visible: the layers of earlier comparisons, other pairs and the
main run are hidden, not deleted. The annotations made while comparing go to the compared pair's
run folder (``RunSelection.folder``, as for a main run of that pair) and record the method chosen
under "annotations about"; those about a method that ran with other weights than the form's
checkpoint (its bundled ones) go to the folder of a run of the pair with those weights, so that a
run of the form's checkpoint (the untrained model, say) never lists them as its own. A failed or
cancelled comparison ends in one notification, like the main run; once the workbench is closed
(:meth:`release`) a comparison still running adds nothing, and the main run puts the viewer back
out of grid mode (:meth:`leave_side_by_side`) so that its overlays sit on its fused image, hides
the comparison and takes the annotations back.

Nothing here computes: the engine fuses, in a napari worker thread, as for the main run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from magicgui import widgets
from napari.qt.threading import create_worker

from napari_unifuse._napari_io import LAYER_METADATA_KEY, layer_to_volume, volume_to_layer_data
from napari_unifuse._qt.analysis import UNTRAINED, RunRequest
from napari_unifuse._qt.notifications import WorkerFailed, report_error, reports_errors, show_warnings
from napari_unifuse._qt.outputs import ResultLayers
from napari_unifuse._qt.run_panel import (
    OUTPUT_ROLE,
    ProgressRelay,
    RunPanel,
    RunSelection,
    WorkerHandover,
    folder_of_run,
)
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.input_checks import model_dimensions
from napari_unifuse.engine.methods import OPTION_SEPARATOR, load_method, methods_for_dimensions, split_name
from napari_unifuse.engine.overlays import checkpoint_identity
from napari_unifuse.engine.progress import CancelToken, ProgressCallback
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume
from napari_unifuse.model.checkpoint import checkpoint_method, read_config

ACTION = "Compare methods"
# Alignment variants offered beside the plain names (engine.methods.split_name).
_VARIANTS = {"mmif-amin": ("sitk", "none")}


@dataclass(frozen=True)
class MethodRun:
    method: str
    result: FusionResult
    # The weights it ran with: the form's checkpoint, the method's bundled one (its name), or None
    # for a method without weights.
    checkpoint: str | None


def method_choices(ndim: int) -> list[str]:
    """Every method available for ``ndim``-D images, with the alignment variants that exist."""
    choices = []
    for name in methods_for_dimensions(ndim):
        choices.append(name)
        choices += [f"{name}{OPTION_SEPARATOR}{option}" for option in _VARIANTS.get(name, ())]
    return choices


def run_methods(methods: list[str], reference: ImageVolume, moving: ImageVolume, device: str,
                tile_size: int | None, progress: ProgressCallback, cancel: CancelToken,
                engines: dict[tuple, FusionEngine], checkpoint: str = UNTRAINED,
                moving_modality: str = "auto") -> list[MethodRun]:
    """Each method's fusion of the pair, in turn (``engines`` caches loaded methods across runs),
    the moving image taken as ``moving_modality`` (the run form's), as the main run takes it.

    ``checkpoint``: the run form's; the method its weights belong to runs with them (a researcher's
    own UniFuse is compared as trained, not the bundled one; weights for other dimensions than the
    pair's are refused), every other with its bundled weights.
    A one-slice volume is compared as the 2D image it is, as the main run fuses it
    (``engine.input_checks.model_dimensions``)."""
    runs = []
    dims = model_dimensions(reference)
    # Before any method loads or runs: a refused checkpoint is named at once, not after the other method ran.
    weights_of = {name: _form_weights_for(name, checkpoint, dims) for name in methods}
    for name in methods:
        cancel.raise_if_cancelled()  # before loading: a method takes seconds to load, wasted once cancelled
        weights = weights_of[name]
        # A checkpoint file retrained in place is another model (engine.overlays.checkpoint_identity).
        key = (name, weights and checkpoint_identity(weights), dims, device, tile_size)
        if key not in engines:
            progress(f"load {name}", 0, 1)
            engines[key] = FusionEngine(load_method(name, checkpoint=weights, spatial_dims=dims),
                                        device=device, tile_size=tile_size)
        result = engines[key].run_fusion(reference, moving, moving_modality=moving_modality,
                                         progress=lambda stage, done, total, n=name: progress(f"{n}: {stage}", done,
                                                                                              total), cancel=cancel)
        runs.append(MethodRun(name, result, engines[key].method.checkpoint_name))
    return runs


def _form_weights_for(name: str, checkpoint: str, spatial_dims: int) -> str | None:
    """``checkpoint`` when it holds weights of method ``name``, else None (the method's bundled
    weights). Weights of ``name`` for other than ``spatial_dims``-D images are refused, as the main
    run refuses them: comparing the bundled ones instead would pass them off as the researcher's."""
    if checkpoint == UNTRAINED or checkpoint_method(checkpoint) != split_name(name)[0]:
        return None
    trained_for = read_config(checkpoint).spatial_dims
    if trained_for != spatial_dims:
        raise InputError(f"this checkpoint is a {trained_for}D model but the images are {spatial_dims}D; "
                         f"choose a {spatial_dims}D checkpoint in the run form", checkpoint)
    return checkpoint


class MethodComparePanel(widgets.Container):
    def __init__(self, viewer, run_panel: RunPanel, results: ResultLayers, annotation_panel=None) -> None:
        self.viewer = viewer
        self.run_panel = run_panel
        self.results = results  # the main run's layers, whose fade or flicker a comparison ends
        self.annotation_panel = annotation_panel
        # Called once the Annotate tab lists the flags of a method compared (the workbench's: notes
        # about the main run's flags go while another folder's are listed).
        self.on_flags_shown: Callable[[], None] | None = None
        # Choices follow the reference's dimensionality; a callable, since napari's reset_choices
        # (on every layer change) re-reads them.
        choices = self._choices()
        self.first = widgets.ComboBox(label="method", choices=self._choices, value="unifuse")
        self.second = widgets.ComboBox(label="versus", choices=self._choices,
                                       value="mmif-amin" if "mmif-amin" in choices else choices[1])
        self.run_button = widgets.PushButton(text="Run both")
        self.cancel_button = widgets.PushButton(text="Cancel", enabled=False)
        # Lists the methods whose outputs are on screen: the comparison's, or the main run's after it.
        self.about = widgets.ComboBox(label="annotations about", choices=[],
                                      tooltip="Flags made in the Annotate tab record this method; while a "
                                              "comparison is on screen they go to the compared pair's run folder "
                                              "of the weights this method ran with")
        self.status = widgets.Label(value="")
        super().__init__(widgets=[
            self.first, self.second,
            widgets.Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
            self.about, self.status,
        ])
        self.worker = None
        self._comparing: RunSelection | None = None  # the pair being compared, until its worker finishes
        self.runs: list[MethodRun] = []
        self._cancel: CancelToken | None = None
        self._engines: dict[tuple, FusionEngine] = {}
        self._released = False
        # Whether grid mode was on before the comparison turned it on; None while no comparison is side by side.
        self._grid_before_comparison: bool | None = None
        # The pair of the comparison on screen (annotations go to its run folder); None when there is none.
        self.compared: RunSelection | None = None
        # Names of the layers other than comparison outputs that showing a comparison hid, shown again
        # when it leaves (names, not layers: a layer the reviewer deletes meanwhile must be freed).
        self._hidden_for_comparison: list[str] = []
        self._relay = ProgressRelay()
        self._relay.progressed.connect(self._show_progress)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.about.changed.connect(self._annotate_about)
        run_panel.reference.changed.connect(self._match_dimensions)

    def _choices(self, _widget=None) -> list[str]:
        """The methods that take images of the reference's dimensionality (2D before there is one;
        a one-slice volume is the 2D image it is, as ``run_methods`` compares it)."""
        name = self.run_panel.reference.value
        if not name or name not in self.viewer.layers:
            return method_choices(2)
        layer = self.viewer.layers[name]
        try:
            return method_choices(model_dimensions(layer_to_volume(layer)))
        except InputError:  # a layer the comparison will refuse, with its message then
            # napari counts an RGB image's spatial axes only; a 4-D series (DWI, fMRI) gets the 2D
            # list, as no method takes it: an empty list would leave the combo boxes no value.
            return method_choices(layer.ndim if layer.ndim in (2, 3) else 2)

    def _match_dimensions(self, _value=None) -> None:
        for combo in (self.first, self.second):
            combo.reset_choices()
        # A "versus" that the new dimensionality does not offer falls back to the first choice, which
        # may be "method" itself: there would be nothing to compare.
        if self.second.value == self.first.value:
            self.second.value = next((name for name in self.second.choices if name != self.first.value),
                                     self.second.value)

    @reports_errors("Annotations about")
    def _annotate_about(self, _value=None) -> None:
        """Point the Annotate tab at the run folder of the compared pair and the weights the method
        chosen ran with (:meth:`_flag_folder`) and at that method, drawn on its fused layer, or
        another image on the reference grid where the reviewer deleted it; nothing while no
        comparison is on screen (flags stay where they are)."""
        if self.annotation_panel is None or self.compared is None or not self.about.value:
            return
        compared, about = self.compared, self.about.value
        on_reference_grid = [self._layer_name("fused", about, compared), compared.reference_name,
                             *(self._layer_name(role, run.method, compared) for run in self.runs
                               for role in ("fused", "aligned"))]
        grid_layer = next((name for name in on_reference_grid if name in self.viewer.layers), None)
        if grid_layer is None:
            raise InputError(f"the reference and every image of this comparison were deleted, so flags still record "
                             f"{self.annotation_panel.method.value}; run the comparison again to flag {about}")
        (run,) = (run for run in self.runs if run.method == about)
        folder = self._flag_folder(run, compared)
        self.annotation_panel.set_run(
            folder, folder.parent, self.viewer.layers[grid_layer],
            subject="comparison", pair=(compared.reference_name, compared.moving_name),
            pair_arrays=(compared.request.reference.array, compared.request.moving.array))
        self.annotation_panel.method.value = about
        if self.on_flags_shown is not None:
            self.on_flags_shown()

    @staticmethod
    def _flag_folder(run: MethodRun, compared: RunSelection) -> Path:
        """Where flags about ``run`` go: the compared pair's run folder where the method ran with the
        form's checkpoint or with no weights; else the folder a run of the pair with the weights it
        ran with gets (``RunPanel.selection``: the same inputs, tile size, degradation and modality)."""
        if run.checkpoint is None or run.checkpoint == compared.request.checkpoint:
            return compared.folder
        return folder_of_run(compared.request, compared.folder.parent, compared.reference_name,
                             compared.moving_name, run.checkpoint)

    @staticmethod
    def _layer_name(role: str, method: str, selection: RunSelection) -> str:
        return f"{role} [{selection.moving_name} → {selection.reference_name}] · {method}"

    @reports_errors(ACTION)
    def start(self) -> None:
        if self.worker is not None:
            raise InputError("a comparison is already running; wait for it or press Cancel")
        if self.first.value == self.second.value:
            raise InputError(f"'method' and 'versus' are both {self.first.value}; choose two different methods "
                             "to compare", "Methods")
        methods = [self.first.value, self.second.value]
        selection = self.run_panel.selection()  # the clear message when the form is incomplete
        self._cancel = cancel = CancelToken()
        self._comparing = selection
        # napari keeps every worker with its function, arguments and slots until the viewer closes:
        # a static function, the pair handed over (not kept as an argument) and bound-method slots
        # (held weakly) leave a finished worker holding neither the inputs nor this panel.
        worker = create_worker(self._compute, methods, WorkerHandover((selection.request, cancel, self._engines)),
                               self._relay.progressed.emit)
        worker.returned.connect(self._finish)
        worker.finished.connect(self._finished)
        self.worker = worker
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = "starting…"
        worker.start()

    @staticmethod
    def _compute(methods: list[str], handover: WorkerHandover[tuple[RunRequest, CancelToken, dict[tuple, FusionEngine]]],
                 progress: ProgressCallback) -> list[MethodRun] | WorkerFailed:
        request, cancel, engines = handover.take()
        try:
            return run_methods(methods, request.reference, request.moving, request.device, request.tile_size,
                               progress, cancel, engines, request.checkpoint, request.moving_modality)
        except Exception as error:  # noqa: BLE001 - reported on the GUI thread by _finish
            return WorkerFailed(error, ACTION)

    def _show_progress(self, stage: str, done: int, total: int) -> None:
        if self._released:  # the comparison is being cancelled and the tab may be gone with the window
            return
        self.status.value = f"{stage} {done}/{total}"

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
            self.status.value = "cancelling at the next step…"

    def release(self) -> None:
        """The workbench is closing: cancel a running comparison, and let its result add nothing, for good."""
        self._released = True
        self.cancel()

    def _finished(self) -> None:
        self.worker, self._cancel, self._comparing = None, None, None
        if self._released:  # the tab may have been deleted with the viewer's window
            return
        self.run_button.enabled, self.cancel_button.enabled = True, False
        if not self.status.value.startswith("done"):  # `returned` (which says "done") comes before `finished`
            self.status.value = "stopped"

    def _finish(self, outcome: list[MethodRun] | WorkerFailed) -> None:
        if self._released:  # closed while the worker ran: its viewer is no longer ours to change
            return
        selection = self._comparing.under_current_names()  # its layers may have been renamed while it ran
        if isinstance(outcome, WorkerFailed):
            report_error(outcome.error, outcome.action)
            return
        self.runs = outcome
        self.show(outcome, selection)
        self.status.value = "done: " + ", ".join(
            f"{run.method} {sum(run.result.provenance['timings_s'].values()):.1f} s" for run in outcome)

    def show(self, runs: list[MethodRun], selection: RunSelection) -> None:
        """Each run's fused and aligned layers, named by method, in grid mode side by side with the
        pair's inputs; every other layer hidden, so that no earlier comparison shares the grid. A fade
        or flicker of the main run ends first: it would hide the comparison, and later show the main
        run's layers in its grid."""
        self.results.stop_flicker()
        for run in runs:
            for role, volume in (("aligned", run.result.aligned), ("fused", run.result.fused)):
                name = self._layer_name(role, run.method, selection)
                data, kwargs, _ = volume_to_layer_data(volume, name)
                info = kwargs["metadata"][LAYER_METADATA_KEY]
                info.update(role=OUTPUT_ROLE, method=run.method, provenance_method=run.result.provenance["method"])
                if name in self.viewer.layers:
                    self.viewer.layers.remove(name)
                self.viewer.add_image(data, **kwargs, visible=role == "fused")
            show_warnings(f"{run.method}: {warning}" for warning in run.result.warnings)
        self._show_only({selection.reference_name, selection.moving_name,
                         *(self._layer_name("fused", run.method, selection) for run in runs)})
        if self._grid_before_comparison is None:  # a second comparison must not record the grid the first turned on
            self._grid_before_comparison = self.viewer.canvas.grid.enabled
        self.viewer.canvas.grid.enabled = True
        self.compared = selection
        self.about.choices = [run.method for run in runs]
        self._annotate_about()  # also when the choices kept their value (no `changed`): the pair may be new

    def _show_only(self, names: set[str]) -> None:
        for layer in self.viewer.layers:
            if layer.name in names:
                layer.visible = True  # an earlier comparison of another pair may have hidden these inputs
            elif layer.visible:
                layer.visible = False
                if not _is_comparison_output(layer):
                    self._hidden_for_comparison.append(layer.name)

    def leave_side_by_side(self, main_method: str) -> None:
        """The main run (of ``main_method``) takes the screen: end a fade or flicker, hide every
        comparison's layers, show again what the comparison hid, give grid mode back the state it
        had before a comparison turned it on (the main run's overlays must share its fused image's
        cell) and offer the main run's method under "annotations about", which the main run's flags
        record."""
        self.results.stop_flicker()  # first: ending it later would turn back on the grid mode it left
        self.compared = None  # the choices below must not point the annotations at the comparison
        self.about.choices = [main_method]
        for layer in self.viewer.layers:
            if _is_comparison_output(layer):
                layer.visible = False
        for name in self._hidden_for_comparison:
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = True
        self._hidden_for_comparison = []
        if self._grid_before_comparison is None:
            return
        self.viewer.canvas.grid.enabled = self._grid_before_comparison
        self._grid_before_comparison = None


def _is_comparison_output(layer) -> bool:
    """Whether ``layer`` is a fused or aligned image that :meth:`MethodComparePanel.show` added."""
    return "method" in layer.metadata.get(LAYER_METADATA_KEY, {})
