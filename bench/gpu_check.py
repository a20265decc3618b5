"""The first GPU: is everything there and right, and how fast? (``bench/gpu_check.sh`` runs this.)

Four checks, each with its own time budget so that the whole fits in 8 minutes on one GPU:

1. ``scan``   mamba-ssm's ``selective_scan_fn`` (through ``model.scan.selective_scan``,
              backend "mamba-ssm", which adds the initial state in closed form) against the
              chunked torch scan, forward (output and last state) and backward (every input's
              gradient), in float32 and bfloat16, each within a tolerance of its dtype.
2. ``fuse``   ``FusionEngine.run_fusion`` end to end on a 160³ phantom pair with the bundled 3D
              checkpoint (``benchmark.phantom_pair``), once per scan backend available.
3. ``memory`` the peak of ``torch.cuda.max_memory_allocated`` during each fusion and training run.
4. ``train``  50 training steps of the paper preset (``model.preset: paper`` on
              ``configs/phantom3d.yaml``, which needs no external data), seconds per step.

Writes ``OUT/gpu_check.json`` and prints one line per check; exits 1 when a check fails. On a CPU
the same code runs with ``--device cpu`` (the scan check then compares the torch scan against the
sequential reference scan), which is how ``tests/bench/test_gpu_check.py`` tests it.

  python bench/gpu_check.py --out bench/results/gpu [--size 160] [--train-steps 50] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("scan", "fuse", "train")
# Largest |candidate − baseline| allowed, relative to the baseline's largest magnitude. float32:
# both scans accumulate in float32 over a few hundred tokens (orders differ: chunked vs fused).
# bfloat16: inputs and outputs carry 8 mantissa bits (relative step 2^-8 ≈ 0.004), and the
# gradients of A and B sum thousands of such products.
TOLERANCES = {torch.float32: 2e-4, torch.bfloat16: 3e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- 1. the selective scan ---------------------------------------------------------------------
@dataclass
class ScanComparison:
    dtype: str
    candidate: str
    baseline: str
    tolerance: float
    errors: dict[str, float] = field(default_factory=dict)  # tensor name -> relative max error

    @property
    def passed(self) -> bool:
        return all(error <= self.tolerance for error in self.errors.values())

    def describe(self) -> str:
        worst = max(self.errors, key=self.errors.get)
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.candidate} vs {self.baseline}, {self.dtype}: worst {worst} {self.errors[worst]:.2e} "
                f"(tolerance {self.tolerance:.0e}) {verdict}")


def scan_inputs(dtype: torch.dtype, device: torch.device, *, batch: int = 2, dim: int = 32, dstate: int = 16,
                length: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs as a Mamba block makes them: u, delta, z, B, C in ``dtype`` (what autocast feeds the
    kernel); A, D, delta_bias and the initial state in float32, as mamba-ssm keeps them."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    low = {
        "u": normal(batch, dim, length), "delta": normal(batch, dim, length, scale=0.5),
        "z": normal(batch, dim, length), "B": normal(batch, dstate, length), "C": normal(batch, dstate, length),
    }
    full = {
        "A": -torch.exp(normal(dim, dstate, scale=0.5)), "D": normal(dim), "delta_bias": normal(dim, scale=0.1),
        "initial_state": normal(batch, dim, dstate, scale=0.5),
    }
    tensors = {**{k: v.to(dtype) for k, v in low.items()}, **full}
    return {name: tensor.to(device).requires_grad_() for name, tensor in tensors.items()}


def _outputs_and_gradients(scan: Callable, inputs: dict[str, torch.Tensor], weights: tuple[torch.Tensor, torch.Tensor],
                           as_float32: bool) -> dict[str, torch.Tensor]:
    leaves = {name: tensor.detach().clone().requires_grad_() for name, tensor in inputs.items()}
    # The baseline sees the very same (already rounded) values, but computes in float32.
    used = {name: tensor.float() if as_float32 else tensor for name, tensor in leaves.items()}
    out, last = scan(**used, delta_softplus=True, return_last_state=True)
    loss = (out.float() * weights[0]).sum() + (last.float() * weights[1]).sum()
    loss.backward()
    return {"out": out.detach().float(), "last_state": last.detach().float(),
            **{f"grad_{name}": leaf.grad.float() for name, leaf in leaves.items()}}


def compare_scans(candidate: Callable, baseline: Callable, dtype: torch.dtype, device: torch.device, *,
                  names: tuple[str, str] = ("candidate", "baseline"), **shape: int) -> ScanComparison:
    """Forward (output, last state) and backward (gradient of every input) of ``candidate`` on
    inputs in ``dtype`` against ``baseline`` computed in float32 on the same values; errors are
    max |difference| relative to the baseline's largest magnitude."""
    inputs = scan_inputs(dtype, device, **shape)
    batch, dim, length = inputs["u"].shape
    generator = torch.Generator().manual_seed(1)
    weights = (torch.randn(batch, dim, length, generator=generator).to(device),
               torch.randn(batch, dim, inputs["A"].shape[1], generator=generator).to(device))
    got = _outputs_and_gradients(candidate, inputs, weights, as_float32=False)
    want = _outputs_and_gradients(baseline, inputs, weights, as_float32=True)
    errors = {name: float((got[name] - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-12))
              for name in want}
    return ScanComparison(str(dtype).removeprefix("torch."), *names, TOLERANCES[dtype], errors)


def scan_check(device: torch.device) -> list[ScanComparison]:
    """On CUDA: mamba-ssm against the torch scan. Elsewhere: the torch scan against the sequential
    reference (what the CPU tests pin down). bfloat16 on both."""
    from napari_unifuse.model.scan import mamba_selective_scan_fn, selective_scan
    from napari_unifuse.model.scan_reference import selective_scan_reference

    def backend(name: str) -> Callable:
        return lambda **kwargs: selective_scan(**kwargs, backend=name)

    if device.type == "cuda":
        if mamba_selective_scan_fn() is None:
            raise RuntimeError("mamba-ssm does not import: install the cuda extra first (gpu_check.sh WHEELS)")
        pair, names = (backend("mamba-ssm"), backend("torch")), ("mamba-ssm", "torch")
    else:
        pair, names = (backend("torch"), selective_scan_reference), ("torch", "reference")
    return [compare_scans(*pair, dtype, device, names=names) for dtype in DTYPES.values()]


# ---- 2./3. fusion at 160³, with memory ----------------------------------------------------------
@dataclass
class FuseCheck:
    side: int
    backend: str
    seconds: float
    network_seconds: float
    peak_memory_mb: float
    stages_s: dict[str, float]  # the engine's seconds per stage: what the GPU does not speed up shows here
    warmed_up: bool


def fuse_check(device: torch.device, side: int, checkpoint: str = "unifuse-3d-phantom",
               budget_s: float = 90.0) -> list[FuseCheck]:
    """End-to-end fusion of a ``side``³ phantom pair, once per scan backend, after a warm-up run (the
    first CUDA call pays for context creation and kernel loading) unless that alone took longer
    than ``budget_s``."""
    from napari_unifuse.benchmark import available_scan_backends, bench_fuse, forced_scan_backend, phantom_pair
    from napari_unifuse.engine.inference import FusionEngine

    engine = FusionEngine(checkpoint, device=device.type)
    pair = phantom_pair(3, side)
    checks = []
    for backend in available_scan_backends(device):
        with forced_scan_backend(backend):
            timing, stages = bench_fuse(engine, pair, repeats=1, budget_s=budget_s)
        checks.append(FuseCheck(side, backend, timing.median_s, stages["fuse"], timing.peak_total_mb, stages,
                                 timing.warmed_up))
    return checks


# ---- 4. training steps of the paper preset -------------------------------------------------------
@dataclass
class TrainCheck:
    config: str
    preset: str
    steps: int
    seconds_per_step: float
    final_loss: float | None
    peak_memory_mb: float


def train_check(device: torch.device, config_path: Path, steps: int, run_dir: Path, preset: str = "paper",
                overrides: dict[str, dict] | None = None) -> TrainCheck:
    """``steps`` optimiser steps of ``config_path`` with the model preset ``preset``; no validation
    or checkpoint before the end (they would be timed as steps)."""
    from napari_unifuse.benchmark import peak_memory
    from napari_unifuse.training.config import load_config
    from napari_unifuse.training.trainer import train

    config = load_config(config_path)
    sections = {"model": {"preset": preset},
                "train": {"max_steps": steps, "val_every": steps, "checkpoint_every": steps, "log_every": steps,
                          "val_batches": 1}}
    for name, values in (overrides or {}).items():
        sections[name] = {**sections.get(name, {}), **values}
    config = config.with_overrides(**sections)
    with peak_memory(device) as memory:
        result = train(config, run_dir, device=device.type, progress=False, stop_at_step=steps, overwrite=True)
    return TrainCheck(str(config_path), preset, result.step, result.seconds_per_step, _last_loss(run_dir), memory[1])


def _last_loss(run_dir: Path) -> float | None:
    """The total loss of the last logged training step (the trainer's ``log.jsonl``)."""
    log = run_dir / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    totals = [row["total"] for row in rows if row.get("kind") == "train"]
    return float(totals[-1]) if totals else None


# ---- the command line ----------------------------------------------------------------------------
def cuda_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The ``cuda`` extra's requirements, read from pyproject so that the script installs exactly
    what the package declares."""
    with pyproject.open("rb") as stream:
        return list(tomllib.load(stream)["project"]["optional-dependencies"]["cuda"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--size", type=int, default=160, help="side of the fused phantom volume")
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--train-config", type=Path, default=REPO / "configs" / "phantom3d.yaml")
    parser.add_argument("--preset", choices=("paper", "small"), default="paper")
    parser.add_argument("--print-cuda-requirements", action="store_true",
                        help="print the cuda extra's requirements (one per line) and exit")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")
    return parser


def plan(args: argparse.Namespace, device: torch.device) -> list[str]:
    steps = {
        "scan": "selective scan: " + ("mamba-ssm vs torch" if device.type == "cuda" else "torch vs reference")
                + " forward + backward, float32 and bfloat16",
        "fuse": f"fusion of a {args.size}³ phantom pair with unifuse-3d-phantom, per scan backend, with peak memory",
        "train": f"{args.train_steps} training steps of {args.train_config.name} with the {args.preset} preset",
    }
    return [steps[check] for check in args.checks]


def run_check(check: str, args: argparse.Namespace, device: torch.device,
              report: dict[str, object]) -> tuple[list[str], bool]:
    """Run one check, add its figures to ``report``; its printed lines and whether it failed."""
    if check == "scan":
        comparisons = scan_check(device)
        report["scan"] = [{**asdict(c), "passed": c.passed} for c in comparisons]
        return [c.describe() for c in comparisons], not all(c.passed for c in comparisons)
    if check == "fuse":
        fusions = fuse_check(device, args.size)
        report["fuse"] = [asdict(f) for f in fusions]
        return [f"{f.side}³ with {f.backend}: {f.seconds:.2f} s end to end{'' if f.warmed_up else ' (cold)'} "
                f"({f.network_seconds:.2f} s network), peak {f.peak_memory_mb:.0f} MB; stages "
                + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in f.stages_s.items())
                for f in fusions], False
    trained = train_check(device, args.train_config, args.train_steps, args.out / "train-run", args.preset)
    report["train"] = asdict(trained)
    return [f"{trained.steps} steps of {trained.preset}: {trained.seconds_per_step:.3f} s/step, "
            f"peak {trained.peak_memory_mb:.0f} MB"], False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_cuda_requirements:
        print("\n".join(cuda_requirements()))
        return 0
    if args.size < 8 or args.train_steps < 1:
        print("gpu_check: --size must be >= 8 and --train-steps >= 1", file=sys.stderr)
        return 2
    if "train" in args.checks and not args.train_config.is_file():
        print(f"gpu_check: no training config {args.train_config}", file=sys.stderr)
        return 2
    from napari_unifuse.engine.device import resolve_device

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}):")
    for line in plan(args, device):
        print(f"  - {line}")
    if args.dry_run:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    failed = False
    report_path = args.out / "gpu_check.json"
    for check in args.checks:
        started = time.perf_counter()
        try:
            lines, check_failed = run_check(check, args, device, report)
        except Exception as error:  # noqa: BLE001 - one check's failure must not hide the others' figures
            report[check] = {"error": f"{type(error).__name__}: {error}"}
            lines, check_failed = [f"FAILED: {type(error).__name__}: {error}"], True
        failed |= check_failed
        report[f"{check}_wall_s"] = round(time.perf_counter() - started, 2)
        for line in lines:
            print(f"[{check}] {line}", flush=True)
        # Written after every check, so that a run stopped by its time limit keeps what it measured.
        report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"gpu_check: {'FAILED' if failed else 'all checks passed'} -> {report_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
