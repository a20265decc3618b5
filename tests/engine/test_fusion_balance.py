"""The calibrated cap on the reference's share of UniFuse's blend (engine.fusion_balance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unifuse.engine.fusion_balance import DIFFERENT_BY, FusionBalance, fusion_balance
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.errors import CheckpointError
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import save_checkpoint, set_metadata_section


def _pair(rng: np.random.Generator, shape=(32, 32)) -> tuple[np.ndarray, np.ndarray]:
    reference = rng.uniform(0.5, 1.0, shape)
    restored = rng.uniform(0.0, 0.4, shape)  # differs from the reference everywhere
    return reference, restored


def test_a_pair_leaning_on_the_reference_is_brought_to_the_cap_with_its_pattern_kept():
    rng = np.random.default_rng(0)
    reference, restored = _pair(rng)
    weight = rng.uniform(0.5, 0.9, reference.shape)
    fused, capped, record = FusionBalance(0.3).apply(reference, restored, weight)
    assert record.applied and record.mean_weight == pytest.approx(weight.mean(), abs=1e-6)
    # One logit shift for the whole pair brings the mean to the cap, and the voxels keep their order.
    assert capped.mean() == pytest.approx(0.3, abs=1e-4)
    assert np.array_equal(np.argsort(capped.ravel(), kind="stable"), np.argsort(weight.ravel(), kind="stable"))
    logit_change = np.log(weight / (1 - weight)) - np.log(capped / (1 - capped))
    np.testing.assert_allclose(logit_change, record.shift, atol=1e-3)
    np.testing.assert_allclose(fused, capped * reference + (1 - capped) * restored, atol=1e-6)


def test_a_pair_at_or_below_the_cap_keeps_its_blend():
    rng = np.random.default_rng(1)
    reference, restored = _pair(rng)
    weight = rng.uniform(0.1, 0.3, reference.shape)
    fused, kept, record = FusionBalance(0.3).apply(reference, restored, weight)
    assert not record.applied and record.shift == 0.0 and "blend kept" in record.message
    np.testing.assert_allclose(kept, weight, atol=1e-6)
    np.testing.assert_allclose(fused, weight * reference + (1 - weight) * restored, atol=1e-6)


def test_only_voxels_where_the_sources_differ_count_toward_the_mean():
    """Where the two images agree any w gives the same voxel: a high w there is no lean."""
    rng = np.random.default_rng(2)
    reference, restored = _pair(rng)
    agree = np.zeros(reference.shape, bool)
    agree[:, :24] = True
    restored = np.where(agree, reference + DIFFERENT_BY / 2, restored)
    weight = np.where(agree, 0.95, 0.25)
    _, _, record = FusionBalance(0.3).apply(reference, restored, weight)
    assert record.voxels == int((~agree).sum()) and record.mean_weight == pytest.approx(0.25)
    assert not record.applied


@pytest.mark.parametrize("section", [{"max_mean_weight": 0.0}, {"max_mean_weight": 1.0}, {"max_mean_weight": "0.3"},
                                     {"max_mean_weight": True}, {"max_mean_weight": float("nan")}, {}, [0.3]])
def test_a_malformed_section_is_refused(section):
    with pytest.raises(ValueError, match="fusion_balance"):
        fusion_balance({"fusion_balance": section})


def test_no_section_means_the_network_blends_as_trained():
    assert fusion_balance({}) is None


def test_the_engine_caps_a_checkpoint_that_calibrated_it_and_says_so(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(UniFuse(UniFuseConfig.small(2)).eval(), tmp_path / "net.safetensors")
    grid = np.indices((48, 48)).astype(np.float32)
    head = np.exp(-((grid - 24) ** 2).sum(axis=0) / 200.0).astype(np.float32)
    reference = ImageVolume(head, Geometry.identity(2))
    moving = ImageVolume(np.clip(1.0 - head, 0, 1) * (head > 0.05), Geometry.identity(2))  # inverted contrast
    as_trained = FusionEngine(path, device="cpu").run_fusion(reference, moving, quality=False)
    assert as_trained.fusion_balance is None and as_trained.provenance["fusion_balance"] is None

    set_metadata_section(path, "fusion_balance", {"max_mean_weight": 0.05})
    capped = FusionEngine(path, device="cpu").run_fusion(reference, moving, quality=False)
    record = capped.provenance["fusion_balance"]
    assert record["applied"] and record["mean_weight"] > 0.05 and record["max_mean_weight"] == 0.05
    assert capped.fusion_balance is not None and record["message"] == capped.fusion_balance.message
    assert "capped at 0.05" in record["message"]
    # Less of the reference in the fused image, the alignment and restoration untouched.
    np.testing.assert_array_equal(capped.aligned.array, as_trained.aligned.array)
    distance = {name: np.abs(result.fused.array - head).mean() for name, result in
                (("as trained", as_trained), ("capped", capped))}
    assert distance["capped"] > distance["as trained"] + 0.01

    set_metadata_section(path, "fusion_balance", {"max_mean_weight": 2})
    with pytest.raises(CheckpointError, match="fusion_balance"):
        FusionEngine(path, device="cpu")
