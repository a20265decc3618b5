"""The differentiable Q_abf and VIF-P behind MMIF-AMIN's edge-transfer and information-fidelity terms,
checked against the evaluation metrics (numpy) and torchmetrics."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import visual_information_fidelity

from napari_unifuse.metrics.fusion import q_vif
from napari_unifuse.metrics.fusion_gradient import q_abf
from napari_unifuse.training.fusion_metric_losses import (
    edge_transfer_loss,
    information_fidelity_loss,
    pixel_vif,
    soft_q_abf,
)
from napari_unifuse.training.mmif_amin_objective import MMIFAMINLoss, adaptive_loss


def _smooth_noise(generator: torch.Generator, size: int = 64) -> torch.Tensor:
    noise = torch.rand(1, 1, size, size, generator=generator, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool2d(noise, 7, 1, 3)
    return (smooth - smooth.min()) / (smooth.max() - smooth.min())


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A textured "MRI" and a blob-and-ring "CT" with edges of their own (float64, (1, 1, 64, 64))."""
    generator = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    radius = torch.sqrt(x**2 + y**2).to(torch.float64)
    reference = (radius < 0.7) * (0.3 + 0.6 * _smooth_noise(generator))
    moving = 0.9 * ((radius > 0.72) & (radius < 0.82)) + 0.5 * (((x - 0.2) ** 2 + y**2) < 0.05)
    return reference.to(torch.float64), moving[None, None].to(torch.float64)


def _candidates(reference: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
    noisy = (reference + moving) / 2 + 0.05 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(1),
                                                         dtype=torch.float64)
    return {"copy-reference": reference, "max": torch.maximum(reference, moving),
            "average": (reference + moving) / 2, "noisy-average": noisy.clamp(0, 1)}


def test_soft_q_abf_follows_the_evaluation_metric(pair):
    """The smoothing of |∇| and arctan at flat pixels costs at most a few thousandths of Q_abf."""
    reference, moving = pair
    for name, fused in _candidates(reference, moving).items():
        expected = q_abf(fused[0, 0].numpy(), reference[0, 0].numpy(), moving[0, 0].numpy())
        assert float(soft_q_abf(fused, reference, moving)) == pytest.approx(expected, abs=5e-3), name


def test_pixel_vif_is_torchmetrics_vif_and_halves_q_vif(pair):
    reference, moving = pair
    for name, fused in _candidates(reference, moving).items():
        for source in (reference, moving):
            expected = visual_information_fidelity(fused * 255, source * 255)
            torch.testing.assert_close(pixel_vif(source, fused)[0], expected, msg=name)
        both = q_vif(fused[0, 0].numpy(), reference[0, 0].numpy(), moving[0, 0].numpy())
        assert float(pixel_vif(reference, fused) + pixel_vif(moving, fused)) == pytest.approx(both, rel=1e-9)


def test_a_flat_source_keeps_the_losses_finite():
    """An all-background PET crop once made the VIF 0/0 and stopped a training run at step 34."""
    generator = torch.Generator().manual_seed(2)
    reference = _smooth_noise(generator).float()
    flat = torch.zeros_like(reference)
    fused = ((reference + flat) / 2).requires_grad_(True)
    torch.testing.assert_close(pixel_vif(flat, fused), torch.ones(1))
    total = edge_transfer_loss(fused, flat, reference) + information_fidelity_loss(fused, flat, reference)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0


def test_the_losses_are_one_minus_the_metrics(pair):
    reference, moving = pair
    fused = (reference + moving) / 2
    torch.testing.assert_close(edge_transfer_loss(fused, moving, reference), 1 - soft_q_abf(fused, reference, moving)[0])
    vif = (pixel_vif(reference, fused) + pixel_vif(moving, fused)) / 2
    torch.testing.assert_close(information_fidelity_loss(fused, moving, reference), 1 - vif[0])


def test_the_losses_reject_volumes_and_colour():
    with pytest.raises(ValueError, match=r"\(B, 1, y, x\)"):
        soft_q_abf(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, y, x\)"):
        pixel_vif(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("term", ["edge_transfer", "information_fidelity"])
def test_the_metric_terms_are_ours_and_off_unless_asked_for(pair, term):
    reference, moving = (image.float() for image in pair)
    batch = {"reference": reference, "label": moving}
    fused = (reference + moving) / 2
    paper = adaptive_loss(fused, batch, MMIFAMINLoss())
    assert term not in paper
    ours = adaptive_loss(fused, batch, MMIFAMINLoss(**{term: 1.5}))
    expected = {"edge_transfer": edge_transfer_loss, "information_fidelity": information_fidelity_loss}[term](
        fused, moving, reference)
    torch.testing.assert_close(ours[term], expected)
    torch.testing.assert_close(ours["total"], paper["total"] + 1.5 * expected)
