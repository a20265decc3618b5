"""BSAFusion's losses (training.bsafusion_objective): known values, finiteness, a tiny overfit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from napari_unifuse.errors import InputError
from napari_unifuse.model.bsafusion import BSAFusion, BSAFusionConfig
from napari_unifuse.model.warp import warp
from napari_unifuse.training.bsafusion_objective import (
    BSAFusionLossWeights,
    balanced_structure_loss,
    bsafusion_losses,
    consistency_loss,
    modality_free_loss,
    role_loss,
)
from napari_unifuse.training.losses import ssim_loss


def blob_pair(size: int = 32, shift: float = 2.0) -> dict[str, torch.Tensor]:
    """A reference, a moving image shifted by ``shift`` pixels (its true field) and its label."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    centre = size / 2

    def blob(cy, cx, width):
        return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * width**2))

    reference = (0.8 * blob(centre, centre, 6) + 0.4 * blob(centre - 5, centre + 6, 2))[None, None]
    label = (0.9 * blob(centre, centre, 4) + 0.6 * blob(centre + 6, centre - 4, 3))[None, None]
    displacement = torch.tensor([shift, -shift]).view(1, 2, 1, 1).expand(1, 2, size, size).contiguous()
    # moving(x + u) = label(x)  <=>  moving = label shifted by +u.
    moving = warp(label, -displacement, padding_mode="border")
    return {"moving": moving, "reference": reference, "label": label, "displacement": displacement}


def test_known_values():
    confident = torch.tensor([[-20.0, 20.0]])
    assert role_loss((confident, -confident)) < 1e-6
    assert role_loss((-confident, confident)) > 30
    even = torch.zeros(3, 2)
    assert modality_free_loss((even, even)).item() == pytest.approx(2 * math.log(2))
    assert modality_free_loss((confident, confident)).item() > 2 * math.log(2)
    image = torch.rand(1, 1, 32, 32)
    assert consistency_loss(image, image).item() == pytest.approx(0.0, abs=1e-6)
    assert consistency_loss(image, 1 - image).item() > 0.5


def test_balance_weights_the_worse_source_term():
    fused = torch.rand(1, 1, 32, 32)
    close, far = (fused + 0.05 * torch.rand_like(fused)).clamp(0, 1), torch.rand(1, 1, 32, 32)
    # μ = L(f, B) / L(f, A): with A close and B far the reference term gets more than its share.
    loss = balanced_structure_loss(fused, close, far)
    a, b = ssim_loss(fused, close), ssim_loss(fused, far)
    assert loss.item() == pytest.approx((a + b / a * b).item(), rel=1e-5)
    assert loss > a + b


def test_weights_from_dict_and_bad_terms():
    weights = BSAFusionLossWeights.from_dict({"reg": 0.01, "inten": 0.5})
    assert weights.reg == 0.01 and weights.ce1 == 1.0
    with pytest.raises(InputError, match="unknown"):
        BSAFusionLossWeights.from_dict({"moda": 1.0})
    with pytest.raises(InputError, match="non-negative"):
        BSAFusionLossWeights(smooth=-1.0)


def test_losses_finite_and_decrease_on_a_tiny_overfit():
    torch.manual_seed(0)
    net = BSAFusion(BSAFusionConfig.small())
    batch = blob_pair()
    weights = BSAFusionLossWeights(reg=0.01)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    history = []
    for _ in range(32):
        terms = bsafusion_losses(net(batch["moving"], batch["reference"]), batch, weights)
        assert set(terms) == {"ce1", "ce2", "consis", "smooth", "struct", "grad", "inten", "reg", "total"}
        assert all(torch.isfinite(value) for value in terms.values())
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        history.append({name: value.item() for name, value in terms.items()})
    # Adam on one pair is noisy from step to step: compare the last five steps with the first.
    def late(name):
        return sum(record[name] for record in history[-5:]) / 5

    assert late("total") < 0.7 * history[0]["total"]
    for name in ("ce1", "consis", "struct", "reg"):  # roles, alignment (image and field), fusion
        assert late(name) < 0.5 * history[0][name], name


def test_trainer_runs_bsafusion_from_a_config_and_checkpoints_it(tmp_path):
    from napari_unifuse.model.checkpoint import load_checkpoint
    from napari_unifuse.training.config import config_from_dict, load_config
    from napari_unifuse.training.trainer import train

    configs = Path(__file__).resolve().parents[2] / "configs"
    for name in ("bsafusion-cpu.yaml", "bsafusion.yaml"):
        shipped = load_config(configs / name)
        assert shipped.model.method == "bsafusion" and isinstance(shipped.loss, BSAFusionLossWeights)
    smoke = load_config(configs / "smoke.yaml").to_dict()
    config = config_from_dict({
        **smoke, "model": {"method": "bsafusion", "preset": "small", "spatial_dims": 2},
        "loss": {"reg": 0.01}, "train": {**smoke["train"], "max_steps": 2, "val_every": 2, "checkpoint_every": 2},
    })
    result = train(config, tmp_path / "run", device="cpu", progress=False)
    assert result.step == 2
    assert {"fusion_gain_min", "ncc_aligned", "ncc_input", "epe_voxels"} <= set(result.validation)
    network, metadata = load_checkpoint(result.last_checkpoint, method="bsafusion")
    assert isinstance(network, BSAFusion) and metadata["method"] == "bsafusion"
    assert network.config == BSAFusionConfig.small()
