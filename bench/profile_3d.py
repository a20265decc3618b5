"""Where the seconds of one 3-D ``run_fusion`` go, stage by stage and inside the matching.

    OMP_NUM_THREADS=2 .venv/bin/python bench/profile_3d.py [--side 160] [--checkpoint unifuse-3d-phantom]
        [--device cpu|cuda] [--torch-profile] [--weigh-network-field] [--out bench/results/profile_3d_after.txt]

The pair is ``benchmark.phantom_pair`` (T2 with motion artefacts, misaligned onto T1, from the MNI
phantom) at ``side``³. Besides the engine's own ``timings_s`` it times, by wrapping them, the
matching's stages (rigid block matching, local matching, the MI refinement, mutual-information
scores) and the network's forward passes (``UniFuse.refine``, one per tile), and prints the
machine load (``os.getloadavg``) beside the figures: the machine is shared. On CUDA one untimed run
comes first (CUDA's start and cuDNN's choice of kernels are not what a user waits for per volume).
``--torch-profile`` adds PyTorch's profiler tables of the operators that took the most time (self
time; on CUDA, on the device and on the host), with their call counts: many calls of short kernels
mean a run bound by launches.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

from napari_unifuse import benchmark
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.metrics import registration_metrics
from napari_unifuse.model import matching
from napari_unifuse.model.unifuse import UniFuse

# (owner, attribute, label): functions whose cumulative wall time is reported.
WATCHED = (
    (matching, "rigid_matching", "matching: rigid block matching"),
    (matching, "local_matching", "matching: local block matching"),
    (matching, "mi_refinement", "matching: MI refinement"),
    (matching, "mutual_information", "matching: MI scores"),
    (UniFuse, "refine", "network: refine (all tiles)"),
)


def timed(seconds: dict[str, float], calls: collections.Counter, label: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start
            calls[label] += 1

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=160)
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--weigh-network-field", action="store_true",
                        help="the guard weighs the network's field even where the checkpoint says not to "
                             "(the two-pass engine of before 2026-12-05)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    pair = benchmark.phantom_pair(3, args.side)
    engine = FusionEngine(args.checkpoint, device=args.device, tile_size=args.tile_size,
                          weigh_network_field=True if args.weigh_network_field else None)
    device = torch.device(args.device)
    if device.type == "cuda":
        engine.run_fusion(pair.reference, pair.moving)
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    load_before = os.getloadavg()
    with ExitStack() as stack:
        for owner, name, label in WATCHED:
            stack.enter_context(mock.patch.object(owner, name, timed(seconds, calls, label, getattr(owner, name))))
        if args.torch_profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = stack.enter_context(torch.profiler.profile(activities=activities))
        start = time.perf_counter()
        with benchmark.peak_memory(device) as memory:
            result = engine.run_fusion(pair.reference, pair.moving)
        total = time.perf_counter() - start
    load_after = os.getloadavg()
    provenance = result.provenance
    lines = [
        f"3-D profile: {args.side}^3 phantom pair (T2 motion onto T1), checkpoint {args.checkpoint}, "
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} ({os.cpu_count()} cores)",
        f"end to end: {total:.1f} s, peak memory {memory[1] / 1024:.2f} GB (increase {memory[0] / 1024:.2f} GB)",
        f"tiles: {provenance['tile_count']} of {provenance['tile_shape']}, guard kept "
        f"{provenance['alignment_guard']['kept']} (network field weighed: {provenance['network_field_weighed']})",
        f"aligned NCC to the clean label: {registration_metrics(result.aligned.array, pair.label.array)['ncc']:.3f}"
        f" (input {registration_metrics(pair.moving.array, pair.label.array)['ncc']:.3f})",
        "class probabilities: " + ", ".join(f"{k} {v:.2f}" for k, v in result.class_probs.items()),
        "",
        "engine stages (timings_s):",
        *(f"  {name:<28} {value:8.2f} s" for name, value in provenance["timings_s"].items()),
        "",
        "inside (wrapped functions, cumulative; nested calls count in both):",
        *(f"  {label:<36} {seconds[label]:8.2f} s  ({calls[label]} calls)" for _, _, label in WATCHED),
    ]
    if args.torch_profile:
        # On CUDA, the host's time shows what launches and waits for the device (a synchronising
        # operator's CPU time includes the wait).
        orders = ("self_cuda_time_total", "self_cpu_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
        for sort_by in orders:
            lines += ["", f"PyTorch profiler, by {sort_by}:",
                      profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=48)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
