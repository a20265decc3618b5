"""`unifuse train` as one process of several (torchrun) and with DataLoader workers: one line per
problem, said by the process it concerns; the record names the launch that trained the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from napari_unifuse.cli import main
from napari_unifuse.cli.train import _command, register
from napari_unifuse.errors import InputError
from napari_unifuse.model.checkpoint import COMMITTED, STAGING_PREFIX, checkpoint_dir
from napari_unifuse.training import trainer
from napari_unifuse.training.datasets import SyntheticPairDataset

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
BASE = ["train", "--config", str(SMOKE), "--device", "cpu", "--no-progress"]


def _parsed(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_a_sample_problem_in_a_dataloader_worker_is_its_own_one_line_message(tmp_path, monkeypatch, capsys):
    """It printed as "Caught InputError in DataLoader worker process 0. Original Traceback ..." (46 lines)."""
    config = yaml.safe_load(SMOKE.read_text(encoding="utf-8"))
    config["train"]["num_workers"] = 1
    config_file = tmp_path / "workers.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")

    def unreadable(self, index, *args, **kwargs):
        raise InputError("case case03: cannot be read as NIfTI (truncated)", "/data/case03/mov.nii.gz")

    monkeypatch.setattr(SyntheticPairDataset, "_sample", unreadable)  # the worker is forked with it
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--out", str(run_dir), "--device", "cpu",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == ("unifuse train: error: /data/case03/mov.nii.gz: case case03: cannot be read "
                                       "as NIfTI (truncated)\n")


def test_a_worker_problem_is_raised_where_the_loader_is_read_and_good_batches_pass_unchanged():
    import torch
    from torch.utils.data import DataLoader

    class Cases(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            if index == 3:
                raise InputError("not a NIfTI file", f"case{index}")
            return {"image": torch.full((2,), float(index))}

    plain = list(DataLoader(Cases(), batch_size=2, sampler=[0, 1]))
    loaded = trainer.SampleLoader(Cases(), batch_size=2, sampler=[0, 1, 2, 3], num_workers=1)
    batches = iter(loaded)
    assert torch.equal(next(batches)["image"], plain[0]["image"])
    with pytest.raises(InputError) as raised:
        next(batches)
    assert str(raised.value) == "case3: not a NIfTI file"


@pytest.mark.parametrize(("world_size", "per_node", "launch"), [
    (None, None, "unifuse train"),
    ("1", "1", "unifuse train"),
    ("2", "2", "torchrun --nproc_per_node 2 -m napari_unifuse.cli train"),
    ("4", "2", "torchrun --nnodes 2 --nproc_per_node 2 -m napari_unifuse.cli train"),
])
def test_the_recorded_command_is_the_launch_that_trained(monkeypatch, world_size, per_node, launch):
    """A two-process run recorded "unifuse train ...", which trains another model (another effective batch)."""
    for name, value in (("WORLD_SIZE", world_size), ("LOCAL_WORLD_SIZE", per_node)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    args = _parsed(["train", "--config", "smoke.yaml", "--out", "runs/x", "--max-steps", "2"])
    assert _command(args) == f"{launch} --config smoke.yaml --out runs/x --max-steps 2 --device auto"


def test_info_says_how_many_processes_trained_a_checkpoint(tmp_path, capsys):
    weights = tmp_path / "two.safetensors"
    weights.write_bytes((checkpoint_dir() / "unifuse-2d-harvard.safetensors").read_bytes())
    sidecar = json.loads((checkpoint_dir() / "unifuse-2d-harvard.json").read_text(encoding="utf-8"))
    command = "torchrun --nproc_per_node 2 -m napari_unifuse.cli train --config smoke.yaml"
    weights.with_suffix(".json").write_text(json.dumps({**sidecar, "world_size": 2, "command": command}),
                                            encoding="utf-8")
    assert main(["info", "--checkpoint", str(weights)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert command in text and "in each of 2 processes" in text


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert main(BASE + ["--out", str(run_dir), "--max-steps", "4", "--stop-at", "1"]) == 0
    return run_dir


def test_only_the_main_process_says_where_resume_continues_and_settles_saves(stopped_run, tmp_path, monkeypatch,
                                                                             capsys):
    """Every process said it (rank 1: "no checkpoint yet", before rank 0 wrote one) and every process
    settled the checkpoints folder, where rank 1 could remove the save rank 0 was writing."""
    run_dir = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    staging = run_dir / "checkpoints" / f"{STAGING_PREFIX}last"
    staging.mkdir()
    (staging / COMMITTED).write_bytes(b"")  # rank 0's save, committed, being moved into place

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    monkeypatch.setenv("RANK", "1")
    assert main(BASE + ["--out", str(run_dir), "--resume"]) == 130
    assert capsys.readouterr().err == ""
    assert staging.is_dir()
    monkeypatch.setenv("RANK", "0")
    assert main(BASE + ["--out", str(run_dir), "--resume"]) == 130
    assert capsys.readouterr().err == ("unifuse train: the last checkpoint holds step 1; --resume continues from it\n"
                                       "unifuse train: interrupted\n")
    assert not staging.exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_another_process_stopping_is_one_line_and_the_main_one_says_where_resume_continues(
        stopped_run, tmp_path, monkeypatch, capsys, rank):
    run_dir = Path(shutil.copytree(stopped_run, tmp_path / "run"))

    def peer_gone(*args, **kwargs):
        raise trainer.AnotherProcessStopped("another process of this job stopped (see its message, if it gave one, "
                                            "above)")

    monkeypatch.setattr(trainer, "train", peer_gone)
    monkeypatch.setenv("RANK", rank)
    assert main(BASE + ["--out", str(run_dir), "--resume"]) == 2
    said = "unifuse train: error: another process of this job stopped (see its message, if it gave one, above)"
    where = "; the last checkpoint holds step 1; --resume continues from it" if rank == "0" else ""
    assert capsys.readouterr().err == said + where + "\n"


_TWO_PROCESSES = '''
import os, signal, sys, threading, time
from types import SimpleNamespace
import torch.distributed as dist
from napari_unifuse.cli import Terminated, _raise_terminated
from napari_unifuse.training import trainer

dist.init_process_group("gloo")
job = SimpleNamespace(dist=SimpleNamespace(world_size=2))
if dist.get_rank() == 1:  # stopped by SIGTERM while it waits for rank 0 (which validates)
    signal.signal(signal.SIGTERM, _raise_terminated)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    start = time.perf_counter()
    try:
        trainer.Trainer._barrier(job)
    except Terminated:
        print(f"stopped after {time.perf_counter() - start:.1f} s", flush=True)
        os._exit(143)
else:  # comes to the barrier after rank 1 has gone
    time.sleep(float(sys.argv[1]))
    try:
        with trainer._another_process_stopping_said():
            trainer.Trainer._barrier(job)
    except trainer.AnotherProcessStopped as error:
        print(error, flush=True)
'''


def test_a_process_waiting_for_the_others_stops_at_once_and_the_other_says_so_in_one_line(tmp_path):
    """Rank 1 met SIGTERM only once rank 0 had finished validating (49-79 s), and rank 0 then printed
    the backend's traceback ("Connection closed by peer")."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESSES, encoding="utf-8")
    rank_0_waits = 6.0
    processes = [subprocess.Popen([sys.executable, str(script), str(rank_0_waits)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                       "WORLD_SIZE": "2", "RANK": str(rank), "OMP_NUM_THREADS": "1"})
                 for rank in (0, 1)]
    (out_0, err_0), (out_1, err_1) = (process.communicate(timeout=120) for process in processes)
    assert processes[1].returncode == 143, err_1
    assert float(out_1.split()[2]) < rank_0_waits / 2
    assert out_0 == "another process of this job stopped (see its message, if it gave one, above)\n", err_0
