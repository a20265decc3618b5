"""Parameters, CPU forward time and peak memory of the UniFuse network.

    .venv/bin/python bench/bench_model.py [--preset paper] [--threads N] [--device cpu|cuda]
                                          [--cases 2d-256 3d-96 3d-160]
                                          [--layout contiguous|channels-last] [--compile]

Each case runs in a fresh subprocess so that its peak resident memory (psutil, sampled every
10 ms) is its own. Timing: two no-grad forward passes on a (1, 1, *shape) pair; the first
("cold") also pays for oneDNN's per-shape kernel setup and the allocator's first touch of the
memory, the second ("warm") is what a tiled or repeated run pays per pass.

``--layout channels-last`` puts the weights and the inputs in channels-last memory (oneDNN's
preferred layout for convolutions); ``--compile`` wraps the network in ``torch.compile`` (the
cold pass then includes the compilation). Both are measured, not used by the engine unless they
pay (bench/results/cpu_layouts.md).

Also prints the UFR&F parameter count with ALSN and the count a multi-expert UFR&F (base net +
Ñ full BaseNet experts per scale instead of the LoRA branches) would have, to compare with the
paper (0.948 M vs 2.986 M).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import psutil
import torch

from napari_unifuse.model import UniFuse, UniFuseConfig

CASES = {"2d-256": (2, 256), "3d-96": (3, 96), "3d-160": (3, 160)}


def parameter_table(config: UniFuseConfig) -> dict[str, int]:
    model = UniFuse(config)
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in model.named_children()}
    counts["total"] = sum(counts.values())
    base = sum(sum(p.numel() for p in skip.base.parameters()) for skip in model.ufrf.skips)
    lora = sum(skip.lora_parameter_count() for skip in model.ufrf.skips)
    counts["ufrf_lora_branches"] = lora
    counts["ufrf_multi_expert_equivalent"] = counts["ufrf"] - lora + config.num_classes * base
    return counts


LAYOUTS = {"contiguous": {2: torch.contiguous_format, 3: torch.contiguous_format},
           "channels-last": {2: torch.channels_last, 3: torch.channels_last_3d}}


def run_case(preset: str, spatial_dims: int, size: int, device: str, layout: str = "contiguous",
             compile_model: bool = False) -> dict[str, float]:
    """Two forward passes; returns their seconds and the peak memory."""
    config = getattr(UniFuseConfig, preset)(spatial_dims)
    memory_format = LAYOUTS[layout][spatial_dims]
    model = UniFuse(config).eval().to(device, memory_format=memory_format)
    if compile_model:
        model = torch.compile(model)
    pair = [torch.rand(1, 1, *[size] * spatial_dims, device=device).contiguous(memory_format=memory_format)
            for _ in range(2)]
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = []
    for _ in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(*pair)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    done.set()
    sampler.join()
    peak = max(peak, process.memory_info().rss)
    result = {"cold_seconds": seconds[0], "warm_seconds": seconds[1],
              "rss_growth_gib": (peak - baseline) / 2**30, "rss_peak_gib": peak / 2**30}
    if device == "cuda":
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("paper", "small"), default="paper")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="contiguous")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        spatial_dims, size = CASES[args.case]
        print(json.dumps(run_case(args.preset, spatial_dims, size, args.device, args.layout, args.compile)))
        return
    for spatial_dims in (2, 3):
        counts = parameter_table(getattr(UniFuseConfig, args.preset)(spatial_dims))
        print(f"{args.preset} {spatial_dims}-D parameters: "
              + ", ".join(f"{name} {count / 1e6:.3f} M" for name, count in counts.items()))
    print(f"forward pass, batch 1, {args.threads} thread(s), device {args.device}, layout {args.layout}"
          + (", torch.compile" if args.compile else "") + ":")
    for case in args.cases:
        command = [sys.executable, __file__, "--preset", args.preset, "--threads", str(args.threads),
                   "--device", args.device, "--layout", args.layout, "--case", case]
        command += ["--compile"] if args.compile else []
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode:
            print(f"  {case}: failed: {completed.stderr.strip().splitlines()[-1]}")
            continue
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"  {case}: cold {result['cold_seconds']:.2f} s, "
              f"warm {result['warm_seconds']:.2f} s, "
              f"peak RSS {result['rss_peak_gib']:.2f} GiB "
              f"(+{result['rss_growth_gib']:.2f} GiB during the passes)"
              + (f", CUDA peak {result['cuda_peak_gib']:.2f} GiB" if "cuda_peak_gib" in result
                 else ""))


if __name__ == "__main__":
    main()
