"""engine.distributed: a stray or inconsistent torchrun variable is one clear line, not a traceback or a
silent wait; the wait for the other processes can be stopped; the cores are split unless the user said."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist

from napari_unifuse.cli import main
from napari_unifuse.engine.distributed import setup_distributed
from napari_unifuse.errors import InputError


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_the_job_is_one_process(no_torchrun):
    job = setup_distributed("cpu")
    assert (job.rank, job.world_size) == (0, 1)


def test_a_world_size_exported_for_another_tool_is_named_with_what_is_missing(no_torchrun):
    no_torchrun.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: start the "
                                         "batch with torchrun.*or unset WORLD_SIZE"):
        setup_distributed("cpu")
    no_torchrun.setenv("RANK", "0")
    with pytest.raises(InputError, match="but MASTER_ADDR, MASTER_PORT are not"):
        setup_distributed("cpu")


@pytest.mark.parametrize(("name", "value"), [("WORLD_SIZE", "two"), ("WORLD_SIZE", "0"), ("RANK", "-1")])
def test_a_variable_torchrun_would_never_set_is_refused(no_torchrun, name, value):
    no_torchrun.setenv("WORLD_SIZE", "2")
    for variable in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        no_torchrun.setenv(variable, "0" if variable == "RANK" else "1")
    no_torchrun.setenv(name, value)
    with pytest.raises(InputError, match=f"{name}='{value}' is not a {'process count' if name == 'WORLD_SIZE' else 'rank'} "
                                         "torchrun would set"):
        setup_distributed("cpu")


def test_an_exported_but_empty_world_size_is_no_setting(no_torchrun):
    no_torchrun.setenv("WORLD_SIZE", "")
    assert setup_distributed("cpu").world_size == 1


def test_fuse_in_a_shell_with_a_stray_world_size_says_so_in_one_line(no_torchrun, tmp_path, capsys):
    no_torchrun.setenv("WORLD_SIZE", "2")
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("L", (16, 16), 128).save(image)
    assert main(["fuse", "--reference", str(image), "--moving", str(image), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "WORLD_SIZE=2 is set but RANK" in error[0]


@pytest.fixture
def torchrun_job(no_torchrun):
    """Rank 1 of a 2-process job on one 16-core machine; the process group calls stubbed (no peer)."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555")):
        no_torchrun.setenv(name, value)
    no_torchrun.delenv("OMP_NUM_THREADS", raising=False)
    no_torchrun.delenv("TORCHELASTIC_RUN_ID", raising=False)
    no_torchrun.setattr(os, "cpu_count", lambda: 16)
    no_torchrun.setattr(dist, "is_initialized", lambda: True)
    no_torchrun.setattr(dist, "new_group", lambda **options: None)
    threads = []
    no_torchrun.setattr(torch, "set_num_threads", threads.append)
    return no_torchrun, threads


@pytest.mark.parametrize(("settings", "refusal"), [
    ({"RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK=1 is not below LOCAL_WORLD_SIZE=1"),
    ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3 exceeds WORLD_SIZE=2"),
])
def test_ranks_no_torchrun_job_has_are_refused_before_waiting_for_peers(torchrun_job, settings, refusal):
    # RANK=2 of 2 waited up to 30 minutes for peers that could never all join, and said nothing.
    environment, _ = torchrun_job
    for name, value in settings.items():
        environment.setenv(name, value)
    with pytest.raises(InputError, match=f"{refusal}.*start the batch with torchrun, or unset WORLD_SIZE"):
        setup_distributed("cpu")


@pytest.mark.parametrize(("omp_num_threads", "under_torchrun", "threads"), [
    (None, False, [8]),  # nothing asked: the machine's 16 cores split between its 2 processes
    ("1", True, [8]),  # what torchrun sets where the user set nothing
    ("1", False, []),  # the user's own 1 (not torchrun's): kept
    ("3", True, []),  # the user's own count: kept
])
def test_the_cores_are_split_unless_omp_num_threads_is_the_users(torchrun_job, omp_num_threads, under_torchrun,
                                                                 threads):
    environment, set_threads = torchrun_job
    if omp_num_threads is not None:
        environment.setenv("OMP_NUM_THREADS", omp_num_threads)
    if under_torchrun:
        environment.setenv("TORCHELASTIC_RUN_ID", "none")
    setup_distributed("cpu")
    assert set_threads == threads


def test_sigterm_ends_the_process_while_it_waits_for_peers_and_its_handler_is_back_after(torchrun_job):
    # The command line's SIGTERM handler is Python, which cannot run while init_process_group waits
    # in C++: the default action (the process ends) must hold for that wait, and the handler after it.
    environment, _ = torchrun_job
    environment.setattr(dist, "is_initialized", lambda: False)
    during = []
    environment.setattr(dist, "init_process_group", lambda backend: during.append(
        (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))))

    def handler(signum, frame):
        raise AssertionError("not reached")

    interrupt = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        setup_distributed("cpu")
        assert during == [(signal.SIG_DFL, signal.SIG_DFL)]
        assert signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGINT) is interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
