"""``unifuse info``: parameters and FLOPs per module of the UniFuse network.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; convs,
matmuls, linears). It cannot see inside a fused CUDA scan and sees the torch scan only partly, so
whatever it attributed to the selective scans is replaced by an analytic count
(:meth:`SelectiveScan.flops`). Element-wise work (norms, activations, grid_sample) is not counted.
"""

from __future__ import annotations

import argparse

from napari_unifuse.cli.arguments import positive_int
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.costs import measure, minimum_size
from napari_unifuse.model.scan import scan_backend

PRESETS = ("paper", "small")
DEFAULT_SIZE = {2: 256, 3: 64}


def build_config(preset: str, spatial_dims: int) -> UniFuseConfig:
    return getattr(UniFuseConfig, preset)(spatial_dims)


def size_rules() -> str:
    """What --size accepts per preset and dimensionality, from the configs themselves."""
    rules = []
    for preset in PRESETS:
        for dims in DEFAULT_SIZE:
            config = build_config(preset, dims)
            rules.append(f"{preset} {dims}-D: a multiple of {config.size_multiple} and at least {minimum_size(config)}")
    return "; ".join(rules)


def run(args: argparse.Namespace) -> int:
    config = build_config(args.preset, args.dims)
    size = DEFAULT_SIZE[args.dims] if args.size is None else args.size
    costs = measure(config, size)
    shape = "×".join([str(size)] * args.dims)
    print(f"UniFuse, preset {args.preset}, {args.dims}-D, input 1×1×{shape}, "
          f"scan backend {scan_backend('cpu')} (CPU)")
    print(f"{'module':<8}{'parameters':>14}{'GFLOPs':>12}{'(scan, analytic)':>20}")
    for cost in costs:
        print(f"{cost.label:<8}{cost.parameters:>14,}{cost.flops / 1e9:>12.3f}"
              f"{cost.scan_flops / 1e9:>20.4f}")
    print(f"{'total':<8}{sum(c.parameters for c in costs):>14,}"
          f"{sum(c.flops for c in costs) / 1e9:>12.3f}"
          f"{sum(c.scan_flops for c in costs) / 1e9:>20.4f}")
    print("FLOPs: FlopCounterMode (2 per multiply-add) for convs/matmuls; selective-scan FLOPs "
          "are estimated analytically; element-wise ops are not counted.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="parameters and FLOPs per module of the UniFuse network",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="paper")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=3)
    parser.add_argument("--size", type=positive_int, default=None,
                        help="side length of the square/cubic test input "
                             f"(default {DEFAULT_SIZE[2]} in 2-D, {DEFAULT_SIZE[3]} in 3-D); {size_rules()}")
    parser.set_defaults(func=run)
