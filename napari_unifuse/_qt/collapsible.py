"""A titled section that opens on click and starts closed (superqt's QCollapsible, napari's own dependency)."""

from __future__ import annotations

from qtpy.QtWidgets import QWidget
from superqt import QCollapsible


def collapsible_section(title: str, content: QWidget, expanded: bool = False) -> QCollapsible:
    section = QCollapsible(title)
    section.addWidget(content)
    if expanded:
        section.expand(animate=False)
    return section
