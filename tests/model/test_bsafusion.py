"""BSAFusion (model.bsafusion, model.bsafusion_fields): shapes, refusals and the field composition."""

from __future__ import annotations

import math

import pytest
import torch

from napari_unifuse.errors import InputError
from napari_unifuse.model.bsafusion import BSAFusion, BSAFusionConfig
from napari_unifuse.model.bsafusion_fields import (
    bidirectional_field,
    compose_steps,
    invert_field,
    to_full_resolution,
    to_level,
)
from napari_unifuse.model.warp import compose, warp


def smooth_image(size: int = 32) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.exp(-((x - 0.1) ** 2 + (y + 0.2) ** 2) / 0.3)[None, None]


def smooth_field(size: int = 32, amplitude: float = 2.0, phase: float = 0.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, math.pi, size), torch.linspace(0, math.pi, size), indexing="ij")
    return amplitude * torch.stack([torch.sin(x + phase), torch.cos(y - phase)])[None]


@pytest.mark.parametrize("preset", [BSAFusionConfig.small, BSAFusionConfig.paper])
def test_shapes_in_2d(preset):
    torch.manual_seed(0)
    net = BSAFusion(preset())
    moving, reference = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    out = net(moving, reference)
    assert out.fused.shape == out.aligned.shape == (2, 1, 32, 48)
    assert out.displacement.shape == out.forward_field.shape == out.reverse_field.shape == (2, 2, 32, 48)
    # Five steps each way, from the token grid (1/16) to full resolution.
    assert [tuple(s.shape[2:]) for s in out.forward_steps] == [(2, 3), (4, 6), (8, 12), (16, 24), (32, 48)]
    assert [s.shape for s in out.reverse_steps] == [s.shape for s in out.forward_steps]
    assert all(logits.shape == (2, 2) for logits in (*out.modality_logits, *out.transfer_logits))
    assert 0.0 <= out.fused.min().item() and out.fused.max().item() <= 1.0


def test_refuses_3d_and_bad_sizes():
    with pytest.raises(InputError, match="2-D"):
        BSAFusionConfig.small(spatial_dims=3)
    net = BSAFusion(BSAFusionConfig.small())
    with pytest.raises(InputError, match="2-D"):
        net(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(InputError, match="divisible by 16"):
        net(torch.rand(1, 1, 24, 32), torch.rand(1, 1, 24, 32))
    with pytest.raises(InputError, match="level_channels"):
        BSAFusionConfig(level_channels=(8, 8))


def test_config_round_trip():
    config = BSAFusionConfig.small()
    assert BSAFusionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="unknown"):
        BSAFusionConfig.from_dict({"bogus": 1})


def test_known_shifts_compose_to_their_sum():
    # Level shifts (voxels of their level) at 1/16 ... 1/1 of a 32² image.
    shifts = [(0.5, -0.25), (1.0, 0.5), (-0.5, 1.0), (0.25, 0.25), (1.0, -1.0)]
    steps = []
    for level, (dy, dx) in enumerate(shifts):
        factor = 2 ** (4 - level)
        level_field = torch.tensor([dy, dx]).view(1, 2, 1, 1).expand(1, 2, 32 // factor, 32 // factor)
        steps.append(to_full_resolution(level_field, factor))
    total = compose_steps(steps)
    expected = sum(2 ** (4 - level) * torch.tensor(shift) for level, shift in enumerate(shifts))
    assert torch.allclose(total, expected.view(1, 2, 1, 1).expand_as(total), atol=1e-5)
    assert torch.allclose(to_level(total, 16), expected.view(1, 2, 1, 1) / 16, atol=1e-5)


def test_bidirectional_shift_is_forward_minus_reverse():
    forward = torch.tensor([3.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 32, 32)
    reverse = torch.tensor([-1.5, 4.0]).view(1, 2, 1, 1).expand(1, 2, 32, 32)
    field = bidirectional_field(forward, reverse, iterations=5)
    assert torch.allclose(field, (forward - reverse), atol=1e-5)


def test_composed_steps_equal_warping_step_by_step():
    image = smooth_image()
    first, second = smooth_field(amplitude=1.5), smooth_field(amplitude=1.0, phase=0.7)
    sequential = warp(warp(image, first, padding_mode="border"), second, padding_mode="border")
    composed = warp(image, compose_steps([first, second]), padding_mode="border")
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert (sequential - composed)[interior].abs().max() < 0.02
    # The paper's sum is only first-order for such fields: the composition is closer.
    summed = warp(image, first + second, padding_mode="border")
    assert (sequential - composed)[interior].abs().mean() < 0.5 * (sequential - summed)[interior].abs().mean()


def test_inverse_field_undoes_the_field():
    field = smooth_field(amplitude=2.0)
    inverse = invert_field(field, iterations=8)
    residual = compose(field, inverse)[:, :, 4:-4, 4:-4]  # x -> x + v -> back by the field
    first_order = compose(field, invert_field(field, iterations=0))[:, :, 4:-4, 4:-4]
    assert residual.abs().max() < 0.05
    assert residual.abs().max() < 0.2 * first_order.abs().max()


def test_network_field_is_the_composition_of_its_steps():
    """Constant step fields (set through the flow heads' biases) must give exactly the known total
    shift: Σ 2^(K-i)·φ^i_A − Σ 2^(K-i)·φ^i_B, and the aligned image must be the moving image moved by it."""
    torch.manual_seed(0)
    net = BSAFusion(BSAFusionConfig.small())
    forward_shift, reverse_shift = torch.zeros(2), torch.zeros(2)
    with torch.no_grad():
        for level, (frl, rrl) in enumerate(zip(net.forward_layers, net.reverse_layers)):
            factor = 2 ** (4 - level)
            frl.flow.weight.zero_()
            rrl.flow.weight.zero_()
            frl.flow.bias.copy_(torch.tensor([0.3, -0.2]) * (level + 1) / 5)
            rrl.flow.bias.copy_(torch.tensor([-0.1, 0.25]))
            forward_shift += factor * torch.tanh(frl.flow.bias)
            reverse_shift += factor * torch.tanh(rrl.flow.bias)
    moving = smooth_image()
    out = net(moving, torch.rand(1, 1, 32, 32))
    expected = (forward_shift - reverse_shift).view(1, 2, 1, 1)
    assert torch.allclose(out.forward_field, forward_shift.view(1, 2, 1, 1).expand_as(out.forward_field), atol=1e-4)
    assert torch.allclose(out.displacement, expected.expand_as(out.displacement), atol=1e-4)
    assert torch.allclose(out.aligned, warp(moving, expected.expand(1, 2, 32, 32)), atol=1e-5)


def test_discriminator_weights_are_frozen_but_pass_the_gradient_to_the_tokens():
    torch.manual_seed(0)
    net = BSAFusion(BSAFusionConfig.small())
    tokens = torch.randn(2, 4, net.config.token_dim, requires_grad=True)
    logits = net.encoder.role_of_tokens(tokens)
    # The same weights the encoder's MFRH path uses.
    _, head = net.encoder.transformer(tokens)
    assert torch.allclose(logits, net.encoder.role(head), atol=1e-6)
    logits.sum().backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert tokens.grad is not None and tokens.grad.abs().max() > 0


def test_bundled_checkpoint_is_a_small_bsafusion_with_stated_limits():
    from napari_unifuse.model.checkpoint import load_checkpoint

    net, metadata = load_checkpoint("bsafusion-2d-harvard", method="bsafusion")
    assert isinstance(net, BSAFusion) and net.config == BSAFusionConfig.small()
    assert metadata["training_config"]["model"]["method"] == "bsafusion"
    assert "NOT learned" in metadata["limitations"]
    with torch.no_grad():
        out = net(smooth_image(64), smooth_image(64).flip(-1))
    assert out.fused.shape == (1, 1, 64, 64) and torch.isfinite(out.displacement).all()
