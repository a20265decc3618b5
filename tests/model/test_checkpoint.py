"""save_checkpoint / load_checkpoint: safetensors round trip and clear failures."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from napari_unifuse.errors import CheckpointError
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model import checkpoint as checkpoint_module
from napari_unifuse.model.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_weights,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
    set_metadata_section,
    training_crop,
)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.small(2)).eval()
    path = save_checkpoint(model, tmp_path / "net", {"seed": 7, "command": "unifuse train"})
    return model, path


def test_a_calibration_section_is_set_without_touching_the_rest(saved):
    _, path = saved
    weights = path.read_bytes()
    sidecar = set_metadata_section(path, "degradation_evidence", {"calibration": "bench/x.py"})
    set_metadata_section(path, "alignment_guard", {"min_credible_motion_voxels": 2})
    metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    assert sidecar == path.with_suffix(".json")
    assert metadata["seed"] == 7 and metadata["command"] == "unifuse train"
    assert metadata["degradation_evidence"] == {"calibration": "bench/x.py"}
    assert metadata["alignment_guard"] == {"min_credible_motion_voxels": 2}
    assert path.read_bytes() == weights


def test_round_trip_gives_identical_outputs_and_metadata(saved):
    model, path = saved
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    loaded, metadata = load_checkpoint(path)
    moving, reference = torch.rand(2, 1, 1, 32, 32)
    with torch.no_grad():
        expected, actual = model(moving, reference), loaded(moving, reference)
    for name in ("fused", "restored", "displacement", "class_probs"):
        assert torch.equal(getattr(expected, name), getattr(actual, name)), name
    assert metadata["seed"] == 7 and metadata["command"] == "unifuse train"
    assert UniFuseConfig.from_dict(metadata["config"]) == model.config
    assert not loaded.training


def test_loading_into_another_config_names_the_mismatching_fields(saved):
    _, path = saved
    other = UniFuse(UniFuseConfig.small(3))
    with pytest.raises(CheckpointError, match=r"spatial_dims: model has 3, checkpoint has 2") as refused:
        load_weights(other, path)
    assert "to train from it, give the training config model.spatial_dims: 2" in str(refused.value)
    wider = UniFuse(UniFuseConfig.from_dict({**UniFuseConfig.small(2).to_dict(), "lora_rank": 3}))
    with pytest.raises(CheckpointError, match=r"give the training config model.overrides: \{lora_rank: \d+\}$"):
        load_weights(wider, path)
    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(path, expected_config=UniFuseConfig.small(3))


def test_a_head_refit_loads_everything_but_the_head_from_a_checkpoint_with_another_head_input(saved):
    import dataclasses

    from napari_unifuse.training.degradation_head import HEAD_INPUT_FIELDS, HEAD_MODULE

    model, path = saved
    wider = UniFuse(dataclasses.replace(model.config, readout_patch_statistics=True))
    own_head = {name: tensor.clone() for name, tensor in wider.state_dict().items() if name.startswith(HEAD_MODULE)}
    with pytest.raises(CheckpointError, match="readout_patch_statistics: model has True, checkpoint has False"):
        load_weights(wider, path)
    load_weights(wider, path, except_module=HEAD_MODULE, fields_of_that_module=HEAD_INPUT_FIELDS)
    saved_weights = model.state_dict()
    for name, tensor in wider.state_dict().items():
        expected = own_head[name] if name.startswith(HEAD_MODULE) else saved_weights[name]
        assert torch.equal(tensor, expected), name
    # Only the named fields may differ, and only the named module is kept.
    with pytest.raises(CheckpointError, match="spatial_dims"):
        load_weights(UniFuse(UniFuseConfig.small(3)), path, except_module=HEAD_MODULE,
                     fields_of_that_module=HEAD_INPUT_FIELDS)
    with pytest.raises(CheckpointError, match="no module"):
        load_weights(UniFuse(model.config), path, except_module="dapl.no_such_head")


def test_weights_that_do_not_fit_their_config_name_the_tensor_and_shapes(saved, tmp_path):
    model, path = saved
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    tensors["fa.output.2.weight"] = torch.zeros(2, 3, 1, 1)
    header = {"unifuse_config": json.dumps(model.config.to_dict())}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=header)
    expected = r"fa\.output\.2\.weight \(2, 3, 1, 1\) \(model: \(2, 8, 1, 1\)\)"
    with pytest.raises(CheckpointError, match=expected) as refused:
        load_checkpoint(tmp_path / "bad.safetensors")
    # An earlier version's checkpoint is refused so: the message says what happened and what to do.
    assert "saved by an earlier version of napari-unifuse" in str(refused.value)
    assert "train it again with this one" in str(refused.value)


def test_corrupt_file_gives_a_checkpoint_error(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(path)


def test_safetensors_without_a_config_is_rejected(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="without a UniFuse config"):
        load_checkpoint(path)


def test_bare_names_resolve_to_the_packaged_checkpoints(saved, tmp_path, monkeypatch):
    model, _ = saved
    packaged = tmp_path / "packaged"
    monkeypatch.setattr(checkpoint_module, "checkpoint_dir", lambda: packaged)
    save_checkpoint(model, packaged / "harvard-small-2d", {})
    assert list_checkpoints() == ["harvard-small-2d"]
    loaded, _ = load_checkpoint("harvard-small-2d")
    assert loaded.config == model.config
    with pytest.raises(CheckpointError, match="not found.*packaged: harvard-small-2d"):
        load_checkpoint("no-such-net")


def test_a_folder_named_like_a_packaged_checkpoint_does_not_shadow_it(saved, tmp_path, monkeypatch):
    """An earlier `unifuse fuse --out unifuse-2d-harvard` in the working directory made every default
    run fail with "unifuse-2d-harvard is a folder, not a checkpoint file"."""
    model, _ = saved
    packaged = tmp_path / "packaged"
    monkeypatch.setattr(checkpoint_module, "checkpoint_dir", lambda: packaged)
    bundled = save_checkpoint(model, packaged / "harvard-small-2d", {})
    working = tmp_path / "working"
    (working / "harvard-small-2d").mkdir(parents=True)
    (working / "harvard-small-2d.safetensors").mkdir()
    monkeypatch.chdir(working)
    for name in ("harvard-small-2d", "harvard-small-2d.safetensors"):
        assert resolve_checkpoint(name) == bundled
    assert read_config("harvard-small-2d") == model.config
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        resolve_checkpoint("./harvard-small-2d")  # a path, not a bare name: the folder is what was meant


def test_a_file_named_like_a_packaged_checkpoint_is_used_before_it(saved, tmp_path, monkeypatch):
    model, path = saved
    packaged = tmp_path / "packaged"
    monkeypatch.setattr(checkpoint_module, "checkpoint_dir", lambda: packaged)
    save_checkpoint(model, packaged / "harvard-small-2d", {})
    monkeypatch.chdir(path.parent)
    local = save_checkpoint(model, path.parent / "harvard-small-2d", {})
    assert resolve_checkpoint("harvard-small-2d.safetensors") == local.relative_to(path.parent)


def test_weights_of_an_unknown_network_name_the_file(tmp_path):
    path = tmp_path / "newer.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"method": "foo", "unifuse_config": "{}"})
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: holds weights of an unknown network 'foo' .*; known: "
                                              r"unifuse, "):
        read_config(path)


def test_packaged_checkpoint_folder_is_the_top_level_resources_folder():
    folder = checkpoint_module.checkpoint_dir()
    assert folder.parts[-2:] == ("resources", "checkpoints") and folder.is_dir()


def test_read_config_gives_the_saved_config_without_the_weights(saved, monkeypatch):
    model, path = saved
    monkeypatch.setattr("safetensors.safe_open.get_tensor", lambda *args: pytest.fail("weights were read"),
                        raising=False)
    assert read_config(path) == model.config


@pytest.mark.parametrize("name, spatial_dims", [("unifuse-2d-harvard", 2), ("unifuse-3d-phantom", 3)])
def test_shipped_checkpoints_load_by_name_and_record_how_they_were_trained(name, spatial_dims):
    assert name in list_checkpoints()
    model, metadata = load_checkpoint(name)
    assert model.config.spatial_dims == spatial_dims
    for key in ("command", "config_file", "seed", "wall_time_s", "device", "steps", "validation"):
        assert key in metadata, key
    shape = (1, 1, *[2 * model.config.size_multiple] * spatial_dims)
    with torch.no_grad():
        output = model.eval()(torch.rand(shape), torch.rand(shape))
    assert output.fused.shape == shape and torch.isfinite(output.displacement).all()


@pytest.mark.parametrize("name", sorted(list_checkpoints()))
def test_the_config_file_of_each_shipped_checkpoint_still_builds_its_network(name):
    # The 2-D checkpoint predates the presets' statistics pooling; its config file must say so,
    # or `unifuse train --config` would no longer reproduce it.
    from pathlib import Path

    from napari_unifuse.model.networks import build_network
    from napari_unifuse.training.config import load_config

    metadata = checkpoint_module.read_metadata(name)
    config = load_config(Path(__file__).resolve().parents[2] / metadata["config_file"])
    network = build_network(config.model.method, config.model.preset, config.model.spatial_dims,
                            config.model.overrides)
    load_weights(network, name)  # a config that differs from the checkpoint's is refused


def test_training_crop_comes_from_the_sidecar_training_config():
    assert training_crop({"training_config": {"data": {"crop": 128}}}) == 128
    assert training_crop({"training_config": {"data": {"crop": [32, 48, 32]}}}) == 48
    assert training_crop({"training_config": {"data": {"crop": None}}}) is None
    assert training_crop({}) is None


def test_a_stage_run_reports_the_crop_of_the_network_it_trained_a_module_of():
    """train.stage fusion_weight fits its head on whole images; the network it leaves as it was
    still reads 128-pixel tiles (in whole passes it named clean validation SPECT low-dose)."""
    stage_run = {"training_config": {"train": {"stage": "fusion_weight"}, "data": {"crop": None}},
                 "initial_weights": {"training_crop": 128}}
    assert training_crop(stage_run) == 128
    full_run = {"training_config": {"train": {"stage": "full"}, "data": {"crop": None}},
                "initial_weights": {"training_crop": 128}}
    assert training_crop(full_run) is None


def _refuse_nan(constant: str):
    raise ValueError(f"not JSON: {constant}")


def test_undefined_scores_are_null_in_the_sidecar_which_is_standard_json(saved, tmp_path):
    """`class_accuracy_clean` is NaN when no clean crop was drawn; Python wrote a bare NaN."""
    model, _ = saved
    path = save_checkpoint(model, tmp_path / "nan", {"validation": {"class_accuracy_clean": float("nan"),
                                                                    "q_ssim": 0.5, "epe": float("inf")}})
    metadata = json.loads(path.with_suffix(".json").read_text(), parse_constant=_refuse_nan)
    assert metadata["validation"] == {"class_accuracy_clean": None, "q_ssim": 0.5, "epe": None}
    sidecar = set_metadata_section(path, "calibration", {"ratio": float("nan")})
    assert json.loads(sidecar.read_text(), parse_constant=_refuse_nan)["calibration"] == {"ratio": None}


def test_a_sidecar_given_as_the_checkpoint_names_the_weights_beside_it(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"JSON sidecar .* pass the weights beside it, .*net\.safetensors"):
        load_checkpoint(path.with_suffix(".json"))


def test_a_runs_resume_state_given_as_the_checkpoint_names_the_weights_beside_it(saved):
    """It said "not a readable safetensors checkpoint (... header too large)"."""
    _, path = saved
    state = path.with_name("net.state.pt")
    torch.save({"step": 3}, state)
    with pytest.raises(CheckpointError, match=r"resume state .*`unifuse train --resume`.* pass the weights beside it, "
                                              r".*net\.safetensors"):
        load_checkpoint(state)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"resume state .* its weights, net\.safetensors, are not beside it"):
        load_checkpoint(state)


def test_a_run_folder_given_as_the_checkpoint_names_its_weights(saved, tmp_path):
    """It said "not found (neither a file nor a packaged checkpoint)" of a folder that exists."""
    model, _ = saved
    run = tmp_path / "my-run"
    best = save_checkpoint(model, run / "checkpoints" / "best")
    with pytest.raises(CheckpointError, match=rf"is a folder, not a checkpoint file; pass one of its weights files: "
                                              rf".*{best.name}"):
        load_checkpoint(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file$"):
        load_checkpoint(empty)
