"""What MMIF-AMIN's loss rewards, on clean aligned Harvard validation crops (docs/methods.md).

1. The adaptive loss (``training.mmif_amin_objective.adaptive_loss``) of four fixed "fusions" of
   16 crops: a copy of each source, max and average fusion, under the paper's loss and under the
   CPU config's (``configs/mmif-amin-cpu.yaml``: the paper's terms plus our ``balance``,
   ``gradient``, ``edge_transfer`` and ``information_fidelity``). Lower is better.
2. What a loss can reach at all: a free image, started from max fusion, optimised per crop (Adam,
   150 steps) for our added terms only (weights in ``FREE_IMAGE_WEIGHTS``), for the paper's whole
   loss and for the config's whole loss, scored on gain_min, Q_abf and Q_vif beside the fixed
   fusions of the same 12 crops.

    .venv/bin/python bench/probe_mmif_amin_loss.py --harvard ../shared/data/harvard-aanlib [--fit-steps 200]
        [--fit-readout-head]

3. With ``--fit-steps``: the bundled network fitted to those 12 crops; with ``--fit-readout-head`` a
   non-linear read-out (two 3×3 convolutions, the last zero-initialised so the fit starts from the
   bundled output) is added beside the paper's linear 1×1 reconstruction first.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from napari_unifuse.metrics import q_abf, ssim_gains
from napari_unifuse.metrics.fusion import q_vif
from napari_unifuse.model.checkpoint import load_checkpoint
from napari_unifuse.training.datasets import build_datasets
from napari_unifuse.training.mmif_amin_objective import MMIFAMINLoss, adaptive_loss

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mmif-amin-cpu.yaml"
# (balance, gradient, edge_transfer, information_fidelity)
FREE_IMAGE_WEIGHTS = ((1.0, 0.0, 0.0, 0.0), (3.0, 1.0, 0.0, 0.0), (3.0, 3.0, 0.0, 0.0), (3.0, 1.0, 2.0, 0.0),
                      (3.0, 1.0, 0.0, 1.0), (3.0, 1.0, 2.0, 1.0))
_ADDED_TERMS = ("balance", "gradient", "edge_transfer", "information_fidelity")
Objective = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _crops(harvard: Path, count: int) -> dict[str, torch.Tensor]:
    config = yaml.safe_load(CONFIG.read_text())
    data = copy.deepcopy(config["data"]) | {"root": str(harvard)}
    _, validation = build_datasets(data, seed=config["seed"], spatial_dims=2)
    picks = np.linspace(0, len(validation) - 1, count).round().astype(int)
    return {key: torch.stack([validation[int(i)][key] for i in picks]) for key in ("reference", "label")}


def _fixed_fusions(reference: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"copy-reference": reference, "copy-moving": moving, "max": torch.maximum(reference, moving),
            "average": (reference + moving) / 2}


def _scores(fused: np.ndarray, reference: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    return ssim_gains(fused, reference, moving).minimum, q_abf(fused, reference, moving), q_vif(fused, reference, moving)


def loss_ranking(batch: dict[str, torch.Tensor]) -> None:
    config_loss = MMIFAMINLoss(**yaml.safe_load(CONFIG.read_text())["loss"])
    print(f"adaptive loss on {len(batch['reference'])} crops (lower is better)")
    for title, loss in (("paper", MMIFAMINLoss()), (f"config {config_loss}", config_loss)):
        totals = {name: adaptive_loss(fused, batch, loss)["total"].item()
                  for name, fused in _fixed_fusions(batch["reference"], batch["label"]).items()}
        print(f"  {title}: " + ", ".join(f"{name} {value:.3f}" for name, value in totals.items()))


def _added_terms_only(weights: tuple[float, ...]) -> tuple[str, Objective]:
    loss = MMIFAMINLoss(**dict(zip(_ADDED_TERMS, weights)))

    def objective(fused: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = adaptive_loss(fused, batch, loss)
        return sum((weight * terms[name] for name, weight in zip(_ADDED_TERMS, weights) if weight > 0),
                   torch.zeros(()))

    return ", ".join(f"{name} {weight:g}" for name, weight in zip(_ADDED_TERMS, weights) if weight > 0), objective


def _whole_loss(title: str, loss: MMIFAMINLoss) -> tuple[str, Objective]:
    return title, lambda fused, batch: adaptive_loss(fused, batch, loss)["total"]


def free_image_frontier(batch: dict[str, torch.Tensor], steps: int = 150) -> None:
    print(f"free image per crop ({len(batch['reference'])} crops): gain_min, Q_abf, Q_vif")
    objectives = [_added_terms_only(weights) for weights in FREE_IMAGE_WEIGHTS]
    objectives += [_whole_loss("the paper's whole loss", MMIFAMINLoss()),
                   _whole_loss("the config's whole loss", MMIFAMINLoss(**yaml.safe_load(CONFIG.read_text())["loss"]))]
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for reference, moving in zip(batch["reference"], batch["label"]):
        pair = {"reference": reference[None], "label": moving[None]}
        r, m = reference[0].numpy(), moving[0].numpy()
        for name, fused in _fixed_fusions(pair["reference"], pair["label"]).items():
            rows.setdefault(name, []).append(_scores(fused[0, 0].numpy(), r, m))
        for label, objective in objectives:
            image = torch.maximum(pair["reference"], pair["label"]).clone().requires_grad_(True)
            optimiser = torch.optim.Adam([image], lr=0.01)
            for _ in range(steps):
                loss = objective(image.clamp(0, 1), pair)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            rows.setdefault(f"free, {label}", []).append(_scores(image.detach().clamp(0, 1)[0, 0].numpy(), r, m))
    for name, values in rows.items():
        gain, edges, vif = np.mean(values, axis=0)
        print(f"  {name}: {gain:.3f}, {edges:.3f}, {vif:.3f}")


class _ReadoutWithHead(nn.Module):
    """The paper's 1×1 reconstruction plus a zero-initialised non-linear 3×3 head on the same features."""

    def __init__(self, linear: nn.Conv2d, hidden: int = 16) -> None:
        super().__init__()
        self.linear = linear
        self.head = nn.Sequential(nn.Conv2d(linear.in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(hidden, linear.out_channels, 3, padding=1))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features) + self.head(features)


def network_fit(batch: dict[str, torch.Tensor], steps: int, lr: float = 2.5e-4, readout_head: bool = False) -> None:
    network, _ = load_checkpoint("mmif-amin-2d-harvard", method="mmif-amin")
    if readout_head:
        network.reconstruct = _ReadoutWithHead(network.reconstruct)
    network.train()
    loss = MMIFAMINLoss(**yaml.safe_load(CONFIG.read_text())["loss"])
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    references, movings = batch["reference"].numpy(), batch["label"].numpy()

    def report(step: int) -> None:
        with torch.no_grad():
            fused = network.eval()(batch["label"], batch["reference"]).numpy()
        network.train()
        values = [_scores(f[0], r[0], m[0]) for f, r, m in zip(fused, references, movings)]
        gain, edges, vif = np.mean(values, axis=0)
        print(f"  step {step}: {gain:.3f}, {edges:.3f}, {vif:.3f}", flush=True)

    print(f"mmif-amin-2d-harvard{' with a 3x3 read-out head' if readout_head else ''} fitted to the same {len(references)} crops (config loss, Adam {lr:g}): "
          "gain_min, Q_abf, Q_vif")
    report(0)
    for step in range(1, steps + 1):
        total = adaptive_loss(network(batch["label"], batch["reference"]), batch, loss)["total"]
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        if step % max(1, steps // 4) == 0:
            report(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--fit-steps", type=int, default=0, help="also fit the bundled network to the 12 crops")
    parser.add_argument("--fit-readout-head", action="store_true", help="fit with a non-linear read-out added")
    parser.add_argument("--skip-free-image", action="store_true", help="only the loss ranking (and the fit)")
    args = parser.parse_args()
    torch.manual_seed(0)
    loss_ranking(_crops(args.harvard, 16))
    if not args.skip_free_image:
        free_image_frontier(_crops(args.harvard, 12))
    if args.fit_steps:
        network_fit(_crops(args.harvard, 12), args.fit_steps, readout_head=args.fit_readout_head)


if __name__ == "__main__":
    main()
