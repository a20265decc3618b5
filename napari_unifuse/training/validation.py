"""Validation scores of a model on a (deterministic) validation split.

Scores, averaged over samples (``label`` is the clean moving image aligned by the true field):

* ``fusion_gain_min`` (selects the best checkpoint): ``metrics.ssim_gains(...).minimum``, the
  smaller of the fused image's per-source gains SSIM(F, S) − SSIM(other source, S) against the
  reference and the label. A copy of either source scores 0 and an average of an aligned atlas
  pair 0.13–0.24, so unlike Q_ssim or Q_abf no one-sided output wins it; a misaligned moving
  share lowers it too.
* ``ssim_restored`` and ``ssim_warped_input``: SSIM of the restored + aligned output with the
  label, and of the degraded input warped by the same predicted field (what the restoration
  must beat).
* ``ncc_restored``, ``ncc_input``: NCC of the restored output, and of the degraded, misaligned
  input (doing nothing), with the label.
* ``epe_voxels``: mean end-point error |φ − φ_gt| of the predicted displacement, voxels.
* ``q_ssim``: the paper's fusion score, reported but not a criterion (a copy scores high on it).
* ``class_accuracy``: degradation classification accuracy; ``class_accuracy_clean`` and
  ``class_accuracy_degraded`` the same on the clean and on the degraded samples alone (NaN when
  there are none), which tell a head that misses artefacts from one that invents them.

``records``, when given, receives one dict per sample: its true and predicted class, the class
probabilities, and ``ssim_input``, the SSIM of the degraded, misaligned input to the label (with no
misalignment: how much the degradation changed the image, i.e. how visible it is).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.model import UniFuse
from napari_unifuse.model.warp import warp
from napari_unifuse.training.losses import ssim

_CLEAN_CLASS = DEGRADATION_CLASSES.index("none")


@torch.no_grad()
def validate(model: UniFuse, loader: DataLoader, device: torch.device, max_batches: int | None = None,
             records: list[dict] | None = None) -> dict[str, float]:
    from napari_unifuse.metrics import q_ssim, registration_metrics, ssim_gains

    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {name: [] for name in (
        "fusion_gain_min", "ssim_restored", "ssim_warped_input", "ncc_restored", "ncc_input", "epe_voxels",
        "q_ssim", "class_accuracy", "class_accuracy_clean", "class_accuracy_degraded")}
    for batch_index, batch in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        moving, reference = batch["moving"].to(device), batch["reference"].to(device)
        label = batch["label"].to(device)
        output = model(moving, reference)
        scores["ssim_restored"].extend(ssim(output.restored, label).cpu().tolist())
        warped_input = warp(moving, output.displacement, padding_mode="border")
        scores["ssim_warped_input"].extend(ssim(warped_input, label).cpu().tolist())
        error = (output.displacement.cpu() - batch["displacement"]).norm(dim=1)
        predicted_class = output.class_logits.argmax(dim=1).cpu()
        if records is not None:
            probabilities = output.class_logits.softmax(dim=1).cpu()
            records.extend({"class_index": int(truth), "predicted_class": int(predicted),
                            "probabilities": p.tolist(), "ssim_input": float(similarity)}
                           for truth, predicted, p, similarity in zip(batch["class_index"], predicted_class,
                                                                      probabilities, ssim(moving, label).cpu()))
        for i in range(moving.shape[0]):
            label_i = batch["label"][i, 0].numpy()
            scores["ncc_restored"].append(registration_metrics(output.restored[i, 0].cpu().numpy(), label_i)["ncc"])
            scores["ncc_input"].append(registration_metrics(batch["moving"][i, 0].numpy(), label_i)["ncc"])
            fused_i, reference_i = output.fused[i, 0].cpu().numpy(), batch["reference"][i, 0].numpy()
            scores["fusion_gain_min"].append(ssim_gains(fused_i, reference_i, label_i).minimum)
            scores["q_ssim"].append(q_ssim(fused_i, label_i, reference_i))
            scores["epe_voxels"].append(float(error[i].mean()))
            right = float(predicted_class[i] == batch["class_index"][i])
            scores["class_accuracy"].append(right)
            clean = int(batch["class_index"][i]) == _CLEAN_CLASS
            scores["class_accuracy_clean" if clean else "class_accuracy_degraded"].append(right)
    model.train(was_training)
    # nanmean: NCC is NaN for a constant image (e.g. an untrained model's flat output).
    return {name: float(np.nanmean(values)) if values else float("nan") for name, values in scores.items()}
