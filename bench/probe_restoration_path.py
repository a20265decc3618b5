"""Can three 3×3 convolutions on the image denoise low-dose SPECT, where UniFuse's U-Net did not?

Trains a small residual CNN (two 16-channel 3×3 convolutions with LeakyReLU, then a zero-started
3×3 output convolution: restored = clip(input + CNN(input))) on the Harvard training split's low-dose PET
and SPECT, aligned and unmoved (misalignment regime none), with the restoration loss of training
(L1 + 1 − SSIM), and prints the SSIM of the SPECT validation pairs to their clean labels every 150
steps. The evidence behind ``model.ufrf.ImageRestoration`` (bench/results/probe_restoration_path.md).

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_restoration_path.py --harvard ../shared/data/harvard-aanlib
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_unifuse.training.datasets import build_datasets
from napari_unifuse.training.losses import restoration_loss, ssim

WIDTH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = {"kind": "harvard", "root": str(args.harvard), "tasks": ["CT-MRI", "PET-MRI", "SPECT-MRI"],
            "none_fraction": 0.0, "val_fraction": 0.1, "split_seed": 0, "misalignment": {"regime": "none"},
            "crop": 128}
    training, validation = build_datasets(data, seed=0, spatial_dims=2)
    network = nn.Sequential(nn.Conv2d(1, WIDTH, 3, padding=1), nn.LeakyReLU(0.2),
                            nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.LeakyReLU(0.2),
                            nn.Conv2d(WIDTH, 1, 3, padding=1))
    nn.init.zeros_(network[-1].weight)
    nn.init.zeros_(network[-1].bias)
    optimizer = torch.optim.AdamW(network.parameters(), 5e-4)
    low_dose = [i for i, pair in enumerate(training.pairs) if pair.task != "CT-MRI"]
    spect = [validation[i] for i, pair in enumerate(validation.pairs) if pair.task == "SPECT-MRI"]
    moving = torch.stack([sample["moving"] for sample in spect])
    label = torch.stack([sample["label"] for sample in spect])

    def restored(images: torch.Tensor) -> torch.Tensor:
        return (images + network(images)).clamp(0.0, 1.0)

    with torch.no_grad():
        print(f"SPECT validation ({len(spect)} pairs): input SSIM {float(ssim(moving, label).mean()):.3f}")
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = [training[int(i)] for i in rng.choice(low_dose, 4)]
        images = torch.stack([sample["moving"] for sample in batch])
        loss = restoration_loss(restored(images), torch.stack([sample["label"] for sample in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 150 == 0:
            with torch.no_grad():
                score = float(ssim(restored(moving), label).mean())
            print(f"step {step}: restored SSIM {score:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
