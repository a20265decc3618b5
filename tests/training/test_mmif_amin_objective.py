"""MMIF-AMIN's adaptive loss: the weights on known answers, RMI's direction, and a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from napari_unifuse.training.config import config_from_dict
from napari_unifuse.training.losses import gradient_loss, ssim
from napari_unifuse.training.mmif_amin_objective import (
    MMIFAMINLoss,
    adaptive_loss,
    adaptive_weights,
    average_gradient,
    entropy,
    region_mutual_information,
)
from napari_unifuse.training.trainer import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMOKE = CONFIGS / "smoke.yaml"


def _ramp(levels: int = 16, rows: int = 8) -> torch.Tensor:
    """Columns 0, 1/255, 2/255, ...: every grey level once per row; AG = 1/255, EN = log2(levels)."""
    return (torch.arange(levels, dtype=torch.float32) / 255).expand(rows, levels)[None, None].clone()


def _checkerboard(size: int = 16) -> torch.Tensor:
    """0/1 checkerboard: |Δx| = |Δy| = 1 everywhere, so AG = √2; two equally frequent levels, EN = 1 bit."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((x + y) % 2).float()[None, None]


def test_average_gradient_and_entropy_on_known_images():
    torch.testing.assert_close(average_gradient(_ramp()), torch.tensor([1 / 255]))
    torch.testing.assert_close(average_gradient(_checkerboard()), torch.tensor([2**0.5]))
    torch.testing.assert_close(entropy(_ramp(levels=16)), torch.tensor([4.0]))
    torch.testing.assert_close(entropy(_checkerboard()), torch.tensor([1.0]))
    assert float(entropy(torch.zeros(1, 1, 8, 8))) == 0.0


def test_adaptive_weights_on_a_known_answer():
    reference, moving = _checkerboard(), _ramp(levels=16, rows=16)
    alpha, beta = adaptive_weights(reference, moving)
    # α ∝ (√2, 1/255), β ∝ (1, 4) bits, each normalised over the pair.
    ag = torch.tensor([2**0.5, 1 / 255])
    torch.testing.assert_close(alpha, (ag / ag.sum())[None])
    torch.testing.assert_close(beta, torch.tensor([[0.2, 0.8]]))
    # Two flat sources carry nothing to weigh: equal weights.
    alpha, beta = adaptive_weights(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8))
    torch.testing.assert_close(alpha, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(beta, torch.tensor([[0.5, 0.5]]))


def test_region_mutual_information_prefers_a_fused_image_that_tells_the_source():
    torch.manual_seed(0)
    source = torch.rand(2, 1, 32, 32)
    informative = 0.5 * source + 0.2  # an affine copy: the source is predictable from it
    unrelated = torch.rand(2, 1, 32, 32)
    assert (region_mutual_information(informative, source) < region_mutual_information(unrelated, source) - 1).all()


def test_a_mmif_amin_config_trains_and_its_checkpoint_records_the_method(tmp_path):
    values = yaml.safe_load(SMOKE.read_text())
    values["model"]["method"] = "mmif-amin"
    values["data"].update(crop=48, none_fraction=1.0, misalignment={"regime": "none"})
    values["train"].update(max_steps=2, val_every=2, checkpoint_every=2)
    values["loss"] = {"rmi_pool": 1}
    config = config_from_dict(values, source="test", base_dir=SMOKE.parent)
    assert isinstance(config.loss, MMIFAMINLoss) and config.loss.rmi_pool == 1
    result = train(config, tmp_path / "run", device="cpu", progress=False)
    sidecar = json.loads(result.last_checkpoint.with_suffix(".json").read_text())
    assert sidecar["method"] == "mmif-amin"
    assert {"fusion_gain_min", "q_abf", "q_vif"} <= set(sidecar["validation"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all({"ssim", "rmi", "alpha_moving", "beta_moving"} <= set(r) for r in log if r["kind"] == "train")


def test_unifuse_loss_keys_are_refused_in_a_mmif_amin_config():
    values = yaml.safe_load(SMOKE.read_text())
    values["model"]["method"] = "mmif-amin"
    with pytest.raises(Exception, match="unknown keys in 'loss'"):
        config_from_dict(values, source="test")


def test_the_balance_term_is_ours_and_off_unless_asked_for():
    torch.manual_seed(0)
    batch = {"reference": torch.rand(2, 1, 32, 32), "label": torch.rand(2, 1, 32, 32)}
    fused = batch["reference"].clone()  # a copy of the reference: the moving source is the worse one
    paper = adaptive_loss(fused, batch, MMIFAMINLoss())
    assert "balance" not in paper
    ours = adaptive_loss(fused, batch, MMIFAMINLoss(balance=2.0))
    worst = (1 - ssim(fused, batch["label"])).mean()
    torch.testing.assert_close(ours["balance"], worst)
    torch.testing.assert_close(ours["total"], paper["total"] + 2.0 * worst)


def test_the_gradient_term_is_ours_and_off_unless_asked_for():
    torch.manual_seed(0)
    batch = {"reference": torch.rand(2, 1, 32, 32), "label": torch.rand(2, 1, 32, 32)}
    fused = (batch["reference"] + batch["label"]) / 2
    paper = adaptive_loss(fused, batch, MMIFAMINLoss())
    assert "gradient" not in paper
    ours = adaptive_loss(fused, batch, MMIFAMINLoss(gradient=0.5))
    expected = gradient_loss(fused, batch["label"], batch["reference"])
    torch.testing.assert_close(ours["gradient"], expected)
    torch.testing.assert_close(ours["total"], paper["total"] + 0.5 * expected)


def _two_source_pair() -> dict[str, torch.Tensor]:
    """A textured "MRI" and a "CT" that holds only a bright ring (a skull) the MRI does not show."""
    generator = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 96), indexing="ij")
    radius = torch.sqrt(x**2 + y**2)
    brain = (radius < 0.7).float()
    texture = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 96, 96, generator=generator), 5, 1, 2)[0, 0]
    reference = brain * (0.3 + 0.6 * (texture - texture.min()) / (texture.max() - texture.min()))
    ring = ((radius > 0.72) & (radius < 0.82)).float()
    moving = 0.95 * ring + 0.15 * brain
    return {"reference": reference[None, None], "label": moving[None, None]}


def test_the_cpu_config_ranks_fusions_above_copies_where_the_papers_loss_prefers_the_mri():
    """The reason for ``balance`` in configs/mmif-amin-cpu.yaml (module docstring): under the
    paper's loss a copy of the reference beats max and average fusion; under the shipped
    configuration both copies score worse than the better of the two fusions."""
    batch = _two_source_pair()
    reference, moving = batch["reference"], batch["label"]
    candidates = {"copy-reference": reference, "copy-moving": moving,
                  "max": torch.maximum(reference, moving), "average": (reference + moving) / 2}
    config_loss = yaml.safe_load((CONFIGS / "mmif-amin-cpu.yaml").read_text())["loss"]
    for loss, copy_wins in ((MMIFAMINLoss(), True), (MMIFAMINLoss(**config_loss), False)):
        total = {name: adaptive_loss(fused, batch, loss)["total"].item() for name, fused in candidates.items()}
        best_fusion = min(total["max"], total["average"])
        assert (total["copy-reference"] < best_fusion) is copy_wins, total
        if not copy_wins:
            assert total["copy-moving"] > best_fusion, total
