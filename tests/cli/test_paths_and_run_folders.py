"""Paths as a user gives them, and run folders a command must not damage: a ``~`` the shell left
unexpanded (``--out=~/runs``, a CSV cell) names the home folder for every command, as nibabel would
take it; CSV cells are stripped alike by every command; synth records its inputs as given; a
training run never replaces a user's config.yaml, and its first failed save says no checkpoint is kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from napari_unifuse.cli import main
from napari_unifuse.cli.arguments import read_pairs_rows
from napari_unifuse.cli.evaluate import pairs_from_csv
from napari_unifuse.cli.fuse import read_pairs_csv
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.io import Geometry, ImageVolume, write_displacement, write_image
from napari_unifuse.training.config import load_config

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
TRAIN = ["train", "--device", "cpu", "--no-progress", "--max-steps", "1"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder holding a PNG pair in ``in/``, and a working folder elsewhere as the cwd."""
    home = tmp_path / "home"
    (home / "in").mkdir(parents=True)
    slices = make_brain_phantom_slices((48, 48), modalities=("t1", "t2"))
    for modality in ("t1", "t2"):
        array = slices[modality].array
        Image.fromarray(np.round(255 * array / array.max()).astype(np.uint8)).save(home / "in" / f"{modality}.png")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return home


def test_synth_takes_a_tilde_in_its_path_options_as_the_home_folder(home, tmp_path):
    assert main(["synth", "--reference=~/in/t1.png", "--moving=~/in/t2.png", "--out=~/syn"]) == 0
    meta = json.loads((home / "syn" / "meta.json").read_text(encoding="utf-8"))
    assert meta["inputs"] == {"reference": str(home / "in" / "t1.png"), "moving": str(home / "in" / "t2.png")}
    assert (home / "syn" / "displacement.nii.gz").is_file()
    assert not (tmp_path / "work" / "~").exists()


def test_a_tilde_in_a_csv_file_cell_names_the_home_folder_for_synth_fuse_and_evaluate(home, tmp_path):
    csv = tmp_path / "work" / "pairs.csv"
    csv.write_text("reference,moving\n~/in/t1.png,~/in/t2.png\n", encoding="utf-8")
    assert main(["synth", "--pairs", str(csv), "--out", str(tmp_path / "syn")]) == 0
    assert (tmp_path / "syn" / "0000" / "meta.json").is_file()
    [pair] = read_pairs_csv(csv)
    assert (pair.reference, pair.moving) == (home / "in" / "t1.png", home / "in" / "t2.png")
    csv.write_text("reference,moving,label\n~/in/t1.png,~/in/t2.png,~/in/t2.png\n", encoding="utf-8")
    [scored] = pairs_from_csv(csv)
    assert scored.reference.source == str(home / "in" / "t1.png")


def test_evaluate_strips_the_cells_of_its_csv_as_fuse_and_synth_do(home, tmp_path):
    csv = home / "pairs.csv"
    csv.write_text("reference,moving,label,task\n in/t1.png , in/t2.png, in/t2.png , CT-MRI \n", encoding="utf-8")
    [pair] = pairs_from_csv(csv)
    assert (pair.name, pair.task, pair.moving.source) == ("in/t2.png", "CT-MRI", str(home / "in" / "t2.png"))


def test_the_csv_reader_expands_a_tilde_in_file_columns_only(home, tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("reference,moving,task\n ~/a.png ,~/b.png, ~task \n", encoding="utf-8")
    [(line, row)] = read_pairs_rows(csv, required=("reference", "moving"), optional=("task",))
    assert (line, row) == (2, {"reference": str(home / "a.png"), "moving": str(home / "b.png"), "task": "~task"})


def test_nifti_outputs_in_a_folder_named_tilde_are_written_there_not_in_the_home_folder(home, tmp_path):
    """``./~/out`` (the shell's way to name such a folder) is ``~/out`` to pathlib, which nibabel expanded."""
    (tmp_path / "work" / "~").mkdir()
    volume = ImageVolume(np.random.default_rng(0).random((4, 5, 6), dtype=np.float32), Geometry.identity(3))
    write_image(volume, Path("./~/image.nii.gz"))
    write_displacement(np.zeros((3, 4, 5, 6)), volume.geometry, Path("./~/field.nii.gz"))
    assert sorted(path.name for path in (tmp_path / "work" / "~").iterdir()) == ["field.nii.gz", "image.nii.gz"]
    assert not list(home.glob("*.nii.gz"))


def test_synth_records_a_symlinked_input_as_given_with_the_file_it_resolves_to(home, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    blob = store / "SHA256E-s1--0123.png"
    (home / "in" / "t1.png").rename(blob)
    (home / "in" / "t1.png").symlink_to(blob)
    assert main(["synth", "--reference", str(home / "in" / "t1.png"), "--moving", "../home/in/t2.png",
                 "--out", "syn"]) == 0
    meta = json.loads((tmp_path / "work" / "syn" / "meta.json").read_text(encoding="utf-8"))
    assert meta["inputs"] == {"reference": str(home / "in" / "t1.png"), "moving": str(home / "in" / "t2.png")}
    assert meta["resolved_paths"] == {"reference": str(blob)}


def _user_config(folder: Path) -> Path:
    """A user's config kept as config.yaml in the folder meant for the run, with a comment of theirs."""
    folder.mkdir()
    config = folder / "config.yaml"
    config.write_text(SMOKE.read_text(encoding="utf-8") + "# tried lr 1e-4 first\n", encoding="utf-8")
    return config


def test_a_run_into_the_folder_of_its_own_config_file_is_refused_and_the_file_kept(tmp_path, capsys):
    config = _user_config(tmp_path / "myrun")
    written = config.read_bytes()
    assert main([*TRAIN, "--config", str(config), "--out", str(tmp_path / "myrun")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is the config given (--config)" in error and "myrun.yaml" in error
    assert config.read_bytes() == written
    assert sorted(path.name for path in config.parent.iterdir()) == ["config.yaml"]


def test_a_run_into_a_folder_with_a_users_config_yaml_is_refused(tmp_path, capsys):
    config = _user_config(tmp_path / "myrun")
    assert main([*TRAIN, "--config", str(SMOKE), "--out", str(tmp_path / "myrun"), "--resume"]) == 2
    assert "is a config.yaml no run wrote" in capsys.readouterr().err
    assert config.read_text(encoding="utf-8").endswith("# tried lr 1e-4 first\n")


def test_the_config_yaml_of_a_run_stopped_before_its_first_log_line_still_starts_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(load_config(SMOKE).to_dict(), sort_keys=False), encoding="utf-8")
    assert main([*TRAIN, "--config", str(config), "--out", str(run_dir)]) == 0
    assert (run_dir / "checkpoints" / "last.safetensors").is_file()


def test_fuse_train_and_evaluate_take_a_tilde_in_their_path_options_as_the_home_folder(home, tmp_path, capsys):
    assert main(["fuse", "--reference=~/in/t1.png", "--moving=~/in/t2.png", "--out=~/res",
                 "--method", "identity+average", "--no-quality"]) == 0
    assert (home / "res" / "t2" / "provenance.json").is_file()
    (home / "cfg.yaml").write_text(SMOKE.read_text(encoding="utf-8"), encoding="utf-8")
    assert main([*TRAIN, "--config=~/cfg.yaml", "--out=~/run"]) == 0
    assert (home / "run" / "checkpoints" / "last.safetensors").is_file()
    (home / "pairs.csv").write_text("reference,moving,label\nin/t1.png,in/t2.png,in/t2.png\n", encoding="utf-8")
    assert main(["evaluate", "--pairs=~/pairs.csv", "--out=~/ev", "--methods", "sitk+wavelet",
                 "--baselines", "identity", "--fusion-rules", "average"]) == 0
    assert (home / "ev" / "evaluation.csv").is_file()
    assert not (tmp_path / "work" / "~").exists()
