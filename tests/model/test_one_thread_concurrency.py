"""one_thread() used by two threads at once (the workbench's Run beside a method comparison) gives
the process back the thread count it had, and keeps each thread inside on one thread."""

import threading
from collections.abc import Callable

import pytest
import torch

from napari_unifuse.model.repeatable import one_thread

TIMEOUT_S = 10


def count_of_a_new_thread() -> int:
    counts: list[int] = []
    thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return counts[0]


def run_together(*targets: Callable[[], None]) -> None:
    """Run each target on its own thread and re-raise the first failure here."""
    failures: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as error:  # re-raised in the test's thread
                failures.append(error)
        return run

    threads = [threading.Thread(target=guarded(target)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
    if failures:
        raise failures[0]


@pytest.mark.parametrize("first_in_leaves_first", [True, False])
def test_overlapping_uses_give_the_process_its_count_back(two_threads, first_in_leaves_first):
    first_entered, both_inside, first_left = (threading.Barrier(2, timeout=TIMEOUT_S) for _ in range(3))
    counts_inside: dict[str, list[int]] = {"first": [], "second": []}

    def first() -> None:
        with one_thread():
            first_entered.wait()
            both_inside.wait()
            counts_inside["first"].append(torch.get_num_threads())
            if not first_in_leaves_first:
                first_left.wait()  # the second leaves before this one
        if first_in_leaves_first:
            first_left.wait()

    def second() -> None:
        first_entered.wait()  # this thread's first torch call comes while the first is pinned
        with one_thread():
            both_inside.wait()
            if first_in_leaves_first:
                first_left.wait()  # the first has left: this thread must still be pinned
            counts_inside["second"].append(torch.get_num_threads())
        if not first_in_leaves_first:
            first_left.wait()

    run_together(first, second)
    assert counts_inside == {"first": [1], "second": [1]}
    assert count_of_a_new_thread() == 2
    assert torch.get_num_threads() == 2


def test_a_thread_started_while_another_was_pinned_restores_the_process_count(two_threads):
    """A thread whose first torch call came while another thread was pinned starts at one; when it
    pins later, it must give back the process's count, not its own."""
    started_while_pinned, pin_left = (threading.Barrier(2, timeout=TIMEOUT_S) for _ in range(2))
    own_count_before: list[int] = []

    def pinned_first() -> None:
        with one_thread():
            started_while_pinned.wait()
            pin_left.wait()  # the other thread reads its count before this one leaves

    def started_late() -> None:
        started_while_pinned.wait()
        own_count_before.append(torch.get_num_threads())
        pin_left.wait()
        with one_thread():
            pass

    run_together(pinned_first, started_late)
    assert own_count_before == [1]  # torch's own behaviour, which the pin must not leak
    assert count_of_a_new_thread() == 2


def test_a_nested_pin_keeps_the_outer_block_on_one_thread(two_threads):
    with one_thread():
        with one_thread():
            pass
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and count_of_a_new_thread() == 2
