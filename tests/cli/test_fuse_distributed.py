"""`unifuse fuse --pairs` split across two torchrun processes on the CPU (gloo): every pair done
exactly once, one provenance per output, a gathered summary, and a rerun that resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_unifuse.engine.distributed import Distributed
from napari_unifuse.engine.outputs import PROVENANCE_FILE, is_complete
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
PAIRS = 5


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_hold_every_item_exactly_once(world_size):
    items = list(range(11))
    shards = [Distributed(rank, rank, world_size, torch.device("cpu")).shard(items) for rank in range(world_size)]
    assert sorted(item for shard in shards for item in shard) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def blob(shape, shift):
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.exp(-3 * sum((g - shift) ** 2 for g in grids))


@pytest.fixture
def batch(tmp_path):
    torch.manual_seed(0)
    config = UniFuseConfig.from_dict({**UniFuseConfig.small(spatial_dims=2).to_dict(),
                                      "matching_mutual_information": False})
    checkpoint = save_checkpoint(UniFuse(config), tmp_path / "tiny-2d.safetensors", {"note": "random weights"})
    Image.fromarray((255 * blob((32, 28), 0.0)).astype(np.uint8)).save(tmp_path / "mri.png")
    with (tmp_path / "pairs.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["reference", "moving"])
        for index in range(PAIRS):
            Image.fromarray((200 * blob((32, 28), 0.05 * index)).astype(np.uint8)).save(tmp_path / f"case{index}.png")
            writer.writerow(["mri.png", f"case{index}.png"])
    return tmp_path, checkpoint


def torchrun(root: Path, checkpoint: Path, processes: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(processes), "-m", "napari_unifuse.cli", "fuse",
               "--pairs", str(root / "pairs.csv"), "--out", str(root / "out"),
               "--checkpoint", str(checkpoint), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_fuse_every_pair_once_and_a_rerun_resumes(batch):
    root, checkpoint = batch
    out = root / "out"

    first = torchrun(root, checkpoint, 2)

    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    names = [f"case{index}" for index in range(PAIRS)]
    for index, name in enumerate(names):
        assert is_complete(out / name)
        assert first.stdout.count(f"] {name}: done") == 1, first.stdout  # done once, by one process
        provenance = json.loads((out / name / PROVENANCE_FILE).read_text(encoding="utf-8"))
        assert provenance["batch"] == {"rank": index % 2, "world_size": 2}  # rank::world_size
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["pairs"], summary["done"], summary["skipped"], summary["failed"]) == (PAIRS, PAIRS, 0, 0)
    assert summary["world_size"] == 2
    assert [outcome["name"] for outcome in summary["outcomes"]] == names  # both ranks' outcomes, CSV order
    assert {outcome["rank"] for outcome in summary["outcomes"]} == {0, 1}

    # An interrupted pair (no provenance yet) is redone; the others are skipped untouched.
    (out / "case3" / PROVENANCE_FILE).unlink()
    kept = {name: (out / name / "fused.png").stat().st_mtime_ns for name in names if name != "case3"}
    second = torchrun(root, checkpoint, 2)

    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped, already done") == PAIRS - 1
    assert second.stdout.count("] case3: done") == 1
    assert {name: (out / name / "fused.png").stat().st_mtime_ns for name in kept} == kept
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["done"], summary["skipped"]) == (1, PAIRS - 1)


def test_a_failed_pair_is_listed_in_the_summary_and_the_batch_exits_2(batch, capsys):
    from napari_unifuse.cli import main

    root, checkpoint = batch
    (root / "bad.csv").write_text("reference,moving\nmri.png,missing.png\nmri.png,case0.png\n", encoding="utf-8")

    code = main(["fuse", "--pairs", str(root / "bad.csv"), "--out", str(root / "out"), "--checkpoint",
                 str(checkpoint), "--device", "cpu"])

    assert code == 2
    assert "missing.png: file not found" in capsys.readouterr().err
    summary = json.loads((root / "out" / "summary.json").read_text(encoding="utf-8"))
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("missing", "failed"), ("case0", "done")]
    assert "file not found" in summary["outcomes"][0]["error"]


LAGGING_RANK_SCRIPT = """
import time
from datetime import timedelta

import torch.distributed as dist

from napari_unifuse.engine.distributed import setup_distributed

dist.init_process_group("gloo", timeout=timedelta(seconds=2))  # a default group quick to give up
job = setup_distributed("cpu")
if job.rank == 1:
    time.sleep(6)  # a shard that takes longer than the default group would wait
gathered = job.gather(job.rank)
if job.is_main:
    print("gathered", gathered)
job.close()
"""


def test_a_process_whose_shard_lags_is_waited_for_past_the_default_groups_timeout(tmp_path):
    """A cohort's shards hold as many pairs, not as much work: the first process done waits at the
    gather, which under the default timeout ended the whole batch (torchrun killed the others)."""
    script = tmp_path / "lagging.py"
    script.write_text(LAGGING_RANK_SCRIPT, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "gathered [0, 1]" in finished.stdout


def test_a_csv_of_other_rows_finds_each_pairs_earlier_folder(batch, capsys):
    """`unifuse synth --pairs` folders: with two rows the folders are 0000_moving and 0001_moving; a
    CSV retrying one of them alone would name it `moving`, fuse it again there, and name the
    summary after itself without a word about the one it replaced."""
    from napari_unifuse.cli import main

    root, checkpoint = batch
    for index in range(2):
        (root / f"000{index}").mkdir()
        (root / f"000{index}" / "moving.png").write_bytes((root / f"case{index}.png").read_bytes())
    (root / "all.csv").write_text("reference,moving\nmri.png,0000/moving.png\nmri.png,0001/moving.png\n",
                                  encoding="utf-8")
    (root / "retry.csv").write_text("reference,moving\nmri.png,0001/moving.png\n", encoding="utf-8")
    out = root / "out"
    options = ["--out", str(out), "--checkpoint", str(checkpoint), "--device", "cpu"]
    assert main(["fuse", "--pairs", str(root / "all.csv"), *options]) == 0
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["0000_moving", "0001_moving"]
    capsys.readouterr()

    assert main(["fuse", "--pairs", str(root / "retry.csv"), *options]) == 0

    printed = capsys.readouterr()
    assert "0001_moving: skipped, already done" in printed.out
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["0000_moving", "0001_moving"]
    assert f"described the batch of {(root / 'all.csv').resolve()}" in printed.err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["pairs_csv"] == str((root / "retry.csv").resolve())
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("0001_moving", "skipped")]


def test_only_process_0_sums_up_the_batch_and_exits_non_zero(batch, capsys, monkeypatch):
    """Another process that exits 2 on its own failures makes torchrun stop process 0 as it writes
    the summary, and each process printed its own count of failed pairs."""
    from napari_unifuse.cli import build_parser, fuse

    root, checkpoint = batch
    (root / "bad.csv").write_text("reference,moving\nmri.png,missing0.png\nmri.png,missing1.png\n",
                                  encoding="utf-8")
    args = build_parser().parse_args(["fuse", "--pairs", str(root / "bad.csv"), "--out", str(root / "out"),
                                      "--checkpoint", str(checkpoint), "--device", "cpu"])
    pairs = fuse._pairs_from_args(args)
    monkeypatch.setattr(Distributed, "gather", lambda self, value: None if self.rank else [value])

    assert fuse._run_shard(args, pairs, Distributed(1, 1, 2, torch.device("cpu"))) == 0
    printed = capsys.readouterr().err
    assert "missing1.png: file not found" in printed and "pairs failed" not in printed
    assert not (root / "out" / "summary.json").exists()
    assert fuse._run_shard(args, pairs, Distributed(0, 0, 2, torch.device("cpu"))) == 2
    assert "1 of 2 pairs failed" in capsys.readouterr().err  # here: process 0's own shard gathered alone


ALONE_IN_A_JOB_OF_TWO_SCRIPT = """
import sys

import napari_unifuse.engine.distributed as distributed
from napari_unifuse.cli import main

distributed.JOIN_NOTICE_SECONDS = 0.5  # say it soon: the test waits for it
sys.argv = ["unifuse", *sys.argv[1:]]
sys.exit(main())  # as the console script does, with its SIGTERM handler
"""


def test_a_process_alone_in_a_job_of_two_says_it_waits_and_sigterm_stops_it(tmp_path):
    """WORLD_SIZE=2 with one process started waited 30 minutes in silence, and SIGTERM (`timeout`, a
    scheduler's time limit) could not stop it: Python's handler never ran while torch waited in C++."""
    Image.fromarray((255 * blob((16, 16), 0.0)).astype(np.uint8)).save(tmp_path / "image.png")
    script = tmp_path / "alone.py"
    script.write_text(ALONE_IN_A_JOB_OF_TWO_SCRIPT, encoding="utf-8")
    with socket.socket() as probe:  # a free port: nothing answers there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    log = tmp_path / "stderr.txt"
    with log.open("w", encoding="utf-8") as stderr:
        process = subprocess.Popen([sys.executable, str(script), "fuse", "--reference", str(tmp_path / "image.png"),
                                    "--moving", str(tmp_path / "image.png"), "--out", str(tmp_path / "out"),
                                    "--device", "cpu"], cwd=REPO, env=env, stderr=stderr, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120  # the command line imports torch and the engine first
            while "waited" not in log.read_text(encoding="utf-8") and process.poll() is None:
                assert time.monotonic() < deadline, log.read_text(encoding="utf-8")
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            process.wait(timeout=10)
        finally:
            process.kill()
    printed = log.read_text(encoding="utf-8")
    assert (f"unifuse fuse: warning: rank 0 has waited 0.5 s at 127.0.0.1:{port} for the job's other 1 process(es) "
            "(WORLD_SIZE=2): check that torchrun started every one, or stop this one (Ctrl-C, SIGTERM)\n") in printed
    assert "Traceback" not in printed
    assert process.returncode == -signal.SIGTERM and time.monotonic() - stopped < 5
    assert not (tmp_path / "out").exists()
