"""Run the structural matching on one torch thread, so that its field does not depend on the machine.

A float sum over several threads adds its parts in an order that depends on the thread count. The
matching's MI refinement climbs, with Adam, an MI landscape whose optima can differ by less than
that rounding, so a difference in the last bits of a sum ends on another optimum: the same pair
landed pixels apart on one thread and on two (``bench/results/matching_threads.md``: 37 of 67
Harvard PET pairs more than 0.5 px apart, one by 12.5 px), and a table measured on one machine
would not hold on another. One thread adds in one order. It costs little: 0.33 → 0.39 s for a
256² pair; in the 3-D engine the matching runs beside SimpleITK's one thread, and a 160³ pair took
no longer pinned than not. (The dense MIND refinement, also Adam, is a smooth problem that does
not amplify: 7e-4 voxels apart on an 80³ pair; it is not pinned.)

``torch.set_num_threads`` acts on the calling thread's OpenMP pool (and is the default of threads
started later), so the setting is restored on the way out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch

_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def on_one_thread(function: Callable[_Params, _Result]) -> Callable[_Params, _Result]:
    """``function`` run inside :func:`one_thread`."""

    @functools.wraps(function)
    def wrapper(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        with one_thread():
            return function(*args, **kwargs)

    return wrapper
