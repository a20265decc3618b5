"""Flag failure cases (a slice, or a region drawn on the "UniFuse annotations" layer) for review.

Every flag is written to the run folder the moment it is made (``engine.annotations``), listed
here, and listed again when the same inputs and checkpoint are opened later.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui import widgets
from napari.utils.notifications import show_info

from napari_unifuse._qt.notifications import reports_errors
from napari_unifuse._qt.outputs import viewed_slice
from napari_unifuse.engine.annotations import (
    FAILURE_CATEGORIES,
    Annotation,
    AnnotationStore,
    default_reviewer,
    export_cohort,
    find_runs,
)
from napari_unifuse.errors import InputError

if TYPE_CHECKING:
    import napari.viewer

ANNOTATION_LAYER = "UniFuse annotations"
DEFAULT_METHOD = "unifuse"


class AnnotationPanel(widgets.Container):
    """The *Annotate* tab: flag the viewed slice or a drawn region with a category, a note, the
    reviewer and the method the flag is about; list, delete and export the run's flags."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.store: AnnotationStore | None = None
        self.reference_layer = None
        self.category = widgets.ComboBox(label="category", choices=FAILURE_CATEGORIES)
        self.suggestion = widgets.Label(value="")
        self.note = widgets.LineEdit(label="note")
        self.reviewer = widgets.LineEdit(label="reviewer", value=default_reviewer())
        self.method = widgets.LineEdit(label="method", value=DEFAULT_METHOD,
                                       tooltip="The fusion method whose output is being flagged")
        self.flag_slice = widgets.PushButton(text="Flag slice", tooltip="Flag the slice in view")
        self.draw_region = widgets.PushButton(text="Draw…", tooltip="Draw a region on the slice, then Flag region")
        self.flag_region = widgets.PushButton(text="Flag region", tooltip="Flag the region drawn on the slice")
        self.listing = widgets.Select(label="flagged", choices=[])
        self.delete = widgets.PushButton(text="Delete selected")
        self.cohort_csv = widgets.FileEdit(label="cohort CSV", mode="w", filter="*.csv")
        self.export = widgets.PushButton(text="Export cohort CSV")
        super().__init__(widgets=[
            self.category, self.suggestion, self.note, self.reviewer, self.method,
            widgets.Container(widgets=[self.flag_slice, self.draw_region, self.flag_region], layout="horizontal",
                              labels=False),
            self.listing, self.delete, self.cohort_csv, self.export,
        ])
        self.flag_slice.changed.connect(self.add_slice_flag)
        self.draw_region.changed.connect(self.start_drawing)
        self.flag_region.changed.connect(self.add_region_flag)
        self.delete.changed.connect(self.delete_selected)
        self.export.changed.connect(self.export_cohort)
        self.runs_root: Path | None = None

    def set_run(self, folder: Path, runs_root: Path, reference_layer) -> None:
        """Point the panel at a run's folder (same inputs + checkpoint ⇒ same folder) and list its flags."""
        self.store = AnnotationStore(folder)
        self.runs_root = Path(runs_root)
        self.reference_layer = reference_layer
        self.refresh()

    def refresh(self) -> None:
        annotations = self.store.load() if self.store else []
        self.listing.choices = [(_describe(a), a.id) for a in annotations]

    @property
    def annotations(self) -> list[Annotation]:
        return self.store.load() if self.store else []

    def suggest(self, category: str, slice_index: int, reason: str) -> None:
        """Pre-fill the category for a slice the reviewer was sent to (by the quality maps)."""
        if category in FAILURE_CATEGORIES:
            self.category.value = category
        self.suggestion.value = f"slice {slice_index}: {reason}"

    # ---- flagging -----------------------------------------------------------------------------
    def _require_run(self) -> AnnotationStore:
        if self.store is None:
            raise InputError("choose the reference and moving images first: annotations belong to a run",
                             "annotations")
        return self.store

    def _slice(self) -> tuple[int | None, int]:
        axis, index = viewed_slice(self.viewer, self.reference_layer)
        return (0, 0) if axis is None else (axis, index)

    @reports_errors("Flag slice")
    def add_slice_flag(self) -> None:
        store = self._require_run()
        axis, index = self._slice()
        self._save(store, Annotation(self.category.value, self.reviewer.value, self.note.value,
                                     slice_index=index, slice_axis=axis, method=self.method.value))

    @reports_errors("Draw region")
    def start_drawing(self) -> None:
        self._require_run()
        layer = self._annotation_layer(create=True)
        self.viewer.layers.selection.active = layer
        layer.mode = "add_polygon"
        show_info("Draw the failure region on the 'UniFuse annotations' layer, then press 'Flag region'.")

    @reports_errors("Flag region")
    def add_region_flag(self) -> None:
        store = self._require_run()
        layer = self._annotation_layer(create=False)
        if layer is None or len(layer.data) == 0:
            raise InputError("draw a region first (Draw region…), or flag the whole slice", ANNOTATION_LAYER)
        shapes = [[list(map(float, layer.data_to_world(point))) for point in shape] for shape in layer.data]
        axis, index = self._slice()
        self._save(store, Annotation(self.category.value, self.reviewer.value, self.note.value,
                                     slice_index=index, slice_axis=axis, region_kind="shapes", region_world=shapes,
                                     method=self.method.value))
        layer.data = []  # flagged: the next region starts from an empty layer

    def _annotation_layer(self, create: bool):
        if ANNOTATION_LAYER in self.viewer.layers:
            return self.viewer.layers[ANNOTATION_LAYER]
        if not create:
            return None
        reference = self.reference_layer
        return self.viewer.add_shapes(name=ANNOTATION_LAYER, ndim=reference.ndim, scale=reference.scale,
                                      translate=reference.translate, affine=reference.affine.affine_matrix,
                                      edge_color="red", face_color="transparent", edge_width=1)

    def _save(self, store: AnnotationStore, annotation: Annotation) -> None:
        store.add(annotation)
        self.refresh()
        show_info(f"Saved: {_describe(annotation)} → {store.path}")

    @reports_errors("Delete annotation")
    def delete_selected(self) -> None:
        store = self._require_run()
        for annotation_id in self.listing.value:
            store.delete(annotation_id, self.reviewer.value)
        self.refresh()

    @reports_errors("Export cohort")
    def export_cohort(self) -> None:
        if self.runs_root is None:
            raise InputError("no runs folder chosen yet", "annotations")
        target = Path(self.cohort_csv.value or "")
        if target.suffix.lower() != ".csv":
            raise InputError("choose where to save the cohort CSV (a .csv file)", "cohort CSV")
        runs = find_runs(self.runs_root)
        rows = export_cohort(runs, target)
        show_info(f"Exported {rows} annotations from {len(runs)} runs to {target}")


def _describe(annotation: Annotation) -> str:
    where = "region" if annotation.region_kind else "slice"
    note = f": {annotation.note}" if annotation.note else ""
    return f"{where} {annotation.slice_index} — {annotation.category} [{annotation.method}] ({annotation.reviewer}){note}"
