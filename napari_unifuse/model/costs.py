"""Parameters and FLOPs per top-level module of the UniFuse network (``unifuse info``, ``unifuse bench``).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; convs,
matmuls, linears). It cannot see inside a fused CUDA scan and sees the torch scan only partly, so
whatever it attributed to the selective scans is replaced by an analytic count
(:meth:`SelectiveScan.flops`). Element-wise work (norms, activations, grid_sample) is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_unifuse.errors import InputError
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.mamba import SelectiveScan
from napari_unifuse.model.unifuse import UniFuse

MODULE_LABELS = {"dapl": "DAPL", "oufr": "OUFR", "fa": "FA", "ufrf": "UFR&F"}


@dataclass
class ModuleCost:
    label: str
    parameters: int
    flops: int
    scan_flops: int  # the analytic part of ``flops``


def minimum_size(config: UniFuseConfig) -> int:
    """The smallest side length (a multiple of ``config.size_multiple``) the network runs on."""
    smallest = config.size_multiple
    if config.spatial_dims == 3:
        # The first RegBLK's cost volume average-pools the token grid (size / patch_size) by up to
        # 2^(correlation_levels − 1), and avg_pool3d refuses a grid smaller than its window
        # (avg_pool2d's ceil_mode pads one, so 2-D needs only the size multiple).
        pooled = config.patch_size * 2 ** (config.correlation_levels - 1)
        smallest = math.ceil(pooled / smallest) * smallest
    return smallest


def check_size(config: UniFuseConfig, size: int) -> None:
    """Refuse a side length the network cannot run on, naming the rule."""
    multiple, smallest = config.size_multiple, minimum_size(config)
    if size % multiple or size < smallest:
        raise InputError(f"the input size must be a multiple of {multiple} and at least {smallest}, got {size}",
                         "model.costs")


def measure(config: UniFuseConfig, size: int) -> list[ModuleCost]:
    """Parameters and FLOPs of one forward pass on a (1, 1, size, …) pair, per top module."""
    check_size(config, size)
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
