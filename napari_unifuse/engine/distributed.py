"""Several processes, one job: the process group ``torchrun`` describes, for training and for
sharded batches of pairs (``unifuse fuse --pairs`` under ``torchrun``).

``torchrun --nproc_per_node N`` starts N copies of a command with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and a rendezvous address in their environment; ``torchrun --nnodes M`` does the
same on M machines of a cluster (SLURM, Kubernetes: whatever starts the command on every node).
Processes talk over NCCL between GPUs and gloo between CPUs. No scheduler of our own: each
process takes its share by rank, and the results meet at rank 0.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from napari_unifuse.engine.device import resolve_device
from napari_unifuse.errors import InputError

Item = TypeVar("Item")
RESULTS_TIMEOUT = timedelta(days=30)
# How long a process waits for the others to join before it says so: torchrun starts a job's processes
# on a machine together, which reach the rendezvous seconds apart; a longer wait means some never started.
JOIN_NOTICE_SECONDS = 10.0
# Set by torchrun's agent in every process it starts (and by nothing else).
_TORCHRUN_AGENT_VARIABLE = "TORCHELASTIC_RUN_ID"


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; a plain run is rank 0 of 1."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # The group ``gather`` waits in (the default group when None).
    results_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Item]) -> list[Item]:
        """This rank's share: every ``world_size``-th item from its rank on, so that shards differ
        in size by at most one and together hold every item exactly once."""
        return list(items[self.rank :: self.world_size])

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (picklable), in rank order, at rank 0; None on the other ranks.
        A collective: every rank must call it."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self.results_group)
        return gathered

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# What torchrun sets beside WORLD_SIZE, and env:// initialisation reads.
_TORCHRUN_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def _torchrun_number(name: str, default: str | None = None) -> int:
    value = os.environ.get(name) or default  # an exported but empty variable is no setting at all
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = -1
    is_count = name.endswith("WORLD_SIZE")
    if number < (1 if is_count else 0):
        raise InputError(f"{name}={value!r} is not a {'process count' if is_count else 'rank'} torchrun would set; "
                         "unset it, or start the batch with torchrun", "environment")
    return number


def setup_distributed(requested_device: str) -> Distributed:
    """Join the process group ``torchrun`` set up in the environment (rank 0 of 1 without it).

    On CUDA each process takes the GPU of its local rank and talks NCCL; on CPUs gloo, with the
    machine's cores split between the processes that share it (unless OMP_NUM_THREADS says
    otherwise, ``_splits_cores``). Settings no torchrun job has (a rank not below its count) are an
    InputError; waiting for the other processes to join can be stopped by SIGTERM or Ctrl-C, and a
    long wait is warned about (``_stoppable_while_joining``).
    """
    world_size = _torchrun_number("WORLD_SIZE", "1")
    device = resolve_device(requested_device)
    if world_size == 1:
        return Distributed(0, 0, 1, device)
    # A shell or container that exports WORLD_SIZE for another tool is not a torchrun job: say so in
    # one line instead of a KeyError or torch's own traceback from init_process_group.
    missing = [name for name in _TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise InputError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         "not: start the batch with torchrun (torchrun --nproc_per_node N -m napari_unifuse.cli ...), "
                         "or unset WORLD_SIZE to run in one process", "environment")
    rank, local_rank = _torchrun_number("RANK"), _torchrun_number("LOCAL_RANK", "0")
    local_world = _torchrun_number("LOCAL_WORLD_SIZE", str(world_size))
    # Settings no torchrun job has: the process would wait for peers that can never all join.
    inconsistent = [f"{index_name}={index} is not below {count_name}={count} (ranks count from 0)"
                    for index_name, index, count_name, count in (("RANK", rank, "WORLD_SIZE", world_size),
                                                                 ("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE",
                                                                  local_world)) if index >= count]
    if local_world > world_size:
        inconsistent.append(f"LOCAL_WORLD_SIZE={local_world} exceeds WORLD_SIZE={world_size}")
    if inconsistent:
        raise InputError(f"{inconsistent[0]}: start the batch with torchrun, or unset WORLD_SIZE to run in one "
                         "process", "environment")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif _splits_cores(local_world):
        # Processes on one machine share its cores: without this each would start one thread
        # per core and they would oversubscribe the CPU.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        with _stoppable_while_joining(rank, world_size):
            # gloo also on GPUs would work, but NCCL is what moves tensors between them fast.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # A process whose shard is done waits at the gather for the slowest one, however long it
    # takes: shards hold the same number of pairs, not the same work (one 3D pair among 2D ones).
    # The default group gives up after 30 min (gloo; 10 min NCCL), and torchrun then kills the
    # whole batch. A process that dies instead of lagging ends the job through torchrun anyway.
    results_group = dist.new_group(backend="gloo", timeout=RESULTS_TIMEOUT)
    return Distributed(rank, local_rank, world_size, device, results_group)


def _splits_cores(local_world: int) -> bool:
    """Whether to give each of the ``local_world`` processes on this machine its share of the cores,
    rather than the thread count OMP_NUM_THREADS asks for (which torch already took). Unset, it asks
    for none. torchrun sets it to 1 where it was unset (with a warning), in every process of a
    machine running several: a 1 there is taken for torchrun's, and an explicit 1 cannot be told
    from it. Any other value, or a 1 outside torchrun, is the user's and is kept."""
    requested = os.environ.get("OMP_NUM_THREADS")
    if not requested:
        return True
    return requested == "1" and local_world > 1 and bool(os.environ.get(_TORCHRUN_AGENT_VARIABLE))


@contextmanager
def _stoppable_while_joining(rank: int, world_size: int) -> Iterator[None]:
    """SIGTERM and Ctrl-C stop the process while it waits for the job's other processes, and a wait
    longer than ``JOIN_NOTICE_SECONDS`` is said (a warning, one line at the command line).

    ``init_process_group`` waits in C++ (the rendezvous store's connection and gloo's retries) for up
    to its 30 minutes, and Python runs signal handlers only between bytecodes: the command line's
    handler, which unwinds the run on SIGTERM, would wait as long, and so would `kill`, `timeout`
    and a scheduler's time limit. So the signals take their default action (the process ends) for
    that wait, and their handlers are put back once every process has joined. No output has been
    written yet, so ending there loses nothing. Signal actions can be set only from the main thread."""
    address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    notice = threading.Timer(JOIN_NOTICE_SECONDS, warnings.warn, args=(
        f"rank {rank} has waited {JOIN_NOTICE_SECONDS:g} s at {address} for the job's other {world_size - 1} "
        f"process(es) (WORLD_SIZE={world_size}): check that torchrun started every one, or stop this one "
        "(Ctrl-C, SIGTERM)",))
    notice.daemon = True
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    on_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {number: signal.getsignal(number) for number in stop_signals} if on_main_thread else {}
    for number in handlers:
        signal.signal(number, signal.SIG_DFL)
    notice.start()
    try:
        yield
    finally:
        notice.cancel()
        for number, handler in handlers.items():
            signal.signal(number, handler)
