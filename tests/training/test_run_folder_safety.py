"""A run folder survives an --overwrite of another kind of run, an interrupted start and a full disk."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import pytest
import yaml

import napari_unifuse
from napari_unifuse.errors import UniFuseError
from napari_unifuse.training.trainer import train

from .test_trainer import _folder_data_config, _tiny_config, _write_2d_case


def test_overwriting_a_folder_data_run_with_a_phantom_run_can_be_resumed(tmp_path):
    """--overwrite left the folders run's split.json, and every --resume of the new run was refused."""
    root = tmp_path / "data"
    for number in range(3):
        _write_2d_case(root, f"case{number}")
    run_dir = tmp_path / "run"
    train(_folder_data_config(root), run_dir, device="cpu", progress=False, stop_at_step=1)
    assert (run_dir / "split.json").is_file()

    phantom = _tiny_config()
    train(phantom, run_dir, device="cpu", progress=False, stop_at_step=1, overwrite=True)
    assert not (run_dir / "split.json").exists()
    assert train(phantom, run_dir, device="cpu", progress=False, resume=True, stop_at_step=2).step == 2


def test_a_phantom_run_resumes_beside_a_stale_split_of_an_earlier_run(tmp_path):
    """A folder overwritten by an earlier version kept a folders run's split.json: generated pairs have
    no cases, so that file says nothing about this run and must not block its resume."""
    config, run_dir = _tiny_config(), tmp_path / "run"
    train(config, run_dir, device="cpu", progress=False, stop_at_step=1)
    (run_dir / "split.json").write_text(json.dumps({"train": ["c0", "c1"], "validation": ["c2"]}), encoding="utf-8")
    assert train(config, run_dir, device="cpu", progress=False, resume=True, stop_at_step=2).step == 2
    assert not (run_dir / "split.json").exists()


def _killed_while_writing(name: str, monkeypatch) -> None:
    """Path.write_text that dies half-way through writing a file whose name holds ``name`` (the file
    itself, or the hidden one an atomic writer renames over it), as a kill -9 would."""
    write_text = pathlib.Path.write_text

    def half_written(self, data, *args, **kwargs):
        if name in self.name:
            write_text(self, data[:len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt  # stands for the process's death: nothing after this runs
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", half_written)


@pytest.mark.parametrize("name", ["config.yaml", "split.json"])
def test_a_resume_killed_while_writing_a_run_file_leaves_the_run_resumable(tmp_path, monkeypatch, name):
    """config.yaml and split.json were rewritten in place: a kill during the write left invalid YAML
    (or JSON), and the run could no longer be resumed."""
    root = tmp_path / "data"
    for number in range(3):
        _write_2d_case(root, f"case{number}")
    config, run_dir = _folder_data_config(root), tmp_path / "run"
    train(config, run_dir, device="cpu", progress=False, stop_at_step=1)
    before = (run_dir / name).read_text(encoding="utf-8")
    with monkeypatch.context() as patch:
        _killed_while_writing(name, patch)
        with pytest.raises(KeyboardInterrupt):
            train(config, run_dir, device="cpu", progress=False, resume=True, stop_at_step=2)
    assert (run_dir / name).read_text(encoding="utf-8") == before
    assert train(config, run_dir, device="cpu", progress=False, resume=True, stop_at_step=2).step == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["seed"] == config.seed


def test_a_full_disk_while_a_resume_rewrites_the_log_is_one_clear_line_and_leaves_no_stray_file(
        tmp_path, monkeypatch):
    """A full disk gave a bare "No space left on device" and left a partial log.jsonl.tmp behind."""
    config, run_dir = _tiny_config(), tmp_path / "run"
    train(config, run_dir, device="cpu", progress=False, stop_at_step=1)
    files_before = sorted(os.listdir(run_dir))
    log_before = (run_dir / "log.jsonl").read_text(encoding="utf-8")
    write_text = pathlib.Path.write_text

    def disk_full(self, data, *args, **kwargs):
        if "log.jsonl" in self.name:
            write_text(self, data[:1], *args, **kwargs)  # the disk took a little of it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, data, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "write_text", disk_full)
        with pytest.raises(UniFuseError) as refused:
            train(config, run_dir, device="cpu", progress=False, resume=True, stop_at_step=2)
    message = str(refused.value)
    assert str(run_dir / "log.jsonl") in message and "No space left on device" in message
    assert "is the disk full? log.jsonl is left as it was" in message
    assert sorted(os.listdir(run_dir)) == files_before
    assert (run_dir / "log.jsonl").read_text(encoding="utf-8") == log_before
    assert train(config, run_dir, device="cpu", progress=False, resume=True, stop_at_step=2).step == 2


def test_a_checkpoint_records_the_package_version_that_wrote_it(tmp_path):
    result = train(_tiny_config().with_overrides(train={"max_steps": 1}), tmp_path / "run", device="cpu",
                   progress=False)
    metadata = json.loads(result.last_checkpoint.with_suffix(".json").read_text(encoding="utf-8"))
    assert metadata["napari_unifuse"] == napari_unifuse.__version__
    assert metadata["torch"]
