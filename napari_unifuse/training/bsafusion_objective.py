"""BSAFusion's training loss (AAAI 2025, Eq. 1, 3, 8, 9, 11-14) for one batch.

L_total = L_ce1 + L_ce2 + L_consis + L_smooth + L_struct + L_grad + λ·L_inten   (Eq. 14, λ = 0.5)

with A the moving image, B the reference, Ĩ_A = W(I_A, φ) the moving image aligned by the
predicted field and I'_A its label (the clean moving image aligned by the true field, the batch's
``label``):

* ``ce1`` (Eq. 1): role cross-entropy of the MFRHs, A -> class 1, B -> class 0;
* ``ce2`` (Eq. 3): cross-entropy of the frozen discriminator on the transferred tokens against
  [0.5, 0.5];
* ``consis`` (Eq. 9): (1 − SSIM(I'_A, Ĩ_A)) + ‖I'_A − Ĩ_A‖₁: the image term that trains the field;
* ``smooth`` (Eq. 8): the diffusion regulariser of every forward and reverse step field, each in
  voxels of its own level;
* ``struct`` (Eq. 11): (1 − SSIM(I_f, Ĩ_A)) + μ (1 − SSIM(I_f, I_B)). The paper updates μ once per
  epoch as Σ L_ssim(I_f, I_B) / Σ L_ssim(I_f, I_A) over the previous epoch; we take the same ratio
  over the current batch (detached), which needs no state across steps;
* ``grad`` / ``inten`` (Eq. 12-13): ‖|∇I_f| − max(|∇Ĩ_A|, |∇I_B|)‖₁ and ‖I_f − max(Ĩ_A, I_B)‖₁;
* ``reg`` (ours, off in the paper config): the squared end-point error against the true field,
  which the synthetic pairs provide; the CPU config uses it because a 40-minute run cannot learn the
  field from L_consis alone.

The fusion targets use Ĩ_A with the field detached (as ``training.objective`` does for UniFuse):
L_consis (and L_reg) train the alignment, and the fusion terms must not pull the field toward
whatever makes the fusion easy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from napari_unifuse.errors import InputError
from napari_unifuse.model.bsafusion import MOVING_CLASS, REFERENCE_CLASS, BSAFusion, BSAFusionOutput
from napari_unifuse.model.warp import warp
from napari_unifuse.training import losses
from napari_unifuse.training.methods import Objective

BSAFUSION_LOSS_TERMS = ("ce1", "ce2", "consis", "smooth", "struct", "grad", "inten", "reg")


@dataclass(frozen=True)
class BSAFusionLossWeights:
    """Weights of Eq. 14 (the paper's: all 1, λ = inten = 0.5) plus our optional ``reg``."""

    ce1: float = 1.0
    ce2: float = 1.0
    consis: float = 1.0
    smooth: float = 1.0
    struct: float = 1.0
    grad: float = 1.0
    inten: float = 0.5
    reg: float = 0.0

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, (int, float)) or value < 0:
                raise InputError(f"loss weight {name} must be a non-negative number, got {value!r}", "loss")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BSAFusionLossWeights:
        unknown = sorted(set(values) - set(BSAFUSION_LOSS_TERMS))
        if unknown:
            raise InputError(f"unknown BSAFusion loss terms {unknown}; known: {', '.join(BSAFUSION_LOSS_TERMS)}",
                             "loss")
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def role_loss(logits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Eq. 1: CE(y_A, moving) + CE(y_B, reference)."""
    moving, reference = logits
    return (F.cross_entropy(moving, torch.full_like(moving[:, 0], MOVING_CLASS, dtype=torch.long))
            + F.cross_entropy(reference, torch.full_like(reference[:, 0], REFERENCE_CLASS, dtype=torch.long)))


def modality_free_loss(logits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Eq. 3: CE(y'_A, [0.5, 0.5]) + CE(y'_B, [0.5, 0.5]) (soft targets); minimal, log 2 each,
    when the discriminator cannot tell the roles apart."""
    return sum(F.cross_entropy(y, torch.full_like(y, 0.5)) for y in logits)


def consistency_loss(label: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """Eq. 9: (1 − SSIM(I'_A, W(I_A, φ))) + ‖I'_A − W(I_A, φ)‖₁."""
    return losses.ssim_loss(label, aligned) + (label - aligned).abs().mean()


def step_smoothness(output: BSAFusionOutput) -> torch.Tensor:
    """Eq. 8: Σ_i ‖∇φ^i_A‖² + ‖∇φ^i_B‖² over the step fields, each on its own level."""
    return sum(losses.smoothness_loss(step) for step in (*output.forward_steps, *output.reverse_steps))


def balanced_structure_loss(fused: torch.Tensor, moving_aligned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 11 with μ = L_ssim(I_f, I_B) / L_ssim(I_f, Ĩ_A) over the batch (detached)."""
    moving_term = losses.ssim_loss(fused, moving_aligned)
    reference_term = losses.ssim_loss(fused, reference)
    balance = (reference_term / moving_term.clamp_min(1e-6)).detach()
    return moving_term + balance * reference_term


def bsafusion_losses(output: BSAFusionOutput, batch: dict[str, torch.Tensor],
                     weights: BSAFusionLossWeights) -> dict[str, torch.Tensor]:
    """Every term's *unweighted* value plus ``total`` (the weighted sum of Eq. 14).

    ``batch``: ``moving`` and ``reference`` (the network's inputs), ``label`` (I'_A) and
    ``displacement`` (the true field; read only when ``weights.reg`` > 0).
    """
    reference = batch["reference"]
    fusion_target = warp(batch["moving"], output.displacement.detach())
    terms = {
        "ce1": role_loss(output.modality_logits),
        "ce2": modality_free_loss(output.transfer_logits),
        "consis": consistency_loss(batch["label"], output.aligned),
        "smooth": step_smoothness(output),
        "struct": balanced_structure_loss(output.fused, fusion_target, reference),
        "grad": losses.gradient_loss(output.fused, fusion_target, reference),
        "inten": losses.intensity_loss(output.fused, fusion_target, reference),
    }
    if weights.reg > 0:
        terms["reg"] = losses.registration_loss(output.displacement, batch["displacement"])
    terms["total"] = sum(getattr(weights, name) * value for name, value in terms.items())
    return terms


class BSAFusionTrainingModel(nn.Module):
    """The module the trainer calls with a batch: the network on (moving, reference)."""

    def __init__(self, network: BSAFusion) -> None:
        super().__init__()
        self.network = network

    def forward(self, batch: dict[str, torch.Tensor]) -> BSAFusionOutput:
        return self.network(batch["moving"], batch["reference"])


@torch.no_grad()
def validate(network: BSAFusion, loader: DataLoader, device: torch.device,
             max_batches: int | None = None) -> dict[str, float]:
    """Scores averaged over the validation samples (``label``: the moving image aligned by the true field):

    * ``fusion_gain_min`` (selects the best checkpoint, as for every method): the smaller per-source
      SSIM gain of the fused image against the reference and the label (``metrics.ssim_gains``);
    * ``ncc_aligned`` / ``ncc_input``: NCC of the aligned moving image / of the input as given
      (identity) with the label — the alignment must raise the first above the second;
    * ``epe_voxels`` / ``epe_identity``: mean end-point error of the predicted / the zero field;
    * ``q_ssim``: the paper's fusion score, reported only (a copy of a source scores high on it).
    """
    from napari_unifuse.metrics import q_ssim, registration_metrics, ssim_gains

    was_training = network.training
    network.eval()
    scores: dict[str, list[float]] = {name: [] for name in (
        "fusion_gain_min", "ncc_aligned", "ncc_input", "epe_voxels", "epe_identity", "q_ssim")}
    for batch_index, batch in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        output = network(batch["moving"].to(device), batch["reference"].to(device))
        error = (output.displacement.cpu() - batch["displacement"]).norm(dim=1).flatten(1).mean(dim=1)
        for i in range(batch["moving"].shape[0]):
            label, reference = batch["label"][i, 0].numpy(), batch["reference"][i, 0].numpy()
            fused = output.fused[i, 0].cpu().numpy()
            scores["fusion_gain_min"].append(ssim_gains(fused, reference, label).minimum)
            scores["ncc_aligned"].append(registration_metrics(output.aligned[i, 0].cpu().numpy(), label)["ncc"])
            scores["ncc_input"].append(registration_metrics(batch["moving"][i, 0].numpy(), label)["ncc"])
            scores["epe_voxels"].append(float(error[i]))
            scores["epe_identity"].append(float(batch["displacement"][i].norm(dim=0).mean()))
            scores["q_ssim"].append(q_ssim(fused, label, reference))
    network.train(was_training)
    # nanmean: NCC is NaN for a constant image.
    return {name: float(np.nanmean(values)) if values else float("nan") for name, values in scores.items()}


OBJECTIVE = Objective(
    loss_section=BSAFusionLossWeights,
    training_model=lambda network, weights: BSAFusionTrainingModel(network),
    losses=bsafusion_losses,
    validate=validate,
)
