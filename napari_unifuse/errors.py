"""The one exception type users see: a message they can act on, naming what was wrong."""

from __future__ import annotations


class UniFuseError(Exception):
    """Base class: every message is written for the person at the viewer or the terminal."""


class InputError(UniFuseError, ValueError):
    """Bad input data (corrupt file, wrong dimensionality, empty or NaN-only array, ...).

    The message names the file (or layer) and the problem.
    """

    def __init__(self, problem: str, source: object | None = None) -> None:
        self.problem = problem
        self.source = source
        super().__init__(f"{source}: {problem}" if source is not None else problem)


class RegistrationError(UniFuseError):
    """A classical registration that failed on this pair (its optimiser found no overlap or no
    signal to follow, e.g. a constant image); the message says what to try instead."""

    def __init__(self, registration: str, cause: str) -> None:
        self.registration = registration
        self.cause = cause
        super().__init__(f"the {registration} registration failed on this pair ({cause}); use another "
                         "registration (e.g. the structural matching) or check that the images show the same "
                         "anatomy and are not constant")


class CheckpointError(UniFuseError):
    """A checkpoint that cannot be used: missing, corrupt, or made for another model config."""


class Cancelled(UniFuseError):
    """Raised inside the engine when the user pressed Cancel; nothing was written."""
