"""load_checkpoint / read_metadata refuse what the engine would run silently wrong: NaN or inf weights,
and a sidecar that is not an object, belongs to other weights or records a crop the network cannot have had."""

import json
import shutil

import pytest
import torch

from napari_unifuse.errors import CheckpointError
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_weights,
    read_config,
    read_metadata,
    save_checkpoint,
    training_crop,
)

TRAINING = {"training_config": {"train": {"stage": "full"}, "data": {"crop": 32}}}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(UniFuse(UniFuseConfig.small(2)).eval(), tmp_path / "net", TRAINING)


def _rewrite_sidecar(path, change):
    sidecar = path.with_suffix(".json")
    metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    change(metadata)
    sidecar.write_text(json.dumps(metadata), encoding="utf-8")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(tmp_path, bad_value):
    """They loaded, and `unifuse fuse` wrote black images and said done."""
    model = UniFuse(UniFuseConfig.small(2))
    with torch.no_grad():
        model.fa.output[2].weight[0, :3] = bad_value
    path = save_checkpoint(model, tmp_path / "diverged")
    expected = r"diverged\.safetensors: corrupt weights: tensor fa\.output\.2\.weight holds 3 NaN or infinite values"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=expected):
        load_weights(UniFuse(UniFuseConfig.small(2)), path)


def test_the_count_of_other_corrupt_tensors_is_given(tmp_path):
    model = UniFuse(UniFuseConfig.small(2))
    with torch.no_grad():
        for parameter in list(model.parameters())[:3]:
            parameter.fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"and 2 more tensors hold some"):
        load_checkpoint(save_checkpoint(model, tmp_path / "nan"))


@pytest.mark.parametrize("text, described", [("[1, 2]", "a list"), ('"hello"', "a string"), ("null", "null"),
                                             ("7", "a number")])
def test_a_sidecar_that_is_not_an_object_is_refused_naming_it(saved, text, described):
    """A list or string raised AttributeError; `null` was taken for a missing sidecar."""
    saved.with_suffix(".json").write_text(text, encoding="utf-8")
    expected = rf"net\.json: the JSON metadata is {described}, not an object"
    with pytest.raises(CheckpointError, match=expected):
        read_metadata(saved)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(saved)


def test_a_sidecar_that_is_not_utf8_is_refused_naming_it(saved):
    saved.with_suffix(".json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match=r"net\.json: not UTF-8 text"):
        load_checkpoint(saved)


@pytest.mark.parametrize("key, value", [
    ("training_config", [1]),
    ("training_config.data", "oops"),
    ("training_config.train", 3),
    ("initial_weights", "x"),
])
def test_a_sidecar_section_that_is_not_an_object_is_refused_naming_the_key(saved, key, value):
    def change(metadata):
        *parents, name = key.split(".")
        section = metadata
        for parent in parents:
            section = section[parent]
        section[name] = value

    _rewrite_sidecar(saved, change)
    with pytest.raises(CheckpointError, match=rf"net\.json: '{key}' is an? \w+, not an object"):
        read_metadata(saved)


@pytest.mark.parametrize("crop", ["big", 3, -128, 0, True, 64.0, [], [32, "x"], [32, 2]])
def test_a_training_crop_the_network_cannot_have_had_is_refused_naming_the_key(saved, crop):
    """Crops of 3 or -128 were blamed on --tile-size, which the user never gave; "big" raised ValueError."""
    _rewrite_sidecar(saved, lambda metadata: metadata["training_config"]["data"].update(crop=crop))
    with pytest.raises(CheckpointError, match=r"net\.json: 'training_config\.data\.crop' is .*, not a training crop "
                                              r"of this network \(a whole number of voxels, at least 4,"):
        load_checkpoint(saved)


def test_a_stage_run_recorded_crop_is_checked_too(saved):
    _rewrite_sidecar(saved, lambda metadata: metadata.update(initial_weights={"training_crop": -1}))
    with pytest.raises(CheckpointError, match=r"'initial_weights\.training_crop' is -1"):
        read_metadata(saved)


@pytest.mark.parametrize("crop, expected", [(None, None), (4, 4), ([32, 48], 48)])
def test_crops_the_network_can_have_had_load(saved, crop, expected):
    _rewrite_sidecar(saved, lambda metadata: metadata["training_config"]["data"].update(crop=crop))
    assert training_crop(load_checkpoint(saved)[1]) == expected


def test_null_training_sections_mean_not_recorded():
    assert training_crop({"training_config": {"train": None, "data": None}}) is None


def test_a_sidecar_of_other_weights_is_refused_naming_the_first_difference(saved, tmp_path):
    """The 2-D sidecar beside 3-D weights applied its crop and calibrations to them silently."""
    other = save_checkpoint(UniFuse(UniFuseConfig.small(3)), tmp_path / "other" / "net3d", TRAINING)
    shutil.copy(saved.with_suffix(".json"), other.with_suffix(".json"))
    with pytest.raises(CheckpointError, match=r"net3d\.json describes spatial_dims 2 but the weights are spatial_dims 3"
                                              r"(?: \(and \d+ more config fields differ\))?: the sidecar belongs to "
                                              r"another checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="belongs to another checkpoint"):
        read_metadata(other)


def test_a_sidecar_of_another_method_or_with_a_bad_config_is_refused(saved):
    _rewrite_sidecar(saved, lambda metadata: metadata.update(method="bsafusion"))
    with pytest.raises(CheckpointError, match=r"net\.json describes bsafusion weights but the weights are unifuse "
                                              r"ones: the sidecar belongs to another checkpoint"):
        load_checkpoint(saved)
    _rewrite_sidecar(saved, lambda metadata: metadata.update(method="unifuse", config={"no_such_field": 1}))
    with pytest.raises(CheckpointError, match=r"net\.json: invalid unifuse config under 'config'"):
        load_checkpoint(saved)


def test_a_sidecar_without_method_or_config_still_loads(saved):
    """Hand-written or older sidecars record neither; there is nothing to compare."""
    saved.with_suffix(".json").write_text('{"seed": 3}', encoding="utf-8")
    assert load_checkpoint(saved)[1] == {"seed": 3}


@pytest.mark.parametrize("name", sorted(list_checkpoints()))
def test_each_shipped_sidecar_describes_its_weights(name):
    metadata = read_metadata(name)
    assert metadata["config"] == read_config(name).to_dict()
    assert training_crop(metadata) is not None
