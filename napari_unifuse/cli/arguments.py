"""Argument types shared by the sub-commands: a bad value is argparse's one-line usage error (exit 2),
not a traceback from deep inside, nor a silent default."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number of at least 1 (a size, a count)."""
    return _whole_number(text, minimum=1)


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (a random seed, a number of optional passes)."""
    return _whole_number(text, minimum=0)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value
