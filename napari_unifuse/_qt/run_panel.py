"""The "what to run" form: inputs, checkpoint, task, device, tiling, output folder, Run / Cancel."""

from __future__ import annotations

import weakref
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from magicgui import widgets
from napari.layers import Image
from napari.utils.notifications import show_warning
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QSizePolicy

from napari_unifuse._napari_io import layer_to_volume
from napari_unifuse._qt.analysis import UNTRAINED, RunRequest
from napari_unifuse._qt.collapsible import collapsible_section
from napari_unifuse._qt.notifications import reports_errors
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.annotations import ANNOTATIONS_FILE, AnnotationStore
from napari_unifuse.engine.device import DEVICE_CHOICES
from napari_unifuse.engine.input_checks import model_dimensions
from napari_unifuse.engine.overlays import (
    grid_fingerprint,
    input_fingerprint,
    path_keyed_input_fingerprint,
    path_keyed_run_folder,
    run_folder,
)
from napari_unifuse.errors import InputError, UniFuseError
from napari_unifuse.io import ImageVolume, read_image
from napari_unifuse.io.digests import LAYER_DIGESTS
from napari_unifuse.io.normalize import MODALITIES, WITHOUT_FILE
from napari_unifuse.io.readers import readable_format
from napari_unifuse.model.checkpoint import list_checkpoints, read_config, resolve_checkpoint

if TYPE_CHECKING:
    import napari.viewer

PLUGIN = "napari-unifuse"
FROM_FILE = "from file…"
NO_LABEL = "none"
# metadata["unifuse"]["role"] of sample-data layers, and of the layers a run adds.
INPUT_ROLES = ("reference", "moving", "label")
OUTPUT_ROLE = "output"
DEFAULT_RUNS_ROOT = Path("~/napari-unifuse-runs")
# Tile sides offered; "auto" leaves the tiling to the engine (None): a 2-D checkpoint's training crop, one pass in 3-D.
TILE_CHOICES = [("auto", None), *((str(side), side) for side in (32, 48, 64, 96, 128, 160, 192, 256, 384, 512))]


class ProgressRelay(QObject):
    """Carries ``progress(stage, done, total)`` from a worker thread to the GUI thread."""

    progressed = Signal(str, int, int)


HandedOver = TypeVar("HandedOver")


class WorkerHandover(Generic[HandedOver]):
    """What a worker thread needs (input volumes, a run's result), given to it by reference once.

    napari's activity registry keeps every worker it ever created, and a function worker keeps the
    arguments it was created with, until the viewer closes: passed directly, every run's inputs and
    every report's result would stay in memory. The worker :meth:`take` s the contents, which
    empties the handover, so that a finished worker holds nothing but this empty box.
    """

    def __init__(self, contents: HandedOver) -> None:
        self._contents: HandedOver | None = contents

    def take(self) -> HandedOver:
        contents, self._contents = self._contents, None
        return contents


@dataclass(frozen=True)
class RunSelection:
    """The run the form describes: the request and the folder its outputs and annotations live in."""

    request: RunRequest
    reference_name: str
    moving_name: str
    folder: Path
    # The (reference, moving) layers, weakly (a deleted layer is let go), to follow them through renames.
    layers: tuple[weakref.ref, weakref.ref]

    def under_current_names(self) -> RunSelection:
        """This selection under its layers' names now: a layer renamed since (while it ran) is still this run's."""
        current = [layer.name if (layer := ref()) is not None else name
                   for ref, name in zip(self.layers, (self.reference_name, self.moving_name), strict=True)]
        return replace(self, reference_name=current[0], moving_name=current[1])


@dataclass(frozen=True)
class PairExtras:
    """The ground truth, the declared degradation and the moving image's modality chosen for one
    (reference, moving) pair; the layers are held weakly (a deleted layer is let go) and followed
    through renames."""

    reference: weakref.ref
    moving: weakref.ref
    ground_truth: weakref.ref | None
    degradation: str
    moving_modality: str = "auto"

    def is_of(self, reference: Image, moving: Image) -> bool:
        return self.reference() is reference and self.moving() is moving

    def is_of_a_deleted_layer(self) -> bool:
        return self.reference() is None or self.moving() is None

    def ground_truth_among(self, offered: list[str]) -> str:
        """The ground truth's name now if it is among the ``offered`` layer names; NO_LABEL otherwise."""
        layer = self.ground_truth() if self.ground_truth is not None else None
        return layer.name if layer is not None and layer.name in offered else NO_LABEL


class RunPanel(widgets.Container):
    """The run form: inputs, checkpoint and Run on top; the rest in a collapsed *Advanced* section.

    Follows the viewer's layer list; call :meth:`disconnect_viewer` when the workbench closes.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.reference = widgets.ComboBox(label="reference", choices=self._image_layer_names,
                                          tooltip="High-quality reference image layer")
        self.moving = widgets.ComboBox(label="moving", choices=self._image_layer_names,
                                       tooltip="Degraded, misaligned image to align, restore and fuse")
        # Nullable: an emptied box is None, not Path("") (the working directory, read as a DICOM folder).
        self.open_reference = widgets.FileEdit(label="open reference", mode="r", nullable=True)
        self.open_moving = widgets.FileEdit(label="open moving", mode="r", nullable=True)
        self.ground_truth = widgets.ComboBox(label="ground truth", choices=self._label_choices, value=NO_LABEL,
                                      tooltip="Optional: the clean, aligned moving image (synthetic pairs, "
                                              "sample data); enables true error maps and label metrics")
        bundled = list_checkpoints(method="unifuse")  # other methods: the Methods tab (method_compare)
        self.checkpoint = widgets.ComboBox(
            label="checkpoint", choices=[*bundled, UNTRAINED, FROM_FILE], value=bundled[0] if bundled else UNTRAINED,
            tooltip=f"'{UNTRAINED}' has random weights: for trying the workbench only, its outputs mean nothing")
        self.checkpoint_file = widgets.FileEdit(label="checkpoint file", mode="r", filter="*.safetensors", visible=False,
                                                nullable=True)
        self.task = widgets.ComboBox(label="degradation", choices=("auto", *DEGRADATION_CLASSES), value="auto",
                                     tooltip="The moving image's degradation if you know it (recorded, and "
                                             "compared with the model's estimate)")
        self.moving_modality = widgets.ComboBox(
            label="moving modality", choices=MODALITIES, value="auto",
            tooltip="What the moving image is, where its file does not say: a colour image does not tell PET from "
                    "SPECT (auto = its header's modality, else read from its intensities)")
        self.device = widgets.ComboBox(label="device", choices=DEVICE_CHOICES, value="auto",
                                       tooltip="auto = CUDA when a GPU is present, else CPU")
        self.tile_size = widgets.ComboBox(label="tile size", choices=TILE_CHOICES, value=None,
                                          tooltip="Voxels per tile side; auto = the size a 2-D checkpoint was trained "
                                                  "on; otherwise, 3-D volumes included, one pass up to 176³ voxels, "
                                                  "beyond that the fewest overlapping slabs")
        self.output_root = widgets.FileEdit(label="runs folder", mode="d", value=str(DEFAULT_RUNS_ROOT.expanduser()),
                                            tooltip="Each run gets its own sub-folder, derived from the inputs, checkpoint, "
                                                    "tile size, degradation and modality, so reopening a run finds its "
                                                    "annotations")
        self.folder_label = widgets.Label(label="run folder")
        self.folder_label.native.setWordWrap(True)
        # A long path is one unbreakable word: let the dock's width, not the path, set the label's.
        self.folder_label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.run_button = widgets.PushButton(text="Run UniFuse")
        self.cancel_button = widgets.PushButton(text="Cancel", enabled=False)
        self.progress = widgets.ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = widgets.Label(value="")
        super().__init__(widgets=[
            self.reference, self.open_reference, self.moving, self.open_moving, self.checkpoint, self.checkpoint_file,
            widgets.Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
            self.progress, self.status,
        ])
        # What a first run does not need: the defaults work, and the settings stay one click away.
        self.advanced_settings = widgets.Container(widgets=[
            self.ground_truth, self.task, self.moving_modality, self.device, self.tile_size, self.output_root,
            self.folder_label])
        self.advanced = collapsible_section("Advanced", self.advanced_settings.native)
        self.native.layout().insertWidget(self.index(self.checkpoint_file) + 1, self.advanced)
        self._open_from(self.open_reference, self.reference)
        self._open_from(self.open_moving, self.moving)
        self.checkpoint.changed.connect(lambda value: setattr(self.checkpoint_file, "visible", value == FROM_FILE))
        self.reference.changed.connect(self._match_checkpoint_to_reference)
        # The ground truth, the declared degradation and the modality belong to the pair they were chosen
        # for, and come back with it: going back to a pair must not silently score it without its ground truth.
        self._extras_of_pairs: list[PairExtras] = []
        for extra in (self.ground_truth, self.task, self.moving_modality):
            extra.changed.connect(self._remember_extras_of_pair)
        for image in (self.reference, self.moving):
            image.changed.connect(self._recall_extras_of_pair)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        viewer.layers.events.moved.connect(self._refresh_layer_choices)
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.layers.events.renamed.connect(self._follow_renamed_layer)
        # (reference, moving) layer names of the last run shown (the workbench sets it): once that
        # pair is done, the next image opened starts the next pair.
        self.last_run_pair: tuple[str, str] | None = None
        # Earlier versions' run folders whose flags the reviewer was told of: once each, not at every keystroke.
        self._told_of_earlier_flags: set[Path] = set()
        self._choose_default_layers()

    def disconnect_viewer(self) -> None:
        layer_events = self.viewer.layers.events
        layer_events.removed.disconnect(self._on_layer_removed)
        layer_events.moved.disconnect(self._refresh_layer_choices)
        layer_events.inserted.disconnect(self._on_layer_inserted)
        layer_events.renamed.disconnect(self._follow_renamed_layer)

    # ---- layer choices -------------------------------------------------------------------------
    def _image_layer_names(self, _widget=None) -> list[str]:
        """The image layers a run may take: not a run's own outputs (a saved result reopened from its file is offered)."""
        return [layer.name for layer in self.viewer.layers if isinstance(layer, Image) and _role(layer) != OUTPUT_ROLE]

    def _label_choices(self, _widget=None) -> list[str]:
        return [NO_LABEL, *self._image_layer_names()]

    def _refresh_layer_choices(self, _event=None) -> None:
        for combo in (self.reference, self.moving, self.ground_truth):
            combo.reset_choices()

    def _on_layer_removed(self, _event=None) -> None:
        """A box whose layer was deleted takes the default pair: the first layer left, which the box
        would take by itself, may belong to another pair, and the next image opened would not replace it."""
        chosen = (self.reference.value, self.moving.value)
        self._refresh_layer_choices()
        if any(name not in self.reference.choices for name in chosen):
            self._choose_default_layers()

    def _follow_renamed_layer(self, event) -> None:
        """A layer renamed in the layer list stays chosen wherever it was, under its new name.

        The boxes hold names: the one that left the layer list is the renamed layer's old name. Its
        boxes change without signals while the old name is gone from the choices (it would pass
        through another layer, which counts as another pair and resets the ground truth), then say
        once that they now hold the new name."""
        renamed = self.viewer.layers[event.index]
        current = set(self._image_layer_names())
        gone = [name for name in self.reference.choices if name not in current]
        if not isinstance(renamed, Image) or len(gone) != 1:
            self._refresh_layer_choices()
            return
        old, new = gone[0], renamed.name
        following = [combo for combo in (self.reference, self.moving, self.ground_truth) if combo.value == old]
        with ExitStack() as quiet:
            for combo in following:
                quiet.enter_context(combo.changed.blocked())
            self._refresh_layer_choices()
            for combo in following:
                combo.value = new
        if self.last_run_pair is not None:
            self.last_run_pair = _renamed_pair(self.last_run_pair, old, new)
        for combo in following:
            combo.changed.emit(combo.value)

    def _on_layer_inserted(self, event) -> None:
        self._refresh_layer_choices()
        layer = event.value
        if _role(layer) in INPUT_ROLES:  # a sample pair arrived: offer it
            self._choose_default_layers()
        elif not isinstance(layer, Image) or _role(layer) == OUTPUT_ROLE:
            return
        elif self.reference.value == self.moving.value:
            # The first image opened into an empty viewer fills both boxes: the next one is the moving image.
            self.moving.value = layer.name
        elif (self.reference.value, self.moving.value) == self.last_run_pair:
            # File > Open or a drop after a run brings the next pair: Run must not silently re-fuse the
            # last one. As in an empty viewer, this image fills both boxes and the next one is the moving.
            self.reference.value = self.moving.value = layer.name

    def _choose_default_layers(self) -> None:
        """Pick layers by the role sample data record (reference / moving / label); otherwise the
        first two image layers that are not our own outputs, in the order `unifuse view` opens them."""
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        by_role = {_role(layer): layer.name for layer in images if _role(layer)}
        if "reference" in by_role and "moving" in by_role:
            self.reference.value, self.moving.value = by_role["reference"], by_role["moving"]
            self.ground_truth.value = by_role.get("label", NO_LABEL)
            degradation = _unifuse_metadata(self.viewer.layers[by_role["moving"]]).get("degradation")
            if degradation in self.task.choices:
                self.task.value = degradation
        else:
            # A ground truth (a sample pair's moving image deleted) is never a default input.
            names = [layer.name for layer in images if _role(layer) not in (OUTPUT_ROLE, "label")]
            if len(names) >= 2:
                self.reference.value, self.moving.value = names[0], names[1]
        self._match_checkpoint_to_reference()  # `changed` does not fire when the value stays

    def _chosen_pair(self, layers: dict[str, Image]) -> tuple[Image, Image] | None:
        if self.reference.value not in layers or self.moving.value not in layers:
            return None
        return layers[self.reference.value], layers[self.moving.value]

    def _remember_extras_of_pair(self, _value=None) -> None:
        layers = _image_layers_by_name(self.viewer)
        pair = self._chosen_pair(layers)
        if pair is None:
            return
        kept = [extras for extras in self._extras_of_pairs
                if not extras.is_of_a_deleted_layer() and not extras.is_of(*pair)]
        ground_truth = layers.get(self.ground_truth.value)
        self._extras_of_pairs = [*kept, PairExtras(weakref.ref(pair[0]), weakref.ref(pair[1]),
                                                   None if ground_truth is None else weakref.ref(ground_truth),
                                                   self.task.value, self.moving_modality.value)]

    def _recall_extras_of_pair(self, _value=None) -> None:
        """Another pair chosen: the ground truth, degradation and modality chosen for it before, or none
        and auto for a pair never chosen (the last pair's, a sample's say, would score it against an
        unrelated image)."""
        pair = self._chosen_pair(_image_layers_by_name(self.viewer))
        extras = next((extras for extras in self._extras_of_pairs if pair is not None and extras.is_of(*pair)), None)
        ground_truth, degradation, modality = (NO_LABEL, "auto", "auto") if extras is None else (
            extras.ground_truth_among(self._image_layer_names()), extras.degradation, extras.moving_modality)
        self.ground_truth.value, self.task.value, self.moving_modality.value = ground_truth, degradation, modality

    def _match_checkpoint_to_reference(self, _value=None) -> None:
        """Offer the bundled checkpoint of the reference's dimensionality, unless the user chose
        something else than a bundled one (a file, the untrained preset)."""
        bundled_dims = {name: read_config(name).spatial_dims for name in list_checkpoints(method="unifuse")}
        if self.checkpoint.value not in bundled_dims or not self.reference.value:
            return
        try:  # a one-slice volume is fused as the 2D image it is (engine.input_checks.model_dimensions)
            ndim = model_dimensions(layer_to_volume(self.viewer.layers[self.reference.value]))
        except InputError:
            return  # a layer the run will refuse, with its message then
        if bundled_dims[self.checkpoint.value] != ndim:
            matching = [name for name, dims in bundled_dims.items() if dims == ndim]
            if matching:
                self.checkpoint.value = matching[0]

    def _open_from(self, box: widgets.FileEdit, combo: widgets.ComboBox) -> None:
        """Open what ``box`` names into ``combo``: a path chosen in the dialog at once, a typed one when
        typing ends (Return, or leaving the box), not every partial path as it is typed ("/" is a folder)."""
        line = box.line_edit.native

        def chosen(path: Path | None) -> None:
            if not line.isModified():  # set by the dialog or by code, not being typed
                self._open_into(path, combo)

        def typed() -> None:
            if line.isModified():  # leaving the box unedited opens nothing again
                line.setModified(False)
                self._open_into(box.value, combo)

        box.changed.connect(chosen)
        line.editingFinished.connect(typed)

    @reports_errors("Open image")
    def _open_into(self, path: Path | None, combo: widgets.ComboBox) -> None:
        if path is None:  # the box was emptied
            return
        readable_format(path)  # a typo'd path: the reader's "file not found", not silence
        other = self.moving if combo is self.reference else self.reference
        kept = other.value
        try:
            layers = self.viewer.open(str(path), plugin=PLUGIN)
        except ValueError as error:  # napari found no reader of ours for the file, or ours refused it
            read_image(path)  # the reader's own reason, when it refuses the content
            # Readable, so napari did not offer our reader for this file name (a DICOM file named unusually).
            raise InputError("napari has no compatible UniFuse reader for this file name; if it is a DICOM file, "
                             "rename it to end in .dcm and open it again", path) from error
        if layers:
            self._refresh_layer_choices()
            combo.value = layers[0].name
            # Offered in the other box too on arrival: that box keeps the image it had.
            if other.value == combo.value and kept in other.choices:
                other.value = kept

    # ---- the run described by the form ---------------------------------------------------------
    def checkpoint_choice(self) -> str:
        if self.checkpoint.value != FROM_FILE:
            return self.checkpoint.value
        if self.checkpoint_file.value is None:
            raise InputError("choose a .safetensors checkpoint file, or a bundled checkpoint", "checkpoint")
        # The CLI's reason for a path that is no checkpoint file: deleted since it was chosen, a folder.
        return str(resolve_checkpoint(self.checkpoint_file.value))

    def selection(self) -> RunSelection:
        """The validated request; raises InputError naming the layer for anything unusable."""
        for name in (self.reference.value, self.moving.value):
            if name in self.viewer.layers and _role(self.viewer.layers[name]) == OUTPUT_ROLE:
                raise InputError("this layer is an output of a run, not an image to fuse; to fuse a saved result "
                                 "again, open the file", name)
        names = self._image_layer_names()
        # While a chosen layer is being deleted, the combo boxes still name it: as good as unchosen.
        if self.reference.value not in names or self.moving.value not in names:
            raise InputError("open or choose a reference and a moving image layer first")
        if self.reference.value == self.moving.value:
            raise InputError("the reference and the moving image are the same layer; choose two images",
                             self.reference.value)
        reference = self._volume(self.reference.value)
        moving = self._volume(self.moving.value)
        checkpoint = self.checkpoint_choice()
        if self.ground_truth.value not in (None, NO_LABEL, *names):
            raise InputError("the ground-truth layer was deleted; choose another or 'none'", self.ground_truth.value)
        label = None if self.ground_truth.value in (None, NO_LABEL) else self._volume(self.ground_truth.value)
        request = RunRequest(reference, moving, checkpoint, self.device.value, self.tile_size.value, self.task.value,
                             label, self.moving_modality.value)
        folder = folder_of_run(request, self.output_root.value, self.reference.value, self.moving.value, checkpoint)
        self._tell_of_earlier_version_flags(request, folder, checkpoint)
        layers = (weakref.ref(self.viewer.layers[self.reference.value]), weakref.ref(self.viewer.layers[self.moving.value]))
        return RunSelection(request, self.reference.value, self.moving.value, folder, layers)

    def _tell_of_earlier_version_flags(self, request: RunRequest, folder: Path, checkpoint: str) -> None:
        """Say, once, where an earlier version keeps flags on these inputs that ``folder`` lacks: they
        are not listed with this run, and a reviewer who upgraded must not take them for lost."""
        inputs = (self._as_known_up_to_2026_12_06(request.reference, self.reference.value),
                  self._as_known_up_to_2026_12_06(request.moving, self.moving.value))
        earlier = earlier_version_flags_folder(inputs, folder, self.reference.value, self.moving.value, checkpoint)
        if earlier is None or earlier in self._told_of_earlier_flags:
            return
        self._told_of_earlier_flags.add(earlier)
        show_warning(f"Flags on these images made by an earlier version of the workbench (before 2026-12-06, which "
                     f"knew a run by its files' paths only) are in {earlier / ANNOTATIONS_FILE}; they are not listed "
                     f"with this run, whose flags go to {folder}, because that version did not record what the "
                     f"files held. If the files are unchanged since, add that file's lines to "
                     f"{folder / ANNOTATIONS_FILE} (or copy it there) to list them here.")

    def _volume(self, name: str) -> ImageVolume:
        layer = self.viewer.layers[name]
        volume = layer_to_volume(layer)  # InputError for 4D and other non-2D/3D layers
        if volume.source is None:
            volume.source = name  # names the layer in messages and provenance
            volume.metadata[WITHOUT_FILE] = True  # still no file: its 8 bits are a picture's
        return volume

    def _as_known_up_to_2026_12_06(self, volume: ImageVolume, name: str) -> ImageVolume:
        """``volume``, of the layer ``name``, as the workbench up to 2026-12-06 knew it: without the
        file napari's own reader (or another plugin's) opened it from, which those versions did not
        look for, so that they keyed its run folder by the layer's name and pixels."""
        return volume if _unifuse_metadata(self.viewer.layers[name]) else replace(volume, source=None)

    def set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        if running:
            self.progress.value = 0


def folder_of_run(request: RunRequest, root: str | Path, reference_name: str, moving_name: str,
                  checkpoint: str | None) -> Path:
    """The run folder under ``root`` of ``request``'s pair run with ``checkpoint``.

    The ground truth only adds metrics and an error map (a Save replaces them) and the device only
    the rounding: the same flags hold for those runs. The tile size, the declared degradation and the
    moving image's modality change the saved fused image or provenance, which another run's report
    must not sit beside (each left at auto is not hashed: the folder of a run on the defaults stays). A
    folder made before 2026-12-07 for a file napari's own reader opened (keyed by its grid) is reused."""
    inputs = (request.reference, request.moving)
    return run_folder(root, reference_name, moving_name, checkpoint,
                      tuple(input_fingerprint(volume, LAYER_DIGESTS) for volume in inputs),
                      {"tile size": request.tile_size, "degradation": request.task,
                       "moving modality": request.moving_modality},
                      earlier_fingerprints=tuple(grid_fingerprint(volume, LAYER_DIGESTS) for volume in inputs))


def earlier_version_flags_folder(inputs: tuple[ImageVolume, ImageVolume], folder: Path, reference_name: str,
                                 moving_name: str, checkpoint: str) -> Path | None:
    """The run folder the workbench up to 2026-12-06 gave this pair (``inputs``: the reference and
    moving image as it knew them) and checkpoint (``overlays.path_keyed_run_folder``), where it
    holds flags that ``folder`` (today's) does not; None otherwise. Flags it cannot read count as
    not held, so that the reviewer is told of them."""
    earlier = path_keyed_run_folder(folder.parent, checkpoint, (
        path_keyed_input_fingerprint(inputs[0], reference_name, LAYER_DIGESTS),
        path_keyed_input_fingerprint(inputs[1], moving_name, LAYER_DIGESTS)))
    if earlier is None or earlier == folder or not (earlier / ANNOTATIONS_FILE).is_file():
        return None
    try:
        held = {annotation.id for annotation in AnnotationStore(folder).load()}
        return None if {annotation.id for annotation in AnnotationStore(earlier).load()} <= held else earlier
    except UniFuseError:
        return earlier


def _image_layers_by_name(viewer: napari.viewer.Viewer) -> dict[str, Image]:
    return {layer.name: layer for layer in viewer.layers if isinstance(layer, Image)}


def _renamed_pair(pair: tuple, old: str, new: str) -> tuple:
    return tuple(new if name == old else name for name in pair)


def _unifuse_metadata(layer) -> dict:
    return (layer.metadata or {}).get("unifuse", {}) or {}


def _role(layer) -> str | None:
    return _unifuse_metadata(layer).get("role") if isinstance(layer, Image) else None
