"""MMIF-AMIN's network: shapes, the invertible dense blocks' exact inverse, 2D only."""

from __future__ import annotations

import pytest
import torch

from napari_unifuse.errors import InputError
from napari_unifuse.model.mmif_amin import MMIFAMIN, InvertibleDenseBlock, MMIFAMINConfig


@pytest.fixture(scope="module")
def network() -> MMIFAMIN:
    torch.manual_seed(0)
    return MMIFAMIN(MMIFAMINConfig.small()).eval()


@torch.no_grad()
def test_fuses_a_2d_pair_into_one_image_in_the_unit_range(network):
    moving, reference = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    fused = network(moving, reference)
    assert fused.shape == (2, 1, 32, 48)
    assert 0.0 <= float(fused.min()) and float(fused.max()) <= 1.0
    # Both sources reach the output: changing either changes the fused image.
    assert not torch.allclose(network(torch.rand_like(moving), reference), fused)
    assert not torch.allclose(network(moving, torch.rand_like(reference)), fused)


def test_invertible_dense_blocks_invert_to_1e_5(network):
    torch.manual_seed(1)
    features = torch.randn(2, network.config.feature_channels, 24, 24)
    block = InvertibleDenseBlock(network.config)
    torch.testing.assert_close(block.inverse(block(features)), features, rtol=0, atol=1e-5)
    idn = network.moving_idn  # all the blocks of one modality's network, in turn
    transformed = idn.transform(features)
    assert (transformed - features).abs().max() > 0.1  # the blocks do transform
    torch.testing.assert_close(idn.inverse(transformed), features, rtol=0, atol=1e-5)


def test_scaling_factor_stays_within_the_clamp(network):
    block = network.moving_idn.blocks[0]
    scale, _ = block._scale_shift(100 * torch.randn(1, network.config.feature_channels // 2, 8, 8))
    clamp = torch.tensor(network.config.clamp)
    assert float(scale.min()) >= float(torch.exp(-clamp)) and float(scale.max()) <= float(torch.exp(clamp))


def test_3d_configs_and_inputs_are_refused(network):
    with pytest.raises(InputError, match="2D network"):
        MMIFAMINConfig(spatial_dims=3)
    with pytest.raises(InputError, match="2D images"):
        network(torch.rand(1, 1, 8, 16, 16), torch.rand(1, 1, 8, 16, 16))
    with pytest.raises(InputError, match="multiples of 8"):
        network(torch.rand(1, 1, 30, 32), torch.rand(1, 1, 30, 32))


def test_config_round_trips_through_a_dict():
    config = MMIFAMINConfig.paper()
    assert MMIFAMINConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="unknown"):
        MMIFAMINConfig.from_dict({**config.to_dict(), "typo": 1})
