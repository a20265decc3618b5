"""Every registered method through FusionEngine on tiny 2D inputs, and what the registry refuses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import (
    FusionMethod,
    available_methods,
    load_method,
    method_for_network,
    registered_methods,
    split_name,
)
from napari_unifuse.engine.result import UNKNOWN_CLASS
from napari_unifuse.errors import CheckpointError, InputError
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.metrics import ssim_gains
from napari_unifuse.model.checkpoint import load_checkpoint, save_checkpoint
from napari_unifuse.model.networks import NETWORKS, build_network, network_class

# The slow registrations (ANTs SyN, the dense MIND optimisation) are exercised in test_classical.
FAST = [name for name in available_methods() if not name.startswith(("ants+", "dense+"))]
NETWORK_METHODS = [name for name in NETWORKS if name in available_methods()]


def _pair(shape=(40, 36)) -> tuple[ImageVolume, ImageVolume]:
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    blob = lambda shift: np.exp(-3 * sum((g - shift) ** 2 for g in grids)).astype(np.float32)  # noqa: E731
    return ImageVolume(blob(0.0), Geometry.identity(len(shape))), ImageVolume(blob(0.1), Geometry.identity(len(shape)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A randomly initialised small network of every network method, saved as a real checkpoint."""
    root = tmp_path_factory.mktemp("method-checkpoints")
    torch.manual_seed(0)
    return {name: str(save_checkpoint(build_network(name, "small", 2), root / f"{name}.safetensors"))
            for name in NETWORK_METHODS}


def _method(name: str, checkpoints: dict[str, str]) -> FusionMethod:
    base, _ = split_name(name)
    return load_method(name, checkpoint=checkpoints.get(base), spatial_dims=2)


@pytest.mark.parametrize("name", FAST)
def test_every_method_fuses_a_2d_pair_on_the_reference_grid(name, checkpoints):
    reference, moving = _pair()
    method = _method(name, checkpoints)
    result = FusionEngine(method, device="cpu").run_fusion(reference, moving)
    assert result.fused.array.shape == result.aligned.array.shape == reference.array.shape
    assert result.displacement.shape == (2, *reference.array.shape)
    assert np.isfinite(result.fused.array).all() and 0 <= result.fused.array.min() <= result.fused.array.max() <= 1
    assert result.provenance["method"]["name"] == method.name
    if split_name(name)[0] == "unifuse":
        assert sum(result.class_probs.values()) == pytest.approx(1.0, abs=1e-5)
    else:  # fusion-only and classical methods say nothing about the degradation
        assert result.class_probs == {} and result.predicted_class == UNKNOWN_CLASS
        assert result.degradation_report()["predicted"] == UNKNOWN_CLASS
    assert (result.alignment_guard is not None) == method.guarded
    assert (result.provenance["alignment_guard"] is not None) == method.guarded


def test_a_classical_pipeline_through_the_engine_fuses_with_its_rule():
    reference, moving = _pair()
    result = FusionEngine(load_method("identity+max"), device="cpu").run_fusion(reference, moving)
    # Identity registration: the fused image is the voxel-wise maximum of the normalised inputs.
    expected = np.maximum(reference.array / reference.array.max(), moving.array / moving.array.max())
    np.testing.assert_allclose(result.fused.array, expected, atol=0.02)
    np.testing.assert_array_equal(result.displacement, 0)


def test_mmif_amin_alignment_options_choose_the_registration(checkpoints):
    reference, moving = _pair()
    none = load_method("mmif-amin:none", checkpoint=checkpoints["mmif-amin"])
    matching = load_method("mmif-amin", checkpoint=checkpoints["mmif-amin"], alignment="matching")
    assert none.describe()["registration"] == "identity" and matching.name == "mmif-amin"
    unmoved = FusionEngine(none, device="cpu").run_fusion(reference, moving)
    np.testing.assert_array_equal(unmoved.displacement, 0)
    assert not none.guarded and unmoved.alignment_guard is None  # nothing to guard: the pair is taken as it is
    # A registration is weighed against the identity under its own name (tests/engine/test_alignment_guard.py
    # has what the guard then keeps).
    for method, name in ((matching, "matching"), (load_method("mmif-amin:sitk", checkpoint=checkpoints["mmif-amin"]),
                                                  "simpleitk")):
        guarded = FusionEngine(method, device="cpu").run_fusion(reference, moving)
        assert set(guarded.alignment_guard.scores) == {"identity", name}


@pytest.mark.parametrize("name", [n for n in NETWORK_METHODS if n != "unifuse"])
def test_a_3d_input_to_a_2d_only_method_is_refused(name, checkpoints):
    with pytest.raises(InputError, match="2D images only.*not 3D"):
        load_method(name, spatial_dims=3)
    reference, moving = _pair((12, 16, 16))
    engine = FusionEngine(load_method(name, checkpoint=checkpoints[name]), device="cpu")
    with pytest.raises(InputError, match="2D images only.*nothing is run slice by slice"):
        engine.run_fusion(reference, moving)


@pytest.mark.parametrize("name", NETWORK_METHODS)
def test_a_checkpoint_of_another_method_is_refused(name, checkpoints):
    other = next(n for n in NETWORK_METHODS if n != name)
    with pytest.raises(CheckpointError, match=f"holds {other} weights, not {name} ones; use it with the {other} method"):
        load_method(name, checkpoint=checkpoints[other])
    with pytest.raises(CheckpointError, match=f"holds {other} weights"):
        load_checkpoint(checkpoints[other], method=name)
    network, _ = load_checkpoint(checkpoints[name], method=None)
    assert isinstance(network, network_class(name))
    # A checkpoint alone names its method.
    assert FusionEngine(checkpoints[name], device="cpu").method.name == name


def test_a_network_in_memory_is_wrapped_as_its_method():
    network = build_network("mmif-amin", "small", 2)
    assert method_for_network(network).network is network
    assert FusionEngine(network, device="cpu").checkpoint_info["note"] == "model passed in memory"


def test_unknown_names_and_options_are_refused():
    with pytest.raises(InputError, match="unknown method 'nope'"):
        load_method("nope")
    with pytest.raises(InputError, match="no option 'rigid'; its alignments: matching, sitk, none"):
        split_name("mmif-amin:rigid")
    with pytest.raises(InputError, match="no option ''"):  # cut short: not silently the default alignment
        split_name("mmif-amin:")
    with pytest.raises(InputError, match="no trained weights"):
        load_method("sitk+max", checkpoint="anything.safetensors")
    assert {"unifuse", "bsafusion", "mmif-amin", "sitk+wavelet", "ants+max"} <= set(registered_methods())


def test_the_bundled_mmif_amin_checkpoint_loads_as_its_method():
    method = load_method("mmif-amin")  # resources/checkpoints/mmif-amin-2d-harvard
    assert method.checkpoint.name == "mmif-amin-2d-harvard.safetensors"
    assert method.checkpoint_metadata["method"] == "mmif-amin" and method.checkpoint_metadata["limitations"]
    reference, moving = _pair((64, 64))
    result = FusionEngine(load_method("mmif-amin:none"), device="cpu").run_fusion(reference, moving)
    assert result.provenance["checkpoint"]["name"] == "mmif-amin-2d-harvard"
    # Trained: the fused image follows both sources (a correlation with each well above chance).
    fused = result.fused.array.ravel()
    for source in (reference.array, moving.array):
        assert np.corrcoef(fused, source.ravel())[0, 1] > 0.5


def test_the_bundled_mmif_amin_shows_what_only_the_moving_image_holds():
    """A textured "MRI" and a "CT" whose only structure is a bright ring the MRI lacks: the fused
    image keeps the ring bright and resembles each source better than the other source does (the
    weights shipped before the balance term lost the ring: 0.015, gain_min -0.11)."""
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.linspace(-1, 1, 128), np.linspace(-1, 1, 128), indexing="ij")
    radius = np.hypot(x, y)
    brain = radius < 0.7
    mri = (brain * 1.2 * gaussian_filter(np.clip(0.45 + 0.15 * rng.standard_normal((128, 128)), 0, 1), 2))
    ring = (radius > 0.74) & (radius < 0.84)
    ct = 0.95 * ring + 0.2 * brain
    reference = ImageVolume(mri.astype(np.float32), Geometry.identity(2))
    moving = ImageVolume(ct.astype(np.float32), Geometry.identity(2))
    fused = FusionEngine(load_method("mmif-amin:none"), device="cpu").run_fusion(reference, moving).fused.array
    assert mri[ring].max() == 0 and fused[ring].mean() > 0.6
    assert ssim_gains(fused, mri, ct).minimum > 0.1


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unifuse_runs_in_channels_last_memory_on_a_cpu_with_the_same_outputs(spatial_dims):
    """The CPU layout is a speed choice only (bench/results/cpu_layouts.md): same fused, restored
    and field as the default layout."""
    torch.manual_seed(0)
    network = build_network("unifuse", "small", spatial_dims)
    reference, moving = _pair((40, 36) if spatial_dims == 2 else (24, 28, 20))
    results = {}
    for channels_last in (True, False):
        method = method_for_network(copy.deepcopy(network))
        method.channels_last_on_cpu = channels_last
        results[channels_last] = FusionEngine(method, device="cpu").run_fusion(reference, moving, quality=False)
        convolution = next(module for module in method.network.modules()  # one input channel: both layouts
                           if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.in_channels > 1)
        layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        assert convolution.weight.is_contiguous(memory_format=layout) == channels_last
    for name in ("fused", "aligned"):
        np.testing.assert_allclose(getattr(results[True], name).array, getattr(results[False], name).array, atol=1e-4)
    np.testing.assert_allclose(results[True].displacement, results[False].displacement, atol=1e-4)
