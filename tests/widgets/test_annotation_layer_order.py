"""Flags count slices as a run's outputs do (the reference's grid in world axis order, slices foot
to head), whatever order the annotated layer stores its array in: a layer a script added may hold
its slices head to foot, and a flag made on it before a run is read against the fused layer after."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse._qt.annotation_panel import ANNOTATION_LAYER, AnnotationPanel
from napari_unifuse.io import ImageVolume

from .conftest import GEOMETRY_3D, ellipsoid_pair

pytestmark = pytest.mark.gui

SHAPE = (16, 48, 48)


def add_head_to_foot_layer(viewer, name: str = "T1"):
    """The reference as a script adds it: slices stored head to foot, placed by a z-flipped affine
    (every voxel at the world position it has on GEOMETRY_3D)."""
    reference, _, _ = ellipsoid_pair(SHAPE)
    geometry = GEOMETRY_3D.reversed_along(0, SHAPE[0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = geometry.direction, geometry.origin
    return viewer.add_image(reference[::-1].copy(), name=name, scale=geometry.spacing, affine=affine)


def world_z_of_slice(index: int) -> float:
    """World z of slice ``index`` of the grid in world axis order (the run's outputs' grid)."""
    return float((GEOMETRY_3D.index_to_world @ [index, 0, 0, 1])[0])


def _panel_on_a_head_to_foot_layer(make_napari_viewer, tmp_path):
    """(viewer, its head-to-foot layer, an annotation panel pointed at it)."""
    viewer = make_napari_viewer()
    layer = add_head_to_foot_layer(viewer)
    panel = AnnotationPanel(viewer)
    panel.reviewer.value = "dr. test"
    panel.set_run(tmp_path / "run", tmp_path, layer)
    return viewer, layer, panel


def test_a_slice_flagged_on_a_layer_stored_head_to_foot_is_counted_as_the_outputs_count_it(
        make_napari_viewer, tmp_path):
    viewer, layer, panel = _panel_on_a_head_to_foot_layer(make_napari_viewer, tmp_path)
    viewer.dims.set_point(0, world_z_of_slice(12))
    assert round(layer.world_to_data(viewer.dims.point)[0]) == 3  # the layer's own slice 3
    panel.flag_slice.clicked()
    assert [(a.slice_axis, a.slice_index) for a in panel.annotations] == [(0, 12)]


def test_a_region_drawn_on_a_layer_stored_head_to_foot_is_counted_as_the_outputs_count_it(
        make_napari_viewer, tmp_path):
    viewer, _, panel = _panel_on_a_head_to_foot_layer(make_napari_viewer, tmp_path)
    panel.draw_region.clicked()
    viewer.layers[ANNOTATION_LAYER].add_polygons([np.array([[2, 10, 10], [2, 10, 20], [2, 20, 20]], float)])
    panel.flag_region.clicked()
    (flag,) = panel.annotations
    assert (flag.slice_axis, flag.slice_index) == (0, SHAPE[0] - 1 - 2)
    np.testing.assert_allclose([point[0] for point in flag.region_world[0]], world_z_of_slice(13))


def test_flags_on_a_layer_in_world_axis_order_keep_the_layers_own_slice(make_napari_viewer, tmp_path):
    """A fused layer (or one our reader opened) already lies on that grid: nothing is converted."""
    from napari_unifuse._napari_io import volume_to_layer_data

    viewer = make_napari_viewer()
    reference, _, _ = ellipsoid_pair(SHAPE)
    data, kwargs, _ = volume_to_layer_data(ImageVolume(reference, GEOMETRY_3D), "fused")
    layer = viewer.add_image(data, **kwargs)
    panel = AnnotationPanel(viewer)
    panel.reviewer.value = "dr. test"
    panel.set_run(tmp_path / "run", tmp_path, layer, subject="run")
    viewer.dims.set_current_step(0, 12)
    panel.flag_slice.clicked()
    viewer.dims.order = (2, 0, 1)
    viewer.dims.set_current_step(2, 23)
    panel.flag_slice.clicked()
    assert [(a.slice_axis, a.slice_index) for a in panel.annotations] == [(0, 12), (2, 23)]


def test_flags_of_the_same_text_are_each_listed_and_each_can_be_deleted(make_napari_viewer, tmp_path):
    """The listing kept one entry per label: a second identical flag was hidden, and could not be deleted."""
    viewer = make_napari_viewer()
    reference, _, _ = ellipsoid_pair(SHAPE)
    layer = viewer.add_image(reference)
    panel = AnnotationPanel(viewer)
    panel.reviewer.value = "dr. test"
    panel.set_run(tmp_path / "run", tmp_path, layer)
    viewer.dims.set_current_step(0, 4)
    panel.flag_slice.clicked()
    panel.flag_slice.clicked()
    assert panel.listing.native.count() == 2
    listed = [panel.listing.native.item(row).text() for row in range(2)]
    assert len(set(listed)) == 2 and all(text.startswith("slice z = 4 — misalignment") for text in listed)
    first, second = (a.id for a in panel.annotations)
    panel.listing.value = [second]
    panel.delete.clicked()
    assert [a.id for a in panel.annotations] == [first]
