"""Would a learned modality translation lift the mild regime's multimodal floor?

    .venv/bin/python bench/probe_translated_reference.py [--harvard ../shared/data/harvard-aanlib]
        [--regime mild] [--limit 6] [--steps 600]

``bench/probe_multimodal_floor.py`` showed that on the mild regime (2-4 px, mostly non-rigid) the
classical optimisers recover the field to 0.3-1.3 px onto the clean moving modality, and end 2.8-9
px off onto the MRI: the multimodal similarity is the limit. This probe asks whether a small
network that predicts the moving modality from the MRI (trained, per task, on the aligned clean
pairs of the training split: the same patient-independent split as ``unifuse-2d-harvard``) gives a
fixed image close enough to the moving modality for the same optimisers to do better than the
identity. Per validation pair (the first ``--limit`` of each task: ``unifuse evaluate``'s pairs,
seeds and regime, those of ``probe_multimodal_floor.py``): the end-point
error over the label's tissue (px) of SimpleITK and the dense MIND optimisation onto the MRI, onto
the translated MRI and onto the clean label, beside the identity's; and the translation's own SSIM
to the label.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_multimodal_floor import print_means, registration_errors  # noqa: E402  (the same errors and table)

from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard  # noqa: E402
from napari_unifuse.engine.inference import _prepare  # noqa: E402
from napari_unifuse.model.checkpoint import read_metadata  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]


class Translator(nn.Module):
    """A two-level U-Net, MRI -> moving modality, in [0, 1]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.2))

        self.down1, self.down2, self.bottom = block(1, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.up2, self.up1 = block(6 * width, 2 * width), block(3 * width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, mri: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(mri)
        d2 = self.down2(F.avg_pool2d(d1, 2))
        bottom = self.bottom(F.avg_pool2d(d2, 2))
        u2 = self.up2(torch.cat([F.interpolate(bottom, scale_factor=2.0), d2], dim=1))
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2.0), d1], dim=1))
        return torch.sigmoid(self.out(u1))


def train_translator(references: torch.Tensor, labels: torch.Tensor, steps: int, seed: int = 0) -> Translator:
    torch.manual_seed(seed)
    network = Translator()
    optimiser = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picks = torch.randint(len(references), (4,), generator=generator)
        # 128² crops: four times the steps of whole images for the same time.
        y, x = (int(v) for v in torch.randint(0, references.shape[-1] - 128 + 1, (2,), generator=generator))
        mri, label = references[picks, :, y:y + 128, x:x + 128], labels[picks, :, y:y + 128, x:x + 128]
        loss = F.l1_loss(network(mri), label)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return network.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, default=REPOSITORY.parent / "shared" / "data" / "harvard-aanlib")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard", help="whose case split to use")
    parser.add_argument("--regime", default="mild")
    parser.add_argument("--limit", type=int, default=6, help="validation pairs per task")
    parser.add_argument("--steps", type=int, default=600, help="translator training steps per task")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    errors: dict[str, list[dict[str, float]]] = defaultdict(list)
    # Built over all three tasks at once, as evaluate does: the case split and the per-pair seeds
    # depend on the task list, so these are evaluate's (and probe_multimodal_floor's) pairs.
    tasks = ["CT", "PET", "SPECT"]
    every_training = pairs_from_harvard(args.harvard, "train", tasks, None, seed=0, size=None, none_fraction=1.0,
                                        cases=cases, regime="none")
    every_validation = pairs_from_harvard(args.harvard, "val", tasks, args.limit, seed=0, size=None,
                                          none_fraction=0.0, cases=cases, regime=args.regime)
    for task in tasks:
        training = [pair for pair in every_training if pair.task.startswith(f"{task}-")]
        references = torch.from_numpy(np.stack([p.reference.array / 255.0 for p in training])[:, None]).float()
        labels = torch.from_numpy(np.stack([p.label for p in training])[:, None]).float()
        start = time.perf_counter()
        translator = train_translator(references, labels, args.steps)
        print(f"{task}: translator on {len(training)} training pairs, {args.steps} steps, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        for pair in (pair for pair in every_validation if pair.task.startswith(f"{task}-")):
            reference = _prepare(pair.reference, "auto").luma.array
            with torch.no_grad():
                translated = translator(torch.from_numpy(pair.reference.array / 255.0).float()[None, None])[0, 0]
            translated = translated.numpy()
            row = {"translation SSIM to label": float(structural_similarity(translated, pair.label, data_range=1.0))}
            row |= registration_errors(pair, {"onto MRI": reference, "onto translated MRI": translated,
                                              "onto clean label": pair.label})
            errors[pair.task].append(row)
            print(pair.name, pair.degradation, {k: round(v, 2) for k, v in row.items()}, flush=True)
    print_means(errors, f"Mean end-point error over the label's tissue (px), {args.regime} regime; translation SSIM")

if __name__ == "__main__":
    main()
