"""`unifuse bench --quick`: runs end to end on CPU, prints every section and writes md + json."""

from __future__ import annotations

import json

import pytest
import torch

from napari_unifuse.benchmark import time_call
from napari_unifuse.cli import main


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_bench_prints_and_writes_every_section(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for title in ("End-to-end fuse", "Classical registration", "Growth with volume size", "One Mamba block",
                  "FLOPs and achieved throughput", "Where the time goes"):
        assert f"## {title}" in printed
    assert "| 2D 64² | torch |" in printed and "| 3D 32³ | torch |" in printed
    assert "| 2D 64² | sitk + wavelet |" in printed
    assert "aten::" in printed  # the profiler's operator table

    written = (tmp_path / "cpu-quick.md").read_text(encoding="utf-8")
    assert "## Where the time goes" in written
    report = json.loads((tmp_path / "cpu-quick.json").read_text(encoding="utf-8"))
    assert report["preset"] == "small" and report["torch_threads"] == 1  # --quick's default
    assert [row["side"] for row in report["scaling"]] == sorted(row["side"] for row in report["scaling"])
    assert len(report["scaling"]) >= 4 and len(report["tokens"]) >= 3
    for row in report["fuse"]:
        assert 0 < row["timing"]["min_s"] <= row["timing"]["median_s"] <= row["timing"]["max_s"]
        assert row["model_seconds"] <= row["timing"]["max_s"]  # the network is one stage of the run
        assert row["flops"] > 0
    # A 3D volume costs more FLOPs than the 2D image with fewer pixels.
    assert report["fuse"][1]["flops"] > report["fuse"][0]["flops"]
    registration = {row["method"]: row["ncc"] for row in report["classical"]}
    assert registration["sitk + wavelet"] > registration["identity + wavelet"]


def test_time_call_repeats_within_budget_and_keeps_a_slow_warmup():
    calls = []
    timing = time_call(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=1)
    assert len(calls) == 4 and timing.runs == 3 and timing.warmed_up
    slow = time_call(lambda: sum(range(200_000)), torch.device("cpu"), repeats=3, warmup=1, budget_s=0.0)
    assert slow.runs == 1 and not slow.warmed_up  # the warm-up alone overran the budget
