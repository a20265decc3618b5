"""The training loop through its Python API: a resumed run equals an uninterrupted one, and a
fine-tuning run starts from the weights it names."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_unifuse.errors import CheckpointError, InputError
from napari_unifuse.model import UniFuse
from napari_unifuse.model.checkpoint import load_checkpoint
from napari_unifuse.training.config import load_config
from napari_unifuse.training.trainer import model_config, train

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _tiny_config():
    # 16x16 crops and no intermediate validation keep the runs of this test short.
    return load_config(SMOKE).with_overrides(
        data={"crop": 16}, train={"max_steps": 3, "val_every": 100, "checkpoint_every": 100}
    )


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    config = _tiny_config()
    straight = train(config, tmp_path / "straight", device="cpu", progress=False)
    assert straight.step == 3

    stopped = train(config, tmp_path / "split", device="cpu", progress=False, stop_at_step=2)
    assert stopped.step == 2
    state = torch.load(tmp_path / "split" / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"]  # AdamW moments were saved
    # The run continues its own config: another crop would make its files misstate the steps to come.
    with pytest.raises(CheckpointError, match=r"\(data\.crop differ"):
        train(config.with_overrides(data={"crop": 8}), tmp_path / "split", device="cpu", resume=True, progress=False)
    resumed = train(config, tmp_path / "split", device="cpu", resume=True, progress=False)
    assert resumed.step == 3

    expected = load_file(straight.last_checkpoint)
    got = load_file(resumed.last_checkpoint)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # ... and training moved the weights away from the seeded initialisation.
    torch.manual_seed(config.seed)
    initial = UniFuse(model_config(config)).state_dict()
    assert any(not torch.equal(initial[name], expected[name]) for name in expected)


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    config = _tiny_config().with_overrides(train={"lr": 1e-2})  # weights move well away from the seed
    trained = train(config, tmp_path / "first", device="cpu", progress=False).last_checkpoint
    # A vanishing learning rate: one step from trained weights must keep the parameters on them
    # (batch-norm statistics still move), while a seeded initialisation, what the run would start
    # from without init_from, is far from them.
    fine_tune = config.with_overrides(train={"max_steps": 1, "lr": 1e-12, "min_lr": 1e-12,
                                             "init_from": str(trained)})
    tuned = load_file(train(fine_tune, tmp_path / "tuned", device="cpu", progress=False).last_checkpoint)
    expected = load_file(trained)
    torch.manual_seed(config.seed)
    initial = dict(UniFuse(model_config(config)).named_parameters())
    for name in initial:
        torch.testing.assert_close(tuned[name], expected[name], rtol=0, atol=1e-8, msg=name)
    assert max(float((initial[name].detach() - expected[name]).abs().max()) for name in initial) > 1e-3


def test_fine_tuning_from_a_checkpoint_of_another_model_is_refused(tmp_path):
    config = _tiny_config()
    trained = train(config, tmp_path / "first", device="cpu", progress=False).last_checkpoint
    other = config.with_overrides(model={"overrides": {"embed_dim": 8}}, train={"init_from": str(trained)})
    with pytest.raises(CheckpointError, match="embed_dim"):
        train(other, tmp_path / "other", device="cpu", progress=False)


def test_the_image_restoration_stage_adds_the_path_and_trains_it_alone(tmp_path):
    config = _tiny_config()
    trained = train(config, tmp_path / "first", device="cpu", progress=False).last_checkpoint
    stage = config.with_overrides(model={"overrides": {"image_restoration_width": 4}},
                                  train={"stage": "image_restoration", "init_from": str(trained), "lr": 1e-2})
    result = train(stage, tmp_path / "stage", device="cpu", progress=False)
    before, after = load_file(trained), load_file(result.last_checkpoint)
    added = set(after) - set(before)
    assert added and all(name.startswith("ufrf.image_restoration.") for name in added)
    assert after["ufrf.image_restoration.out.weight"].abs().max() > 0  # trained away from its zero start
    # Everything else, buffers included, is the checkpoint's: the classifier's running
    # standardisation must not follow the batches.
    assert any(name.startswith("dapl.classifier.") and "running" in name for name in before)
    assert all(torch.equal(before[name], after[name]) for name in before)
    network, _ = load_checkpoint(result.last_checkpoint)
    assert network.config.image_restoration_width == 4
    # The stage starts the path afresh: run from its own result (as from a shipped checkpoint that
    # has the path), it gives the same weights.
    again = train(stage.with_overrides(train={"init_from": str(result.last_checkpoint)}), tmp_path / "again",
                  device="cpu", progress=False)
    repeated = load_file(again.last_checkpoint)
    assert all(torch.equal(after[name], repeated[name]) for name in after)


def test_the_fusion_weight_stage_refits_the_fusion_weight_head_alone_and_afresh(tmp_path):
    config = _tiny_config().with_overrides(train={"lr": 1e-2})
    trained = train(config, tmp_path / "first", device="cpu", progress=False).last_checkpoint
    stage = config.with_overrides(train={"stage": "fusion_weight", "init_from": str(trained)},
                                  loss={"fusion_target": "true_field"})
    result = train(stage, tmp_path / "stage", device="cpu", progress=False)
    before, after = load_file(trained), load_file(result.last_checkpoint)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"ufrf.fusion_weight_head.weight", "ufrf.fusion_weight_head.bias"}
    assert json.loads(result.last_checkpoint.with_suffix(".json").read_text())["initial_weights"]["training_crop"] == 16
    # Afresh: from its own result it gives the same weights again.
    again = train(stage.with_overrides(train={"init_from": str(result.last_checkpoint)}), tmp_path / "again",
                  device="cpu", progress=False)
    repeated = load_file(again.last_checkpoint)
    assert all(torch.equal(after[name], repeated[name]) for name in after)


def test_a_fine_tuning_run_resumed_before_its_first_checkpoint_starts_from_its_weights(tmp_path, capsys):
    config = _tiny_config().with_overrides(train={"max_steps": 1})
    first = train(config, tmp_path / "first", device="cpu", progress=False).last_checkpoint
    fine_tune = config.with_overrides(train={"init_from": str(first)})
    straight = train(fine_tune, tmp_path / "straight", device="cpu", progress=False)

    interrupted = tmp_path / "interrupted"
    train(fine_tune, interrupted, device="cpu", progress=False)
    shutil.rmtree(interrupted / "checkpoints")  # as if killed before its first checkpoint
    capsys.readouterr()
    resumed = train(fine_tune, interrupted, device="cpu", resume=True, progress=False)
    assert "has no checkpoint yet: starting it from step 0" in capsys.readouterr().out
    assert resumed.step == 1
    expected, got = load_file(straight.last_checkpoint), load_file(resumed.last_checkpoint)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    metadata = json.loads(resumed.last_checkpoint.with_suffix(".json").read_text(encoding="utf-8"))
    assert metadata["initial_weights"]["checkpoint"] == str(first)


def test_the_training_log_writes_an_undefined_score_as_null(tmp_path):
    """log.jsonl held bare NaN (e.g. class_accuracy_clean after configs/smoke.yaml): not JSON."""
    from types import SimpleNamespace

    from napari_unifuse.training.trainer import Trainer

    Trainer._log(SimpleNamespace(run_dir=tmp_path), {"kind": "val", "class_accuracy_clean": float("nan")})

    def refuse(constant):
        raise ValueError(constant)

    line = (tmp_path / "log.jsonl").read_text().splitlines()[0]
    assert json.loads(line, parse_constant=refuse) == {"kind": "val", "class_accuracy_clean": None}


def test_too_few_samples_for_a_batch_say_which_setting_draws_more(tmp_path):
    from napari_unifuse.errors import UniFuseError

    config = _tiny_config().with_overrides(data={"train_length": 1})
    with pytest.raises(UniFuseError, match=r"1 samples: too few for batch size 2 .*raise data\.train_length, or "
                                           r"lower the batch size \(--batch-size\)"):
        train(config, tmp_path / "run", device="cpu", progress=False)


def test_a_run_folder_is_trained_by_one_run_at_a_time(tmp_path):
    """Two fresh runs into one --out both "succeeded", one's results silently overwriting the other's."""
    from napari_unifuse.errors import UniFuseError
    from napari_unifuse.training.trainer import Trainer

    config, run_dir = _tiny_config(), tmp_path / "run"
    first = Trainer(config, run_dir, device="cpu", progress=False)
    with pytest.raises(UniFuseError) as refused:
        Trainer(config, run_dir, device="cpu", progress=False, overwrite=True)
    assert str(refused.value) == f"another unifuse train is using {run_dir}: wait for it to finish, or choose another --out"
    assert first.fit().step == 3
    # Released once done: the run can be continued.
    assert train(config, run_dir, device="cpu", resume=True, progress=False).step == 3


def test_init_from_weights_without_their_sidecar_records_this_runs_crop_and_says_so(tmp_path, capsys):
    """The stage's checkpoint recorded no training crop, so inference stopped tiling (whole images)."""
    from napari_unifuse.model.checkpoint import read_metadata, training_crop

    config = _tiny_config()
    trained = train(config, tmp_path / "first", device="cpu", progress=False).last_checkpoint
    bare = tmp_path / "bare.safetensors"
    shutil.copyfile(trained, bare)
    stage = config.with_overrides(data={"crop": 24}, train={"stage": "fusion_weight", "init_from": str(bare)},
                                  loss={"fusion_target": "true_field"})
    capsys.readouterr()
    result = train(stage, tmp_path / "stage", device="cpu", progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(bare.with_suffix(".json")) in warnings[0] and "(24)" in warnings[0]
    assert training_crop(read_metadata(result.last_checkpoint)) == 24


def _folder_data_config(root: Path):
    from napari_unifuse.training.config import config_from_dict

    values = _tiny_config().to_dict()
    values["data"] = {"kind": "folders", "root": str(root), "layout": "brats", "crop": 16, "val_fraction": 0.34,
                      "samples_per_case": 2}
    return config_from_dict(values)


def _write_2d_case(root: Path, name: str) -> None:
    import nibabel as nib
    import numpy as np

    folder = root / name
    folder.mkdir(parents=True)
    image = np.random.default_rng(len(name)).random((24, 24, 1)).astype(np.float32) * 1000
    for modality in ("t1", "t2"):
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{name}_{modality}.nii.gz")


@pytest.mark.parametrize("change", ["added", "removed"])
def test_resuming_after_the_datas_cases_changed_is_refused(tmp_path, change):
    """A case added to the data folder reshuffled the validation split of the resumed run silently."""
    root = tmp_path / "data"
    for number in range(4):
        _write_2d_case(root, f"case{number}")
    config, run_dir = _folder_data_config(root), tmp_path / "run"
    train(config, run_dir, device="cpu", progress=False, stop_at_step=1)
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    assert sorted(split["train"] + split["validation"]) == ["case0", "case1", "case2", "case3"]
    if change == "added":
        _write_2d_case(root, "case4")
    else:
        shutil.rmtree(root / split["train"][0])
    changed = "case4" if change == "added" else split["train"][0]
    with pytest.raises(InputError, match=rf"the data's cases changed since the run started \({change}: {changed}\)"):
        train(config, run_dir, device="cpu", resume=True, progress=False)


def test_a_resume_says_which_of_the_config_files_resumable_settings_it_keeps_the_runs_own(tmp_path, capsys):
    """A config file whose max_steps was raised resumed silently at the run's old max_steps."""
    import yaml

    from napari_unifuse.training.trainer import resumed_config

    run = _tiny_config()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run.to_dict()), encoding="utf-8")
    raised = run.with_overrides(train={"max_steps": 16, "batch_size": run.train.batch_size + 1})
    continued = resumed_config(tmp_path, raised)
    assert continued.train.max_steps == 3 and continued.train.batch_size == run.train.batch_size
    (note,) = capsys.readouterr().out.splitlines()
    assert note.startswith("unifuse train: --resume keeps the run's train.max_steps 3, not the config file's 16: "
                           "pass --max-steps 16 to change it; train.batch_size ")
    assert f"batch_size {run.train.batch_size}, not the config file's {run.train.batch_size + 1}: pass --batch-size" in note
    # The flags given, or the file as the run has it: nothing to say.
    assert resumed_config(tmp_path, raised, max_steps=16, batch_size=2).train.max_steps == 16
    assert resumed_config(tmp_path, run).train.max_steps == 3
    assert capsys.readouterr().out == ""


def test_a_run_started_from_a_started_run_keeps_both_records(tmp_path):
    """A head refit recorded only the run it started from, not that run's own start: the chain broke."""
    config = _tiny_config().with_overrides(train={"max_steps": 1})
    first = train(config, tmp_path / "first", device="cpu", progress=False).last_checkpoint
    second = train(config.with_overrides(train={"init_from": str(first)}), tmp_path / "second", device="cpu",
                   progress=False).last_checkpoint
    third = train(config.with_overrides(train={"init_from": str(second)}), tmp_path / "third", device="cpu",
                  progress=False).last_checkpoint
    record = json.loads(third.with_suffix(".json").read_text(encoding="utf-8"))["initial_weights"]
    assert record["checkpoint"] == str(second)
    assert record["initial_weights"]["checkpoint"] == str(first)
    assert "initial_weights" not in record["initial_weights"]  # the first run started from nothing


def test_a_resume_reading_another_data_root_shows_both_roots_and_asks_for_data_root_again(tmp_path):
    """Installed from a wheel, a packaged data config reads a root inside site-packages unless --data-root
    is given: a resume without it was told the run had "another config", which it did not."""
    import yaml

    from napari_unifuse.training.trainer import resumed_config

    run = _folder_data_config(tmp_path / "data")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run.to_dict()), encoding="utf-8")
    elsewhere = run.with_overrides(data={"root": str(tmp_path / "packaged")})
    with pytest.raises(CheckpointError) as refused:
        resumed_config(tmp_path, elsewhere)
    assert str(refused.value) == (f"{tmp_path} read its data from {tmp_path / 'data'}; the config given reads "
                                  f"{tmp_path / 'packaged'}: give --data-root {tmp_path / 'data'} again")
    # With another difference, that one is named on its own line, in the singular.
    reseeded = dataclasses.replace(elsewhere, seed=run.seed + 1)
    with pytest.raises(CheckpointError) as refused:
        resumed_config(tmp_path, reseeded)
    root_line, other_line = str(refused.value).splitlines()
    assert root_line.endswith(f"give --data-root {tmp_path / 'data'} again")
    assert f"{tmp_path} was trained with another config (seed differs from its config.yaml)" in other_line


def _harvard_data_config(root: Path, **data):
    from napari_unifuse.training.config import config_from_dict

    values = _tiny_config().to_dict()
    values["data"] = {"kind": "harvard", "root": str(root), "tasks": ["CT-MRI", "PET-MRI"], "crop": 16,
                      # Clean samples: the fake atlas' noise has no tissue deep enough for metal.
                      "none_fraction": 1.0, "val_fraction": 0.2, **data}
    return config_from_dict(values)


def test_every_checkpoint_records_the_cases_of_its_split(tmp_path):
    """evaluate --split val drew the split again from the folder given; on another copy of the atlas
    its "validation" pairs were partly ones the checkpoint trained on. The sidecars now say."""
    from napari_unifuse.model.checkpoint import read_metadata
    from napari_unifuse.training import harvard

    from .test_harvard import write_fake_harvard

    root = write_fake_harvard(tmp_path / "atlas")
    result = train(_harvard_data_config(root), tmp_path / "run", device="cpu", progress=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text(encoding="utf-8"))
    assert split["validation"]
    for checkpoint in (result.last_checkpoint, result.best_checkpoint):
        assert read_metadata(checkpoint)[harvard.RECORDED_SPLIT_KEY] == split
    # Evaluated on a copy of the atlas holding a case fewer, the checkpoint's split stays its own.
    pairs = [pair for pair in harvard.index_harvard(root, ("CT-MRI", "PET-MRI")) if str(pair.case) != split["train"][0]]
    recorded = harvard.recorded_split(read_metadata(result.last_checkpoint), pairs)
    assert sorted({str(pair.case) for pair in recorded.validation}, key=int) == split["validation"]
    assert not recorded.unrecorded


def test_a_crop_the_network_cannot_train_on_is_refused_before_the_run_starts(tmp_path):
    """Crop 4 of the small 2-D network stopped the first step with a traceback from the contrastive loss."""
    from napari_unifuse.training.datasets import NetworkSides
    from napari_unifuse.training.trainer import trainable_sides

    config = _tiny_config().with_overrides(data={"crop": 4})
    assert trainable_sides(model_config(config)) == NetworkSides(multiple=4, smallest=8)
    with pytest.raises(InputError, match=r"^data.crop: \[4, 4\] \(y, x\): not sides the network trains on "
                                         r"\(multiples of 4, at least 8\)"):
        train(config, tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_too_few_harvard_pairs_for_a_batch_are_not_told_of_a_key_the_harvard_kind_refuses(tmp_path):
    from napari_unifuse.errors import UniFuseError

    from .test_harvard import write_fake_harvard

    config = _harvard_data_config(write_fake_harvard(tmp_path / "atlas")).with_overrides(train={"batch_size": 64})
    with pytest.raises(UniFuseError, match=r"too few for batch size 64 .*; add cases \(a Harvard pair is one "
                                           r"sample\), or lower the batch size") as refused:
        train(config, tmp_path / "run", device="cpu", progress=False)
    assert "samples_per_case" not in str(refused.value)
