"""The Annotate tab on a one-slice volume (one coronal slice, a 2D image stored as 3D): napari first
shows it one row per z step, but a flag is about the image, as on a 2D image."""

from __future__ import annotations

import pytest

from napari_unifuse._qt.annotation_panel import ANNOTATION_LAYER, AnnotationPanel

from .conftest import add_pair

pytestmark = pytest.mark.gui

ONE_CORONAL_SLICE = (24, 1, 30)


def one_slice_panel(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    add_pair(viewer, shape=ONE_CORONAL_SLICE)
    panel = AnnotationPanel(viewer)
    panel.reviewer.value = "dr. test"
    panel.set_run(tmp_path / "run", tmp_path, viewer.layers["T1"])
    return viewer, panel


def listed(panel) -> list[str]:
    return [panel.listing.native.item(row).text() for row in range(panel.listing.native.count())]


def test_flag_slice_on_a_one_slice_volume_flags_the_image(make_napari_viewer, tmp_path):
    viewer, panel = one_slice_panel(make_napari_viewer, tmp_path)
    viewer.dims.set_current_step(0, 11)  # napari's first view: the slider runs along z, one row of the image
    panel.note.value = "seen row by row"
    panel.flag_slice.clicked()
    viewer.dims.order = (1, 0, 2)  # the image's own plane
    panel.note.value = "seen whole"
    panel.flag_slice.clicked()
    assert [(a.slice_axis, a.slice_index) for a in panel.annotations] == [(1, 0), (1, 0)]
    assert [text.split(" — ")[0] for text in listed(panel)] == ["image", "image"]


def test_a_region_on_a_one_slice_volume_is_on_the_image(make_napari_viewer, tmp_path):
    viewer, panel = one_slice_panel(make_napari_viewer, tmp_path)
    viewer.dims.order = (1, 0, 2)
    panel.draw_region.clicked()
    viewer.layers[ANNOTATION_LAYER].add_polygons([[[5, 0, 5], [5, 0, 20], [15, 0, 20]]])  # z, y, x
    panel.flag_region.clicked()
    assert [(a.slice_axis, a.slice_index) for a in panel.annotations] == [(1, 0)]
    assert listed(panel)[0].startswith("region — ")


def test_flag_slice_off_a_one_slice_volume_is_still_refused(make_napari_viewer, tmp_path, notifications):
    """Past the image's end along z napari draws none of it: nothing seen, nothing to flag."""
    viewer, panel = one_slice_panel(make_napari_viewer, tmp_path)
    viewer.add_image(viewer.layers["T1"].data.repeat(2, axis=0), name="longer", scale=viewer.layers["T1"].scale,
                     translate=viewer.layers["T1"].translate)
    viewer.dims.set_current_step(0, 40)
    panel.flag_slice.clicked()
    assert panel.annotations == []
    errors = [message for severity, message in notifications if severity == "error"]
    assert errors and "lies outside the image" in errors[-1]
