"""Progress and cancellation plumbing shared by the engine, the CLI and the GUI.

The engine never knows who is listening: it calls ``progress(stage, done, total)`` and asks a
:class:`CancelToken` between tiles and stages (the micro-sam pattern), so the same core drives a
tqdm bar on the terminal and a progress bar plus Cancel button in napari.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from napari_unifuse.errors import Cancelled

ProgressCallback = Callable[[str, int, int], None]


def ignore_progress(stage: str, done: int, total: int) -> None:
    """The default listener: inference without anyone watching."""


class CancelToken:
    """A thread-safe flag the GUI sets and the engine polls at safe points."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """Stop the work here; callers rely on this happening before anything is written."""
        if self._event.is_set():
            raise Cancelled("fusion was cancelled; nothing was written")
