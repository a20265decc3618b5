"""Where the seconds of one 3-D ``run_fusion`` go, stage by stage and inside the matching.

    OMP_NUM_THREADS=2 .venv/bin/python bench/profile_3d.py [--side 160] [--checkpoint unifuse-3d-phantom]
        [--out bench/results/profile_3d_after.txt]

The pair is ``benchmark.phantom_pair`` (T2 with motion artefacts, misaligned onto T1, from the MNI
phantom) at ``side``³. Besides the engine's own ``timings_s`` it times, by wrapping them, the
matching's stages (rigid block matching, local matching, the MI refinement, mutual-information
scores) and the network's forward passes (``UniFuse.refine``, one per tile), and prints the
machine load (``os.getloadavg``) beside the figures: the machine is shared.
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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    pair = benchmark.phantom_pair(3, args.side)
    engine = FusionEngine(args.checkpoint, device="cpu", tile_size=args.tile_size)
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    load_before = os.getloadavg()
    with ExitStack() as stack:
        for owner, name, label in WATCHED:
            stack.enter_context(mock.patch.object(owner, name, timed(seconds, calls, label, getattr(owner, name))))
        start = time.perf_counter()
        with benchmark.peak_memory(torch.device("cpu")) as memory:
            result = engine.run_fusion(pair.reference, pair.moving)
        total = time.perf_counter() - start
    load_after = os.getloadavg()
    provenance = result.provenance
    lines = [
        f"3-D profile: {args.side}^3 phantom pair (T2 motion onto T1), checkpoint {args.checkpoint}, "
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} (2 cores, shared machine)",
        f"end to end: {total:.1f} s, peak memory {memory[1] / 1024:.2f} GB (increase {memory[0] / 1024:.2f} GB)",
        f"tiles: {provenance['tile_count']} of {provenance['tile_shape']}, guard kept "
        f"{provenance['alignment_guard']['kept']}",
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
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
