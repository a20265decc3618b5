"""DAPL's token orders (§3.2), the Mamba block's hidden state, the classifier's standardisation and
its size-robust windowed read-out."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from napari_unifuse.errors import InputError
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.dapl import PATCH_STATISTICS, DegradationAwarePromptLearning, patch_statistics, token_orders
from napari_unifuse.model.layers import RunningStandardize, flatten_spatial
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


def _decisive_dapl(spatial_dims: int, patch_statistics: bool = False) -> DegradationAwarePromptLearning:
    """A random DAPL whose head is scaled up so that its classes differ clearly (a random head
    gives near-uniform probabilities, which every read-out would match)."""
    torch.manual_seed(0)
    config = dataclasses.replace(UniFuseConfig.small(spatial_dims), readout_patch_statistics=patch_statistics)
    dapl = DegradationAwarePromptLearning(config).eval()
    with torch.no_grad():
        dapl.classifier[-1].weight.mul_(300.0)
    return dapl


@pytest.mark.parametrize("patch_statistics", [False, True])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_windowed_readout_names_a_crop_and_the_volume_holding_it_alike(spatial_dims, patch_statistics):
    dapl = _decisive_dapl(spatial_dims, patch_statistics)
    crop = (32,) * spatial_dims
    moving, reference = torch.rand(1, 1, *crop), torch.rand(1, 1, *crop)
    # The crop in a corner of a larger, otherwise empty volume whose last side is no multiple of
    # the window (the last two windows overlap there, away from the crop).
    volume = (64,) * (spatial_dims - 1) + (80,)
    holder = (slice(None), slice(None), *(slice(0, side) for side in crop))
    moving_volume, reference_volume = torch.zeros(1, 1, *volume), torch.zeros(1, 1, *volume)
    moving_volume[holder], reference_volume[holder] = moving, reference
    with torch.no_grad():
        crop_output = dapl(moving, reference)
        alone = torch.softmax(crop_output.class_logits, dim=-1)
        dapl.readout_window = crop[0]
        windowed = dapl(moving_volume, reference_volume)
        windowed_probs = torch.softmax(windowed.class_logits, dim=-1)
    assert alone.max() > 0.5  # a decisive answer to compare with
    assert windowed_probs.argmax() == alone.argmax()
    torch.testing.assert_close(windowed_probs, alone, atol=0.05, rtol=0)
    if spatial_dims == 3:
        assert windowed.slice_class_logits.shape[1] == -(-volume[0] // dapl.config.slab_size)
        # The crop's slices are read as the crop alone reads them, not diluted by the empty rest.
        crop_slabs = crop_output.slice_class_logits.shape[1]
        torch.testing.assert_close(torch.softmax(windowed.slice_class_logits[:, :crop_slabs], dim=-1),
                                   torch.softmax(crop_output.slice_class_logits, dim=-1), atol=0.05, rtol=0)


def test_a_window_as_large_as_the_input_changes_nothing():
    dapl = _decisive_dapl(3)
    moving, reference = torch.rand(1, 1, 32, 32, 48), torch.rand(1, 1, 32, 32, 48)
    with torch.no_grad():
        plain = dapl(moving, reference)
        dapl.readout_window = 48
        windowed = dapl(moving, reference)
    for name in ("class_logits", "slice_class_logits", "prompts"):
        torch.testing.assert_close(getattr(windowed, name), getattr(plain, name), rtol=0, atol=0)


def test_statistics_pooling_sees_a_change_in_spread_that_the_mean_hides():
    """Two sets of token read-outs with the same mean and different spread (a noisier image):
    mean pooling cannot tell them apart, mean-and-standard-deviation pooling can."""
    torch.manual_seed(0)
    calm = torch.randn(2, 64, 48)
    calm = calm - calm.mean(dim=1, keepdim=True)
    noisy = 3.0 * calm
    pools = {flag: DegradationAwarePromptLearning(dataclasses.replace(UniFuseConfig.small(3), pool_readout_std=flag))._pool
             for flag in (False, True)}
    torch.testing.assert_close(pools[False](calm, dim=1), pools[False](noisy, dim=1))
    with_spread = pools[True](calm, dim=1), pools[True](noisy, dim=1)
    assert with_spread[0].shape[-1] == 2 * 48
    torch.testing.assert_close(with_spread[1][:, 48:], 3.0 * with_spread[0][:, 48:])


def test_checkpoints_saved_before_statistics_pooling_keep_mean_pooling():
    old = {key: value for key, value in UniFuseConfig.small(2).to_dict().items() if key != "pool_readout_std"}
    config = UniFuseConfig.from_dict(old)
    assert not config.pool_readout_std and UniFuseConfig.small(2).pool_readout_std
    assert DegradationAwarePromptLearning(config).classifier[1].in_features == 3 * config.embed_dim
    with pytest.raises(InputError, match="pool_readout_std"):
        dataclasses.replace(UniFuseConfig.small(2), pool_readout_std="yes")


def test_patch_statistics_match_a_scipy_transcription_and_rise_with_noise_in_the_moving_image_only():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    grid = np.mgrid[:32, :32, :32].astype(np.float32)
    smooth = 0.2 + 0.6 * np.exp(-((grid - 16) ** 2).sum(0) / 200.0)  # a soft blob: little detail
    noisy = np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1).astype(np.float32)
    as_tensor = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    clean_stats = patch_statistics(as_tensor(smooth), as_tensor(smooth), 4)[0].numpy()
    noisy_stats = patch_statistics(as_tensor(noisy), as_tensor(smooth), 4)[0].numpy()
    assert clean_stats.shape == noisy_stats.shape == (PATCH_STATISTICS, 8, 8, 8)

    # Independent transcription: scipy's Gaussian (edges replicated, 3 sigma), per-patch means.
    detail = noisy - ndimage.gaussian_filter(noisy.astype(np.float64), 1.0, mode="nearest", truncate=3.0)
    patches = lambda a: a.reshape(8, 4, 8, 4, 8, 4).mean(axis=(1, 3, 5))  # noqa: E731
    np.testing.assert_allclose(noisy_stats[0], 0.5 * np.log(patches(detail ** 2) + 1e-8), atol=1e-3)
    np.testing.assert_allclose(noisy_stats[1], np.log(patches(np.abs(detail)) + 1e-4), atol=1e-3)
    np.testing.assert_allclose(noisy_stats[3], patches(noisy), atol=1e-5)
    blurred = {sigma: ndimage.gaussian_filter(noisy.astype(np.float64), sigma, mode="nearest", truncate=3.0)
               for sigma in (0.5, 1.5)}
    log_rms = lambda band: 0.5 * np.log(patches(band ** 2) + 1e-8)  # noqa: E731
    np.testing.assert_allclose(noisy_stats[4], log_rms(noisy - blurred[0.5]) - log_rms(blurred[0.5] - blurred[1.5]),
                               atol=1e-3)

    # Noise raises the moving image's detail several times over; the reference's is unchanged.
    assert (noisy_stats[:2] > clean_stats[:2] + 1).all()
    np.testing.assert_array_equal(noisy_stats[2], clean_stats[2])


def test_spectral_slope_sees_low_dose_noise_that_the_scanner_blur_hides_from_the_detail():
    """Low dose = Poisson thinning + the scanner's blur: on a textured, already blurred uptake map
    the blur takes about as much detail as the noise adds, but the noise's flat spectrum shows."""
    from scipy import ndimage

    from napari_unifuse.data.degrade import make_degradation

    rng = np.random.default_rng(0)
    uptake = ndimage.gaussian_filter(rng.random((32, 32, 32)), 1.2)
    uptake = ((uptake - uptake.min()) / np.ptp(uptake)).astype(np.float32)
    low_dose = make_degradation("lowdose", 0.5)(uptake, rng).astype(np.float32)
    as_tensor = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    clean, noisy = (patch_statistics(as_tensor(image), as_tensor(uptake), 4)[0].mean(dim=(1, 2, 3))
                    for image in (uptake, low_dose))
    assert float(noisy[0]) < float(clean[0])  # the detail's log RMS even falls (by 0.09 here)
    assert float(noisy[4] - clean[4]) > 0.15  # the slope rises (by 0.23 here)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patch_statistics_widen_the_classifier_input_and_nothing_else(spatial_dims):
    plain = _decisive_dapl(spatial_dims)
    with_statistics = _decisive_dapl(spatial_dims, patch_statistics=True)
    embed = plain.config.embed_dim
    assert plain.classifier[1].in_features == 2 * 3 * embed
    assert with_statistics.classifier[1].in_features == 2 * (3 * embed + PATCH_STATISTICS)
    shape = (1, 1) + (32,) * spatial_dims
    moving, reference = torch.rand(shape), torch.rand(shape)
    with torch.no_grad():
        outputs = plain(moving, reference), with_statistics(moving, reference)
    # Same seed, same weights up to the head: the features and hidden states do not change.
    torch.testing.assert_close(outputs[0].moving_features, outputs[1].moving_features)
    for first, second in zip(outputs[0].hidden_states, outputs[1].hidden_states):
        torch.testing.assert_close(first, second)
    with pytest.raises(InputError, match="readout_patch_statistics"):
        dataclasses.replace(UniFuseConfig.small(2), readout_patch_statistics=1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_statistics_only_classifier_reads_the_pooled_statistics_and_the_prompts_stay(spatial_dims):
    config = dataclasses.replace(UniFuseConfig.small(spatial_dims), readout_patch_statistics=True)
    torch.manual_seed(0)
    both = DegradationAwarePromptLearning(config).eval()
    torch.manual_seed(0)
    alone = DegradationAwarePromptLearning(dataclasses.replace(config, classifier_statistics_only=True)).eval()
    assert alone.classifier[1].in_features == 2 * PATCH_STATISTICS
    shape = (1, 1) + (32,) * spatial_dims
    moving, reference = torch.rand(shape), torch.rand(shape)
    seen: list[torch.Tensor] = []
    alone.classifier.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    with torch.no_grad():
        outputs = both(moving, reference), alone(moving, reference)
    tokens = flatten_spatial(patch_statistics(moving, reference, config.patch_size))[0]
    torch.testing.assert_close(seen[0][0, 0], torch.cat([tokens.mean(0), tokens.std(0)]))
    for first, second in zip(outputs[0].hidden_states, outputs[1].hidden_states):
        torch.testing.assert_close(first, second)
    with pytest.raises(InputError, match="classifier_statistics_only needs readout_patch_statistics"):
        dataclasses.replace(UniFuseConfig.small(2), classifier_statistics_only=True)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_statistics_of_the_acquired_image_feed_the_head_and_nothing_else(spatial_dims):
    """With ``acquired`` the classifier's statistics come from it; the features and prompts, which
    the rest of the network reads, stay those of the moved pair."""
    config = dataclasses.replace(UniFuseConfig.small(spatial_dims), readout_patch_statistics=True,
                                 classifier_statistics_only=True, statistics_before_alignment=True)
    torch.manual_seed(0)
    dapl = DegradationAwarePromptLearning(config).eval()
    shape = (1, 1) + (32,) * spatial_dims
    generator = torch.Generator().manual_seed(1)
    moved, reference = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    acquired = torch.rand(shape, generator=generator) ** 3  # another texture and intensity
    seen: list[torch.Tensor] = []
    dapl.classifier.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    with torch.no_grad():
        on_acquired, on_moved = dapl(moved, reference, acquired), dapl(moved, reference)
    tokens = flatten_spatial(patch_statistics(acquired, reference, config.patch_size))[0]
    torch.testing.assert_close(seen[0][0, 0], torch.cat([tokens.mean(0), tokens.std(0)]))
    assert not torch.allclose(on_acquired.class_logits, on_moved.class_logits, atol=1e-4)
    torch.testing.assert_close(on_acquired.moving_features, on_moved.moving_features)
    torch.testing.assert_close(on_acquired.prompts, on_moved.prompts)
    with pytest.raises(InputError, match="statistics_before_alignment needs readout_patch_statistics"):
        dataclasses.replace(UniFuseConfig.small(2), statistics_before_alignment=True)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("statistics_only", [False, True])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_class_read_out_alone_equals_the_forward_pass_and_skips_the_token_path(spatial_dims, statistics_only,
                                                                                   window):
    """``classify`` gives the logits of ``forward`` bitwise, with one window and with several; a
    statistics-only head needs neither the encoder nor the Mamba scans, so they do not run."""
    config = dataclasses.replace(UniFuseConfig.small(spatial_dims), readout_patch_statistics=True,
                                 classifier_statistics_only=statistics_only)
    torch.manual_seed(0)
    dapl = DegradationAwarePromptLearning(config).eval()
    dapl.readout_window = window
    shape = (1, 1) + (32,) * (spatial_dims - 1) + (40,)
    generator = torch.Generator().manual_seed(2)
    moving, reference, acquired = (torch.rand(shape, generator=generator) for _ in range(3))
    with torch.no_grad():
        full = dapl(moving, reference, acquired)
        encoder_calls: list[int] = []
        dapl.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
        dapl.mamba_first.register_forward_hook(lambda *_: encoder_calls.append(1))
        class_logits, slice_class_logits = dapl.classify(moving, reference, acquired)
    torch.testing.assert_close(class_logits, full.class_logits, rtol=0, atol=0)
    torch.testing.assert_close(slice_class_logits, full.slice_class_logits, rtol=0, atol=0)
    assert bool(encoder_calls) != statistics_only
