"""Image baselines of the docked plot (pytest-mpl, compared on every `python -m pytest` through
``--mpl`` in pyproject's addopts). Regenerate after a deliberate change of the plot with
``python -m pytest tests/widgets/test_plot_images.py --mpl-generate-path=tests/widgets/baseline``
and look at the new images before committing them."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex

from napari_unifuse._qt.plots import NO_DEGRADATION_TEXT, ProbabilityPlot
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.quality import INVENTED, LOST, MAP_LABELS, RESTORATION_CHANGE, QualityMaps

pytestmark = pytest.mark.gui
BASELINE = dict(baseline_dir="baseline", style="default", tolerance=3)


def quality_with_defect(shape: tuple[int, ...]) -> QualityMaps:
    maps = {name: np.zeros(shape, np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE)}
    maps[INVENTED][..., 2:6, 2:6] = 1.0  # every slice: 16 of 400 voxels (4 %)
    if len(shape) == 3:
        maps[LOST][7, :3, :] = 1.0  # slice 7 only: 60 of 400 (15 %)
    maps[RESTORATION_CHANGE][..., :1, :4] = 1.0
    return QualityMaps.from_maps(maps, dict.fromkeys(maps, 0.5))


def offscreen(plot: ProbabilityPlot):
    """The plot's figure on an Agg canvas: pytest-mpl saves it after the Qt widget is gone."""
    FigureCanvasAgg(plot.figure)
    return plot.figure


@pytest.mark.mpl_image_compare(**BASELINE)
def test_3d_plot_lines_per_class_and_map_with_the_slice_marker(qtbot):
    plot = ProbabilityPlot()
    qtbot.addWidget(plot)
    slices = np.linspace(0, 1, 12)[:, None]
    probabilities = np.hstack([1 - slices, slices, np.zeros_like(slices), np.zeros_like(slices)])
    plot.show_probabilities(probabilities, DEGRADATION_CLASSES, "motion", quality_with_defect((12, 20, 20)))
    plot.set_slice(7)
    return offscreen(plot)


@pytest.mark.mpl_image_compare(**BASELINE)
def test_2d_plot_draws_bars(qtbot):
    plot = ProbabilityPlot()
    qtbot.addWidget(plot)
    plot.show_probabilities(np.array([[0.1, 0.15, 0.25, 0.5]]), DEGRADATION_CLASSES,
                            quality=quality_with_defect((20, 20)))
    return offscreen(plot)


def test_the_class_caveat_shows_under_the_values_until_the_next_run(qtbot):
    plot = ProbabilityPlot()
    qtbot.addWidget(plot)
    probabilities = np.array([[0.1, 0.6, 0.2, 0.1]])
    plot.show_probabilities(probabilities, DEGRADATION_CLASSES, caveat="'motion' is not evidence of the artefact")
    assert plot.values_label.text().endswith("'motion' is not evidence of the artefact")
    plot.show_probabilities(probabilities, DEGRADATION_CLASSES)
    assert "not evidence" not in plot.values_label.text()


@pytest.mark.parametrize("slices", [1, 12])
@pytest.mark.parametrize("with_quality", [False, True])
def test_a_method_without_degradation_classes_is_said_so_and_the_slice_still_follows(qtbot, slices, with_quality):
    """Fusion-only methods (bsafusion, mmif-amin) return (S, 0) probabilities beside the class names."""
    plot = ProbabilityPlot()
    qtbot.addWidget(plot)
    quality = quality_with_defect((20, 20) if slices == 1 else (slices, 20, 20)) if with_quality else None
    plot.show_probabilities(np.zeros((slices, 0)), DEGRADATION_CLASSES, quality=quality)
    plot.canvas.draw()
    probability_panel, *quality_panel = plot.figure.axes
    assert [text.get_text() for text in probability_panel.texts] == [NO_DEGRADATION_TEXT]
    assert not probability_panel.lines and not probability_panel.patches
    assert len(quality_panel) == int(with_quality)
    plot.set_slice(7)
    row = min(7, slices - 1)
    label = plot.values_label.text()
    assert label.startswith(f"slice {row}: {NO_DEGRADATION_TEXT}")
    assert ("flagged: invented structure" in label) == with_quality
    # A 3D run's marker is on the quality panel, the one panel with slices along its axis.
    assert plot.marker_position == (row if with_quality and slices > 1 else None)


def test_the_viewed_slice_survives_a_theme_change_without_a_marker(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    plot = ProbabilityPlot(viewer)
    qtbot.addWidget(plot)
    plot.show_probabilities(np.zeros((12, 0)), DEGRADATION_CLASSES)
    plot.set_slice(5)
    viewer.theme = "light" if viewer.theme == "dark" else "dark"
    assert plot.values_label.text().startswith("slice 5:")
    plot.disconnect_viewer()


def test_moving_the_marker_repaints_it_over_the_cached_figure(qtbot):
    """The marker is blitted (plots module docstring): its pixels move, the lines under it stay."""
    plot = ProbabilityPlot()
    qtbot.addWidget(plot)
    plot.resize(400, 320)
    plot.show()
    slices = np.linspace(0, 1, 12)[:, None]
    probabilities = np.hstack([1 - slices, slices, np.zeros_like(slices), np.zeros_like(slices)])
    plot.show_probabilities(probabilities, DEGRADATION_CLASSES, "motion", quality_with_defect((12, 20, 20)))
    plot.canvas.draw()
    ink = np.array([int(plot.figure.axes[0].title.get_color()[i:i + 2], 16) for i in (1, 3, 5)])

    def marker_pixels(row: int) -> int:
        """Pixels of the marker's colour in the probability panel's column at ``row``."""
        ax = plot.figure.axes[0]
        x = int(round(ax.transData.transform((row, 0))[0]))
        height = plot.canvas.buffer_rgba().shape[0]
        top, bottom = height - int(ax.bbox.y1) + 3, height - int(ax.bbox.y0) - 3
        column = np.asarray(plot.canvas.buffer_rgba())[top:bottom, x - 1:x + 2, :3].astype(int)
        return int((np.abs(column - ink).sum(axis=-1) < 30).any(axis=1).sum())

    before = {row: marker_pixels(row) for row in (0, 5, 9)}
    plot.set_slice(9)
    after = {row: marker_pixels(row) for row in (0, 5, 9)}
    assert before[0] > 20 and before[9] < 5
    assert after[9] > 20 and after[0] < 5
    assert before[5] == after[5] < 5  # a column the marker never crossed is left as it was


def test_a_one_slice_volume_stored_sagittally_is_one_image_in_the_plot(qtbot):
    """Its quality maps score it as one image while its class estimate repeats along the stored
    first axis: the plot took it for 40 slices and set_slice(20) indexed the one image's scores."""
    plot = ProbabilityPlot()
    qtbot.addWidget(plot)
    probabilities = np.tile([[0.1, 0.6, 0.2, 0.1]], (40, 1))
    plot.show_probabilities(probabilities, DEGRADATION_CLASSES, quality=quality_with_defect((40, 20, 1)))
    plot.set_slice(20)
    assert plot.is_single_slice and plot.marker_position is None
    assert plot.values_label.text().startswith("slice 0: none 0.10, motion 0.60")


def test_the_quality_panel_dots_the_suspicious_slices_above_each_maps_dotted_cutoff(qtbot):
    """In a volume a map must beat its typical slice as well as the flag level (QualityMaps.cutoffs).
    The panel drew one dotted line at the flag level (0.1 %), under which invented structure (4 % of
    every slice) and restoration change (1 %) looked suspicious on all 12 slices; only slice 7 is."""
    quality = quality_with_defect((12, 20, 20))
    plot = ProbabilityPlot()
    qtbot.addWidget(plot)
    plot.show_probabilities(np.zeros((12, 0)), DEGRADATION_CLASSES, quality=quality)
    panel = plot.figure.axes[-1]
    cutoff_line, dots = {}, {}
    for name in (INVENTED, LOST, RESTORATION_CHANGE):
        scores = next(line for line in panel.get_lines() if line.get_label() == MAP_LABELS[name])
        in_its_colour = [line for line in panel.get_lines() if to_hex(line.get_color()) == to_hex(scores.get_color())]
        dotted = [float(line.get_ydata()[0]) for line in in_its_colour if line.get_linestyle() == ":"]
        cutoff_line[name] = dotted[0] if len(dotted) == 1 else dotted
        dots[name] = [int(index) for line in in_its_colour if line.get_marker() == "o" for index in line.get_xdata()]
    assert cutoff_line == pytest.approx({INVENTED: 4.0, LOST: 0.1, RESTORATION_CHANGE: 1.0})
    assert dots == {INVENTED: [], LOST: [7], RESTORATION_CHANGE: []}
    assert sorted(sum(dots.values(), [])) == quality.suspicious_slices()
