"""UniFuse forward/backward on the small preset, 2-D and 3-D."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.errors import InputError
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.warp import warp

# 3-D: 20 z voxels = 5 patch rows, so the slabs of 2 rows are 2, 2 and a thinner 1.
SHAPES = {2: (32, 32), 3: (20, 16, 16)}


def _pair(config, shape, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, config.in_channels, *shape, generator=generator),
            torch.rand(batch, config.in_channels, *shape, generator=generator))


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def model_and_pair(request):
    torch.manual_seed(0)
    config = UniFuseConfig.small(request.param)
    return UniFuse(config), _pair(config, SHAPES[request.param])


def test_forward_gives_the_documented_shapes_and_ranges(model_and_pair):
    model, (moving, reference) = model_and_pair
    cfg = model.config
    shape = moving.shape[2:]
    out = model(moving, reference)
    tokens = 1
    for size in shape:
        tokens *= size // cfg.patch_size
    # 3-D: one slab per started slab_size voxels along z; 2-D: one slice.
    slabs = math.ceil(shape[0] / cfg.slab_size) if cfg.spatial_dims == 3 else 1
    assert out.fused.shape == out.restored.shape == (2, 1, *shape)
    assert out.displacement.shape == (2, cfg.spatial_dims, *shape)
    assert out.class_logits.shape == out.class_probs.shape == (2, cfg.num_classes)
    assert out.slice_class_probs.shape == (2, slabs, cfg.num_classes)
    assert out.prompts.shape == (2, cfg.num_classes, cfg.prompt_length, cfg.embed_dim)
    assert out.moving_features.shape == out.reference_features.shape == (2, tokens, cfg.embed_dim)
    for image in (out.fused, out.restored):
        assert image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(out.class_probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(out.slice_class_probs.sum(-1), torch.ones(2, slabs))
    if cfg.spatial_dims == 3:
        assert not torch.allclose(out.slice_class_probs[:, 0], out.slice_class_probs[:, 1])


def test_untrained_network_adds_almost_nothing_to_the_structural_matching(model_and_pair):
    model, (moving, reference) = model_and_pair
    with torch.no_grad():
        displacement = model(moving, reference).displacement
        initial = model.initial_alignment(moving, reference)
    assert (displacement - initial).abs().max() < 0.25  # voxels: FA's output conv starts at N(0, 1e-2)


def test_without_matching_the_untrained_network_predicts_the_identity_transform(model_and_pair):
    model, (moving, reference) = model_and_pair
    model = UniFuse(dataclasses.replace(model.config, matching_range=0))
    with torch.no_grad():
        assert model.initial_alignment(moving, reference).eq(0).all()
        assert model(moving, reference).displacement.abs().max() < 0.25


def test_untrained_heads_pass_the_aligned_image_through_and_average(model_and_pair):
    """The heads predict corrections in image space, initialised at zero. (Without matching, so
    that the output field is the one the image was warped with.)"""
    model, (moving, reference) = model_and_pair
    model = UniFuse(dataclasses.replace(model.config, matching_range=0))
    with torch.no_grad():
        out = model(moving, reference)
    torch.testing.assert_close(out.restored, warp(moving, out.displacement, padding_mode="border"))
    torch.testing.assert_close(out.fused, (out.restored + reference) / 2, atol=1e-6, rtol=0)


def test_refine_on_a_prealigned_pair_equals_the_forward_pass(model_2d):
    moving, reference = _pair(model_2d.config, SHAPES[2])
    with torch.no_grad():
        initial = model_2d.initial_alignment(moving, reference)
        direct = model_2d(moving, reference)
        refined = model_2d.refine(warp(moving, initial, padding_mode="border"), reference, initial)
    torch.testing.assert_close(refined.fused, direct.fused)
    torch.testing.assert_close(refined.displacement, direct.displacement)


def test_a_fixed_field_skips_fa_and_is_the_output_field(model_2d):
    moving, reference = _pair(model_2d.config, SHAPES[2])
    initial = torch.zeros(2, 2, *SHAPES[2])
    initial[:, 1] = 3.0
    with torch.no_grad():
        nn.init.normal_(model_2d.fa.output[-1].weight, std=0.5)  # FA would move the image if it ran
        fixed = model_2d.refine(warp(moving, initial), reference, initial, fixed_field=True)
        learned = model_2d.refine(warp(moving, initial), reference, initial)
    torch.testing.assert_close(fixed.displacement, initial)
    assert (learned.displacement - initial).abs().max() > 0.1


def _trained_looking_heads(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in (model.ufrf.restoration_head, model.ufrf.fusion_weight_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
            head.bias.copy_(torch.randn(head.bias.shape, generator=generator))


def _ufrf_outputs(model, class_probs, shape=SHAPES[2]):
    cfg = model.config
    generator = torch.Generator().manual_seed(2)
    features = [torch.rand(1, cfg.feature_channels, *shape, generator=generator) for _ in range(2)]
    moving, reference = (torch.rand(1, 1, *shape, generator=generator) for _ in range(2))
    prompts = torch.rand(1, cfg.num_classes, cfg.prompt_length, cfg.embed_dim, generator=generator)
    with torch.no_grad():
        fused, restored, _ = model.ufrf(*features, moving, reference, prompts, class_probs)
    return fused, restored, moving, reference


def test_a_clean_input_passes_the_restoration_unchanged(model_2d):
    """restored = warped input + (1 − p_none)·Δ: a trained head changes a degraded input but not
    one the classifier calls clean (the ungated head remapped clean PET/SPECT)."""
    _trained_looking_heads(model_2d)
    clean = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    _, restored, moving, _ = _ufrf_outputs(model_2d, clean)
    torch.testing.assert_close(restored, moving)
    _, restored, moving, _ = _ufrf_outputs(model_2d, torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    assert (restored - moving).abs().mean() > 0.05


def test_the_fused_image_is_a_blend_of_the_reference_and_the_restored_image(model_2d):
    """No free correction term: the fusion cannot cancel a source's share or invent intensities."""
    _trained_looking_heads(model_2d)
    fused, restored, _, reference = _ufrf_outputs(model_2d, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    low, high = torch.minimum(reference, restored), torch.maximum(reference, restored)
    assert bool(((fused >= low - 1e-6) & (fused <= high + 1e-6)).all())
    assert (fused - reference).abs().mean() > 0.01 and (fused - restored).abs().mean() > 0.01


def test_the_image_restoration_path_starts_as_the_network_without_it_and_reads_the_image(model_2d):
    """config.image_restoration_width: zero-initialised, added to a trained network (train.stage
    image_restoration), it changes nothing until trained; trained, the correction depends on the
    image and on p, which the U-Net's correction from the same features does not see."""
    _trained_looking_heads(model_2d)
    with_path = UniFuse(dataclasses.replace(model_2d.config, image_restoration_width=4))
    missing, unexpected = with_path.load_state_dict(model_2d.state_dict(), strict=False)
    assert missing and all(name.startswith("ufrf.image_restoration.") for name in missing) and unexpected == []
    low_dose = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    for got, expected in zip(_ufrf_outputs(with_path, low_dose), _ufrf_outputs(model_2d, low_dose)):
        torch.testing.assert_close(got, expected)
    # Small corrections of mid-grey images: the restoration's clip to [0, 1] stays out of play.
    for network in (model_2d, with_path):
        nn.init.normal_(network.ufrf.restoration_head.weight, std=0.01)
        nn.init.zeros_(network.ufrf.restoration_head.bias)
    nn.init.normal_(with_path.ufrf.image_restoration.out.weight, std=0.1)
    cfg, shape = model_2d.config, SHAPES[2]
    generator = torch.Generator().manual_seed(3)
    features = [torch.rand(1, cfg.feature_channels, *shape, generator=generator) for _ in range(2)]
    prompts = torch.rand(1, cfg.num_classes, cfg.prompt_length, cfg.embed_dim, generator=generator)
    image, reference = (0.3 + 0.4 * torch.rand(1, 1, *shape, generator=generator) for _ in range(2))
    noise = 0.05 * torch.randn(1, 1, *shape, generator=generator)

    def correction(network, moving, class_probs=low_dose):
        with torch.no_grad():
            return network.ufrf(*features, moving, reference, prompts, class_probs)[1] - moving

    # Same features, another image: only the network with the path corrects differently.
    torch.testing.assert_close(correction(model_2d, image), correction(model_2d, image + noise))
    assert (correction(with_path, image) - correction(with_path, image + noise)).abs().mean() > 1e-4
    metal = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert (correction(with_path, image) - correction(with_path, image, metal)).abs().mean() > 1e-4


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradients_reach_every_parameter(spatial_dims):
    torch.manual_seed(0)
    config = UniFuseConfig.small(spatial_dims)
    model = UniFuse(config)
    # The heads start at zero, which stops gradients below them for the first step only.
    nn.init.normal_(model.ufrf.restoration_head.weight, std=0.1)
    nn.init.normal_(model.ufrf.fusion_weight_head.weight, std=0.1)
    moving, reference = _pair(config, [16] * spatial_dims, batch=1)
    out = model(moving, reference)
    loss = (out.fused.mean() + out.restored.mean() + out.displacement.square().mean()
            + torch.nn.functional.cross_entropy(out.class_logits, torch.tensor([3]))
            + out.slice_class_probs[..., 0].mean()
            + out.moving_features.square().mean() + out.reference_features.square().mean())
    loss.backward()
    dead = [name for name, p in model.named_parameters()
            if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


def test_only_the_classification_loss_trains_the_degradation_classifier():
    """p routes the prompt guidance and ALSN's experts, but the fusion, restoration and
    registration losses must not move it: it is shown to users as the degradation estimate."""
    torch.manual_seed(0)
    config = UniFuseConfig.small(2)
    model = UniFuse(config)
    moving, reference = _pair(config, [16, 16], batch=2)
    out = model(moving, reference)
    (out.fused.mean() + out.restored.mean() + out.displacement.square().mean()).backward()
    head = model.dapl.classifier
    assert all(p.grad is None or not p.grad.any() for p in head.parameters())
    assert model.dapl.encoder[0][0].weight.grad.abs().sum() > 0  # the shared trunk still learns
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(moving, reference).class_logits,
                                      torch.tensor([0, 3])).backward()
    assert all(p.grad is not None and p.grad.any() for p in head.parameters())


@pytest.fixture
def model_2d():
    torch.manual_seed(0)
    return UniFuse(UniFuseConfig.small(2)).eval()


def test_batch_items_are_processed_independently(model_2d):
    """On phantoms, not noise: the MI refinement of the matching amplifies rounding differences
    where MI has no optimum (pure noise), so only images with structure give a defined answer."""
    model = model_2d
    slices = make_brain_phantom_slices(SHAPES[2], ("t1", "ct", "pet", "t2"))
    images = [torch.from_numpy(slices[name].array / slices[name].array.max()).float()[None] for name in slices]
    reference = torch.stack([images[0]] * 3)
    moving = torch.roll(torch.stack(images[1:]), shifts=(2, -1), dims=(2, 3))
    with torch.no_grad():
        together = model(moving, reference).fused
        alone = model(moving[1:2], reference[1:2]).fused
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_unified_features_match_the_network_pass_on_the_same_pair(model_2d):
    """unified_features sees the pair as given, like refine() with no initial motion."""
    model = model_2d
    moving, reference = _pair(model.config, SHAPES[2])
    with torch.no_grad():
        out = model.refine(moving, reference, torch.zeros(2, 2, *SHAPES[2]))
        moving_tokens, reference_tokens = model.unified_features(moving, reference)
    torch.testing.assert_close(moving_tokens, out.moving_features)
    torch.testing.assert_close(reference_tokens, out.reference_features)


def test_injected_hidden_states_shape_the_unified_features(model_2d):
    """OUFR's Spatial Mamba must actually use DAPL's h_j (Eq. 3)."""
    model = model_2d
    moving, reference = _pair(model.config, SHAPES[2])
    with torch.no_grad():
        dapl = model.dapl(moving, reference)
        with_states = model.oufr(dapl.moving_features, dapl.reference_features,
                                 dapl.hidden_states)
        zero_states = model.oufr(dapl.moving_features, dapl.reference_features,
                                 [torch.zeros_like(h) for h in dapl.hidden_states])
    assert not torch.allclose(with_states.moving_tokens, zero_states.moving_tokens, atol=1e-4)


@pytest.mark.parametrize(("shape", "problem"), [
    ((1, 1, 30, 32), "multiple of 4"),
    ((1, 2, 32, 32), r"\(batch, 1, size, size\)"),
    ((1, 1, 32, 32, 32), r"got \(1, 1, 32, 32, 32\)"),
])
def test_bad_inputs_are_rejected_with_expected_and_actual_shapes(shape, problem):
    model = UniFuse(UniFuseConfig.small(2))
    with pytest.raises(InputError, match=problem):
        model(torch.rand(shape), torch.rand(shape))


def test_moving_and_reference_must_have_the_same_shape():
    model = UniFuse(UniFuseConfig.small(2))
    with pytest.raises(InputError, match="same shape"):
        model(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 64))


def test_repr_reports_the_scan_backend():
    assert "scan=torch" in repr(UniFuse(UniFuseConfig.small(2))).splitlines()[1]


def test_displacement_scale_multiplies_the_predicted_field():
    torch.manual_seed(0)
    base = UniFuse(dataclasses.replace(UniFuseConfig.small(2), matching_range=0)).eval()
    scaled = UniFuse(dataclasses.replace(base.config, displacement_scale=3 * base.config.displacement_scale)).eval()
    scaled.load_state_dict(base.state_dict())
    nn.init.normal_(base.fa.output[-1].weight, std=0.1)  # a field far from zero
    scaled.fa.output[-1].weight.data.copy_(base.fa.output[-1].weight)
    moving, reference = torch.rand(2, 1, 1, 32, 32)
    with torch.no_grad():
        field, tripled = base(moving, reference).displacement, scaled(moving, reference).displacement
    assert field.abs().max() > 0.1
    torch.testing.assert_close(tripled, 3 * field)


def test_a_head_reading_the_acquired_image_gets_the_unmoved_input_from_forward():
    """forward() hands DAPL the moving image before the matching moved it; refine() without it is
    refused, since its class would silently come from the interpolated image."""
    config = dataclasses.replace(UniFuseConfig.small(2), readout_patch_statistics=True,
                                 classifier_statistics_only=True, statistics_before_alignment=True)
    torch.manual_seed(0)
    model = UniFuse(config).eval()
    moving, reference = _pair(config, SHAPES[2], batch=1)
    with torch.no_grad():
        initial = model.initial_alignment(moving, reference)
        assert initial.abs().max() > 0.5  # the matching moves this pair, so the two images differ
        moved = model.moved_by(moving, initial)
        whole = model(moving, reference)
        by_parts = model.refine(moved, reference, initial, acquired=moving)
        on_moved = model.refine(moved, reference, initial, acquired=moved)
    torch.testing.assert_close(whole.class_probs, by_parts.class_probs)
    assert not torch.allclose(whole.class_probs, on_moved.class_probs, atol=1e-4)
    with pytest.raises(ValueError, match="acquired="):
        model.refine(moved, reference, initial)


def test_classify_reads_the_pair_as_given_and_given_probabilities_route_refine():
    """classify() is DAPL's read-out of the unmoved pair (refine's on a zero field); a p handed to
    refine() replaces the tile's own reading in the outputs and in ALSN's routing."""
    config = dataclasses.replace(UniFuseConfig.small(2), readout_patch_statistics=True,
                                 classifier_statistics_only=True, statistics_before_alignment=True)
    torch.manual_seed(0)
    model = UniFuse(config).eval()
    _trained_looking_heads(model)
    moving, reference = _pair(config, SHAPES[2], batch=1)
    zero = torch.zeros(1, 2, *SHAPES[2])
    given = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    with torch.no_grad():
        class_probs, slice_class_probs = model.classify(moving, reference)
        own = model.refine(moving, reference, zero, acquired=moving)
        routed = model.refine(moving, reference, zero, acquired=moving, class_probs=given)
        routed_clean = model.refine(moving, reference, zero, acquired=moving,
                                    class_probs=torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(class_probs, own.class_probs)
    torch.testing.assert_close(slice_class_probs, own.slice_class_probs)
    torch.testing.assert_close(routed.class_probs, given)
    torch.testing.assert_close(routed.slice_class_probs, given[:, None])
    # p = none gates the restoration off; low dose lets the (trained-looking) head change the image.
    moved = warp(moving, routed_clean.displacement, padding_mode="border")  # FA's (untrained) correction
    torch.testing.assert_close(routed_clean.restored, moved.clamp(0, 1))
    assert (routed.restored - moved).abs().mean() > 0.05


def test_a_routed_refine_skips_the_class_read_out_and_gives_the_same_images(monkeypatch):
    """With p given, DAPL's classifier and patch statistics would be computed for nothing: they
    are skipped, the per-slab p keeps the read-out's number of slabs, and nothing else changes."""
    config = dataclasses.replace(UniFuseConfig.small(3), readout_patch_statistics=True,
                                 statistics_before_alignment=True)
    torch.manual_seed(0)
    model = UniFuse(config).eval()
    _trained_looking_heads(model)
    shape = (40, 16, 16)  # several slabs along z, the last one thinner
    moving, reference = _pair(config, shape, batch=1)
    zero = torch.zeros(1, 3, *shape)
    given = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    with torch.no_grad():
        own = model.refine(moving, reference, zero, acquired=moving)
        classifier_calls = []
        model.dapl.classifier.register_forward_hook(lambda *args: classifier_calls.append(1))
        routed = model.refine(moving, reference, zero, acquired=moving, class_probs=given)
        assert not classifier_calls and routed.class_logits is None
        read_anyway = model.dapl.forward
        monkeypatch.setattr(model.dapl, "forward", lambda *a, **k: read_anyway(*a, **{**k, "read_class": True}))
        routed_with_read_out = model.refine(moving, reference, zero, acquired=moving, class_probs=given)
    assert classifier_calls  # the comparison run did read the class
    assert routed.slice_class_probs.shape == own.slice_class_probs.shape
    assert own.slice_class_probs.shape[1] == model.slab_count(shape) > 1
    for name in ("fused", "restored", "displacement"):
        torch.testing.assert_close(getattr(routed, name), getattr(routed_with_read_out, name), rtol=0, atol=0)
