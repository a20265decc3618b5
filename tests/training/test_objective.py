"""UniFuse's training objective: where its fusion and restoration losses expect the moving image."""

from __future__ import annotations

import dataclasses

import torch

from napari_unifuse.model import UniFuseOutput
from napari_unifuse.model.warp import warp
from napari_unifuse.training.config import LossSection
from napari_unifuse.training.objective import compute_losses


def _smooth(generator, shape=(1, 1, 32, 32)):
    coarse = torch.rand(1, 1, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)


def test_the_targets_sit_where_loss_fusion_target_says():
    """A restored image that is the clean moving image moved by the true field is perfect against
    the true-field target and wrong against the network's (here zero) field."""
    generator = torch.Generator().manual_seed(0)
    moving_clean, reference = _smooth(generator), _smooth(generator)
    true_field = torch.zeros(1, 2, 32, 32)
    true_field[:, 1] = 4.0  # four pixels along x
    aligned = warp(moving_clean, true_field, padding_mode="border")
    zero = torch.zeros_like(true_field)
    output = UniFuseOutput(
        fused=0.5 * (aligned + reference), restored=aligned, displacement=zero, initial_displacement=zero,
        class_logits=torch.tensor([[0.0, 0.0, 0.0, 5.0]]), class_probs=torch.tensor([[0.0, 0.0, 0.0, 1.0]]),
        slice_class_probs=torch.zeros(1, 1, 4), prompts=torch.zeros(1, 4, 1, 1),
        moving_features=torch.zeros(1, 1, 1), reference_features=torch.zeros(1, 1, 1),
        fusion_weight=torch.full_like(reference, 0.5))
    batch = {"reference": reference, "moving_clean": moving_clean, "displacement": true_field,
             "class_index": torch.tensor([3])}
    on_truth = compute_losses(output, None, batch, dataclasses.replace(LossSection(), fusion_target="true_field"))
    on_network = compute_losses(output, None, batch, LossSection())
    assert float(on_truth["restore"]) < 1e-5
    assert float(on_network["restore"]) > 0.01
