"""`unifuse bench`: how fast, how big and how efficient UniFuse is here, beside SimpleITK and ANTs.

One run prints (and with ``--out`` writes ``<device>[-quick].md`` and ``.json``):

1. end-to-end ``fuse`` time (engine, warm-up then median/min/max) and peak memory for 2D 256²,
   3D 96³ and 160³ (256³ on CUDA), per available scan backend, paper preset;
2. the same pairs through SimpleITK rigid + B-spline and ANTs SyN, each then wavelet-fused: time,
   ratio to UniFuse, and the aligned image's NCC to the known label (identity for reference);
3. growth of time and memory with the volume size, and of one Mamba block's time with tokens L;
4. FLOPs per pass (``unifuse info``'s count) against the paper's 395 G at 160³, and achieved
   FLOP/s of the network against a measured GEMM and the CPU's theoretical peak;
5. where the time goes: the initial alignment, each module and the rest of one forward pass, the
   scans' share, torch.profiler's top ops.

``--quick`` runs tiny sizes (2D 64², 3D 32³) with the small preset and one repeat, for CI.
UniFuse has random weights here (speed does not depend on them); its accuracy: ``unifuse evaluate``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from napari_unifuse import benchmark
from napari_unifuse.cli.arguments import add_device_argument, positive_int, user_path
from napari_unifuse.engine import classical
from napari_unifuse.engine.device import resolve_device
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.outputs import check_writable_folder, write_files_together
from napari_unifuse.errors import InputError
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.unifuse import UniFuse

CLASSICAL_RULE = "wavelet"


@dataclass(frozen=True)
class Plan:
    preset: str
    fuse_sizes: tuple[tuple[int, int], ...]  # (spatial_dims, side)
    scaling_sides: tuple[int, ...]  # 3D
    token_lengths: tuple[int, ...]
    repeats: int
    budget_s: float  # per measurement
    flops_max_voxels: int  # larger inputs: FLOPs extrapolated linearly in voxels
    profile_size: tuple[int, int]
    classical_dims: tuple[int, ...]  # which fuse sizes also run the classical pipelines


def make_plan(quick: bool, device: torch.device) -> Plan:
    if quick:
        # Classical 3D is left out: SimpleITK's B-spline alone takes ~10 s even at 32³.
        return Plan("small", ((2, 64), (3, 32)), (16, 24, 40), (256, 1024, 4096), 1, 10.0, 40**3, (2, 64), (2,))
    sizes = ((2, 256), (3, 96), (3, 160)) + (((3, 256),) if device.type == "cuda" else ())
    return Plan("paper", sizes, (32, 48, 64, 80), (1024, 4096, 16384, 65536), 3, 150.0, 96**3, (2, 256), (2, 3))


def markdown(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def growth_table(scaling: list[dict]) -> str:
    """The growth section: one row per size (``side``, ``voxels``, ``timing``), smallest first.

    A cold row is a single run that overran its time budget during the warm-up (``Timing.warmed_up``
    false): its time holds one-off start-up costs, so no growth ratio is computed from it, neither
    for its row nor as the base of the others (the smallest warm row is)."""
    warm = [row for row in scaling if row["timing"].warmed_up]

    def ratio(row: dict) -> str:
        if not row["timing"].warmed_up:
            return "– (cold)"
        base = warm[0]
        return f"{(row['timing'].median_s / base['timing'].median_s) / (row['voxels'] / base['voxels']):.2f}"

    table = markdown(
        ["input", "voxels", "time: median (min–max) × runs", "µs / voxel", "time ratio / voxel ratio",
         "peak memory: increase / total (MB)", "increase bytes / voxel"],
        [[benchmark.size_label(3, row["side"]), f"{row['voxels']:,}", row["timing"].describe(),
          f"{1e6 * row['timing'].median_s / row['voxels']:.3g}", ratio(row),
          f"{row['timing'].peak_memory_mb:.0f} / {row['timing'].peak_total_mb:.0f}",
          f"{row['timing'].peak_memory_mb * 2**20 / row['voxels']:.0f}"]
         for row in scaling])
    if len(warm) == len(scaling):
        return table
    return table + ("\n\nCold: one run whose warm-up alone overran the time budget, start-up costs included; "
                    "no ratio is computed from it.")


def prepare_out_folder(out: Path) -> None:
    """Create ``--out`` now and check that files can be written there: the full benchmark takes
    long, and a path it cannot write to would otherwise only be refused once all of it has run."""
    if out.exists() and not out.is_dir():
        raise InputError("--out is a file; give a folder for the report", out)
    check_writable_folder(out)


def run(args: argparse.Namespace) -> int:
    if args.out:
        prepare_out_folder(args.out)
    device = resolve_device(args.device)
    plan = make_plan(args.quick, device)
    # --quick's tiny tensors gain nothing from a thread pool, and on a busy CI runner OpenMP threads
    # waiting for a core made it 5× slower (measured on a shared 2-core machine).
    threads = args.threads or (1 if args.quick else None)
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    sections: list[str] = []
    report: dict[str, object] = {"device": str(device), "preset": plan.preset, "quick": args.quick,
                                 "torch_threads": torch.get_num_threads()}

    def emit(title: str, body: str) -> None:
        text = f"## {title}\n\n{body}\n"
        sections.append(text)
        print(text, flush=True)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads"
    print(f"# unifuse bench: {plan.preset} preset on {device} ({machine})\n", flush=True)

    # 1 + 4: end-to-end fuse per size and scan backend, with FLOPs.
    fuse_results: list[benchmark.FuseResult] = []
    pairs = {}
    measured_flops: dict[int, tuple[int, float]] = {}  # dims -> (voxels, flops) of the largest measured size
    for dims, side in plan.fuse_sizes:
        config = getattr(UniFuseConfig, plan.preset)(dims)
        pairs[dims, side] = pair = benchmark.phantom_pair(dims, side)
        voxels = side**dims
        if voxels <= plan.flops_max_voxels:
            flops, exact = benchmark.model_flops(config, side), True
            measured_flops[dims] = (voxels, flops)
        else:
            base_voxels, base_flops = measured_flops[dims]
            flops, exact = base_flops * voxels / base_voxels, False
        for backend in benchmark.available_scan_backends(device):
            with benchmark.forced_scan_backend(backend):
                engine = FusionEngine(UniFuse(config), device=str(device))
                timing, stages = benchmark.bench_fuse(engine, pair, repeats=plan.repeats, budget_s=plan.budget_s)
            fuse_results.append(benchmark.FuseResult(dims, side, backend, timing, stages["fuse"], flops, exact))
            print(f"  fuse {benchmark.size_label(dims, side)} [{backend}]: {timing.describe()}", flush=True)
    emit("End-to-end fuse (engine.run_fusion)", markdown(
        ["input", "scan backend", "time: median (min–max) × runs", "network alone (s)", "peak memory: increase / total (MB)"],
        [[r.label, r.backend, r.timing.describe(), f"{r.model_seconds:.3g}",
          f"{r.timing.peak_memory_mb:.0f} / {r.timing.peak_total_mb:.0f}"] for r in fuse_results]))

    # 2: classical pipelines on the same pairs.
    methods = ["identity", *(m for m in classical.available_registration_methods() if m != "identity")]
    classical_results: list[benchmark.ClassicalResult] = []
    for (dims, side), pair in pairs.items():
        if dims not in plan.classical_dims or (dims == 3 and args.classical_max_side and side > args.classical_max_side):
            continue
        unifuse_seconds = next(r.timing.median_s for r in fuse_results if r.label == benchmark.size_label(dims, side))
        for result in benchmark.bench_classical(pair, methods, CLASSICAL_RULE, unifuse_seconds, benchmark.size_label(dims, side)):
            classical_results.append(result)
            print(f"  {result.method} {result.label}: {result.seconds:.3g} s, NCC {result.ncc:.3f}", flush=True)
    skipped = "" if not args.classical_max_side else f" Volumes larger than {args.classical_max_side}³ skipped."
    unavailable = "" if classical.ants_available() else " ANTsPy (antspyx) is not installed: no ANTs rows."
    emit("Classical registration + wavelet fusion on the same pairs", markdown(
        ["input", "pipeline", "time (s)", "time / UniFuse", "NCC aligned vs label"],
        [[r.label, r.method, f"{r.seconds:.3g}", f"{r.ratio_to_unifuse:.3g}", f"{r.ncc:.3f}"]
         for r in classical_results])
        + f"\n\nOne run each; UniFuse time = its end-to-end median above.{skipped}{unavailable}")

    # 3: growth with volume size and with tokens.
    config_3d = getattr(UniFuseConfig, plan.preset)(3)
    scaling = []
    measured_sides = {side for dims, side in plan.fuse_sizes if dims == 3}
    for side in sorted(set(plan.scaling_sides) - measured_sides):
        engine = FusionEngine(UniFuse(config_3d), device=str(device))
        timing, stages = benchmark.bench_fuse(engine, benchmark.phantom_pair(3, side),
                                              repeats=plan.repeats, budget_s=plan.budget_s / 3)
        scaling.append({"side": side, "voxels": side**3, "timing": timing, "network_s": stages["fuse"]})
    # The end-to-end 3D sizes extend the curve (first backend only, like the rows above).
    scaling += [{"side": r.side, "voxels": r.side**3, "timing": r.timing, "network_s": r.model_seconds}
                for r in fuse_results if r.dims == 3 and r.backend == fuse_results[0].backend]
    scaling.sort(key=lambda row: row["voxels"])
    emit("Growth with volume size (3D, end to end)", growth_table(scaling))
    tokens = benchmark.bench_mamba_tokens(config_3d, list(plan.token_lengths), device, repeats=plan.repeats,
                                          budget_s=plan.budget_s / 5)
    emit(f"One Mamba block (dim {config_3d.embed_dim}, N {config_3d.d_state}) vs tokens L", markdown(
        ["L", "time (ms)", "µs / token", "scan share", "scan GFLOP/s"],
        [[f"{row['tokens']:,}", f"{1e3 * row['timing'].median_s:.3g}",
          f"{1e6 * row['timing'].median_s / row['tokens']:.3g}", f"{100 * row['scan_share']:.0f} %",
          f"{row['scan_gflops'] / (row['scan_share'] * row['timing'].median_s):.3g}"] for row in tokens]))

    # 4: FLOPs and efficiency.
    gemm = benchmark.matmul_gflops(device)
    peak_rows = [["measured float32 GEMM (2048²)", f"{gemm:.1f}"]]
    if device.type == "cpu":
        theoretical, how = benchmark.cpu_theoretical_gflops()
        peak_rows.append([f"theoretical: {how}", f"{theoretical:.1f}"])
    flops_rows = [[r.label, r.backend, f"{r.flops / 1e9:.1f}" + ("" if r.flops_measured else " (extrapolated)"),
                   f"{r.achieved_gflops:.2f}", f"{100 * r.achieved_gflops / gemm:.1f} %"] for r in fuse_results]
    paper_row = next((r for r in fuse_results if r.label == benchmark.size_label(3, 160)), None)
    paper_note = ""
    if paper_row is not None:
        paper_note = (f"\n\nAt 160³ our count is {paper_row.flops / 1e9:.0f} GFLOPs per pass vs the paper's "
                      f"{benchmark.PAPER_FLOPS_160 / 1e9:.0f} G (Table 1), ratio "
                      f"{paper_row.flops / benchmark.PAPER_FLOPS_160:.2f}.")
    emit("FLOPs and achieved throughput", markdown(["peak", "GFLOP/s"], peak_rows) + "\n\n" + markdown(
        ["input", "backend", "GFLOPs / pass", "achieved GFLOP/s (network)", "of GEMM peak"], flops_rows)
        + "\n\nFLOPs: FlopCounterMode for convs/matmuls + analytic selective-scan count (unifuse info); "
          "element-wise work is not counted. Extrapolated sizes scale the largest counted size by voxels."
        + paper_note)

    # 5: where the time goes.
    dims, side = plan.profile_size
    net = UniFuse(getattr(UniFuseConfig, plan.preset)(dims)).eval().to(device)
    shares = benchmark.module_time_shares(net, side, device)
    total = shares.total_s
    emit(f"Where the time goes ({benchmark.size_label(dims, side)}, one forward pass, {total:.3g} s)", markdown(
        ["part", "seconds", "share"],
        [[name, f"{seconds:.3g}", f"{100 * seconds / total:.0f} %"]
         for name, seconds in sorted(shares.parts.items(), key=lambda item: -item[1])]
        + [[f"(within the modules) {name}", f"{seconds:.3g}", f"({100 * seconds / total:.0f} %)"]
           for name, seconds in shares.nested.items()])
        + "\n\nThe parts add up to the whole pass; the rows in parentheses are time spent inside them."
        + "\n\n```\n" + benchmark.profile_top_ops(net, side, device) + "```")

    report.update(fuse=fuse_results, classical=classical_results, scaling=scaling, tokens=tokens,
                  gemm_gflops=gemm, forward_seconds=shares)
    if args.out:
        stem = device.type + ("-quick" if args.quick else "")
        title = f"# unifuse bench: {plan.preset} preset on {device} ({machine})\n\n"
        texts = {f"{stem}.md": title + "\n".join(sections),
                 f"{stem}.json": json.dumps(benchmark.to_jsonable(report), indent=2) + "\n"}
        # Together: a full disk leaves the earlier report whole, and says so in one line.
        write_files_together(args.out, {name: lambda path, text=text: path.write_text(text, encoding="utf-8")
                                        for name, text in texts.items()})
        print(f"wrote {args.out / stem}.md and .json")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="time, memory and FLOPs of UniFuse vs SimpleITK/ANTs on phantom pairs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, small preset, one repeat (CI)")
    add_device_argument(parser)
    parser.add_argument("--out", type=user_path, help="folder for <device>[-quick].md and .json (created, and checked "
                                                "writable, before measuring)")
    parser.add_argument("--threads", type=positive_int,
                        help="torch CPU threads (default: 1 with --quick, else torch's choice); on a shared, busy "
                             "machine use 1: OpenMP threads waiting for a contended core can slow the scan's "
                             "many small ops 100×")
    parser.add_argument("--classical-max-side", type=positive_int,
                        help="skip the classical pipelines on volumes larger than this per side (ANTs at 160³ is slow)")
    parser.set_defaults(func=run)
