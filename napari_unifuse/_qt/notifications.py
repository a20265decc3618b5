"""Every problem the workbench meets becomes a napari notification a clinician can act on.

Expected problems (``UniFuseError``: bad input, missing checkpoint, cancelled run) show their own
message, and so does a folder the user cannot write to (``PermissionError``, a full disk, a
read-only file system): the file and what to do. Anything else is a bug: the user gets a one-line
message and the traceback goes to the log at DEBUG level, never to the console.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from napari.utils.notifications import show_error, show_info, show_warning

from napari_unifuse.engine.device import is_out_of_memory
from napari_unifuse.errors import Cancelled, UniFuseError

LOG = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
# A file system's refusals to write that the user can act on, with what to do: not bugs to report.
WRITE_REFUSAL_ADVICE = {
    errno.ENOSPC: "free some space on its disk or save to a folder on another disk",
    errno.EDQUOT: "free some of your disk quota or save to a folder on another disk",
    errno.EFBIG: "its file system cannot hold a file this large; save to a folder on another disk",
    errno.EROFS: "choose a folder on a disk that can be written to",
}


def report_error(error: BaseException, action: str) -> None:
    """Show ``error`` as the outcome of ``action`` (e.g. "Run UniFuse")."""
    if isinstance(error, Cancelled):
        show_info(f"{action} was cancelled; no layers were added and nothing was written.")
    elif isinstance(error, UniFuseError):
        show_error(f"{action}: {error}")
    elif isinstance(error, PermissionError):  # e.g. a read-only runs folder: the user's to fix, not a bug
        where = error.filename or "a file"
        show_error(f"{action}: permission denied on {where}; check its permissions or choose another runs folder.")
    elif isinstance(error, OSError) and error.errno in WRITE_REFUSAL_ADVICE:
        where, reason = error.filename or "a file", error.strerror or os.strerror(error.errno)
        show_error(f"{action}: could not write {where} ({reason}); {WRITE_REFUSAL_ADVICE[error.errno]}.")
    elif is_out_of_memory(error):
        show_error(f"{action}: the computer ran out of memory ({error}); close other programs or layers and run "
                   "again, or use smaller or coarser volumes.")
    else:
        LOG.debug("unexpected error during %s", action, exc_info=error)
        show_error(f"{action} failed unexpectedly ({type(error).__name__}: {error}). "
                   "Please report this with the input files.")


@dataclass(frozen=True)
class WorkerFailed:
    """A worker's error handed back as a value: napari relays a raised exception as a traceback
    notification (and superqt re-raises a returned exception), but the user should see one line
    (``report_error(failure.error, failure.action)`` on the GUI thread)."""

    error: Exception
    action: str  # what the notification says failed


def reports_errors(action: str) -> Callable[[F], F]:
    """Decorator for button handlers: errors become notifications and the handler returns None."""

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return handler(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - a button must never crash the viewer
                report_error(error, action)
                return None

        return guarded  # type: ignore[return-value]

    return decorate


def show_warnings(messages: Iterable[str]) -> None:
    for message in messages:
        show_warning(message)
