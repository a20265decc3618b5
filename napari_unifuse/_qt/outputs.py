"""The run's result layers, all in the reference's world geometry, and the slice-following quivers."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QTimer

from napari_unifuse._napari_io import LAYER_METADATA_KEY, volume_to_layer_data
from napari_unifuse._qt.analysis import RunOutcome
from napari_unifuse._qt.run_panel import OUTPUT_ROLE
from napari_unifuse.engine.overlays import checkerboard, deformed_grid, displacement_magnitude_mm, slice_quivers
from napari_unifuse.engine.quality import INVENTED, LOST, MAP_LABELS, MAP_UNITS, RESTORATION_CHANGE, UNCERTAINTY
from napari_unifuse.io import ImageVolume, placement_metadata

if TYPE_CHECKING:
    import napari.viewer
    from napari.layers import Layer
    from napari.utils.transforms import Affine

FLICKER_INTERVAL_MS = 600
# Each map in its own hue, drawn additively over the fused image and hidden until asked for.
QUALITY_OPACITY = 0.6  # ticked on, a map tints the fused image rather than hiding it
MAP_COLORMAPS = {INVENTED: "red", LOST: "cyan", RESTORATION_CHANGE: "yellow", UNCERTAINTY: "inferno"}
# napari builds an arrow's mesh in the layer's data units (voxels) and only then scales it to mm: a
# width in voxels keeps arrows as visible at 0.25 mm pixels as at 4 mm.
ARROW_WIDTH_VOXELS = 0.3
# What a reviewer sets on a layer (a window, a colour map, a layer hidden) and expects a re-run to keep.
DISPLAY_SETTINGS = ("visible", "opacity", "blending")
IMAGE_DISPLAY_SETTINGS = (*DISPLAY_SETTINGS, "colormap", "gamma", "contrast_limits")


@dataclass(frozen=True)
class OutputNames:
    """The names of a run's output layers, derived from its input layers' names."""

    fused: str
    aligned: str
    quivers: str
    grid: str
    error: str
    jacobian: str
    folding: str
    checkerboard: str

    @classmethod
    def for_inputs(cls, reference: str, moving: str) -> OutputNames:
        pair, onto = f"[{reference} + {moving}]", f"[{moving} → {reference}]"
        # "error map", not "alignment error": against a ground truth it holds the restoration's error
        # too (the aligned image is the restored one), without one it is the MIND misalignment estimate.
        return cls(
            fused=f"fused {pair}", aligned=f"aligned {onto}", quivers=f"displacement {onto}",
            grid=f"deformed grid {onto}", error=f"error map {onto}", jacobian=f"det J {onto}",
            folding=f"folding (det J ≤ 0) {onto}", checkerboard=f"checkerboard {pair}",
        )

    def all(self) -> tuple[str, ...]:
        return tuple(vars(self).values())

    def quality_map(self, map_name: str) -> str:
        """The layer of one quality map (``engine.quality`` names: "invented", "lost", …)."""
        return f"{MAP_LABELS[map_name]} {self.fused.removeprefix('fused ')}"


def _sliced_axes(viewer: napari.viewer.Viewer, layer) -> list[int]:
    """``layer``'s array axes that the sliders cut (the dims not displayed), in the dims' order."""
    offset = viewer.dims.ndim - layer.ndim
    return [axis - offset for axis in viewer.dims.not_displayed if axis >= offset]


def _slicing_transform(layer, axes: list[int]) -> Affine:
    """The world → data transform napari slices ``layer`` with on its sliced ``axes``: their block of
    the full inverse alone (napari's ``_SliceInput.data_slice``). On a tilted volume the full inverse
    at the sliders' point names another slice than the one napari draws (napari shows a slice as if
    it were orthogonal). The slicing transform itself napari keeps private (``Layer._data_to_world``,
    which grid mode's shift is not part of); tests/widgets/test_slice_following.py checks that the slice
    it names is the one napari draws."""
    return layer._data_to_world.inverse.set_slice(axes)


def viewed_plane(viewer: napari.viewer.Viewer, layer) -> tuple[int | None, int]:
    """(array axis, index) of the plane of ``layer`` that the sliders cut in a 2D view; the index is
    below 0 or past the last slice where the sliders are beyond ``layer`` (on a longer layer of the
    viewer). ``(None, 0)`` for 2D layers and the 3D view."""
    axes = _sliced_axes(viewer, layer)
    if layer.ndim < 3 or not axes:
        return None, 0
    point = np.asarray(viewer.dims.point[-layer.ndim:], dtype=float)
    index = np.round(_slicing_transform(layer, axes)(point[axes]))
    return axes[-1], int(index[-1])


def viewed_slice(viewer: napari.viewer.Viewer, layer) -> tuple[int | None, int]:
    """(array axis, index) of ``layer``'s slice that napari draws in a 2D view, the nearest one where
    the sliders are beyond ``layer`` (see :func:`viewed_plane`); ``(None, 0)`` for 2D layers and the 3D view."""
    axis, index = viewed_plane(viewer, layer)
    if axis is None:
        return None, 0
    return axis, int(np.clip(index, 0, layer.data.shape[axis] - 1))


def show_data_position(viewer: napari.viewer.Viewer, layer, position: np.ndarray) -> None:
    """Move the sliders so that napari draws ``layer``'s slices through ``position`` (data
    coordinates, one per array axis; those of the displayed axes do not count): the inverse of
    :func:`viewed_slice`."""
    axes = _sliced_axes(viewer, layer)
    if not axes:
        return
    slicing = _slicing_transform(layer, axes)
    # Solved, not slicing.inverse: napari cannot invert a one-axis transform (its units check fails).
    world = np.linalg.solve(slicing.linear_matrix, np.asarray(position, dtype=float)[axes] - slicing.translate)
    offset = viewer.dims.ndim - layer.ndim
    viewer.dims.set_point([axis + offset for axis in axes], [float(value) for value in world])


class ResultLayers:
    """Adds or refreshes the output layers of the latest run and keeps the quivers on the viewed slice.

    Call :meth:`disconnect_viewer` when the workbench closes: it releases the viewer's events and
    the flicker timer, and takes the run's text off the canvas. ``on_flicker_stopped`` is called
    whenever the flicker stops, also on its own (a new run, the aligned layer deleted), so that the
    control that started it can show it stopped; ``on_outputs_deleted`` once the last of the run's
    output layers is deleted (its inputs may stay: a reviewer clears a run's outputs, not the images
    loaded), so that what is about the run on screen can let go of it.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.outcome: RunOutcome | None = None
        self.names: OutputNames | None = None
        # The run's layers by role ("reference" or an OutputNames field), weakly (a deleted layer is
        # let go): followed through renames.
        self._layers: dict[str, weakref.ref] = {}
        self.on_flicker_stopped: Callable[[], None] | None = None
        self.on_outputs_deleted: Callable[[], None] | None = None
        self.quiver_stride = 4
        self.grid_spacing = 4
        self.checker_tile = 8
        self.arrow_scale = 1.0
        # Each output layer's display settings as the workbench made it, weakly: those a reviewer
        # changed since are carried over to the layer a re-run puts in its place.
        self._settings_as_made: weakref.WeakKeyDictionary[Layer, dict] = weakref.WeakKeyDictionary()
        # (layer, visible) of each layer fade or flicker showed, hid or flips, as it was before: put back when they end.
        self._visibility_before_compare: list[tuple[Layer, bool]] = []
        self._grid_left_for_compare = False  # grid mode was on: fade and flicker overlay the two in one view
        self._kept_estimate_text: str | None = None  # what this run wrote on the canvas, while shown
        self._flicker = QTimer()
        self._flicker.setInterval(FLICKER_INTERVAL_MS)
        self._flicker.timeout.connect(self._flip)
        viewer.dims.events.current_step.connect(self.update_quivers)
        viewer.dims.events.order.connect(self.update_quivers)
        viewer.dims.events.ndisplay.connect(self.update_quivers)
        viewer.layers.events.removed.connect(self._on_layer_removed)

    def disconnect_viewer(self) -> None:
        self.on_flicker_stopped = self.on_outputs_deleted = None  # the controls may be closing with the viewer's window
        self.stop_flicker()
        self.clear_kept_estimate()
        self.viewer.dims.events.current_step.disconnect(self.update_quivers)
        self.viewer.dims.events.order.disconnect(self.update_quivers)
        self.viewer.dims.events.ndisplay.disconnect(self.update_quivers)
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)

    # ---- building -----------------------------------------------------------------------------
    def show(self, outcome: RunOutcome, reference_name: str, moving_name: str) -> None:
        """The layers of ``outcome``, a run of the layers now named ``reference_name`` and ``moving_name``."""
        self.stop_flicker()
        names = OutputNames.for_inputs(reference_name, moving_name)
        earlier_quivers = self.layer("quivers")
        if earlier_quivers is not None and earlier_quivers.name != names.quivers:
            # Arrows follow the slider only with their run's field, which is not kept past its run.
            self.viewer.layers.remove(earlier_quivers)
        self.outcome, self.names = outcome, names
        self._layers = {}
        if reference_name in self.viewer.layers:
            self._layers["reference"] = weakref.ref(self.viewer.layers[reference_name])
        result = outcome.result
        geometry = result.fused.geometry
        placed = geometry.napari_kwargs()
        self._map(names.checkerboard, self._checkerboard(), colormap="gray", visible=False)
        self._volume_layer(result.aligned, names.aligned, visible=False)
        self._volume_layer(result.fused, names.fused)
        self._map(names.error, outcome.error_map, colormap="magma", blending="additive", opacity=0.6,
                  tags={"kind": outcome.error_kind})
        self._map(names.jacobian, outcome.jacobian, colormap="PiYG", contrast_limits=(0.0, 2.0), visible=False)
        self._upsert(names.folding, outcome.folding, "labels", placed, opacity=0.8)
        self._map(names.grid, self._deformed_grid(), colormap="yellow", blending="additive", visible=False)
        magnitude = displacement_magnitude_mm(result.displacement, geometry.spacing)
        self._upsert(names.quivers, np.zeros((0, 2, geometry.ndim), np.float32), "vectors", placed,
                     edge_colormap="viridis", edge_width=ARROW_WIDTH_VOXELS, length=self.arrow_scale,
                     edge_contrast_limits=(0.0, max(float(magnitude.max()), 1e-6)))
        self._layers.update({role: weakref.ref(self.viewer.layers[name]) for role, name in vars(names).items()})
        self.update_quivers()
        self._show_quality_maps()
        self._show_kept_estimate()

    def _show_quality_maps(self) -> None:
        """One hidden layer per quality map, its colour saturating at twice the flag threshold."""
        quality = self.outcome.result.quality
        if quality is None:
            return
        for name, array in quality.maps().items():
            threshold = quality.thresholds[name]
            self._map(self.names.quality_map(name), array, colormap=MAP_COLORMAPS[name], blending="additive",
                      visible=False, opacity=QUALITY_OPACITY, contrast_limits=(0.0, max(2.0 * threshold, 1e-6)),
                      tags={"kind": name, "units": MAP_UNITS[name], "threshold": threshold})

    def _show_kept_estimate(self) -> None:
        """On the canvas: which displacement the layers show (identity, matching or network) and
        why, so that "no motion" reads as the guard's decision, not as a failure; and, where the
        checkpoint caps it, how much of the fused image the reference takes."""
        result = self.outcome.result
        lines = [] if result.alignment_guard is None else [f"alignment guard: {result.alignment_guard.message}"]
        if result.fusion_balance is not None:
            lines.append(result.fusion_balance.message)
        self.clear_kept_estimate()
        if not lines:
            return
        # Named after the fused layer: other pairs' layers may share the canvas.
        self._kept_estimate_text = "\n".join([f"{self.names.fused}:", *lines])
        overlay = self.viewer.canvas.overlays["text"]
        overlay.text = self._kept_estimate_text
        overlay.visible = True

    def clear_kept_estimate(self) -> None:
        """Take the run's text off the canvas (left alone if someone else has written there since)."""
        overlay = self.viewer.canvas.overlays["text"]
        if self._kept_estimate_text is not None and overlay.text == self._kept_estimate_text:
            overlay.text = ""
            overlay.visible = False
        self._kept_estimate_text = None

    @property
    def reference_name(self) -> str | None:
        """The current name of the run's reference layer (None once it is deleted)."""
        reference = self.layer("reference")
        return None if reference is None else reference.name

    @property
    def outputs_on_screen(self) -> bool:
        """Whether any output layer of the latest run is still in the viewer."""
        return any(self.layer(role) is not None for role in self._layers if role != "reference")

    def layer(self, role: str) -> Layer | None:
        """The latest run's layer ``role`` ("reference" or an OutputNames field: "fused", "quivers", …)
        under whatever name it has now; None before a run and once the layer is deleted."""
        followed = self._layers.get(role)
        layer = None if followed is None else followed()
        return layer if layer is not None and layer in self.viewer.layers else None

    def _on_layer_removed(self, event) -> None:
        """The text describes the fused layer: it goes with it. Without the aligned layer there is
        nothing to fade or flicker to: the layers hidden for it come back. With the run's last output
        layer, ``on_outputs_deleted`` is called."""
        removed = {role for role, followed in self._layers.items() if followed() is event.value}
        if "fused" in removed:
            self.clear_kept_estimate()
        elif "aligned" in removed:
            self.stop_flicker()
        if removed - {"reference"} and not self.outputs_on_screen and self.on_outputs_deleted is not None:
            self.on_outputs_deleted()

    def _volume_layer(self, volume: ImageVolume, name: str, tags: dict | None = None, **kwargs) -> None:
        """An image layer placed and described as the reader's (geometry, metadata with the NIfTI
        forms), so that napari's File → Save Selected Layer(s) through our writer puts it where the
        workbench's own save does; ``tags`` join its ``metadata["unifuse"]``."""
        data, layer_kwargs, _ = volume_to_layer_data(volume, name)
        del layer_kwargs["name"]
        metadata = layer_kwargs.pop("metadata")
        metadata[LAYER_METADATA_KEY].update(tags or {})
        self._upsert(name, data, "image", layer_kwargs, metadata=metadata, **kwargs)

    def _map(self, name: str, array: np.ndarray, **kwargs) -> None:
        """A map on the run's reference grid: an image with the fused image's geometry and the
        reference's NIfTI forms (``placement_metadata``), as every file written on that grid."""
        fused = self.outcome.result.fused
        self._volume_layer(ImageVolume(array, fused.geometry, placement_metadata(fused.metadata)), name, **kwargs)

    def _upsert(self, name: str, data, kind: str, placed: dict, **kwargs):
        """Replace a layer of that name (a re-run), keeping its place in the layer list and the
        display settings a reviewer changed on it (window, colour map, opacity, visibility)."""
        if name in self.viewer.layers:
            earlier = self.viewer.layers[name]
            position = self.viewer.layers.index(name)
            changed = self._settings_changed_since_made(earlier)
            self.viewer.layers.remove(name)
        else:
            position, changed = None, {}
        metadata = kwargs.pop("metadata", {})
        metadata.setdefault(LAYER_METADATA_KEY, {})["role"] = OUTPUT_ROLE  # never offered as a run input
        layer = getattr(self.viewer, f"add_{kind}")(data, name=name, metadata=metadata, **placed, **kwargs)
        self._settings_as_made[layer] = _display_settings(layer)
        for setting, value in changed.items():
            setattr(layer, setting, value)
        if position is not None:
            self.viewer.layers.move(self.viewer.layers.index(layer), position)
        return layer

    def _settings_changed_since_made(self, layer: Layer) -> dict:
        """The display settings of ``layer`` that differ from those the workbench made it with (none
        for a layer it did not make). An output's name fixes its kind, so they fit the layer a re-run
        puts in its place."""
        made = self._settings_as_made.get(layer)
        if made is None:
            return {}
        now = _display_settings(layer)
        return {setting: value for setting, value in now.items() if made.get(setting) != value}

    def _deformed_grid(self) -> np.ndarray:
        result = self.outcome.result
        return deformed_grid(result.displacement, self.grid_spacing, result.fused.single_slice_axis)

    def _checkerboard(self) -> np.ndarray:
        return checkerboard(self.outcome.reference_grey, self.outcome.aligned_grey, self.checker_tile)

    # ---- live adjustments (no re-run) ----------------------------------------------------------
    def update_quivers(self, _event=None) -> None:
        # The user may have deleted either layer: nothing to follow then.
        arrows, fused = self.layer("quivers"), self.layer("fused")
        if arrows is None or fused is None:
            return
        axis, index = viewed_slice(self.viewer, fused)
        result = self.outcome.result
        quivers = slice_quivers(result.displacement, result.fused.geometry.spacing, self.quiver_stride, axis, index)
        # features first would mismatch the old data's length; data first resizes them with defaults
        arrows.data = quivers.vectors
        arrows.features = {"magnitude_mm": quivers.magnitude_mm}
        arrows.edge_color = "magnitude_mm"

    def set_quiver_stride(self, stride: int) -> None:
        self.quiver_stride = int(stride)
        self.update_quivers()

    def set_arrow_scale(self, scale: float) -> None:
        """Draw arrows ``scale`` times their true length (sub-voxel fields are otherwise invisible)."""
        self.arrow_scale = float(scale)
        quivers = self.layer("quivers")
        if quivers is not None:
            quivers.length = self.arrow_scale

    def set_grid_spacing(self, spacing: int) -> None:
        self.grid_spacing = int(spacing)
        grid = self.layer("grid")
        if grid is not None:
            grid.data = self._deformed_grid()

    def set_checker_tile(self, tile: int) -> None:
        self.checker_tile = int(tile)
        board = self.layer("checkerboard")
        if board is not None:
            board.data = self._checkerboard()

    def fade(self, opacity: float) -> None:
        """Aligned moving image over the reference at ``opacity`` (0: reference only). 1, the fade
        slider's default and the view a run opens with, ends the fade: the layers it hid come back
        (unless the flicker still compares the two)."""
        if opacity >= 1.0:
            aligned = self.layer("aligned")
            if aligned is not None:
                aligned.opacity = 1.0
            if not self.flickering:
                self._restore_view_before_compare()
            return
        aligned = self._compare_layers()
        if aligned is None:
            return
        self._set_visible_for_compare(aligned, True)  # hidden in the review view: hidden again when the fade ends
        aligned.opacity = float(opacity)

    def start_flicker(self) -> None:
        if self._compare_layers() is None:
            self.stop_flicker()  # nothing to flicker: say so to the control that asked
        else:
            self._flicker.start()

    def stop_flicker(self) -> None:
        """Stop the flicker and end a fade: the view comes back as it was before them."""
        self._flicker.stop()
        self._restore_view_before_compare()
        if self.on_flicker_stopped is not None:
            self.on_flicker_stopped()

    def _restore_view_before_compare(self) -> None:
        """The view as before fade or flicker compared the reference with the aligned image: each
        layer they showed, hid or flipped as visible as it was, and grid mode back on if they left it."""
        for layer, visible in self._visibility_before_compare:
            if layer in self.viewer.layers:
                layer.visible = visible
        self._visibility_before_compare = []
        if self._grid_left_for_compare:
            self._grid_left_for_compare = False
            self.viewer.canvas.grid.enabled = True

    def _set_visible_for_compare(self, layer, visible: bool) -> None:
        """Show or hide ``layer`` while comparing, remembering its visibility before the first change."""
        if all(layer is not changed for changed, _ in self._visibility_before_compare):
            self._visibility_before_compare.append((layer, layer.visible))
        layer.visible = visible

    @property
    def flickering(self) -> bool:
        return self._flicker.isActive()

    def _flip(self) -> None:
        aligned = self._compare_layers()
        if aligned is None:
            self.stop_flicker()
            return
        aligned.opacity = 1.0
        self._set_visible_for_compare(aligned, not aligned.visible)

    def _compare_layers(self):
        """The aligned layer, after hiding every other layer but the reference (the moving input,
        the fused image, the maps, an earlier run's layers; the quivers stay), showing the reference
        and leaving grid mode (a comparison's side by side), so that fade and flicker overlay exactly
        the reference and the aligned image in one view."""
        aligned = self.layer("aligned")
        if aligned is None:
            return None
        reference, quivers = self.layer("reference"), self.layer("quivers")
        for layer in self.viewer.layers:
            if layer.visible and all(layer is not kept for kept in (reference, aligned, quivers)):
                self._set_visible_for_compare(layer, False)
        if reference is not None:
            self._set_visible_for_compare(reference, True)
        if self.viewer.canvas.grid.enabled:
            self.viewer.canvas.grid.enabled = False
            self._grid_left_for_compare = True
        return aligned


def _display_settings(layer: Layer) -> dict:
    """``layer``'s reviewer-adjustable display settings as comparable values (a colour map by name)."""
    from napari.layers import Image

    names = IMAGE_DISPLAY_SETTINGS if isinstance(layer, Image) else DISPLAY_SETTINGS
    settings = {name: getattr(layer, name) for name in names}
    if "colormap" in settings:
        settings["colormap"] = settings["colormap"].name
    if "contrast_limits" in settings:
        settings["contrast_limits"] = tuple(float(limit) for limit in settings["contrast_limits"])
    if "blending" in settings:
        settings["blending"] = str(settings["blending"])
    return settings
