"""`unifuse train` end to end on the smoke config: train, checkpoint, resume, and two processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_unifuse.cli import main
from napari_unifuse.model.checkpoint import load_checkpoint
from napari_unifuse.training.config import load_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def test_smoke_training_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(SMOKE), "--out", str(run_dir), "--device", "cpu", "--no-progress"]
    assert main(args) == 0

    checkpoint = run_dir / "checkpoints" / "last.safetensors"
    model, metadata = load_checkpoint(checkpoint)
    assert model.config.spatial_dims == 2
    assert metadata["steps"] == 3
    assert metadata["seed"] == 0
    assert metadata["command"].startswith("unifuse train --config")
    assert metadata["training_config"]["data"]["kind"] == "phantom"
    assert metadata["wall_time_s"] > 0
    assert metadata["device"].startswith("cpu")
    assert set(metadata["validation"]) >= {"fusion_gain_min", "ssim_restored", "ssim_warped_input", "ncc_restored", "ncc_input", "epe_voxels", "q_ssim"}
    assert (run_dir / "checkpoints" / "last.state.pt").is_file()

    records = _log(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["kind"] == "val"] == [3]
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in records if r["kind"] == "train")

    # Resume to 5 steps: the step counter continues and the cosine now spans 5 steps. Each step
    # logs the learning rate it trained with: step s the cosine's value after s - 1 steps.
    assert main(args + ["--resume", "--max-steps", "5"]) == 0
    _, metadata = load_checkpoint(checkpoint)
    assert metadata["steps"] == 5
    assert "--resume" not in metadata["command"] and "--resume" in metadata["resumed_with"][-1]
    steps = [r["step"] for r in _log(run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    learning_rates = {r["step"]: r["lr"] for r in _log(run_dir) if r["kind"] == "train"}

    def cosine(done: int, max_steps: int) -> float:
        return 1e-6 + (1e-4 - 1e-6) * (1 + math.cos(math.pi * done / max_steps)) / 2

    assert learning_rates[1] == pytest.approx(1e-4)
    assert learning_rates[3] == pytest.approx(cosine(2, 3))  # the first, 3-step schedule
    assert learning_rates[4] == pytest.approx(cosine(3, 5))
    assert learning_rates[5] == pytest.approx(cosine(4, 5))


def test_init_from_and_lr_reach_the_run_and_its_metadata(tmp_path):
    first = tmp_path / "first"
    base = ["train", "--config", str(SMOKE), "--device", "cpu", "--no-progress", "--max-steps", "1"]
    assert main(base + ["--out", str(first)]) == 0
    weights = first / "checkpoints" / "last.safetensors"
    tuned = tmp_path / "tuned"
    assert main(base + ["--out", str(tuned), "--init-from", str(weights), "--lr", "3e-5"]) == 0
    _, metadata = load_checkpoint(tuned / "checkpoints" / "last.safetensors")
    assert metadata["training_config"]["train"]["init_from"] == str(weights)
    assert metadata["initial_weights"]["checkpoint"] == str(weights)
    assert metadata["initial_weights"]["steps"] == 1 and len(metadata["initial_weights"]["sha256"]) == 64
    assert metadata["training_config"]["train"]["lr"] == pytest.approx(3e-5)
    assert f"--init-from {weights}" in metadata["command"] and "--lr 3e-05" in metadata["command"]
    assert _log(tuned)[0]["lr"] == pytest.approx(3e-5)  # the one step of a one-step cosine is at its peak


def test_resume_without_a_checkpoint_is_a_clean_error(tmp_path, capsys):
    args = ["train", "--config", str(SMOKE), "--out", str(tmp_path / "empty"), "--device", "cpu", "--resume"]
    assert main(args) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_bad_config_is_a_clean_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("data: {kind: phantom}\ntrain: {batch_sise: 2}\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "batch_sise" in capsys.readouterr().err


def test_two_processes_with_torchrun_on_cpu(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "napari_unifuse.cli", "train", "--config", str(SMOKE), "--out", str(run_dir),
        "--max-steps", "2", "--device", "cpu", "--no-progress",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    _, metadata = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    assert metadata["world_size"] == 2
    assert metadata["steps"] == 2
    # The launch that trained it (a plain `unifuse train` trains another model), and no DDP notice shown as ours.
    assert metadata["command"].startswith("torchrun --nproc_per_node 2 -m napari_unifuse.cli train --config ")
    assert "Grad strides" not in completed.stderr
    # Only rank 0 logs: one line per step, not two.
    assert [r["step"] for r in _log(run_dir) if r["kind"] == "train"] == [1, 2]


@pytest.mark.parametrize("flag", ["--max-steps", "--batch-size", "--lr"])
def test_non_positive_overrides_are_rejected(tmp_path, flag, capsys):
    args = ["train", "--config", str(SMOKE), "--out", str(tmp_path / "run"), flag, "0"]
    assert main(args) == 2
    assert flag in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    """It said only "afile: File exists"."""
    existing = tmp_path / "afile"
    existing.write_text("")
    for out in (existing, existing / "run"):
        assert main(["train", "--config", str(SMOKE), "--out", str(out), "--no-progress"]) == 2
        error = capsys.readouterr().err.strip()
        assert "not a folder" in error and str(out) in error and "\n" not in error


def test_an_out_that_is_a_symbolic_link_to_nothing_names_the_missing_target(tmp_path, capsys):
    """It said only "dangling: File exists"."""
    link, target = tmp_path / "dangling", tmp_path / "missing"
    link.symlink_to(target)
    assert main(["train", "--config", str(SMOKE), "--out", str(link), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"unifuse train: error: {link}: is a symbolic link to {target}, which does not "
                                       f"exist: create {target} or choose another --out\n")
    assert not target.exists()


def test_a_sidecar_given_to_init_from_names_the_weights_beside_it(tmp_path, capsys):
    sidecar = REPO / "resources" / "checkpoints" / "unifuse-2d-harvard.json"
    args = ["train", "--config", str(SMOKE), "--out", str(tmp_path / "run"), "--init-from", str(sidecar),
            "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "JSON sidecar" in error and "unifuse-2d-harvard.safetensors" in error and "header too large" not in error


def test_init_from_on_the_command_line_gives_a_stage_config_its_starting_weights(tmp_path, capsys):
    """The file was validated before --init-from applied: "it needs ... train.init_from", against the help."""
    import yaml

    first = tmp_path / "first"
    base = ["--device", "cpu", "--no-progress", "--max-steps", "1"]
    assert main(["train", "--config", str(SMOKE), "--out", str(first), *base]) == 0
    values = yaml.safe_load(SMOKE.read_text(encoding="utf-8"))
    values["train"]["stage"] = "fusion_weight"  # and no train.init_from
    values["loss"] = {"fusion_target": "true_field"}  # the stage reads only the fusion losses
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump(values), encoding="utf-8")
    weights = first / "checkpoints" / "last.safetensors"
    capsys.readouterr()
    assert main(["train", "--config", str(stage), "--out", str(tmp_path / "stage"), "--init-from", str(weights),
                 *base]) == 0, capsys.readouterr().err
    _, metadata = load_checkpoint(tmp_path / "stage" / "checkpoints" / "last.safetensors")
    assert metadata["initial_weights"]["checkpoint"] == str(weights)
    assert metadata["training_config"]["train"]["stage"] == "fusion_weight"


def test_train_takes_a_packaged_config_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """The help said "see configs/", which an installed package did not hold; now it names the packaged configs."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "a packaged config's name" in " ".join(capsys.readouterr().out.split())
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "smoke", "--device", "cpu", "--no-progress", "--max-steps", "1"]) == 0
    _, metadata = load_checkpoint(tmp_path / "runs" / "smoke" / "checkpoints" / "last.safetensors")
    assert metadata["command"].startswith("unifuse train --config smoke ")
    assert metadata["training_config"] == load_config(SMOKE).with_overrides(train={"max_steps": 1}).to_dict()


def test_the_progress_bar_is_not_drawn_into_a_log_file(tmp_path, capsys):
    """stderr redirected to a file got every redraw of the bar (a carriage return per step)."""
    assert main(["train", "--config", str(SMOKE), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--max-steps", "2"]) == 0
    printed = capsys.readouterr().err
    assert "\r" not in printed and "step/s" not in printed and "s/step" not in printed
    assert [r["step"] for r in _log(tmp_path / "run") if r["kind"] == "train"] == [1, 2]  # the steps, logged
