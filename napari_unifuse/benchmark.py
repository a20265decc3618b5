"""Measurements behind ``unifuse bench``: speed, memory and FLOPs of UniFuse beside the classical tools.

Everything runs on synthetic brain-phantom pairs (``data.pairs.make_pair``: T2 with motion
artefacts, misaligned onto T1) with a known label, so the classical pipelines' alignment can be
scored. UniFuse is timed with random weights (speed does not depend on the weights; for its
accuracy see ``unifuse evaluate``).

* ``time_call`` -- warm-up, then repeats (median / min / max) within a time budget. Peak memory on
  CPU is the largest resident-set size (psutil, sampled every 5 ms in a thread): absolute, and
  above the level before the call. The increase is a lower bound (memory freed by an earlier run
  and kept by the allocator is reused unseen), the absolute peak an upper bound (it includes
  Python, torch and the inputs). On CUDA both come from ``torch.cuda.max_memory_allocated``.
* FLOPs per pass come from ``model.costs.measure`` (FlopCounterMode + the scan's analytic count);
  the model-only time is the engine's ``fuse`` stage, from its provenance.
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import psutil
import torch

from napari_unifuse.data.pairs import SyntheticPair, make_pair
from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms
from napari_unifuse.engine import classical
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import normalize_intensity
from napari_unifuse.metrics import registration_metrics
from napari_unifuse.model import mamba, matching
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.costs import measure as measure_module_costs
from napari_unifuse.model.mamba import MambaBlock, SelectiveScan
from napari_unifuse.model.scan import mamba_selective_scan_fn, selective_scan
from napari_unifuse.model.unifuse import UniFuse

_MEMORY_SAMPLE_S = 0.005
PAPER_FLOPS_160 = 395e9  # UniFuse, Table 1: Q_f = 395 G for a 160³ pair


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    runs: int
    peak_memory_mb: float  # increase over the level before the call
    peak_total_mb: float  # absolute peak (process RSS on CPU, allocated tensors on CUDA)
    warmed_up: bool

    def describe(self) -> str:
        spread = f" ({self.min_s:.3g}–{self.max_s:.3g})" if self.runs > 1 else ""
        note = "" if self.warmed_up else ", cold"
        return f"{self.median_s:.3g} s{spread} ×{self.runs}{note}"


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that holds, on exit, the peak memory in MB: [increase over the start, absolute]."""
    result = [0.0, 0.0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize()
        result[:] = [(torch.cuda.max_memory_allocated(device) - start) / 2**20,
                     torch.cuda.max_memory_allocated(device) / 2**20]
        return
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(_MEMORY_SAMPLE_S):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result[:] = [(peak[0] - start) / 2**20, peak[0] / 2**20]


def time_call(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 1,
              budget_s: float = 60.0) -> Timing:
    """Median/min/max wall time of ``fn`` over up to ``repeats`` runs after ``warmup`` runs.

    Runs stop early once ``budget_s`` is spent (at least one timed run). A warm-up run that alone
    exceeds the budget is kept as the only (cold) sample instead of being thrown away.
    """

    def one_run() -> tuple[float, list[float]]:
        with peak_memory(device) as memory:
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return seconds, memory

    samples, memories = [], []
    spent = 0.0
    for _ in range(warmup):
        seconds, memory = one_run()
        spent += seconds
        if seconds > budget_s:
            return Timing(seconds, seconds, seconds, 1, *memory, warmed_up=False)
    while len(samples) < max(1, repeats) and (not samples or spent < budget_s):
        seconds, memory = one_run()
        samples.append(seconds)
        memories.append(memory)
        spent += seconds
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples),
                  max(m[0] for m in memories), max(m[1] for m in memories), warmed_up=warmup > 0)


def phantom_pair(spatial_dims: int, side: int, seed: int = 0) -> SyntheticPair:
    """T2 with motion artefacts, misaligned, onto T1; both normalised to [0, 1]."""
    if spatial_dims == 2:
        images = make_brain_phantom_slices((side, side), ("t1", "t2"))
    else:
        images = make_brain_phantoms((side,) * 3, ("t1", "t2"))
    reference, label = (normalize_intensity(images[name], "mr")[0] for name in ("t1", "t2"))
    return make_pair(reference, label, "t1-t2-motion", seed)


def available_scan_backends(device: torch.device) -> list[str]:
    return ["mamba-ssm", "torch"] if device.type == "cuda" and mamba_selective_scan_fn() is not None else ["torch"]


@contextmanager
def forced_scan_backend(backend: str) -> Iterator[None]:
    """Make every Mamba block use ``backend`` (the model itself always asks for "auto")."""
    with mock.patch.object(mamba, "selective_scan", functools.partial(selective_scan, backend=backend)):
        yield


def size_label(dims: int, side: int) -> str:
    return f"{dims}D {side}{'²' if dims == 2 else '³'}"


@dataclass
class FuseResult:
    dims: int
    side: int
    backend: str
    timing: Timing
    model_seconds: float  # the engine's "fuse" stage of the last run: the network alone
    flops: float
    flops_measured: bool  # False: extrapolated linearly in the voxel count

    @property
    def label(self) -> str:
        return size_label(self.dims, self.side)

    @property
    def achieved_gflops(self) -> float:
        return self.flops / self.model_seconds / 1e9


def bench_fuse(engine: FusionEngine, pair: SyntheticPair, *, repeats: int,
               budget_s: float) -> tuple[Timing, dict[str, float]]:
    """End-to-end ``run_fusion`` timing and the last run's seconds per engine stage (``"fuse"``:
    the network alone)."""
    last: list = [None]

    def run() -> None:
        last[0] = engine.run_fusion(pair.reference, pair.moving)

    timing = time_call(run, engine.device, repeats=repeats, budget_s=budget_s)
    return timing, {stage: float(seconds) for stage, seconds in last[0].provenance["timings_s"].items()}


def model_flops(config: UniFuseConfig, side: int) -> float:
    return float(sum(cost.flops for cost in measure_module_costs(config, side)))


@dataclass
class ClassicalResult:
    label: str
    method: str
    seconds: float
    ncc: float
    ratio_to_unifuse: float


def bench_classical(pair: SyntheticPair, methods: list[str], rule: str, unifuse_seconds: float,
                    label: str) -> list[ClassicalResult]:
    """Each registration followed by ``rule``, timed once, with the aligned image's NCC to the label."""
    reference = pair.reference.array.astype(np.float32)
    moving = pair.moving.array.astype(np.float32)
    results = []
    for method in methods:
        start = time.perf_counter()
        registration = classical.register(method, reference, moving, pair.reference.geometry)
        classical.fuse_classical(rule, reference, registration.aligned)
        seconds = time.perf_counter() - start
        ncc = registration_metrics(registration.aligned, pair.label.array)["ncc"]
        results.append(ClassicalResult(label, f"{method} + {rule}", seconds, ncc, seconds / unifuse_seconds))
    return results


def bench_mamba_tokens(config: UniFuseConfig, lengths: list[int], device: torch.device, *, repeats: int,
                       budget_s: float) -> list[dict]:
    """A MambaBlock of the config's width alone vs the token count L, with its scan's share."""
    block = MambaBlock(config.embed_dim, config.d_state, config.d_conv, config.expand).eval().to(device)
    scan_seconds = [0.0]

    def start_scan(module, args):
        scan_seconds.append(time.perf_counter())

    def stop_scan(module, args, output):
        scan_seconds[0] += time.perf_counter() - scan_seconds.pop()

    hooks = [block.scan.register_forward_pre_hook(start_scan), block.scan.register_forward_hook(stop_scan)]
    rows = []
    try:
        for length in lengths:
            tokens = torch.randn(1, length, config.embed_dim, device=device)
            # The share is read within each timed run: a separate untimed run divided by the median of
            # the others read 126-270 % on a busy machine.
            shares: list[float] = []

            def timed_block() -> None:
                scan_seconds[0] = 0.0
                start = time.perf_counter()
                block(tokens)
                shares.append(scan_seconds[0] / (time.perf_counter() - start))

            with torch.inference_mode():
                timing = time_call(timed_block, device, repeats=repeats, budget_s=budget_s)
            rows.append({"tokens": length, "timing": timing,
                         "scan_share": float(np.median(shares[-timing.runs:])),
                         "scan_gflops": SelectiveScan.flops(1, block.inner_dim, length, config.d_state) / 1e9})
    finally:
        for hook in hooks:
            hook.remove()
    return rows


@dataclass
class TimeShares:
    """One forward pass split into disjoint parts that add up to ``total_s``, plus time spent
    inside those parts (``nested``: the selective scans, which run within DAPL and OUFR; FA has none)."""

    total_s: float
    parts: dict[str, float]
    nested: dict[str, float]


def module_time_shares(net: UniFuse, side: int, device: torch.device) -> TimeShares:
    """Seconds of one forward pass in the initial alignment (structural matching and its
    mutual-information refinement), in each top-level module, and in the rest ("other": warps,
    input checks); the selective scans' seconds as a nested part."""
    seconds: dict[str, float] = {}
    starts: dict[int, float] = {}

    def clock() -> float:
        # CUDA kernels run asynchronously: without a sync a part's time lands in whichever part waits next.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def add(key: str, start: float) -> None:
        seconds[key] = seconds.get(key, 0.0) + clock() - start

    def timed(key: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                add(key, start)
        return wrapper

    watched = dict(net.named_children())
    watched.update({f"scan:{name}": module for name, module in net.named_modules() if isinstance(module, SelectiveScan)})

    def pre(module, args):
        starts[id(module)] = clock()

    def post(name):
        key = "selective scans" if name.startswith("scan:") else name

        def hook(module, args, output):
            add(key, starts.pop(id(module)))
        return hook

    hooks = [h for name, module in watched.items()
             for h in (module.register_forward_pre_hook(pre), module.register_forward_hook(post(name)))]
    image = torch.rand(1, 1, *[side] * net.config.spatial_dims, device=device)
    try:
        with torch.inference_mode(), \
                mock.patch.object(net, "initial_alignment", timed("initial alignment", net.initial_alignment)), \
                mock.patch.object(matching, "mi_refinement", timed("mutual information", matching.mi_refinement)):
            start = clock()
            net(image, image)
            total = clock() - start
    finally:
        for hook in hooks:
            hook.remove()
    # The MI refinement (Adam on a control grid) runs inside the initial alignment: split it out.
    refinement = seconds.pop("mutual information", 0.0)
    alignment = seconds.pop("initial alignment", 0.0)
    nested = {"selective scans": seconds.pop("selective scans", 0.0)}
    parts = {"initial alignment: structural matching": alignment - refinement}
    if refinement:
        parts["initial alignment: mutual-information refinement (Adam)"] = refinement
    parts.update(seconds)
    parts["other"] = total - sum(parts.values())
    return TimeShares(total, parts, nested)


def profile_top_ops(net: UniFuse, side: int, device: torch.device, rows: int = 12) -> str:
    """torch.profiler's table of the operators with the most self time in one forward pass."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    image = torch.rand(1, 1, *[side] * net.config.spatial_dims, device=device)
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with torch.inference_mode(), profile(activities=activities) as profiler:
        net(image, image)
    return profiler.key_averages().table(sort_by=sort_key, row_limit=rows)


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 GEMM throughput: the practical roofline for conv/linear-heavy work."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    timing = time_call(lambda: a @ b, device, repeats=repeats, budget_s=10.0)
    return 2 * size**3 / timing.min_s / 1e9


def cpu_theoretical_gflops() -> tuple[float, str]:
    """cores × clock × FP32 FLOP per cycle, assuming two FMA pipes at the widest vector ISA."""
    flags, mhz = set(), 0.0
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":", 1)[1])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = 2 * 2 * lanes if "fma" in flags or "avx512f" in flags else 2 * lanes  # 2 pipes × (mul+add)
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    ghz = (mhz or (psutil.cpu_freq().max if psutil.cpu_freq() else 0.0)) / 1000
    return cores * ghz * per_cycle, (f"{cores} cores × {ghz:.2f} GHz × {per_cycle} FP32 FLOP/cycle "
                                     f"({'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'}, 2 FMA pipes)")


def to_jsonable(value: object) -> object:
    if isinstance(value, (Timing, FuseResult, ClassicalResult, TimeShares)):
        return {key: to_jsonable(item) for key, item in asdict(value).items()}
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
