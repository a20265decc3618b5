"""`unifuse train --resume` continues the run folder as its files describe it: its own config with
the overrides given now, the learning rate those say, each step logged once; and a fresh run
never mixes itself into a folder that holds one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from napari_unifuse.cli import main
from napari_unifuse.training import trainer

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
BASE = ["train", "--config", str(SMOKE), "--device", "cpu", "--no-progress"]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def _train_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in _log(run_dir) if record["kind"] == "train"]


def _saved_train_section(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["train"]


def _logged_learning_rates(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["lr"] for record in _log(run_dir) if record["kind"] == "train"}


def _optimizer_lr(run_dir: Path) -> float:
    state = torch.load(run_dir / "checkpoints" / "last.state.pt", weights_only=True)
    return state["optimizer"]["param_groups"][0]["lr"]


def _cosine(done: int, lr: float, max_steps: int, min_lr: float = 1e-6) -> float:
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * done / max_steps)) / 2


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A 4-step run stopped (checkpointed) after step 1."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert main(BASE + ["--out", str(run_dir), "--max-steps", "4", "--stop-at", "1"]) == 0
    return run_dir


@pytest.fixture
def run_dir(stopped_run, tmp_path) -> Path:
    """A copy of ``stopped_run`` for one test to change."""
    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


def test_resume_continues_the_runs_own_schedule_and_trains_with_the_lr_it_logs(tmp_path):
    run_dir = tmp_path / "run"
    args = BASE + ["--out", str(run_dir)]
    assert main(args + ["--max-steps", "4", "--stop-at", "1", "--lr", "2e-5"]) == 0
    assert _saved_train_section(run_dir)["max_steps"] == 4  # --stop-at does not shorten the schedule

    # Resumed without --lr or --max-steps: the run's own 2e-5 over 4 steps, not smoke.yaml's.
    assert main(args + ["--resume", "--stop-at", "2"]) == 0
    saved = _saved_train_section(run_dir)
    assert (saved["lr"], saved["max_steps"]) == (pytest.approx(2e-5), 4)
    assert _logged_learning_rates(run_dir)[2] == pytest.approx(_cosine(1, 2e-5, 4))
    assert _optimizer_lr(run_dir) == _logged_learning_rates(run_dir)[2]

    # Resumed with another lr and max_steps: the optimiser follows the new cosine from step 3 on.
    assert main(args + ["--resume", "--lr", "1e-3", "--max-steps", "6"]) == 0
    saved = _saved_train_section(run_dir)
    assert (saved["lr"], saved["max_steps"]) == (pytest.approx(1e-3), 6)
    learning_rates = _logged_learning_rates(run_dir)
    assert sorted(learning_rates) == [1, 2, 3, 4, 5, 6]
    for step in (3, 6):
        assert learning_rates[step] == pytest.approx(_cosine(step - 1, 1e-3, 6))
    assert _optimizer_lr(run_dir) == learning_rates[6]


def test_resume_with_a_config_that_differs_in_more_than_the_overrides_is_refused(run_dir, tmp_path, capsys):
    values = yaml.safe_load(SMOKE.read_text(encoding="utf-8"))
    values["seed"] = 1
    values["data"]["crop"] = 16
    values["train"]["max_steps"] = 9  # an overridable setting: not a difference
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(values), encoding="utf-8")
    args = ["train", "--config", str(other), "--out", str(run_dir), "--device", "cpu", "--no-progress", "--resume"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "(data.crop, seed differ from its config.yaml)" in error and "max_steps" not in error
    assert _train_steps(run_dir) == [1]


def test_resume_with_another_methods_config_says_so_before_the_differing_fields(run_dir, capsys):
    """The method and data kind were two of ~40 fields in one line."""
    args = ["train", "--config", "bsafusion-cpu", "--out", str(run_dir), "--device", "cpu", "--no-progress", "--resume"]
    assert main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(f"{run_dir} is a unifuse run; the config given trains bsafusion")
    assert lines[1] == f"{run_dir} trained on phantom data; the config given trains on harvard data"
    assert lines[2].startswith(f"{run_dir} was trained with another config (") and "model.method" in lines[2]
    assert _train_steps(run_dir) == [1]


def test_a_run_config_with_a_repeated_key_is_refused_naming_it(run_dir):
    path = run_dir / "config.yaml"
    path.write_text(path.read_text(encoding="utf-8") + "seed: 1\n", encoding="utf-8")
    with pytest.raises(trainer.CheckpointError, match=r"'seed' is given twice \(lines \d+ and \d+\)"):
        trainer.run_config(run_dir)


def test_a_resumed_run_logs_each_step_once(run_dir):
    # As if the run had gone on past its checkpoint (step 1) and been interrupted writing a line.
    with (run_dir / "log.jsonl").open("a", encoding="utf-8") as stream:
        stream.write(json.dumps({"kind": "train", "step": 2, "total": -1.0}) + "\n")
        stream.write(json.dumps({"kind": "val", "step": 2, "fusion_gain_min": -1.0}) + "\n")
        stream.write('{"kind": "train", "st')
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 0
    assert _train_steps(run_dir) == [1, 2]
    assert all(record.get("total", 0) != -1.0 and record.get("fusion_gain_min", 0) != -1.0
               for record in _log(run_dir))


def test_a_fresh_run_into_a_run_folder_is_refused_unless_told_to_overwrite(run_dir, capsys):
    before = (run_dir / "log.jsonl").read_text(encoding="utf-8")
    assert main(BASE + ["--out", str(run_dir), "--max-steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run_dir / "log.jsonl").read_text(encoding="utf-8") == before

    stale = run_dir / "checkpoints" / "last.state.tmp"  # as a save cut short leaves it
    stale.write_bytes(b"")
    assert main(BASE + ["--out", str(run_dir), "--max-steps", "1", "--overwrite"]) == 0
    assert _train_steps(run_dir) == [1]  # the old run's step 1 is gone, not logged twice
    assert not stale.exists()


def test_resuming_to_a_step_the_run_has_passed_is_refused_and_leaves_its_config(run_dir, capsys):
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 0
    saved = (run_dir / "config.yaml").read_text(encoding="utf-8")
    assert main(BASE + ["--out", str(run_dir), "--resume", "--max-steps", "1"]) == 2
    assert "already at step 2, past --max-steps 1" in capsys.readouterr().err
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "1"]) == 2
    assert "already at step 2, past --stop-at 1" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text(encoding="utf-8") == saved
    assert _train_steps(run_dir) == [1, 2]


def test_resume_and_init_from_are_exclusive(run_dir, capsys):
    weights = run_dir / "checkpoints" / "last.safetensors"
    with pytest.raises(SystemExit) as exited:
        main(BASE + ["--out", str(run_dir), "--resume", "--init-from", str(weights)])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def _run_files(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


def test_an_overwrite_refused_for_its_batch_size_leaves_the_earlier_run(run_dir, capsys):
    before = _run_files(run_dir)
    assert main(BASE + ["--out", str(run_dir), "--overwrite", "--batch-size", "50"]) == 2
    assert "too few for batch size 50" in capsys.readouterr().err
    assert _run_files(run_dir) == before  # its checkpoints, log, config.yaml and split


def test_a_resume_refused_for_its_batch_size_leaves_the_config_later_resumes_continue(run_dir, capsys):
    before = _run_files(run_dir)
    assert main(BASE + ["--out", str(run_dir), "--resume", "--batch-size", "50"]) == 2
    assert "too few for batch size 50" in capsys.readouterr().err
    assert _run_files(run_dir) == before
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 0
    assert _train_steps(run_dir) == [1, 2] and _saved_train_section(run_dir)["batch_size"] == 2


def test_a_fine_tuning_run_resumes_with_the_config_it_was_started_with(stopped_run, tmp_path, capsys):
    weights = stopped_run / "checkpoints" / "last.safetensors"
    tuned = tmp_path / "tuned"
    args = BASE + ["--out", str(tuned)]
    assert main(args + ["--init-from", str(weights), "--max-steps", "2", "--stop-at", "1"]) == 0
    started_from = json.loads((tuned / "checkpoints" / "last.json").read_text(encoding="utf-8"))["initial_weights"]

    # A real difference is still refused; then the config it was started with, without --init-from, resumes.
    values = yaml.safe_load(SMOKE.read_text(encoding="utf-8"))
    values["seed"] = 1
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(values), encoding="utf-8")
    assert main(["train", "--config", str(other), "--out", str(tuned), "--device", "cpu", "--no-progress",
                 "--resume"]) == 2
    assert "(seed differs from its config.yaml)" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0, capsys.readouterr().err
    assert _train_steps(tuned) == [1, 2]
    assert _saved_train_section(tuned)["init_from"] == str(weights)
    sidecar = json.loads((tuned / "checkpoints" / "last.json").read_text(encoding="utf-8"))
    assert sidecar["steps"] == 2 and sidecar["initial_weights"] == started_from


def test_a_stage_run_started_with_init_from_resumes_with_its_stage_config(stopped_run, tmp_path, capsys):
    """The stage config leaves train.init_from to --init-from, which --resume does not take."""
    values = yaml.safe_load(SMOKE.read_text(encoding="utf-8"))
    values["train"]["stage"] = "fusion_weight"
    values["loss"] = {"fusion_target": "true_field"}  # the stage reads only the fusion losses
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump(values), encoding="utf-8")
    args = ["train", "--config", str(stage), "--out", str(tmp_path / "stage"), "--device", "cpu", "--no-progress"]
    weights = stopped_run / "checkpoints" / "last.safetensors"
    assert main(args + ["--init-from", str(weights), "--max-steps", "2", "--stop-at", "1"]) == 0
    assert main(args + ["--resume"]) == 0, capsys.readouterr().err
    assert _train_steps(tmp_path / "stage") == [1, 2]


@pytest.mark.parametrize("damage", ["no sidecar", "junk state"])
def test_resuming_a_damaged_run_folder_names_the_file(run_dir, damage, capsys):
    checkpoints = run_dir / "checkpoints"
    if damage == "no sidecar":
        (checkpoints / "last.json").unlink()
        damaged = checkpoints / "last.json"
    else:
        damaged = checkpoints / "last.state.pt"
        damaged.write_bytes(b"not a checkpoint at all")
    assert main(BASE + ["--out", str(run_dir), "--resume"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and str(damaged) in error


def test_an_interrupt_says_which_step_resume_continues_from(run_dir, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    assert main(BASE + ["--out", str(run_dir), "--resume"]) == 130
    assert "the last checkpoint holds step 1; --resume continues from it" in capsys.readouterr().err


# ------------------------------------------------------------------ a checkpoint is replaced as a unit

CHECKPOINT_FILES = ("last.safetensors", "last.json", "last.state.pt")


class _Killed(BaseException):
    """The process dying at this instant: nothing after it runs, no handler sees it."""


def _checkpoint_files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / "checkpoints" / name).read_bytes() for name in CHECKPOINT_FILES}


def _steps_recorded(run_dir: Path) -> tuple[int, int]:
    checkpoints = run_dir / "checkpoints"
    sidecar = json.loads((checkpoints / "last.json").read_text(encoding="utf-8"))
    return sidecar["steps"], torch.load(checkpoints / "last.state.pt", weights_only=True)["step"]


@pytest.mark.parametrize("cut", ["midway through the weights", "before the state"])
def test_a_save_cut_short_leaves_the_previous_checkpoint_and_resume_continues_from_it(run_dir, cut, monkeypatch):
    before = _checkpoint_files(run_dir)
    if cut == "midway through the weights":
        import napari_unifuse.model.checkpoint as checkpoint

        real_save_file = checkpoint.save_file

        def save_file(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            if Path(filename).name == "last.safetensors":
                size = Path(filename).stat().st_size
                with open(filename, "r+b") as stream:
                    stream.truncate(size // 2)
                raise _Killed

        monkeypatch.setattr(checkpoint, "save_file", save_file)
    else:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if Path(f).name == "last.state.pt":
                raise _Killed
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    with pytest.raises(_Killed):
        main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"])
    monkeypatch.undo()
    assert _checkpoint_files(run_dir) == before  # step 1's set, whole

    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 0
    assert _steps_recorded(run_dir) == (2, 2)
    assert _train_steps(run_dir) == [1, 2]
    assert not any(path.name.startswith(".") for path in (run_dir / "checkpoints").iterdir())


def _kill_a_resume_after_it_moved_one_committed_file(run_dir, monkeypatch) -> None:
    """Run ``--resume`` and kill it once it has moved one file of the committed ``last`` save into place."""
    real_settle = trainer._settle_interrupted_save

    def settle(staging, checkpoint_dir):
        if staging.name.endswith("last") and (staging / trainer.COMMITTED).is_file():
            first = sorted(path for path in staging.iterdir() if path.name != trainer.COMMITTED)[0]
            first.replace(checkpoint_dir / first.name)  # one file of the three moved into place
            raise _Killed
        real_settle(staging, checkpoint_dir)

    monkeypatch.setattr(trainer, "_settle_interrupted_save", settle)
    with pytest.raises(_Killed):
        main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"])
    monkeypatch.undo()


def test_a_save_cut_short_after_it_was_committed_is_finished_by_resume(run_dir, monkeypatch):
    _kill_a_resume_after_it_moved_one_committed_file(run_dir, monkeypatch)

    # The resumed run finds step 2's whole set: nothing left to train up to --stop-at 2.
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 0
    assert _steps_recorded(run_dir) == (2, 2)
    assert _train_steps(run_dir) == [1, 2]
    assert not (run_dir / "checkpoints" / ".saving-last").exists()


def test_an_interrupt_after_a_save_was_committed_names_the_step_resume_continues_from(run_dir, monkeypatch,
                                                                                     capsys):
    """Ctrl-C between the commit and the moves: --resume finishes the save, so the hint names its step."""
    real_settle = trainer._settle_interrupted_save

    def settle(staging, checkpoint_dir):
        if staging.name.endswith("last") and (staging / trainer.COMMITTED).is_file():
            monkeypatch.setattr(trainer, "_settle_interrupted_save", real_settle)
            raise KeyboardInterrupt
        real_settle(staging, checkpoint_dir)

    monkeypatch.setattr(trainer, "_settle_interrupted_save", settle)
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 130
    assert "the last checkpoint holds step 2; --resume continues from it" in capsys.readouterr().err
    assert _steps_recorded(run_dir) == (2, 2)


def test_resuming_checkpoint_files_of_different_saves_is_refused(run_dir, capsys):
    step_1_state = (run_dir / "checkpoints" / "last.state.pt").read_bytes()
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 0
    (run_dir / "checkpoints" / "last.state.pt").write_bytes(step_1_state)  # a hand-mixed folder
    assert main(BASE + ["--out", str(run_dir), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "last.json records step 2 but last.state.pt step 1" in error and len(error.strip().splitlines()) == 1
    assert _train_steps(run_dir) == [1, 2]


def test_resuming_with_another_number_of_processes_is_refused(run_dir, capsys):
    sidecar = run_dir / "checkpoints" / "last.json"
    metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    assert metadata["world_size"] == 1
    sidecar.write_text(json.dumps({**metadata, "world_size": 2}), encoding="utf-8")  # as torchrun with 2 wrote it
    assert main(BASE + ["--out", str(run_dir), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "trained by 2 process(es) and this run has 1" in error and "torchrun --nproc_per_node 2" in error
    assert _train_steps(run_dir) == [1]


def test_resume_before_the_first_checkpoint_starts_the_run_from_step_0(run_dir, capsys):
    # As a run killed during its first save leaves its folder: a log, no checkpoint, an uncommitted save.
    shutil.rmtree(run_dir / "checkpoints")
    staging = run_dir / "checkpoints" / ".saving-last"
    staging.mkdir(parents=True)
    (staging / "last.safetensors").write_bytes(b"cut short")
    assert main(BASE + ["--out", str(run_dir), "--max-steps", "4"]) == 2  # a fresh run still needs a flag
    capsys.readouterr()

    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "1"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "no checkpoint yet" in line]
    assert said == [f"unifuse train: {run_dir} has no checkpoint yet: starting it from step 0"]
    assert _train_steps(run_dir) == [1]  # the interrupted attempt's step 1 is not logged twice
    assert _steps_recorded(run_dir) == (1, 1)
    assert not staging.exists()


def _disk_full_at_the_state_save(monkeypatch) -> None:
    """torch's zip writer on a full disk: "[enforce fail at inline_container.cc:672] unexpected pos"."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name == "last.state.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_first_checkpoint_the_disk_cannot_hold_does_not_claim_an_earlier_one_is_kept(tmp_path, monkeypatch, capsys):
    _disk_full_at_the_state_save(monkeypatch)
    assert main(BASE + ["--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is the disk full? There is no earlier last.safetensors to keep" in error


def test_a_checkpoint_the_disk_cannot_hold_is_one_line_and_the_previous_one_is_kept(run_dir, monkeypatch, capsys):
    before = _checkpoint_files(run_dir)
    _disk_full_at_the_state_save(monkeypatch)
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is the disk full? The previous checkpoint is kept" in error
    monkeypatch.undo()
    assert _checkpoint_files(run_dir) == before


def test_a_weights_file_the_disk_cannot_hold_is_one_line_and_the_previous_checkpoint_is_kept(run_dir, monkeypatch,
                                                                                           capsys):
    """safetensors on a full disk raises its own SafetensorError, which crashed with a traceback."""
    from safetensors import SafetensorError

    import napari_unifuse.model.checkpoint as checkpoint

    before = _checkpoint_files(run_dir)

    def save_file(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and ".safetensors: the checkpoint could not be written" in error
    assert "No space left on device" in error and "is the disk full? The previous checkpoint is kept" in error
    monkeypatch.undo()
    assert _checkpoint_files(run_dir) == before


def test_a_run_folder_another_run_is_training_is_refused_in_one_line_and_left_alone(run_dir, capsys):
    """A --resume requeued while the run still trained removed its save in progress and rewrote its log."""
    live = trainer.Trainer(trainer.run_config(run_dir), run_dir, device="cpu", resume=True, progress=False)
    in_progress = run_dir / "checkpoints" / ".saving-last"
    in_progress.mkdir()
    (in_progress / "last.safetensors").write_bytes(b"being written")
    files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    capsys.readouterr()
    for flags in (["--resume"], ["--overwrite"]):
        assert main(BASE + ["--out", str(run_dir), *flags]) == 2
        error = capsys.readouterr().err
        assert error == f"unifuse train: error: another unifuse train is using {run_dir}: wait for it to finish, " \
                        "or choose another --out\n"
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == files
    assert live.fit().step == 4
    assert _train_steps(run_dir) == [1, 2, 3, 4]


def test_a_checkpoint_whose_save_was_cut_short_while_moving_in_is_refused_until_resume_finishes_it(run_dir,
                                                                                                 monkeypatch, capsys):
    """Killed between the moves: the new last.json sat on the old weights, and `unifuse info` read the pair."""
    _kill_a_resume_after_it_moved_one_committed_file(run_dir, monkeypatch)
    weights = run_dir / "checkpoints" / "last.safetensors"
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(weights)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "an interrupted save of last is beside it" in error
    assert f"--out {run_dir} --resume" in error

    assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", "2"]) == 0
    assert main(["info", "--checkpoint", str(weights)]) == 0


def test_a_resumed_runs_checkpoint_records_the_command_that_started_it_and_each_resume(run_dir, capsys):
    """The sidecar's command was the last --resume's, which names no --max-steps or --lr the run was
    started with: the record could not say how to make the checkpoint again."""
    started = json.loads((run_dir / "checkpoints" / "last.json").read_text(encoding="utf-8"))["command"]
    assert "--stop-at 1" in started and "--resume" not in started
    for stop_at in ("2", "3"):
        assert main(BASE + ["--out", str(run_dir), "--resume", "--stop-at", stop_at]) == 0
    sidecar = json.loads((run_dir / "checkpoints" / "last.json").read_text(encoding="utf-8"))
    assert sidecar["command"] == started
    assert [command.split("--stop-at ")[1].split()[0] for command in sidecar["resumed_with"]] == ["2", "3"]
    assert all("--resume" in command for command in sidecar["resumed_with"])
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(run_dir / "checkpoints" / "last.safetensors")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.index(f"trained: {started}") < text.index("resumed: ") and text.count("resumed: ") == 2
