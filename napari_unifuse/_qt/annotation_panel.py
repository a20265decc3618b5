"""Flag failure cases (a slice, or a region drawn on the "UniFuse annotations" layer) for review.

Every flag is written to the run folder the moment it is made (``engine.annotations``), listed
here, and listed again when the same inputs and checkpoint are opened later. A flag records the
content hashes of the input pair it was made on, and one made before any run is about the inputs
(it names no method); a listed flag made on other inputs than the pair on screen says so. A run
folder whose flags cannot be read is reported in a notification, never as a traceback: the
workbench around it stays usable. A region is recorded on the slice its shape
was drawn on, whatever slice is in view when it is flagged, and regions are always drawn on the
grid of the run on screen. Slices are counted as a run's outputs count them (the reference's grid
in world axis order), whatever order the annotated layer stores its array in, so that a flag made
on the inputs before a run names the same slice once the run is on screen. Each listed flag is
numbered: two flags may read alike, and each must be there to select. In napari's grid mode every visible layer gets a
cell of its own, so the region layer would be an empty cell beside the image being flagged: Draw…
leaves grid mode and puts that image just under the region layer, and Flag region brings the grid
back. The subject follows its layers through renames.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui import widgets
from napari.layers import Shapes
from napari.utils.notifications import show_info, show_warning

from napari_unifuse._napari_io import layer_to_volume
from napari_unifuse._qt.notifications import reports_errors, show_warnings
from napari_unifuse._qt.outputs import viewed_plane, viewed_slice
from napari_unifuse.engine.annotations import (
    ANNOTATIONS_FILE,
    AXIS_LETTERS,
    FAILURE_CATEGORIES,
    INPUTS_SUBJECT,
    OUTPUT_SUBJECT,
    Annotation,
    AnnotationStore,
    InputHashes,
    default_reviewer,
    describe_location,
    describe_subject,
    ellipse_outline,
    export_cohort,
    find_runs,
    flags_perhaps_counted_as_stored,
    slice_in_world_axis_order,
    slice_of_region,
)
from napari_unifuse.errors import InputError
from napari_unifuse.io.digests import LAYER_DIGESTS
from napari_unifuse.io.image import STORED_SLICES_REVERSED, single_slice_axis_of

if TYPE_CHECKING:
    import napari.viewer

ANNOTATION_LAYER = "UniFuse annotations"
DEFAULT_METHOD = "unifuse"


class AnnotationPanel(widgets.Container):
    """The *Annotate* tab: flag the viewed slice or a drawn region with a category, a note, the
    reviewer and the method the flag is about; list, delete and export the run's flags. Call
    :meth:`disconnect_viewer` when the workbench closes."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.store: AnnotationStore | None = None
        self.reference_layer = None
        self.subject = widgets.Label(label="annotating", value="(no run yet)")
        self.subject.native.setWordWrap(True)
        self.category = widgets.ComboBox(label="category", choices=FAILURE_CATEGORIES)
        self.suggestion = widgets.Label(value="")
        # Said by the workbench when the run's QC report no longer lists the flags as they are.
        self.report_note = widgets.Label(value="")
        self.report_note.native.setWordWrap(True)
        self.note = widgets.LineEdit(label="note")
        self.reviewer = widgets.LineEdit(label="reviewer", value=default_reviewer())
        self.method = widgets.LineEdit(label="method", value=DEFAULT_METHOD,
                                       tooltip="The fusion method whose output is being flagged")
        self.flag_slice = widgets.PushButton(text="Flag slice", tooltip="Flag the slice in view")
        self.draw_region = widgets.PushButton(
            text="Draw…", tooltip="Draw a region on the slice, then Flag region. In grid mode the grid is left while "
                                  "you draw, over the image being flagged, and comes back with Flag region")
        self.flag_region = widgets.PushButton(text="Flag region", tooltip="Flag the region drawn on the slice")
        self.listing = widgets.Select(label="flagged", choices=[])
        self.delete = widgets.PushButton(text="Delete selected")
        self.cohort_csv = widgets.FileEdit(label="cohort CSV", mode="w", filter="*.csv")
        self.export = widgets.PushButton(text="Export cohort CSV")
        super().__init__(widgets=[
            self.subject, self.category, self.suggestion, self.note, self.reviewer, self.method,
            widgets.Container(widgets=[self.flag_slice, self.draw_region, self.flag_region], layout="horizontal",
                              labels=False),
            self.listing, self.delete, self.report_note, self.cohort_csv, self.export,
        ])
        self.flag_slice.changed.connect(self.add_slice_flag)
        self.draw_region.changed.connect(self.start_drawing)
        self.flag_region.changed.connect(self.add_region_flag)
        self.delete.changed.connect(self.delete_selected)
        self.export.changed.connect(self.export_cohort)
        self.runs_root: Path | None = None
        self._warned: set[str] = set()  # unreadable-line warnings already shown, so each shows once
        self._grid_left_for_drawing = False  # Flag region turns grid mode back on only when Draw… turned it off
        self._pair: tuple[str, str] | None = None  # (reference, moving) layer names of what is annotated
        # Those layers, weakly (a deleted layer is let go), to follow them through renames.
        self._pair_layers: tuple[weakref.ref | None, weakref.ref | None] = (None, None)
        self._subject_kind = ""  # what set_run said is annotated: inputs, a run or a comparison
        self._folder: Path | None = None
        self._about_inputs = False  # no run on screen yet: flags describe the input pair, not a method
        # sha256 of the (reference, moving) arrays annotated, taken when the target is set: the layers
        # may be deleted or replaced before the reviewer flags.
        self._pair_sha256: tuple[str | None, str | None] = (None, None)
        # The slice :meth:`suggest` pre-filled the form for (None: the one image of a 2D run), the
        # category it put there and the one the reviewer had chosen before; None without a suggestion.
        self._suggested: tuple[int | None, str, str] | None = None
        viewer.layers.events.renamed.connect(self._follow_renamed_layer)

    def disconnect_viewer(self) -> None:
        self.viewer.layers.events.renamed.disconnect(self._follow_renamed_layer)

    def set_run(self, folder: Path, runs_root: Path, reference_layer, subject: str = "",
                pair: tuple[str, str] | None = None,
                pair_arrays: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Point the panel at a run's folder (same inputs + checkpoint ⇒ same folder) and list its flags;
        ``subject`` says what is annotated (inputs, a run or a comparison) and ``pair`` of which
        (reference, moving) layers. ``pair_arrays``: the (reference, moving) arrays a run read, which
        its flags record; without them, those the pair's layers hold now (the layers may have been
        deleted or replaced while a run computed, so a run passes its own). Regions drawn for another
        pair (other arrays, not only other layer names) and not flagged are dropped. A folder whose
        flags cannot be read is reported in a notification (see :meth:`refresh`)."""
        self.store = AnnotationStore(folder)
        self.runs_root = Path(runs_root)
        self.reference_layer = reference_layer
        self._folder, self._subject_kind = Path(folder), subject
        self.subject.tooltip = f"Flags are saved in {Path(folder) / 'annotations.jsonl'}"
        self._grid_left_for_drawing = False  # whoever shows the new target owns the grid now
        pair_sha256 = (self._sha256_of_pair(pair) if pair_arrays is None
                       else tuple(LAYER_DIGESTS(array) for array in pair_arrays))
        if pair != self._pair:
            # Layers renamed (or reopened in another order) hold the same arrays: their regions stay.
            if None in pair_sha256 or pair_sha256 != self._pair_sha256:
                self._drop_unflagged_regions_of(self._pair)
            self._pair = pair
        self._pair_sha256 = pair_sha256
        self._pair_layers = (None, None) if pair is None else tuple(
            weakref.ref(self.viewer.layers[name]) if name in self.viewer.layers else None for name in pair)
        self._show_subject()
        self._about_inputs = subject == INPUTS_SUBJECT
        self.method.enabled = not self._about_inputs
        if self._about_inputs:
            self.method.value = ""  # nothing has run yet: the flags name no method
        elif not self.method.value.strip():
            self.method.value = DEFAULT_METHOD
        if isinstance(self._existing_annotation_layer(), Shapes):
            self._annotation_layer(create=False)  # regions drawn from now on land on this run's grid
        self.refresh()

    def _show_subject(self) -> None:
        about = ", ".join(part for part in (self._subject_kind, self._pair and _describe_pair(self._pair)) if part)
        self.subject.value = f"{about}: {self._folder.name}" if about else self._folder.name

    def _follow_renamed_layer(self, _event) -> None:
        """A layer of the annotated pair renamed in the layer list is still what is annotated."""
        if self._pair is None:
            return
        renamed = tuple(layer.name if ref is not None and (layer := ref()) is not None else name
                        for ref, name in zip(self._pair_layers, self._pair, strict=True))
        if renamed != self._pair:
            self._pair = renamed
            self._show_subject()

    def _drop_unflagged_regions_of(self, pair: tuple[str, str] | None) -> None:
        """The next Flag region records every shape on the layer: those drawn for ``pair`` would be
        saved in another pair's folder (on the same grid nothing else tells them apart)."""
        layer = self._existing_annotation_layer()
        if pair is None or not isinstance(layer, Shapes) or len(layer.data) == 0:
            return
        count = len(layer.data)
        layer.data = []
        show_info(f"{count} unflagged region{'s' if count > 1 else ''} of {_describe_pair(pair)} "
                  f"{'were' if count > 1 else 'was'} dropped: flags belong to the pair they were drawn on.")

    def _sha256_of_pair(self, pair: tuple[str, str] | None) -> tuple[str | None, str | None]:
        if pair is None:
            return None, None
        reference, moving = pair
        return self._sha256_of_layer(reference), self._sha256_of_layer(moving)

    def _sha256_of_layer(self, name: str) -> str | None:
        """The content hash of the array the run reads from layer ``name`` (None once it is deleted)."""
        if name not in self.viewer.layers:
            return None
        return LAYER_DIGESTS(layer_to_volume(self.viewer.layers[name]).array)

    @reports_errors("Load annotations")
    def refresh(self) -> None:
        """List the run's flags; a file that cannot be read leaves the list empty and says why."""
        self.listing.choices = []  # never the last run's flags under this one's name
        if self.store is None:
            return
        annotations = self.store.load()
        pair_inputs = InputHashes.of_digests(*self._pair_sha256)
        # Numbered: the listing keeps one entry per label, and two flags may read the same.
        self.listing.choices = [(f"{self._describe(a, pair_inputs)} (#{number})", a.id)
                                for number, a in enumerate(annotations, start=1)]
        show_warnings(warning for warning in self.store.warnings if warning not in self._warned)
        self._warned.update(self.store.warnings)
        self._warn_of_flags_perhaps_counted_as_stored(annotations)

    def _warn_of_flags_perhaps_counted_as_stored(self, annotations: list[Annotation]) -> None:
        """Say, once per run folder, which of its flags an earlier version may have counted on the
        annotated reference's slices as stored (``flags_perhaps_counted_as_stored``): on a volume
        stored head to foot such a flag names the mirrored slice."""
        layer = self._pair_layers[0]() if self._pair_layers[0] is not None else None
        if layer is None or f"stored order: {self._folder}" in self._warned:
            return
        volume = layer_to_volume(layer)
        early = flags_perhaps_counted_as_stored(annotations, volume)
        if not early:
            return
        self._warned.add(f"stored order: {self._folder}")
        slices = volume.spatial_shape[0]
        head_to_foot = bool(volume.metadata.get(STORED_SLICES_REVERSED)) or volume.slices_stored_head_to_foot
        stored = "with its slices from head to foot" if head_to_foot else "with its axes in another order"
        examples = "; ".join(
            f"{AXIS_LETTERS[a.slice_axis]} = {a.slice_index}"
            + (f" may be z = {slices - 1 - a.slice_index} now" if head_to_foot and a.slice_axis == 0 else "")
            for a in early[:5])
        show_warning(f"{len(early)} flag{'s' if len(early) > 1 else ''} in {self._folder / ANNOTATIONS_FILE} "
                     f"{'were' if len(early) > 1 else 'was'} made before 2026-12-07 on '{layer.name}', stored "
                     f"{stored}: versions before then counted its slices as stored, today's as napari's slider "
                     f"and the outputs do, so such a flag may name another slice ({examples}). Check them "
                     "before relying on their slice numbers.")

    @property
    def annotations(self) -> list[Annotation]:
        return self.store.load() if self.store else []

    def suggest(self, category: str, slice_index: int | None, reason: str) -> None:
        """Pre-fill the category for a slice the reviewer was sent to (by the quality maps);
        ``slice_index`` None for the one image of a 2D run. The pre-fill is that slice's: it goes
        when the viewer leaves it (:meth:`follow_viewed_slice`)."""
        chosen_before = self._suggested[2] if self._suggested else self.category.value
        if category in FAILURE_CATEGORIES:
            self.category.value = category
        self._suggested = (slice_index, self.category.value, chosen_before)
        self.suggestion.value = f"{'image' if slice_index is None else f'slice {slice_index}'}: {reason}"

    def follow_viewed_slice(self, slice_index: int) -> None:
        """The viewer is on ``slice_index``: a suggestion for another slice goes, and the category it
        pre-filled gives way to the reviewer's earlier choice (one the reviewer changed stays), so
        that a flag there does not record the suggested slice's case."""
        if self._suggested is not None and self._suggested[0] not in (None, slice_index):
            self.forget_suggestion()

    def forget_suggestion(self) -> None:
        """Drop the suggestion (another slice in view, or another run on screen)."""
        if self._suggested is None:
            return
        _, suggested_category, chosen_before = self._suggested
        if self.category.value == suggested_category:
            self.category.value = chosen_before
        self._suggested = None
        self.suggestion.value = ""

    # ---- flagging -----------------------------------------------------------------------------
    def _require_run(self) -> AnnotationStore:
        if self.store is None:
            raise InputError("choose the reference and moving images first: annotations belong to a run",
                             "annotations")
        return self.store

    def _viewed_slice(self) -> tuple[int, int]:
        """(array axis, index) of the run's slice in view, counted as flags count it
        (:meth:`_as_flags_count`); (0, 0) for a 2D image, and the one slice of a one-slice volume,
        which is the image whatever plane of it is in view (napari first shows one coronal slice one
        row per z step). A plane beyond the run's image (where only a longer layer is drawn) is
        refused: its nearest slice is not what was seen."""
        return self._as_flags_count(*self._viewed_slice_of_layer())

    def _viewed_slice_of_layer(self) -> tuple[int, int]:
        """:meth:`_viewed_slice` on the annotated layer's own array."""
        reference = self.reference_layer
        axis, index = viewed_plane(self.viewer, reference)
        if axis is not None and not 0 <= index < reference.data.shape[axis]:
            letter, last = AXIS_LETTERS[axis], reference.data.shape[axis] - 1
            raise InputError(f"the slice in view ({letter} = {index}) lies outside the image, which has slices "
                             f"{letter} = 0 to {last}; scroll onto the image to flag a slice", reference.name)
        one_slice_axis = single_slice_axis_of(_spatial_shape(reference))
        if one_slice_axis is not None:
            return one_slice_axis, 0
        if axis is None and reference.ndim >= 3:
            raise InputError("the 3D view shows no single slice; switch to the 2D view to flag a slice")
        if axis is None:
            return 0, 0
        return axis, index

    def _new_annotation(self, slice_axis: int, slice_index: int, region_world: list[list[list[float]]] | None = None
                        ) -> Annotation:
        """A flag on the target set by :meth:`set_run`, with the form's category, note and reviewer."""
        reference_sha256, moving_sha256 = self._pair_sha256
        return Annotation(
            self.category.value, self.reviewer.value, self.note.value, slice_index=slice_index,
            slice_axis=slice_axis, region_kind="shapes" if region_world else None, region_world=region_world or [],
            method=None if self._about_inputs else self.method.value,
            subject=INPUTS_SUBJECT if self._about_inputs else OUTPUT_SUBJECT,
            reference_sha256=reference_sha256, moving_sha256=moving_sha256)

    @reports_errors("Flag slice")
    def add_slice_flag(self) -> None:
        store = self._require_run()
        axis, index = self._viewed_slice()
        self._save(store, [self._new_annotation(axis, index)])

    @reports_errors("Draw region")
    def start_drawing(self) -> None:
        self._require_run()
        if self.viewer.dims.ndisplay == 3:  # napari would leave the layer in pan/zoom: nothing could be drawn
            raise InputError("napari draws regions only in the 2D view; switch to the 2D view to draw a region")
        layer = self._annotation_layer(create=True)
        layer.visible = True
        where = ""
        if self.viewer.canvas.grid.enabled:
            self._leave_grid_for_drawing(layer)
            where = f" over '{self.reference_layer.name}' (grid view off until 'Flag region')"
        self.viewer.layers.selection.active = layer
        layer.mode = "add_polygon"
        show_info(f"Draw the failure region on the 'UniFuse annotations' layer{where}, then press 'Flag region'.")

    def _leave_grid_for_drawing(self, annotation_layer: Shapes) -> None:
        """One view, the image being flagged on top of the others and the region layer on it."""
        self.viewer.canvas.grid.enabled = False
        self._grid_left_for_drawing = True
        layers = self.viewer.layers
        for layer in (self.reference_layer, annotation_layer):
            if layer in layers:
                layer.visible = True
                layers.move(layers.index(layer), len(layers))

    @reports_errors("Flag region")
    def add_region_flag(self) -> None:
        """One annotation per slice the drawn shapes lie on (several regions on one slice share it)."""
        store = self._require_run()
        layer = self._annotation_layer(create=False)
        if layer is None or len(layer.data) == 0:
            raise InputError("draw a region first (Draw region…), or flag the whole slice", ANNOTATION_LAYER)
        regions: dict[tuple[int, int], list[list[list[float]]]] = {}
        for shape, shape_type in zip(layer.data, layer.shape_type, strict=True):
            world = [list(map(float, layer.data_to_world(point))) for point in shape]
            if shape_type == "ellipse":
                world = ellipse_outline(world)
            regions.setdefault(self._slice_of_region(world), []).append(world)
        self._save(store, [self._new_annotation(axis, index, shapes) for (axis, index), shapes in regions.items()])
        layer.data = []  # flagged: the next region starts from an empty layer
        if self._grid_left_for_drawing:
            self._grid_left_for_drawing = False
            layer.visible = False  # an empty layer would take a grid cell of its own
            self.viewer.canvas.grid.enabled = True

    def _slice_of_region(self, world: list[list[float]]) -> tuple[int, int]:
        """(array axis, index) of the run's slice a shape (vertices in world mm) was drawn on, counted
        as flags count it (:meth:`_as_flags_count`); (0, 0) for a 2D image."""
        reference = self.reference_layer
        if reference.ndim < 3:
            return 0, 0
        return self._as_flags_count(*slice_of_region([reference.world_to_data(point) for point in world],
                                                     reference.data.shape, viewed_slice(self.viewer, reference)[0]))

    def _as_flags_count(self, axis: int, index: int) -> tuple[int, int]:
        """A slice of the annotated layer's array on the grid the run's outputs lie on (the reference's,
        in world axis order), where flags count slices: before a run the annotated layer is the
        reference input, which a script may have added with slices stored head to foot, and the same
        flags are read against the fused layer once the run is on screen."""
        return slice_in_world_axis_order(layer_to_volume(self.reference_layer), axis, index)

    def _existing_annotation_layer(self):
        return self.viewer.layers[ANNOTATION_LAYER] if ANNOTATION_LAYER in self.viewer.layers else None

    def _annotation_layer(self, create: bool):
        """The Shapes layer regions are drawn on, on the run's grid. One left by a run of other
        dimensions or spacing is replaced (a region's voxel indices would be wrong there), keeping the
        shapes that still fit."""
        layer = self._existing_annotation_layer()
        if layer is None:
            return self._add_annotation_layer() if create else None
        if not isinstance(layer, Shapes):
            raise InputError(f"this is a {type(layer).__name__} layer, but regions are drawn as shapes; rename or "
                             "remove it, then press Draw… and draw the region", ANNOTATION_LAYER)
        if _same_grid(layer, self.reference_layer):
            return layer
        return self._replace_annotation_layer(layer)

    def _add_annotation_layer(self) -> Shapes:
        reference = self.reference_layer
        return self.viewer.add_shapes(name=ANNOTATION_LAYER, ndim=reference.ndim, scale=reference.scale,
                                      translate=reference.translate, affine=reference.affine.affine_matrix,
                                      edge_color="red", face_color="transparent", edge_width=1)

    def _replace_annotation_layer(self, old: Shapes) -> Shapes:
        # Shapes of the same dimensions keep their place in the world (mm); others cannot be placed.
        fitting = old.ndim == self.reference_layer.ndim
        world_shapes = [[old.data_to_world(point) for point in shape] for shape in old.data] if fitting else []
        shape_types = list(old.shape_type)
        self.viewer.layers.remove(old)
        layer = self._add_annotation_layer()
        layer.visible = old.visible  # hidden by a Methods-tab comparison: a new one must not take a grid cell
        if world_shapes:
            layer.add([np.array([layer.world_to_data(point) for point in shape]) for shape in world_shapes],
                      shape_type=shape_types)
        elif len(old.data):
            show_info(f"{len(old.data)} unflagged region(s) drawn on the previous {old.ndim}D image were removed: "
                      f"they cannot be placed on this {self.reference_layer.ndim}D run.")
        return layer

    def _save(self, store: AnnotationStore, annotations: list[Annotation]) -> None:
        for annotation in annotations:
            store.add(annotation)
        self.note.value = ""  # it described these flags: the next one starts without it
        self.refresh()
        show_info(f"Saved: {'; '.join(self._describe(a) for a in annotations)} → {store.path}")

    def _describe(self, annotation: Annotation, pair_inputs: InputHashes | None = None) -> str:
        """A flag as listed; ``pair_inputs``: the annotated pair's hashes, to mark flags made on others."""
        where = describe_location(annotation, _spatial_shape(self.reference_layer))
        note = f": {annotation.note}" if annotation.note else ""
        earlier = "(made on other inputs) " if pair_inputs and pair_inputs.made_on_other_inputs(annotation) else ""
        return f"{earlier}{where} — {annotation.category} [{describe_subject(annotation)}] ({annotation.reviewer}){note}"

    @reports_errors("Delete annotation")
    def delete_selected(self) -> None:
        """Withdraw the selected flags still live; those another reviewer withdrew since the list was
        made are counted, not an error, and the list is brought up to date either way."""
        store = self._require_run()
        selected = list(self.listing.value)
        if not selected:
            raise InputError("select the flags to withdraw in the list first", "annotations")
        live = {annotation.id for annotation in store.load()}
        try:
            for annotation_id in selected:
                if annotation_id in live:
                    store.delete(annotation_id, self.reviewer.value)
        finally:
            self.refresh()
        withdrawn = sum(annotation_id not in live for annotation_id in selected)
        if withdrawn:
            show_info(f"{withdrawn} flag{'s were' if withdrawn > 1 else ' was'} already withdrawn (by another "
                      "reviewer or workbench); the list now shows the flags still live.")

    @reports_errors("Export cohort")
    def export_cohort(self) -> None:
        if self.runs_root is None:
            raise InputError("no runs folder chosen yet", "annotations")
        target = Path(self.cohort_csv.value or "")
        if target.suffix.lower() != ".csv":
            raise InputError("choose where to save the cohort CSV (a .csv file)", "cohort CSV")
        runs = find_runs(self.runs_root)
        export = export_cohort(runs, target)
        other_inputs = (f"; {export.about_other_inputs} made on other inputs than their run's (about_other_inputs "
                        "yes)" if export.about_other_inputs else "")
        skipped = (f"; {len(export.skipped)} unusable line{'s' if len(export.skipped) > 1 else ''} skipped, in "
                   + ", ".join(f"{line.path} line {line.line}" for line in export.skipped) if export.skipped else "")
        show_info(f"Exported {export.rows} annotations from {len(runs)} runs under {self.runs_root} to {target}"
                  f"{other_inputs}{skipped}")


def _describe_pair(pair: tuple[str, str]) -> str:
    reference, moving = pair
    return f"{moving} → {reference}"


def _spatial_shape(layer) -> tuple[int, ...]:
    """The shape of ``layer``'s image without an RGB layer's colour axis."""
    return tuple(layer.data.shape[:layer.ndim])


def _same_grid(layer, reference) -> bool:
    """Whether ``layer`` places data indices where ``reference`` does (same dimensions and world transform)."""
    if layer.ndim != reference.ndim:
        return False
    corners = np.vstack([np.zeros(reference.ndim), np.eye(reference.ndim)])
    return np.allclose([layer.data_to_world(p) for p in corners], [reference.data_to_world(p) for p in corners])
