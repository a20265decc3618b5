"""Validation scores of a model on a (deterministic) validation split.

Scores, averaged over samples:

* ``ncc_restored``: NCC of the model's restored + aligned moving output with the clean aligned
  label (selects the best checkpoint); ``ncc_input``: the same for the degraded, misaligned
  input, i.e. what doing nothing scores.
* ``epe_voxels``: mean end-point error |φ − φ_gt| of the predicted displacement, voxels.
* ``q_cc`` and ``q_ssim``: the paper's fusion scores of the fused image against the two clean
  sources (label, reference), from ``napari_unifuse.metrics``.
* ``class_accuracy``: degradation classification accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from napari_unifuse.model import UniFuse


@torch.no_grad()
def validate(model: UniFuse, loader: DataLoader, device: torch.device, max_batches: int | None = None) -> dict[str, float]:
    from napari_unifuse.metrics import q_cc, q_ssim, registration_metrics

    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {
        "ncc_restored": [], "ncc_input": [], "epe_voxels": [], "q_cc": [], "q_ssim": [], "class_accuracy": []
    }
    for batch_index, batch in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        moving, reference = batch["moving"].to(device), batch["reference"].to(device)
        output = model(moving, reference)
        error = (output.displacement.cpu() - batch["displacement"]).norm(dim=1)
        predicted_class = output.class_logits.argmax(dim=1).cpu()
        for i in range(moving.shape[0]):
            label = batch["label"][i, 0].numpy()
            reference_i = batch["reference"][i, 0].numpy()
            scores["ncc_restored"].append(registration_metrics(output.restored[i, 0].cpu().numpy(), label)["ncc"])
            scores["ncc_input"].append(registration_metrics(batch["moving"][i, 0].numpy(), label)["ncc"])
            fused = output.fused[i, 0].cpu().numpy()
            scores["q_cc"].append(q_cc(fused, label, reference_i))
            scores["q_ssim"].append(q_ssim(fused, label, reference_i))
            scores["epe_voxels"].append(float(error[i].mean()))
            scores["class_accuracy"].append(float(predicted_class[i] == batch["class_index"][i]))
    model.train(was_training)
    # nanmean: NCC is NaN for a constant image (e.g. an untrained model's flat output).
    return {name: float(np.nanmean(values)) if values else float("nan") for name, values in scores.items()}
