"""DAPL's token orders (§3.2), the Mamba block's hidden state, the classifier's standardisation."""

import copy

import pytest
import torch

from napari_unifuse.model.dapl import token_orders
from napari_unifuse.model.layers import RunningStandardize
from napari_unifuse.model.mamba import MambaBlock


@pytest.mark.parametrize("length", [2, 7, 8, 64])
def test_token_orders_follow_the_paper(length):
    forward, backward, bidirectional = (order.tolist() for order in token_orders(length))
    # Written 1-based as in the paper, then shifted: F_bid = [f1 … f(⌊N/2⌋−1), fN … f⌊N/2⌋].
    half = length // 2
    paper_bidirectional = list(range(1, half)) + list(range(length, half - 1, -1))
    assert forward == list(range(length))
    assert backward == list(range(length - 1, -1, -1))
    assert bidirectional == [i - 1 for i in paper_bidirectional]


def test_mamba_block_resumes_exactly_from_an_injected_hidden_state():
    """With a width-1 conv (no cross-token mixing outside the SSM) running the second half of a
    sequence from the first half's last state must equal running the whole sequence."""
    torch.manual_seed(0)
    block = MambaBlock(16, d_state=4, d_conv=1)
    tokens = torch.randn(2, 10, 16)
    whole, state = block(tokens, return_last_state=True)
    assert state.shape == (2, block.inner_dim, 4)
    _, head_state = block(tokens[:, :6], return_last_state=True)
    resumed = block(tokens[:, 6:], initial_state=head_state)
    cold = block(tokens[:, 6:])
    torch.testing.assert_close(resumed, whole[:, 6:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cold, whole[:, 6:], atol=1e-3)


def test_running_standardize_tracks_the_feature_statistics_independently_of_the_batch():
    torch.manual_seed(0)
    layer = RunningStandardize(3)
    features = torch.randn(4000, 3) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([5.0, -1.0, 0.0])
    for batch in features.split(32):
        before = copy.deepcopy(layer.state_dict())
        single = layer(batch[:1])
        layer.load_state_dict(before)
        assert torch.equal(layer(batch)[:1], single)  # the rest of a batch does not matter
    layer.eval()
    standardized = layer(features)
    torch.testing.assert_close(standardized.mean(dim=0), torch.zeros(3), atol=0.15, rtol=0)
    torch.testing.assert_close(standardized.std(dim=0), torch.ones(3), atol=0.15, rtol=0)
    frozen = layer.running_mean.clone()
    layer(features + 100)
    assert torch.equal(layer.running_mean, frozen)  # evaluation never updates the statistics
