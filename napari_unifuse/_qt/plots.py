"""The docked per-slice plot: degradation probabilities and, below them, how much of each slice the
quality maps flag. A 3D run draws one line per class (and per map) along z with a marker on the
viewed slice; a 2D image is one "slice", so it draws bars. A method that estimates no degradation
gets a sentence in place of the probabilities. Colours follow napari's theme.

The markers are blitted: moving them redraws only them over the figure's cached pixels. A full
draw (constrained layout, every line) took 120 of the 185 ms a slice change cost on a 176-slice
run, and scrolling through slices moves nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.utils.theme import get_theme
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from napari_unifuse.engine.quality import MAP_LABELS, QualityMaps

if TYPE_CHECKING:
    import napari.viewer

WAITING_TEXT = "Run UniFuse to see the estimated degradation per slice."
NO_DEGRADATION_TEXT = "this method estimates no degradation"


class ProbabilityPlot(QWidget):
    """Per-slice degradation probabilities and quality-map scores for the latest run.

    Restyles itself when napari's theme changes; call :meth:`disconnect_viewer` before dropping it.
    """

    def __init__(self, viewer: napari.viewer.Viewer | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.figure = Figure(figsize=(4, 3.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        self.values_label = QLabel(WAITING_TEXT)
        self.values_label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.canvas)
        layout.addWidget(self.values_label)
        self.probabilities: np.ndarray | None = None
        self.class_names: tuple[str, ...] = ()
        self.declared = "auto"
        self.quality: QualityMaps | None = None
        self.caveat: str | None = None
        self.row = 0  # the viewed slice, which a restyle keeps even where no marker shows it
        self.markers: list = []
        self._background = None  # the figure's pixels without the markers, taken at each full draw
        self.canvas.mpl_connect("draw_event", self._on_draw)
        self.theme_id = viewer.theme if viewer is not None else "dark"
        if viewer is not None:
            viewer.events.theme.connect(self._on_theme)
        self._redraw()

    # ---- data ----------------------------------------------------------------------------------
    def show_probabilities(self, probabilities: np.ndarray, class_names: tuple[str, ...], declared: str = "auto",
                           quality: QualityMaps | None = None, caveat: str | None = None) -> None:
        """``probabilities``: ``(S, classes)``, one row per slice along z (a single row for 2D), no
        columns for a method that estimates no degradation; ``quality``: the run's quality maps,
        whose per-slice scores get a second panel; ``caveat``: a line shown under the values
        (``FusionResult.class_caveat``)."""
        self.probabilities, self.class_names = np.asarray(probabilities), tuple(class_names)
        self.declared, self.quality, self.caveat = declared, quality, caveat
        self._redraw()
        self.set_slice(0)

    @property
    def has_data(self) -> bool:
        return self.probabilities is not None

    @property
    def is_single_slice(self) -> bool:
        """One image: a 2D one, or a one-slice volume along any axis (its quality maps score it as one
        image; a sagittal one repeats its one class estimate along the stored first axis)."""
        if self.probabilities is None:
            return False
        return len(self.probabilities) == 1 or (self.quality is not None and self.quality.slice_axis is None)

    @property
    def estimates_degradation(self) -> bool:
        """False for fusion-only and classical methods, whose results carry no class columns (their
        ``class_names`` may still list the classes)."""
        return self.probabilities is not None and self.probabilities.shape[1] > 0

    def set_slice(self, index: int) -> None:
        if self.probabilities is None:
            return
        row = self.row = 0 if self.is_single_slice else int(np.clip(index, 0, len(self.probabilities) - 1))
        for marker in self.markers:
            marker.set_xdata([row, row])
        values = (", ".join(f"{name} {p:.2f}" for name, p in zip(self.class_names, self.probabilities[row]))
                  if self.estimates_degradation else NO_DEGRADATION_TEXT)
        text = f"slice {row}: {values}"
        if self.quality is not None:
            flagged = ", ".join(f"{MAP_LABELS[name]} {100 * scores[row]:.1f} %"
                                for name, scores in self.quality.slice_scores.items())
            text += f"\nflagged: {flagged}"
            if row in self.quality.slices_outside_moving():
                text += " (mostly outside the moving image: not evidence of alignment)"
        if self.caveat:
            text += f"\n{self.caveat}"
        self.values_label.setText(text)
        if self._background is None:  # not drawn yet: the full draw puts the markers in place
            self.canvas.draw_idle()
            return
        self.canvas.restore_region(self._background)
        self._draw_markers()
        self.canvas.update()  # a paint at Qt's next turn, which merges a fast scroll's moves (blit paints now)

    def _on_draw(self, _event) -> None:
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_markers()

    def _draw_markers(self) -> None:
        for marker in self.markers:
            marker.axes.draw_artist(marker)

    @property
    def marker_position(self) -> float | None:
        return float(self.markers[0].get_xdata()[0]) if self.markers else None

    # ---- drawing -------------------------------------------------------------------------------
    def _redraw(self) -> None:
        self.figure.clear()
        self.markers = []
        self._background = None
        theme = get_theme(self.theme_id)
        background, text = theme.background.as_hex(), theme.text.as_hex()
        self.figure.set_facecolor(background)
        if self.probabilities is None:
            self.canvas.draw_idle()
            return
        panels = 2 if self.quality is not None else 1
        axes = self.figure.subplots(panels, 1, sharex=not self.is_single_slice, squeeze=False)[:, 0]
        if self.estimates_degradation:
            self._draw_probabilities(axes[0])
        else:
            _say_no_degradation(axes[0], text)
        if self.quality is not None:
            self._draw_quality(axes[1], self.quality)
        for ax in axes:
            _style_axes(ax, background, text)
            if not self.is_single_slice and ax.has_data():  # no marker on the note that stands for no data
                self.markers.append(ax.axvline(0, color=text, linestyle="--", linewidth=1, animated=True))
        self.canvas.draw_idle()

    def _draw_probabilities(self, ax: Axes) -> None:
        assert self.probabilities is not None
        if self.is_single_slice:
            ax.bar(range(len(self.class_names)), self.probabilities[0], color=_colours(len(self.class_names)))
            ax.set_xticks(range(len(self.class_names)), self.class_names)
        else:
            for column, name in enumerate(self.class_names):
                ax.plot(self.probabilities[:, column], label=name)
            _legend(ax)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
        ax.set_title("degradation" + ("" if self.declared == "auto" else f" (declared {self.declared})"), fontsize=8)

    def _draw_quality(self, ax: Axes, quality: QualityMaps) -> None:
        """Each map's score per slice with its cutoff dotted (``QualityMaps.cutoffs``: in a volume a
        map that flags a little of every slice must flag more than that, not just the flag level) and,
        in a volume, a dot where a map makes the slice suspicious: what navigation and the report list."""
        names = list(quality.slice_scores)
        percent = {name: 100.0 * np.asarray(quality.slice_scores[name]) for name in names}
        cutoff_percent = {name: 100.0 * cutoff for name, cutoff in quality.cutoffs().items()}
        colours = _colours(len(names), offset=4)
        if self.is_single_slice:
            ax.bar(range(len(names)), [percent[name][0] for name in names], color=colours)
            ax.hlines([cutoff_percent[name] for name in names], np.arange(len(names)) - 0.4,
                      np.arange(len(names)) + 0.4, color="grey", linestyle=":", linewidth=1)
            ax.set_xticks(range(len(names)), [MAP_LABELS[name].replace(" ", "\n") for name in names])
            ax.set_title("quality (dotted: cutoffs)", fontsize=8)
        else:
            flagged_slices = quality.slices_flagged_by_map()
            for colour, name in zip(colours, names):
                ax.plot(percent[name], color=colour, label=MAP_LABELS[name])
                ax.axhline(cutoff_percent[name], color=colour, linestyle=":", linewidth=1)
                ax.plot(flagged_slices[name], percent[name][flagged_slices[name]], color=colour,
                        linestyle="none", marker="o", markersize=4)
            outside = quality.slices_outside_moving()
            for index in outside:  # no moving data there: the scores are no evidence of alignment
                ax.axvspan(index - 0.5, index + 0.5, color="grey", alpha=0.3, linewidth=0)
            _legend(ax)
            ax.set_xlabel("slice (z)")
            ax.set_title("quality (dots: suspicious; dotted: cutoffs" + ("; grey: outside the moving image)" if outside
                                                                        else ")"), fontsize=8)
        top = max(max(float(values.max()) for values in percent.values()), 2 * 100.0 * quality.flag_level,
                  *cutoff_percent.values())
        ax.set_ylim(0, 1.1 * top)
        ax.set_ylabel("% flagged")

    def _on_theme(self, event) -> None:
        self.theme_id = event.value
        self._redraw()
        self.set_slice(self.row)

    def disconnect_viewer(self) -> None:
        """Stop following the viewer's theme (the plot is being closed)."""
        if self.viewer is not None:
            self.viewer.events.theme.disconnect(self._on_theme)
            self.viewer = None


def _style_axes(ax: Axes, background: str, text: str) -> None:
    """napari-matplotlib's theme mapping: theme background behind the data, theme text for ink."""
    ax.set_facecolor(background)
    ax.tick_params(colors=text, labelsize=7)
    for spine in ax.spines.values():
        spine.set_color(text)
    for label in (ax.xaxis.label, ax.yaxis.label):
        label.set_color(text)
        label.set_fontsize(8)
    ax.title.set_color(text)
    legend = ax.get_legend()
    if legend is not None:
        legend.get_frame().set_facecolor(background)
        legend.get_frame().set_edgecolor(text)
        for label in legend.get_texts():
            label.set_color(text)


def _say_no_degradation(ax: Axes, colour: str) -> None:
    """The sentence instead of the probabilities, in an axes without frame or ticks to read."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, NO_DEGRADATION_TEXT, transform=ax.transAxes, ha="center", va="center", color=colour,
            fontsize=8)


def _legend(ax: Axes) -> None:
    """Small and two columns wide: the dock beside a 1280-pixel window is under 300 pixels."""
    ax.legend(fontsize=6, ncols=2, loc="upper right", framealpha=0.6, handlelength=1.2, columnspacing=0.8)


def _colours(count: int, offset: int = 0) -> list:
    """Matplotlib's default cycle colours: bars of a 2D image match the lines of a 3D run."""
    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[(offset + index) % len(cycle)] for index in range(count)]
