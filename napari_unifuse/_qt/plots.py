"""Per-slice degradation probabilities: one line per class along z, a marker on the viewed slice."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget


class ProbabilityPlot(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.figure = Figure(figsize=(4, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)  # stacked with the workbench dock, it would otherwise collapse
        self.axes = self.figure.add_subplot()
        self.values_label = QLabel("Run UniFuse to see the estimated degradation per slice.")
        self.values_label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.canvas)
        layout.addWidget(self.values_label)
        self.probabilities: np.ndarray | None = None
        self.class_names: tuple[str, ...] = ()
        self.marker = None

    def show_probabilities(self, probabilities: np.ndarray, class_names: tuple[str, ...], declared: str = "auto") -> None:
        """``probabilities``: ``(S, classes)``, one row per slice along z (a single row for 2D)."""
        self.probabilities, self.class_names = np.asarray(probabilities), tuple(class_names)
        self.axes.clear()
        slices = np.arange(len(self.probabilities))
        style = "-" if len(slices) > 1 else "o"  # a 2D image has one "slice": dots, not invisible lines
        for column, name in enumerate(self.class_names):
            self.axes.plot(slices, self.probabilities[:, column], style, label=name)
        self.axes.set_ylim(0, 1)
        self.axes.set_xlabel("slice (z)" if len(slices) > 1 else "image")
        self.axes.set_ylabel("probability")
        title = "degradation per slice" + ("" if declared == "auto" else f" (declared: {declared})")
        self.axes.set_title(title, fontsize=9)
        self.axes.legend(fontsize=7, loc="upper right")
        self.marker = self.axes.axvline(0, color="k", linestyle="--", linewidth=1)
        self.set_slice(0)

    def set_slice(self, index: int) -> None:
        if self.probabilities is None:
            return
        row = int(np.clip(index, 0, len(self.probabilities) - 1))
        self.marker.set_xdata([row, row])
        values = ", ".join(f"{name} {p:.2f}" for name, p in zip(self.class_names, self.probabilities[row]))
        self.values_label.setText(f"slice {row}: {values}")
        self.canvas.draw_idle()

    @property
    def marker_position(self) -> float | None:
        return None if self.marker is None else float(self.marker.get_xdata()[0])
