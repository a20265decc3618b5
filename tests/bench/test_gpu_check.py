"""What of bench/gpu_check.{sh,py} runs on a CPU: the scan comparison (torch scan against the
sequential reference), its power to catch a wrong scan, the arguments, the fusion and training
runners at toy sizes, and the shell script's dry run."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_torch_scan_matches_the_reference_forward_and_backward(gpu_check, dtype):
    from napari_unifuse.model.scan import selective_scan
    from napari_unifuse.model.scan_reference import selective_scan_reference

    comparison = gpu_check.compare_scans(lambda **kw: selective_scan(**kw, backend="torch"),
                                         selective_scan_reference, dtype, CPU, length=130)
    assert comparison.passed, comparison.describe()
    names = {"out", "last_state", *(f"grad_{n}" for n in ("u", "delta", "z", "B", "C", "A", "D", "delta_bias",
                                                          "initial_state"))}
    assert set(comparison.errors) == names


def test_the_comparison_catches_a_scan_that_drops_the_skip_term(gpu_check):
    from napari_unifuse.model.scan_reference import selective_scan_reference

    def forgetful(D, **kwargs):
        return selective_scan_reference(D=D * 0, **kwargs)

    comparison = gpu_check.compare_scans(forgetful, selective_scan_reference, torch.float32, CPU, length=40)
    assert not comparison.passed
    assert comparison.errors["out"] > 1e-2 and "FAILED" in comparison.describe()


def test_the_cpu_scan_check_runs_both_dtypes(gpu_check):
    comparisons = gpu_check.scan_check(CPU)
    assert [c.dtype for c in comparisons] == ["float32", "bfloat16"]
    assert all(c.candidate == "torch" and c.baseline == "reference" and c.passed for c in comparisons)


def test_cuda_requirements_are_the_packages_cuda_extra(gpu_check):
    with (REPO / "pyproject.toml").open("rb") as stream:
        extra = tomllib.load(stream)["project"]["optional-dependencies"]["cuda"]
    assert gpu_check.cuda_requirements() == extra and any(r.startswith("mamba-ssm") for r in extra)


def test_dry_run_prints_the_plan_and_bad_arguments_are_refused(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--size", "96", "--train-steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "torch vs reference" in out and "96³" in out and "7 training steps of phantom3d.yaml" in out
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--size", "4"]) == 2
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--train-config", "nope.yaml"]) == 2
    with pytest.raises(SystemExit):
        gpu_check.main(["--checks", "everything"])


def test_fusion_runner_times_each_backend_with_memory(gpu_check):
    (check,) = gpu_check.fuse_check(CPU, 24)
    assert check.backend == "torch" and check.side == 24
    assert check.seconds >= check.network_seconds > 0 and check.peak_memory_mb > 0
    assert check.warmed_up and check.stages_s["fuse"] == check.network_seconds
    assert sum(check.stages_s.values()) <= check.seconds * 1.05  # the stages are parts of the timed run


def test_training_runner_takes_the_steps_asked_for(gpu_check, tmp_path):
    check = gpu_check.train_check(CPU, REPO / "configs" / "smoke.yaml", 2, tmp_path / "run", preset="small")
    assert check.steps == 2 and check.preset == "small"
    assert math.isfinite(check.seconds_per_step) and check.seconds_per_step > 0
    assert check.final_loss is not None and math.isfinite(check.final_loss)


def test_the_shell_script_dry_run_installs_offline_from_the_folder(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path), "--",
                             "--size", "64"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    install = next(line for line in result.stdout.splitlines() if " -m pip install " in line)
    assert f"--no-index --find-links {tmp_path}" in install and "mamba-ssm" in install and "causal-conv1d" in install
    assert "64³ phantom pair" in result.stdout

    missing = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path / "none")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no folder" in missing.stderr


def test_the_shell_script_builds_the_kernel_from_an_sdist_for_this_gpu_alone(tmp_path):
    (tmp_path / "mamba_ssm-2.3.2.tar.gz").write_bytes(b"")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "KERNEL_SITE": str(tmp_path / "site")}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"bench/build_scan_kernel.py {tmp_path}/mamba_ssm-2.3.2.tar.gz {tmp_path}/site" in result.stdout
    assert " -m pip install " not in result.stdout

    # A kernel built by an earlier run and carried back is used as it is.
    (tmp_path / "site" / "mamba_ssm").mkdir(parents=True)
    (tmp_path / "site" / "selective_scan_cuda.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    reused = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert reused.returncode == 0, reused.stderr
    assert "build_scan_kernel.py" not in reused.stdout and f"reusing the kernel built in {tmp_path}/site" in reused.stdout


@pytest.fixture
def build_scan_kernel():
    spec = importlib.util.spec_from_file_location("build_scan_kernel", REPO / "bench" / "build_scan_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_kernel_builder_unpacks_an_sdist_and_refuses_without_cuda(build_scan_kernel, tmp_path, monkeypatch):
    import tarfile

    source = tmp_path / "src" / "mamba_ssm-9.9"
    (source / "mamba_ssm").mkdir(parents=True)
    (source / "setup.py").write_text("")
    (source / "mamba_ssm" / "__init__.py").write_text("__version__ = '9.9'\n")
    sdist = tmp_path / "mamba_ssm-9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(source, arcname="mamba_ssm-9.9")
    root = build_scan_kernel.unpack_sdist(sdist, tmp_path / "unpacked")
    assert root == tmp_path / "unpacked" / "mamba_ssm-9.9" and (root / "mamba_ssm" / "__init__.py").is_file()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        build_scan_kernel.build(sdist, tmp_path / "site")
    assert build_scan_kernel.main([str(tmp_path / "missing.tar.gz"), str(tmp_path / "site")]) == 2


def test_a_failing_check_is_reported_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    import json

    def broken(device):
        raise RuntimeError("mamba-ssm does not import")

    monkeypatch.setattr(gpu_check, "scan_check", broken)
    code = gpu_check.main(["--device", "cpu", "--checks", "scan", "train", "--train-steps", "1", "--preset", "small",
                           "--train-config", str(REPO / "configs" / "smoke.yaml"), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 1 and "mamba-ssm does not import" in report["scan"]["error"]
    assert report["train"]["steps"] == 1 and "train_wall_s" in report


def test_the_offline_packer_asks_for_its_output_folder():
    result = subprocess.run(["bash", str(REPO / "bench" / "pack_offline_deps.sh")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "usage: bench/pack_offline_deps.sh OUT_DIR" in result.stderr
