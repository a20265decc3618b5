"""Can a small network trained on the true field alone recover the 2-D mild regime? (2026-12-06)

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_supervised_mild_2d.py --harvard ../shared/data/harvard-aanlib
        --out runs/probe-supervised-mild [--minutes 45] [--resume] [--monomodal] [--init-from STATE]

Every multimodal similarity we have (MI, MIND, NGF, brain masks) sits 2-9 px off the atlas on these
pairs, so nothing classical beats the identity on the mild regime (README, "Mild residuals"). A
network trained by regression on the synthesised field needs no similarity: it can learn what a
2-4 px elastic displacement of a CT or PET under an MRI looks like. This trains a plain 2-D U-Net
(the two images in, the field out, end-point-error loss) on the Harvard training split's mild draws,
fresh ones every epoch, on one thread for ``--minutes``, then prints the validation split's
end-point error over the reference's tissue (px), mild and aligned (``none``), per task, against
the identity, and how many pairs it made better or worse. ``--monomodal`` gives the network the
reference moved by the same field instead of the moving image: a check that the network and its
training can learn a field where the two images share a modality; ``--init-from`` starts from the
weights of another run's ``state.pt`` (a curriculum: monomodal first, then the pairs as they are).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from napari_unifuse.engine.alignment_guard import tissue_mask
from napari_unifuse.training.datasets import build_datasets

TASKS = ["CT-MRI", "PET-MRI", "SPECT-MRI"]


def datasets(harvard: Path, regime: str):
    data = {"kind": "harvard", "root": str(harvard), "tasks": TASKS, "none_fraction": 0.0,
            "val_fraction": 0.1, "split_seed": 0, "misalignment": {"regime": regime}}
    return build_datasets(data, seed=0, spatial_dims=2)


def double_conv(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.GroupNorm(4, outputs), nn.LeakyReLU(0.1),
                         nn.Conv2d(outputs, outputs, 3, padding=1), nn.GroupNorm(4, outputs), nn.LeakyReLU(0.1))


class FieldUNet(nn.Module):
    """Reference and moving image in, displacement (px) out; four levels, 16-128 channels."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        inputs = 2
        for width in widths:
            self.down.append(double_conv(inputs, width))
            inputs = width
        self.up = nn.ModuleList(double_conv(widths[i + 1] + widths[i], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], 2, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, reference: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        x = torch.cat([reference, moving], dim=1)
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else nn.functional.avg_pool2d(x, 2))
            skips.append(x)
        for level in reversed(range(len(self.up))):
            x = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.up[level](torch.cat([x, skips[level]], dim=1))
        return self.head(x)


def flipped(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each sample mirrored left-right with probability 1/2, its field's column component negated."""
    flip = torch.rand(len(batch["reference"]), generator=generator) < 0.5
    out = {}
    for key in ("reference", "moving", "reference_misaligned", "displacement"):
        value = batch[key].clone()
        value[flip] = value[flip].flip(-1)
        out[key] = value
    out["displacement"][flip, 1] *= -1
    return out


def end_point_error(field: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(field - truth, dim=1).mean()


def moving_input(batch: dict[str, torch.Tensor], monomodal: bool) -> torch.Tensor:
    return batch["reference_misaligned" if monomodal else "moving"]


def train(args: argparse.Namespace) -> FieldUNet:
    model = FieldUNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    state_path = args.out / "state.pt"
    step, epoch = 0, 0
    if args.init_from is not None:
        model.load_state_dict(torch.load(args.init_from, weights_only=True)["model"])
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        step, epoch = int(state["step"]), int(state["epoch"])
    train_set, _ = datasets(args.harvard, "mild")
    generator = torch.Generator().manual_seed(epoch)
    deadline = time.monotonic() + 60 * args.minutes
    recent: list[float] = []
    while time.monotonic() < deadline:
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, num_workers=1, drop_last=True,
                            generator=torch.Generator().manual_seed(epoch), persistent_workers=False)
        for batch in loader:
            batch = flipped(batch, generator)
            loss = end_point_error(model(batch["reference"], moving_input(batch, args.monomodal)),
                                   batch["displacement"])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            recent.append(float(loss.detach()))
            if step % 50 == 0:
                print(f"epoch {epoch} step {step} EPE {np.mean(recent):.3f} px", flush=True)
                recent.clear()
            if time.monotonic() >= deadline:
                break
        else:
            epoch += 1
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                    "epoch": epoch}, state_path)
    return model


@torch.no_grad()
def evaluate(model: FieldUNet, harvard: Path, monomodal: bool) -> None:
    model.eval()
    rows: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for regime in ("mild", "none"):
        _, validation = datasets(harvard, regime)
        for index, source in enumerate(validation.pairs):
            sample = validation[index]
            truth = sample["displacement"].numpy()
            field = model(sample["reference"][None], moving_input(sample, monomodal)[None])[0].numpy()
            mask = tissue_mask(sample["reference"][0].numpy())
            row = rows[(source.task, regime)]
            row["identity"].append(float(np.linalg.norm(truth, axis=0)[mask].mean()))
            row["network"].append(float(np.linalg.norm(field - truth, axis=0)[mask].mean()))
            row["moved"].append(float(np.linalg.norm(field, axis=0)[mask].mean()))
    print("\n| task | regime | pairs | identity EPE | network EPE | change | better / worse | mean motion |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (task, regime), row in sorted(rows.items()):
        identity, network = np.array(row["identity"]), np.array(row["network"])
        change = f"{100 * (network.mean() / identity.mean() - 1):+.0f} %" if identity.mean() > 0 else "–"
        print(f"| {task} | {regime} | {len(identity)} | {identity.mean():.2f} | {network.mean():.2f} | "
              f"{change} | {int((network < identity - 1e-6).sum())} / {int((network > identity + 1e-6).sum())} | "
              f"{np.mean(row['moved']):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=45.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--monomodal", action="store_true", help="the reference moved by the field as moving image")
    parser.add_argument("--init-from", type=Path, help="start from the weights in another run's state.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    evaluate(train(args), args.harvard, args.monomodal)


if __name__ == "__main__":
    main()
