"""Can a network learn to register at all? A shift probe for FA, with a plain-CNN control.

    .venv/bin/python bench/probe_registration.py --network unifuse|fa|cnn|bundled-fa [--steps 1500]
        [--harvard ../shared/data/harvard-aanlib [--regime large|mild|none]]

Shift probe: each sample is a blurred-noise 64² image and the same image shifted by an integer
vector of up to ±4 px in each axis (same modality, no degradation), so the true displacement is
that vector everywhere. With ``--harvard``: the synthesised training pairs of
``configs/harvard2d-cpu.yaml`` instead (128² crops, cross-modal, degraded, rotation + translation +
elastic misalignment of ~17 px on average), validated on 16 pairs of its validation split;
``--regime mild`` draws every pair from the mild regime instead (2-4 px residuals, issue 17's
"train FA on the mild regime").
Only L_reg trains (AdamW, batch 4, gradient clipping at 1). Every ``--every`` steps the script
prints, on the fixed validation pairs, L_reg divided by the L_reg of the best constant field (1:
nothing image-dependent was learned, 0: a perfect registration) and the mean end-point error.

Networks: ``unifuse`` is UniFuse-small 2D whole (the field of ``UniFuse.forward``); ``fa`` is
FeatureAlignment alone, fed by a 2-layer patch embedding of each image (as OUFR's token maps would
be), which isolates the RegBLK stack; ``cnn`` is a 4-conv network on the stacked pair at 1/4
resolution, upsampled, as the control that any working design should at least match;
``bundled-fa`` is the bundled ``unifuse-2d-harvard`` with everything but FA frozen, on the pair as
given (no matching: the identity the guard keeps on mild residuals).

``--regime mild``, 1500 steps, one thread (2026-12-03), on the 16 validation pairs whose identity
is 3.17 px off: ``bundled-fa`` ends at 3.16 px (L_reg ratio 1.004), ``cnn`` at 3.17 px (1.008).
Neither learns a cross-modal 2-4 px residual at this scale.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from napari_unifuse.model.checkpoint import load_checkpoint
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.fa import FeatureAlignment
from napari_unifuse.model.unifuse import UniFuse
from napari_unifuse.training.datasets import build_datasets
from napari_unifuse.training.losses import registration_loss

SIZE, MAX_SHIFT, MARGIN = 64, 4, 8
HARVARD_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "harvard2d-cpu.yaml"


def shifted_pairs(count: int, generator: torch.Generator):
    """(moving, reference, displacement): moving(x) = reference(x − t), so φ = t everywhere."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (taps[:, None] * taps[None]) / taps.sum() ** 2
    texture = torch.rand(count, 1, SIZE + 2 * MARGIN, SIZE + 2 * MARGIN, generator=generator)
    for _ in range(2):
        texture = F.conv2d(texture, kernel[None, None], padding=2)
    low = texture.amin(dim=(2, 3), keepdim=True)
    texture = (texture - low) / (texture.amax(dim=(2, 3), keepdim=True) - low)
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (count, 2), generator=generator)
    inside = (..., slice(MARGIN, MARGIN + SIZE), slice(MARGIN, MARGIN + SIZE))
    moving = torch.stack([torch.roll(image, tuple(shift.tolist()), dims=(1, 2))
                          for image, shift in zip(texture, shifts, strict=True)])
    displacement = shifts.float()[:, :, None, None].expand(count, 2, SIZE, SIZE)
    return moving[inside], texture[inside], displacement


class HarvardPairs:
    """Batches of the Harvard training config's synthesised pairs (a fixed pool of 200, so the
    probe does not spend its time on synthesis) and its first 16 validation pairs."""

    KEYS = ("moving", "reference", "displacement")

    def __init__(self, root: str, regime: str | None = None) -> None:
        data = yaml.safe_load(HARVARD_CONFIG.read_text(encoding="utf-8"))["data"]
        if regime is not None:
            data["misalignment"] = {**data["misalignment"], "regimes": {regime: 1.0}}
        train, val = build_datasets({**data, "root": root}, seed=0, spatial_dims=2)
        self.pool = [train[i] for i in range(0, len(train), max(1, len(train) // 200))][:200]
        self.validation = self._stack([val[i] for i in range(16)])

    def _stack(self, samples):
        return tuple(torch.stack([sample[key] for sample in samples]) for key in self.KEYS)

    def batch(self, generator: torch.Generator):
        chosen = torch.randperm(len(self.pool), generator=generator)[:4]
        return self._stack([self.pool[i] for i in chosen.tolist()])


class WholeUniFuse(nn.Module):
    def __init__(self, config: UniFuseConfig) -> None:
        super().__init__()
        self.net = UniFuse(config)

    def forward(self, moving, reference):
        return self.net(moving, reference).displacement


class AlignmentAlone(nn.Module):
    def __init__(self, config: UniFuseConfig) -> None:
        super().__init__()
        self.embed = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(8, config.embed_dim, config.patch_size, stride=config.patch_size))
        self.fa = FeatureAlignment(config)
        self.prompts = nn.Parameter(torch.randn(
            config.num_classes, config.prompt_length, config.embed_dim))
        self.num_classes = config.num_classes

    def forward(self, moving, reference):
        batch = moving.shape[0]
        uniform = torch.full((batch, self.num_classes), 1.0 / self.num_classes)
        prompts = self.prompts.expand(batch, -1, -1, -1)
        return self.fa(self.embed(moving), self.embed(reference), prompts, uniform)


class BundledAlignment(nn.Module):
    """The bundled 2-D UniFuse with every weight but FA's frozen, run on the pair as given."""

    def __init__(self) -> None:
        super().__init__()
        self.net, _ = load_checkpoint("unifuse-2d-harvard")
        for name, parameter in self.net.named_parameters():
            parameter.requires_grad_(name.startswith("fa."))

    def forward(self, moving, reference):
        identity = moving.new_zeros(moving.shape[0], 2, *moving.shape[2:])
        return self.net.refine(moving, reference, identity, acquired=moving).displacement


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(2, 16, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 3, 2, 1),
            nn.LeakyReLU(0.2), nn.Conv2d(32, 32, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 2, 3, 1, 1))

    def forward(self, moving, reference):
        coarse = self.layers(torch.cat([moving, reference], dim=1)) * 10.0
        return F.interpolate(coarse, scale_factor=4, mode="bilinear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=("unifuse", "fa", "cnn", "bundled-fa"), default="fa")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (default: 1e-3, with --harvard the config's)")
    parser.add_argument("--harvard", metavar="DIR", help="probe on the Harvard pairs under DIR")
    parser.add_argument("--regime", choices=("large", "mild", "none"),
                        help="with --harvard: draw every pair from this misalignment regime")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = UniFuseConfig.small(2)
    network = {"unifuse": lambda: WholeUniFuse(config), "fa": lambda: AlignmentAlone(config),
               "cnn": PlainCNN, "bundled-fa": BundledAlignment}[args.network]()
    train_generator = torch.Generator().manual_seed(args.seed + 1)
    if args.harvard:
        pairs = HarvardPairs(args.harvard, args.regime)
        val_moving, val_reference, val_field = pairs.validation
        next_batch = pairs.batch
        lr = yaml.safe_load(HARVARD_CONFIG.read_text(encoding="utf-8"))["train"]["lr"]
    else:
        val_moving, val_reference, val_field = shifted_pairs(32, torch.Generator().manual_seed(12345))
        next_batch = partial(shifted_pairs, 4)
        lr = 1e-3
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr or lr)
    best_constant = registration_loss(
        val_field.mean(dim=(0, 2, 3), keepdim=True).expand_as(val_field), val_field)
    identity_error = val_field.square().sum(dim=1).sqrt().mean()
    print(f"identity: L_reg / best constant field "
          f"{(registration_loss(torch.zeros_like(val_field), val_field) / best_constant).item():.3f}  "
          f"end-point error {identity_error.item():.2f} px")
    print(f"{args.network}: {sum(p.numel() for p in network.parameters())} parameters, "
          f"torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        moving, reference, field = next_batch(train_generator)
        loss = registration_loss(network(moving, reference), field)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % args.every == 0:
            network.eval()
            with torch.no_grad():
                predicted = network(val_moving, val_reference)
            network.train()
            ratio = registration_loss(predicted, val_field) / best_constant
            end_point_error = (predicted - val_field).square().sum(dim=1).sqrt().mean()
            print(f"step {step:5d}  L_reg / best constant field {ratio.item():.3f}  "
                  f"end-point error {end_point_error.item():.2f} px  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
