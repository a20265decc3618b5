"""Review controls Slicer / ITK-SNAP users expect: quiver density, deformed grid, checkerboard,
fade and flicker between the reference and the aligned moving image. Nothing here re-runs the model."""

from __future__ import annotations

from magicgui import widgets

from napari_unifuse._qt.outputs import ResultLayers


class QCPanel(widgets.Container):
    def __init__(self, results: ResultLayers) -> None:
        self.results = results
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
        super().__init__(widgets=[self.quiver_stride, self.arrow_scale, self.grid_spacing, self.checker_tile, self.fade, self.flicker])
        self.quiver_stride.changed.connect(results.set_quiver_stride)
        self.arrow_scale.changed.connect(results.set_arrow_scale)
        self.grid_spacing.changed.connect(results.set_grid_spacing)
        self.checker_tile.changed.connect(results.set_checker_tile)
        self.fade.changed.connect(results.fade)
        self.flicker.changed.connect(lambda on: results.start_flicker() if on else results.stop_flicker())
