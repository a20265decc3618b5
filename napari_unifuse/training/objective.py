"""The total training loss (paper Eq. 15) for one batch: L_ce + L_moda + L_reg + L_rf (+ ours).

``TrainingModel`` wraps :class:`UniFuse` so that one ``forward`` runs both passes L_moda needs
(the main pass on {I'_D, I_R} and the OUFR-only pass on {I_D, I'_R}, Eq. 4); wrapping both in one
module is what lets DistributedDataParallel see every parameter use inside its forward.

Targets. As the paper (Eq. 11–12), the fusion is supervised with ``W(I_fine, φ)``: the clean
moving image (``moving_clean``, misaligned like the input) warped by the *predicted* field, which
is where the moving content of the fused image actually sits. An earlier version used the label
aligned by the true field; with the predicted field still 5–11 px off, any moving content in the
fused image was in the wrong place and penalised, and the network learned to copy the reference.
The restoration has the same target, so that it learns to remove the degradation, not to make up
for the alignment error. The field is detached in these targets: L_reg trains the alignment, and
the fusion losses must not pull the field toward whatever makes fusing easy. The chroma term
(Eq. 13) warps with the predicted field and is not detached: the fused colour image carries the
moving image's CbCr, which must be moved onto the reference, so L_crcb also trains the alignment.

``loss.fusion_target: true_field`` puts both targets at the label aligned by the true field
instead. ``train.stage: fusion_weight`` uses it: with the field frozen there is no alignment left to
learn, and the question becomes how much of each source the fused image shows where that source
truly is, which is what the copy-proof evaluation scores (configs/harvard2d-cpu-fusion-weight.yaml).
"""

from __future__ import annotations

import torch
from torch import nn

from napari_unifuse.model import UniFuse, UniFuseOutput
from napari_unifuse.model.warp import warp
from napari_unifuse.training import losses
from napari_unifuse.training.config import LossSection
from napari_unifuse.training.methods import Objective
from napari_unifuse.training.validation import validate

LOSS_TERMS = ("ce", "moda", "reg", "smooth", "ssim", "inten", "grad", "balance", "crcb", "restore")


class TrainingModel(nn.Module):
    """UniFuse plus the second OUFR pass of L_moda, as one module."""

    def __init__(self, model: UniFuse, with_moda: bool) -> None:
        super().__init__()
        self.model = model
        self.with_moda = with_moda

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[UniFuseOutput, tuple[torch.Tensor, torch.Tensor] | None]:
        output = self.model(batch["moving"], batch["reference"])
        clean_tokens = None
        if self.with_moda:
            # {I_D, W(I'_R, φ₀)}: the clean label (aligned with I_R) and the reference moved like
            # the main pass's moving image: misaligned like I'_D, then moved by the same structural
            # matching φ₀, so that token positions correspond within each pair of Eq. 4.
            clean_tokens = self.model.unified_features(
                batch["label"], warp(batch["reference_misaligned"], output.initial_displacement))
        return output, clean_tokens


class AlignedRestorationModel(nn.Module):
    """UniFuse on the pair as the engine restores it once its alignment guard has chosen a field:
    the moving image warped by a fixed field, here the true one (``refine(fixed_field=True)``).
    For ``train.stage: image_restoration``. The network's own field moves every training crop by
    a fraction of a voxel somewhere, and that interpolation smooths noise; where the guard keeps the
    identity the engine restores the image as acquired, which a restoration trained only on moved
    crops left below its input (low-dose SPECT, Harvard validation)."""

    def __init__(self, model: UniFuse) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[UniFuseOutput, None]:
        field = batch["displacement"]
        moved = warp(batch["moving"], field)
        return self.model.refine(moved, batch["reference"], field, fixed_field=True, acquired=batch["moving"]), None


def fusion_target(moving_clean: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """W(I_fine, φ) of Eq. 11–12 with the field detached (see the module docstring)."""
    return warp(moving_clean, displacement.detach(), padding_mode="border")


def _target_field(output: UniFuseOutput, batch: dict[str, torch.Tensor], weights: LossSection) -> torch.Tensor:
    return batch["displacement"] if weights.fusion_target == "true_field" else output.displacement


def compute_losses(
    output: UniFuseOutput,
    clean_tokens: tuple[torch.Tensor, torch.Tensor] | None,
    batch: dict[str, torch.Tensor],
    weights: LossSection,
) -> dict[str, torch.Tensor]:
    """Every weighted term's *unweighted* value plus ``total`` (the weighted sum)."""
    reference = batch["reference"]
    moving_target = fusion_target(batch["moving_clean"], _target_field(output, batch, weights))
    terms: dict[str, torch.Tensor] = {
        "ce": losses.classification_loss(output.class_logits, batch["class_index"]),
        "reg": losses.registration_loss(output.displacement, batch["displacement"]),
        "ssim": losses.structure_loss(output.fused, moving_target, reference),
        "inten": losses.intensity_loss(output.fused, moving_target, reference),
        "grad": losses.gradient_loss(output.fused, moving_target, reference),
        "balance": losses.balance_loss(output.fused, moving_target, reference),
        "restore": losses.restoration_loss(output.restored, moving_target),
    }
    if clean_tokens is not None and weights.moda > 0:
        label_tokens, misaligned_reference_tokens = clean_tokens
        options = {
            "num_negatives": weights.moda_negatives,
            "temperature": weights.temperature,
            "max_anchors": weights.moda_anchors,
        }
        # Eq. 4: L_cont(F̄_D, F̄_R) + L_cont(F̄'_D, F̄'_R); positions correspond within each pair.
        terms["moda"] = losses.contrastive_loss(label_tokens, output.reference_features, **options) + losses.contrastive_loss(
            output.moving_features, misaligned_reference_tokens, **options
        )
    if weights.smooth > 0:
        terms["smooth"] = losses.smoothness_loss(output.displacement)
    if "cbcr" in batch and weights.crcb > 0:
        fused_chroma = warp(batch["cbcr"], output.displacement, padding_mode="border")
        terms["crcb"] = losses.color_loss(fused_chroma, batch["label_cbcr"], batch["is_color"])
    terms["total"] = sum(getattr(weights, name) * value for name, value in terms.items())
    return terms


def _training_model(network: UniFuse, weights: LossSection) -> TrainingModel:
    return TrainingModel(network, with_moda=weights.moda > 0)


def _losses(output: tuple[UniFuseOutput, tuple[torch.Tensor, torch.Tensor] | None], batch: dict[str, torch.Tensor],
            weights: LossSection) -> dict[str, torch.Tensor]:
    return compute_losses(*output, batch, weights)


OBJECTIVE = Objective(loss_section=LossSection, training_model=_training_model, losses=_losses, validate=validate)
