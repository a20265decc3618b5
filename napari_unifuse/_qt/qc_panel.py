"""Review controls Slicer / ITK-SNAP users expect: fade and flicker between the reference and the
aligned moving image, quiver density, deformed grid, checkerboard, and a walk through the slices
the quality maps flag. Nothing here re-runs the model."""

from __future__ import annotations

from magicgui import widgets

from napari_unifuse._qt.collapsible import collapsible_section
from napari_unifuse._qt.outputs import ResultLayers


class QCPanel(widgets.Container):
    """The *Review* tab: suspicious-slice navigation, fade / flicker, and (under *Advanced*) the
    density of the quivers, grid and checkerboard. The workbench connects the navigation buttons."""

    def __init__(self, results: ResultLayers) -> None:
        self.results = results
        self.previous_suspicious = widgets.PushButton(text="◀ suspicious", enabled=False,
                                                      tooltip="Go to the previous slice the quality maps flag")
        self.next_suspicious = widgets.PushButton(text="suspicious ▶", enabled=False,
                                                  tooltip="Go to the next slice the quality maps flag")
        self.suspicion = widgets.Label(value="no quality maps yet")
        self.suspicion.native.setWordWrap(True)  # a partial-coverage note is a sentence: wrap, not widen the dock
        self.quiver_stride = widgets.SpinBox(label="quiver every", value=results.quiver_stride, min=1, max=64,
                                             tooltip="Draw one displacement arrow every N voxels")
        self.arrow_scale = widgets.FloatSpinBox(label="arrow scale", value=results.arrow_scale, min=0.1, max=50,
                                                step=0.5, tooltip="Arrows drawn this many times their true length")
        self.grid_spacing = widgets.SpinBox(label="grid every", value=results.grid_spacing, min=2, max=64,
                                            tooltip="Deformed-grid line spacing in voxels")
        self.checker_tile = widgets.SpinBox(label="checker tile", value=results.checker_tile, min=1, max=256,
                                            tooltip="Checkerboard square size in pixels")
        self.fade = widgets.FloatSlider(label="fade ref ↔ aligned", value=1.0, min=0.0, max=1.0, step=0.05)
        self.flicker = widgets.CheckBox(label="flicker ref ↔ aligned", value=False)
        navigation = widgets.Container(widgets=[self.previous_suspicious, self.next_suspicious], layout="horizontal",
                                       labels=False)
        super().__init__(widgets=[navigation, self.suspicion, self.fade, self.flicker])
        self.advanced_settings = widgets.Container(widgets=[self.quiver_stride, self.arrow_scale, self.grid_spacing,
                                                            self.checker_tile])
        self.advanced = collapsible_section("Advanced", self.advanced_settings.native)
        self.native.layout().addWidget(self.advanced)
        self.native.layout().addStretch()  # a tall tab keeps its controls together at the top
        self.quiver_stride.changed.connect(results.set_quiver_stride)
        self.arrow_scale.changed.connect(results.set_arrow_scale)
        self.grid_spacing.changed.connect(results.set_grid_spacing)
        self.checker_tile.changed.connect(results.set_checker_tile)
        self.fade.changed.connect(results.fade)
        self.flicker.changed.connect(lambda on: results.start_flicker() if on else results.stop_flicker())
        results.on_flicker_stopped = self._show_flicker_stopped

    def _show_flicker_stopped(self) -> None:
        """The flicker also stops on its own (a new run, a comparison, the aligned layer deleted): untick
        it then; stopping it also ends a fade, so the slider goes back to its no-fade end."""
        self.flicker.value = False
        self.fade.value = 1.0
