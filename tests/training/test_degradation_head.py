"""The degradation-head refit (train.stage: degradation_head): it fits the head to read-outs it is
given, does not depend on the head it starts from, and through the trainer changes nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_unifuse.errors import CheckpointError, InputError, UniFuseError
from napari_unifuse.model import UniFuse
from napari_unifuse.model.checkpoint import load_checkpoint
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.dapl import PATCH_STATISTICS
from napari_unifuse.training.config import config_from_dict, load_config
from napari_unifuse.training.datasets import build_datasets
from napari_unifuse.training.degradation_head import collect_readouts, degradation_head, fit_degradation_head
from napari_unifuse.training.trainer import train

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _head(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return degradation_head(UniFuse(UniFuseConfig.small(spatial_dims=3)))


def _separable_readouts(samples: int = 200, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Read-outs whose class shows in a few features, on a large shared offset (as pooled read-outs
    have, which is what the standardisation is for)."""
    generator = torch.Generator().manual_seed(0)
    width = degradation_head(UniFuse(UniFuseConfig.small(spatial_dims=3)))[0].running_mean.numel()
    labels = torch.arange(samples) % 4
    readouts = 50.0 + 0.3 * torch.randn(samples, rows, width, generator=generator)
    readouts[torch.arange(samples), :, labels] += 2.0
    return readouts, labels


def _fit(head: torch.nn.Sequential, readouts: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, float]]:
    losses: list[tuple[int, float]] = []
    fit_degradation_head(head, readouts, labels, steps=300, batch_size=16, learning_rate=lambda step: 3e-3,
                         weight_decay=0.01, seed=0, log=lambda step, loss: losses.append((step, loss)))
    return losses


def test_the_refit_head_names_every_row_of_separable_readouts():
    readouts, labels = _separable_readouts()
    head = _head(0)
    losses = _fit(head, readouts, labels)
    with torch.no_grad():
        predicted = head(readouts).argmax(dim=-1)  # (N, rows): the crop's row and its slabs'
    assert (predicted == labels[:, None]).float().mean() == 1.0
    assert [step for step, _ in losses] == [100, 200, 300] and losses[-1][1] < 0.1 * losses[0][1]
    # The standardisation holds the read-outs' exact statistics, not a running estimate.
    torch.testing.assert_close(head[0].running_mean, readouts.reshape(-1, readouts.shape[-1]).mean(dim=0))


def test_the_refit_does_not_depend_on_the_head_it_starts_from():
    readouts, labels = _separable_readouts(64)
    first, second = _head(1), _head(2)
    assert not torch.equal(first[1].weight, second[1].weight)
    _fit(first, readouts, labels)
    _fit(second, readouts, labels)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_collect_readouts_gives_the_crop_row_and_one_row_per_slab():
    config = UniFuseConfig.small(spatial_dims=3)
    torch.manual_seed(0)
    network = UniFuse(config)
    data = {"kind": "phantom", "shape": [32, 32, 32], "crop": 16, "tasks": ["t1-t2", "ct-pet"],
            "none_fraction": 0.5, "train_length": 3, "val_length": 1}
    dataset, _ = build_datasets(data, seed=0, spatial_dims=3)
    seen: list[tuple[int, int]] = []
    readouts, labels = collect_readouts(network, dataset, torch.device("cpu"), batch_size=2,
                                        progress=lambda done, total: seen.append((done, total)))
    slabs = -(-16 // config.slab_size)
    assert readouts.shape == (3, 1 + slabs, degradation_head(network)[0].running_mean.numel())
    assert labels.tolist() == [int(dataset[i]["class_index"]) for i in range(3)]
    assert seen == [(2, 3), (3, 3)] and not network.training


def _smoke_checkpoint(tmp_path: Path) -> Path:
    config = load_config(SMOKE).with_overrides(data={"crop": 16}, train={"max_steps": 1, "val_every": 100})
    return train(config, tmp_path / "backbone", device="cpu", progress=False).last_checkpoint


def test_the_head_stage_changes_the_head_and_nothing_else(tmp_path):
    backbone = _smoke_checkpoint(tmp_path)
    head_config = load_config(SMOKE).with_overrides(
        data={"crop": 16, "train_length": 6},
        train={"stage": "degradation_head", "init_from": str(backbone), "max_steps": 50, "batch_size": 4})
    result = train(head_config, tmp_path / "head", device="cpu", progress=False)
    before, after = load_file(backbone), load_file(result.last_checkpoint)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("dapl.classifier.") for name in changed)
    assert "class_accuracy" in result.validation
    with pytest.raises(UniFuseError, match="not resumable"):
        train(head_config, tmp_path / "head", device="cpu", resume=True, progress=False)


@pytest.mark.parametrize("stage", ["degradation_head", "image_restoration", "fusion_weight"])
def test_a_partial_stage_needs_a_trained_unifuse(stage):
    with pytest.raises(InputError, match="init_from"):
        config_from_dict({"data": {"kind": "phantom"}, "train": {"stage": stage}})
    with pytest.raises(InputError, match="stage must be one of"):
        config_from_dict({"data": {"kind": "phantom"}, "train": {"stage": "classifier"}})


def test_the_image_restoration_stage_needs_the_path_in_the_model():
    with pytest.raises(InputError, match="image_restoration_width"):
        config_from_dict({"data": {"kind": "phantom"},
                          "train": {"stage": "image_restoration", "init_from": "unifuse-2d-harvard"}})


@pytest.mark.parametrize("statistics_only", [False, True])
def test_the_head_stage_can_give_the_head_patch_statistics_the_backbone_was_trained_without(tmp_path, statistics_only):
    """configs/phantom3d-cpu-head.yaml: the shipped 3-D network, refitted with another head input:
    the patch statistics beside the read-outs, or alone."""
    backbone = _smoke_checkpoint(tmp_path)
    head_config = load_config(SMOKE).with_overrides(
        model={"overrides": {"readout_patch_statistics": True, "classifier_statistics_only": statistics_only}},
        data={"crop": 16, "train_length": 6},
        train={"stage": "degradation_head", "init_from": str(backbone), "max_steps": 20, "batch_size": 4})
    result = train(head_config, tmp_path / "head", device="cpu", progress=False)
    before, after = load_file(backbone), load_file(result.last_checkpoint)
    widths = [weights["dapl.classifier.1.weight"].shape[1] for weights in (before, after)]
    # Mean and spread of each statistic, beside or instead of the read-outs'.
    assert widths[1] == (0 if statistics_only else widths[0]) + 2 * PATCH_STATISTICS
    assert all(torch.equal(before[name], after[name]) for name in before if not name.startswith("dapl.classifier."))
    network, _ = load_checkpoint(result.last_checkpoint)
    assert network.config.readout_patch_statistics
    assert network.config.classifier_statistics_only == statistics_only
    # A full training run still refuses weights saved for another head input.
    full = head_config.with_overrides(train={"stage": "full", "max_steps": 1})
    with pytest.raises(CheckpointError, match="readout_patch_statistics"):
        train(full, tmp_path / "full", device="cpu", progress=False)
