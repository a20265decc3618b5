"""``unifuse info``: parameters and FLOPs per module of the UniFuse network.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; convs,
matmuls, linears). It cannot see inside a fused CUDA scan and sees the torch scan only partly, so
whatever it attributed to the selective scans is replaced by an analytic count
(:meth:`SelectiveScan.flops`). Element-wise work (norms, activations, grid_sample) is not counted.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_unifuse.errors import InputError
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.mamba import SelectiveScan
from napari_unifuse.model.scan import scan_backend
from napari_unifuse.model.unifuse import UniFuse

MODULE_LABELS = {"dapl": "DAPL", "oufr": "OUFR", "fa": "FA", "ufrf": "UFR&F"}
DEFAULT_SIZE = {2: 256, 3: 64}


@dataclass
class ModuleCost:
    label: str
    parameters: int
    flops: int
    scan_flops: int  # the analytic part of ``flops``


def build_config(preset: str, spatial_dims: int) -> UniFuseConfig:
    return getattr(UniFuseConfig, preset)(spatial_dims)


def measure(config: UniFuseConfig, size: int) -> list[ModuleCost]:
    """Parameters and FLOPs of one forward pass on a (1, 1, size, …) pair, per top module."""
    if size % config.size_multiple:
        raise InputError(f"--size must be a multiple of {config.size_multiple}, got {size}",
                         "unifuse info")
    net = UniFuse(config).eval()
    image = torch.rand(1, config.in_channels, *[size] * config.spatial_dims)
    scan_calls: list[tuple[str, int]] = []
    names = {module: name for name, module in net.named_modules()}

    def record_scan(module, args, kwargs, output):
        u, a = args[0], args[2]
        scan_calls.append((names[module], SelectiveScan.flops(u.shape[0], u.shape[1],
                                                             u.shape[2], a.shape[1])))

    hooks = [module.register_forward_hook(record_scan, with_kwargs=True)
             for module in net.modules() if isinstance(module, SelectiveScan)]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(image, image)
    finally:
        for hook in hooks:
            hook.remove()
    counted = counter.get_flop_counts()

    def counted_flops(path: str) -> int:
        return sum(counted.get(f"UniFuse.{path}", {}).values())

    costs = []
    for name, label in MODULE_LABELS.items():
        scans = [(path, flops) for path, flops in scan_calls if path.startswith(f"{name}.")]
        replaced = sum(counted_flops(path) for path in {path for path, _ in scans})
        analytic = sum(flops for _, flops in scans)
        parameters = sum(p.numel() for p in getattr(net, name).parameters())
        costs.append(ModuleCost(label, parameters, counted_flops(name) - replaced + analytic,
                                analytic))
    return costs


def run(args: argparse.Namespace) -> int:
    config = build_config(args.preset, args.dims)
    size = args.size or DEFAULT_SIZE[args.dims]
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
    parser.add_argument("--preset", choices=("paper", "small"), default="paper")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=3)
    parser.add_argument("--size", type=int, default=None,
                        help="side length of the square/cubic test input "
                             f"(default {DEFAULT_SIZE[2]} in 2-D, {DEFAULT_SIZE[3]} in 3-D)")
    parser.set_defaults(func=run)
