"""Image baselines of the docked plot (pytest-mpl, compared on every `python -m pytest` through
``--mpl`` in pyproject's addopts). Regenerate after a deliberate change of the plot with
``python -m pytest tests/widgets/test_plot_images.py --mpl-generate-path=tests/widgets/baseline``
and look at the new images before committing them."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from napari_unifuse._qt.plots import ProbabilityPlot
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.quality import INVENTED, LOST, RESTORATION_CHANGE, QualityMaps

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
