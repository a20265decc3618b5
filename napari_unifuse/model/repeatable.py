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

``torch.set_num_threads`` sets the calling thread's OpenMP pool and also the count every thread
takes at its first torch call; a thread keeps the count it took until it sets its own. Two threads
can pin at once (the workbench's Run and a method comparison both run the matching), so the pin is
counted process-wide: the first to enter saves the count a new thread would take, each thread that
leaves its outermost pin is given that count back, and the last to leave leaves it as the default,
whatever the order. A thread still inside keeps its own count of one.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch

_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


_pin_lock = threading.Lock()
_threads_pinned = 0  # threads inside one_thread() now
_unpinned_threads = 1  # the count a new thread took before the first of them entered
_this_thread = threading.local()  # .depth: how many one_thread() blocks this thread is inside


def _count_of_a_new_thread() -> int:
    """What a thread starting now takes (the last ``torch.set_num_threads`` anywhere); the calling
    thread's own count can be older, so it is read in a thread of its own."""
    counts: list[int] = []
    probe = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    return counts[0]


@contextmanager
def one_thread() -> Iterator[None]:
    global _threads_pinned, _unpinned_threads
    depth = getattr(_this_thread, "depth", 0)
    _this_thread.depth = depth + 1
    if depth == 0:
        with _pin_lock:
            if _threads_pinned == 0:
                _unpinned_threads = _count_of_a_new_thread()
            _threads_pinned += 1
            # A thread's first torch call sets its count from the process's: made here, before the
            # pin, so that a later first call cannot replace the pin by a count another thread left.
            torch.get_num_threads()
            torch.set_num_threads(1)
    try:
        yield
    finally:
        _this_thread.depth = depth
        if depth == 0:
            with _pin_lock:
                _threads_pinned -= 1
                torch.set_num_threads(_unpinned_threads)


def on_one_thread(function: Callable[_Params, _Result]) -> Callable[_Params, _Result]:
    """``function`` run inside :func:`one_thread`."""

    @functools.wraps(function)
    def wrapper(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        with one_thread():
            return function(*args, **kwargs)

    return wrapper
