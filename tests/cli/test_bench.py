"""`unifuse bench --quick`: runs end to end on CPU, prints every section and writes md + json."""

from __future__ import annotations

import json

import pytest
import torch

from napari_unifuse.benchmark import Timing, module_time_shares, time_call
from napari_unifuse.cli import main
from napari_unifuse.cli.bench import growth_table
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.unifuse import UniFuse


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
    forward = report["forward_seconds"]
    assert sum(forward["parts"].values()) == pytest.approx(forward["total_s"])
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


def growth_row(side: int, seconds: float, runs: int, warmed_up: bool) -> dict:
    timing = Timing(seconds, seconds, seconds, runs, 10.0, 800.0, warmed_up)
    return {"side": side, "voxels": side**3, "timing": timing, "network_s": seconds / 10}


def test_the_growth_table_marks_cold_runs_and_computes_no_ratio_from_them():
    """--quick's 3-D sizes each overran their budget in the warm-up: the table showed those single
    cold runs as plain times and divided by the first of them (ratios 1.00 / 0.21 / 0.03)."""
    table = growth_table([growth_row(16, 41.1, 1, False), growth_row(24, 2.0, 3, True),
                          growth_row(32, 4.0, 2, True), growth_row(40, 21.3, 1, False)])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if "³" in line}
    assert rows["3D 16³"][2] == "41.1 s ×1, cold" and rows["3D 16³"][4] == "– (cold)"
    assert rows["3D 40³"][4] == "– (cold)"
    # The smallest warm size is the base: 32³ has 2.37× the voxels of 24³ and took 2× the time.
    assert rows["3D 24³"][2] == "2 s (2–2) ×3" and rows["3D 24³"][4] == "1.00"
    assert rows["3D 32³"][4] == f"{2.0 / (32**3 / 24**3):.2f}"
    assert "Cold: one run" in table


def test_a_growth_table_of_warm_runs_needs_no_cold_note():
    table = growth_table([growth_row(32, 1.0, 3, True), growth_row(64, 8.0, 3, True)])
    assert "cold" not in table.lower() and "| 1.00 |" in table


@pytest.fixture
def benchmark_must_not_start(monkeypatch):
    """A refused argument must stop `bench` before any measurement (the full run takes many minutes)."""
    def started(name):
        raise AssertionError("the benchmark started")

    monkeypatch.setattr("napari_unifuse.cli.bench.resolve_device", started)


@pytest.mark.parametrize("option", ["--threads", "--classical-max-side"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_bench_refuses_a_count_below_one_in_one_line(option, value, benchmark_must_not_start, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", option, value])
    assert exit_info.value.code == 2
    assert f"unifuse bench: error: argument {option}: must be at least 1, got {value}" in capsys.readouterr().err


def test_bench_refuses_an_out_that_is_a_file_before_measuring(tmp_path, benchmark_must_not_start, capsys):
    out = tmp_path / "report.md"
    out.write_text("kept", encoding="utf-8")
    assert main(["bench", "--quick", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.strip() == f"unifuse bench: error: {out}: --out is a file; give a folder for the report"
    assert out.read_text(encoding="utf-8") == "kept"


def test_bench_refuses_an_out_it_cannot_create_before_measuring(tmp_path, benchmark_must_not_start, capsys):
    blocker = tmp_path / "a-file"
    blocker.touch()
    assert main(["bench", "--quick", "--out", str(blocker / "reports")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"unifuse bench: error: {blocker / 'reports'}: cannot create the --out folder")
    assert len(error.strip().splitlines()) == 1


def test_time_shares_account_for_the_whole_forward_pass():
    net = UniFuse(UniFuseConfig.small(2)).eval()
    shares = module_time_shares(net, 16, torch.device("cpu"))
    assert sum(shares.parts.values()) == pytest.approx(shares.total_s, rel=1e-6)
    # The named parts, not the remainder, hold the time: the initial alignment (matching and its
    # Adam-driven MI refinement) dominates a small pass, beside the four modules.
    assert {"initial alignment: structural matching", "initial alignment: mutual-information refinement (Adam)",
            "dapl", "oufr", "fa", "ufrf"} <= set(shares.parts)
    assert shares.parts["other"] < 0.25 * shares.total_s
    assert 0 < shares.nested["selective scans"] < shares.parts["dapl"] + shares.parts["oufr"]  # FA runs no scan


def test_bench_refuses_an_out_it_cannot_write_to_before_measuring(tmp_path, benchmark_must_not_start, deny_writes_in,
                                                                   capsys):
    """An existing read-only --out passed the folder check and failed with a traceback after the run
    (~50 s for --quick)."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    deny_writes_in(read_only)
    assert main(["bench", "--quick", "--out", str(read_only)]) == 2
    assert capsys.readouterr().err == f"unifuse bench: error: {read_only}: cannot write there (Permission denied)\n"
    assert list(read_only.iterdir()) == []


def test_the_scan_share_is_read_within_the_timed_runs(monkeypatch):
    """A scan that slows down run after run (a machine getting busier) must not read as more than
    the block it runs in: the share was once an extra untimed run over the median of the others."""
    import time

    from napari_unifuse.benchmark import bench_mamba_tokens
    from napari_unifuse.model.mamba import SelectiveScan

    calls = [0]
    forward = SelectiveScan.forward

    def slower_each_time(self, *args, **kwargs):
        calls[0] += 1
        time.sleep(0.01 * calls[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SelectiveScan, "forward", slower_each_time)
    (row,) = bench_mamba_tokens(UniFuseConfig.small(spatial_dims=3), [64], torch.device("cpu"), repeats=3,
                                budget_s=10.0)
    assert 0.5 < row["scan_share"] <= 1.0
