"""Timings of the selective scan: chunked torch path vs the sequential reference (and mamba-ssm).

    .venv/bin/python bench/bench_scan.py [--quick] [--device cpu|cuda]

Prints forward and forward+backward wall times (best of ``--repeats``) for a few
(batch, dim, N, L) settings, a chunk-size sweep, and the speed-up over the one-step-per-token
reference. On CUDA with mamba-ssm installed it also checks mamba-ssm (with an injected initial
state and the last state) against the torch path to 1e-3 and times it.
"""

from __future__ import annotations

import argparse
import time

import torch

from napari_unifuse.model.scan import (
    default_chunk_size,
    mamba_selective_scan_fn,
    scan_backend,
    selective_scan,
    selective_scan_torch,
)
from napari_unifuse.model.scan_reference import selective_scan_reference


def make_inputs(batch, dim, dstate, length, device, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    tensors = dict(
        u=torch.randn(batch, dim, length, generator=gen),
        delta=torch.randn(batch, dim, length, generator=gen) * 0.5 - 2.0,
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),  # S4D-real init
        B=torch.randn(batch, dstate, length, generator=gen),
        C=torch.randn(batch, dstate, length, generator=gen),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, length, generator=gen),
        delta_bias=torch.zeros(dim),
        initial_state=torch.randn(batch, dim, dstate, generator=gen),
    )
    return {k: v.to(device).requires_grad_(requires_grad) for k, v in tensors.items()}


def timed(fn, repeats, device):
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def forward_and_backward_times(scan_fn, setting, device, repeats):
    batch, dim, dstate, length = setting

    def forward():
        with torch.no_grad():
            scan_fn(**make_inputs(batch, dim, dstate, length, device), delta_softplus=True,
                    return_last_state=True)

    def forward_backward():
        out, last = scan_fn(**make_inputs(batch, dim, dstate, length, device, True),
                            delta_softplus=True, return_last_state=True)
        (out.square().mean() + last.square().mean()).backward()

    return timed(forward, repeats, device), timed(forward_backward, repeats, device)


def fmt(seconds):
    return f"{seconds * 1e3:9.1f} ms"


def compare_with_mamba(settings, repeats):
    if not torch.cuda.is_available() or mamba_selective_scan_fn() is None:
        print("\nmamba-ssm not available (needs CUDA and a compiled selective_scan_cuda); "
              "skipping the mamba-ssm comparison")
        return
    print(f"\nmamba-ssm vs torch path on {torch.cuda.get_device_name()} "
          f"(auto backend: {scan_backend('cuda')})")
    for setting in settings:
        batch, dim, dstate, length = setting
        inputs = make_inputs(batch, dim, dstate, length, "cuda")
        kwargs = dict(delta_softplus=True, return_last_state=True)
        out_m, last_m = selective_scan(**inputs, **kwargs, backend="mamba-ssm")
        out_t, last_t = selective_scan(**inputs, **kwargs, backend="torch")
        err = max((out_m - out_t).abs().max().item() / max(out_t.abs().max().item(), 1.0),
                  (last_m - last_t).abs().max().item() / max(last_t.abs().max().item(), 1.0))
        status = "OK" if err <= 1e-3 else "MISMATCH"
        times = {
            name: forward_and_backward_times(
                lambda **kw: selective_scan(**kw, backend=name), setting, "cuda", repeats)
            for name in ("mamba-ssm", "torch")
        }
        print(f"  {setting}: rel. max error {err:.2e} [{status}]  "
              f"mamba fwd {fmt(times['mamba-ssm'][0])} fwd+bwd {fmt(times['mamba-ssm'][1])} | "
              f"torch fwd {fmt(times['torch'][0])} fwd+bwd {fmt(times['torch'][1])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = args.device

    settings = [(1, 48, 16, 4096), (1, 48, 16, 16384)]
    if not args.quick:
        settings.append((3, 96, 16, 16384))
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          "float32, softplus, D, z, initial state, last state\n")

    print("chunk-size sweep (torch path), fwd | fwd+bwd")
    for setting in settings:
        for chunk in (16, 32, 64, 128, 256, 512):
            fwd, fwd_bwd = forward_and_backward_times(
                lambda **kw: selective_scan_torch(**kw, chunk_size=chunk), setting, device,
                args.repeats)
            print(f"  {setting} T={chunk:<4d} {fmt(fwd)} | {fmt(fwd_bwd)}")
        print(f"  default chunk: {default_chunk_size(setting[3])}")

    print("\nchunked torch scan (default chunk) vs sequential reference, fwd | fwd+bwd")
    for setting in settings:
        fast = forward_and_backward_times(selective_scan_torch, setting, device, args.repeats)
        slow = forward_and_backward_times(selective_scan_reference, setting, device, 1)
        print(f"  {setting}: chunked {fmt(fast[0])} | {fmt(fast[1])}   "
              f"reference {fmt(slow[0])} | {fmt(slow[1])}   "
              f"speed-up x{slow[0] / fast[0]:.1f} | x{slow[1] / fast[1]:.1f}")

    compare_with_mamba(settings, args.repeats)


if __name__ == "__main__":
    main()
