"""Metrics table: current slice (refreshed as the slice changes) and whole volume (once per run)."""

from __future__ import annotations

import math

from qtpy.QtWidgets import QTableWidget, QTableWidgetItem

COLUMNS = ("metric", "slice", "volume")


class MetricsPanel(QTableWidget):
    """The *Metrics* tab: one row per metric, its value on the viewed slice and on the whole volume."""

    def __init__(self, parent=None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.volume: dict[str, float] = {}
        self.slice: dict[str, float] = {}

    def show_metrics(self, volume: dict[str, float] | None = None, slice_values: dict[str, float] | None = None) -> None:
        if volume is not None:
            self.volume = volume
        if slice_values is not None:
            self.slice = slice_values
        names = list(dict.fromkeys([*self.slice, *self.volume]))
        self.setRowCount(len(names))
        for row, name in enumerate(names):
            for column, text in enumerate((name, _format(self.slice.get(name)), _format(self.volume.get(name)))):
                self.setItem(row, column, QTableWidgetItem(text))
        self.resizeColumnsToContents()

    def value(self, name: str, column: str) -> str:
        """The text shown for ``name`` in ``column`` ("slice" or "volume")."""
        for row in range(self.rowCount()):
            if self.item(row, 0).text() == name:
                return self.item(row, COLUMNS.index(column)).text()
        raise KeyError(name)


def _format(value: float | None) -> str:
    if value is None:
        return ""
    return "n/a" if math.isnan(value) else f"{value:.4g}"
