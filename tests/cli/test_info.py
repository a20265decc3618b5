"""`unifuse info`: the input sizes it accepts are the ones the network runs on."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from napari_unifuse.cli import main
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.costs import minimum_size
from napari_unifuse.model.unifuse import UniFuse


def test_info_refuses_a_size_below_the_smallest_the_network_runs_on_in_one_line(capsys):
    assert main(["info", "--preset", "small", "--dims", "3", "--size", "4"]) == 2
    error = capsys.readouterr().err
    assert error.strip() == ("unifuse info: error: model.costs: the input size must be a multiple of 4 "
                             "and at least 8, got 4")


def test_info_help_states_the_size_rule_of_each_preset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "small 3-D: a multiple of 4 and at least 8" in text
    assert "paper 3-D: a multiple of 8 and at least 8" in text


@pytest.mark.parametrize("config", [
    UniFuseConfig.small(3),
    dataclasses.replace(UniFuseConfig.small(3), correlation_levels=3),
    dataclasses.replace(UniFuseConfig.small(3), patch_size=8, num_regblocks=3, regblock_channels=(16, 8, 8)),
], ids=["small-3d", "three-correlation-levels", "patch-8"])
def test_minimum_size_is_the_smallest_size_the_network_runs_on(config):
    net = UniFuse(config).eval()
    smallest = minimum_size(config)
    assert smallest % config.size_multiple == 0

    def forward(size):
        image = torch.rand(1, 1, *[size] * config.spatial_dims)
        with torch.no_grad():
            net(image, image)

    forward(smallest)
    with pytest.raises(RuntimeError, match="smaller than kernel size"):
        forward(smallest - config.size_multiple)


def test_info_describes_a_shipped_checkpoint(capsys):
    assert main(["info", "--checkpoint", "unifuse-3d-phantom"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for line in ("method: unifuse", "dimensions: 3-D", "degradation classes: none, motion, metal, lowdose",
                 "name: unifuse-3d-phantom"):
        assert line in lines
    assert any(line.startswith("training crop: 32 ") for line in lines)
    assert "configs/phantom3d-cpu-head.yaml" in text and "configs/phantom3d-cpu-restoration.yaml" in text
    assert "train.stage image_restoration" in text and "fusion_gain_min" in text
    assert "calibrations: alignment_guard, degradation_evidence, coarse_readout" in text
    assert "limitations: CPU-sized run" in text


@pytest.mark.parametrize(("name", "use"), [
    ("unifuse-2d-harvard", "training crop: 128 (inference tiles at this size)"),
    ("unifuse-3d-phantom", "training crop: 32 (the degradation classifier reads windows of this size; volumes run "
                           "whole up to 176³ voxels, in slabs beyond)"),
])
def test_info_says_what_the_engine_does_with_the_training_crop(name, use, capsys):
    """Only 2-D images run in tiles of the crop; a 3-D volume runs whole (FusionEngine leaves its tile
    size unset), so telling a 3-D user the crop is the inference tile would misstate what the network sees."""
    assert main(["info", "--checkpoint", name]) == 0
    assert use in capsys.readouterr().out.splitlines()


def test_info_on_a_lone_weights_file_says_the_sidecar_is_missing(tmp_path, capsys):
    from napari_unifuse.model.checkpoint import checkpoint_dir

    lone = tmp_path / "copied.safetensors"
    lone.write_bytes((checkpoint_dir() / "unifuse-2d-harvard.safetensors").read_bytes())
    assert main(["info", "--checkpoint", str(lone)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "method: unifuse dimensions: 2-D" in text
    assert "sidecar: missing (copied.json is not beside it)" in text


def test_info_on_an_empty_sidecar_says_it_is_empty_not_missing(tmp_path, capsys):
    from napari_unifuse.model.checkpoint import checkpoint_dir

    weights = tmp_path / "copied.safetensors"
    weights.write_bytes((checkpoint_dir() / "unifuse-2d-harvard.safetensors").read_bytes())
    weights.with_suffix(".json").write_text("{}", encoding="utf-8")
    assert main(["info", "--checkpoint", str(weights)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"sidecar: empty ({weights.with_suffix('.json')}):" in text
    assert "missing" not in text



@pytest.mark.parametrize(("field", "value", "said"), [
    ("validation", [0.5, 0.6], "'validation' is a list, not an object of named fields"),
    ("validation", "good", "'validation' is a string, not an object of named fields"),
    ("limitations", ["CPU-sized", "2-D only"], "'limitations' is a list, not text"),
])
def test_info_refuses_a_sidecar_field_of_the_wrong_kind_in_one_line(tmp_path, capsys, field, value, said):
    """They were an AttributeError traceback ('list' object has no attribute 'items' / 'expandtabs')."""
    import json

    from napari_unifuse.model.checkpoint import checkpoint_dir

    weights = tmp_path / "edited.safetensors"
    weights.write_bytes((checkpoint_dir() / "unifuse-2d-harvard.safetensors").read_bytes())
    sidecar = json.loads((checkpoint_dir() / "unifuse-2d-harvard.json").read_text(encoding="utf-8"))
    weights.with_suffix(".json").write_text(json.dumps({**sidecar, field: value}), encoding="utf-8")
    assert main(["info", "--checkpoint", str(weights)]) == 2
    error = capsys.readouterr().err
    assert said in error and error.count("\n") == 1

def test_info_refuses_a_checkpoint_with_the_network_size_options(capsys):
    assert main(["info", "--checkpoint", "unifuse-2d-harvard", "--dims", "2"]) == 2
    assert "give one or the other" in capsys.readouterr().err


def test_info_of_a_bundled_name_describes_the_bundled_checkpoint_beside_a_folder_of_that_name(
        tmp_path, capsys, monkeypatch):
    """A folder named unifuse-2d-harvard (an earlier `fuse --out`) in the working directory was refused
    as "a folder, not a checkpoint file"."""
    (tmp_path / "unifuse-2d-harvard").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["info", "--checkpoint", "unifuse-2d-harvard"]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("checkpoint: ") and lines[0].endswith("checkpoints/unifuse-2d-harvard.safetensors")


def test_info_of_weights_of_an_unknown_network_names_the_file(tmp_path, capsys):
    path = tmp_path / "newer.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"method": "foo", "unifuse_config": "{}"})
    assert main(["info", "--checkpoint", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"unifuse info: error: {path}: holds weights of an unknown network "
                                               "'foo' (saved by a newer napari-unifuse?); known: unifuse, bsafusion, "
                                               "mmif-amin")


@pytest.mark.parametrize(("name", "configs"), [
    ("unifuse-2d-harvard", ["harvard2d-cpu.yaml", "harvard2d-cpu-head.yaml", "harvard2d-cpu-restoration.yaml"]),
    ("unifuse-3d-phantom", ["phantom3d-cpu.yaml", "phantom3d-cpu-head.yaml", "phantom3d-cpu-restoration.yaml"]),
])
def test_info_lists_every_training_run_of_a_shipped_checkpoint_first_to_last(name, configs, capsys):
    """It printed the head refit as "started from: <the checkpoint itself>" and left out the network's own run."""
    assert main(["info", "--checkpoint", name]) == 0
    text = " ".join(capsys.readouterr().out.split())
    runs = text[text.index("training (first to last):"):text.index("validation:")]
    assert runs.count("first: ") == 1 and runs.count("then: ") == 2
    positions = [runs.index(f"--config configs/{config} ") for config in configs]
    assert positions == sorted(positions) and runs.index("first: ") < positions[0]
    assert "started from" not in runs
