"""Does the guard ever keep the network's own field (FA)? And what does weighing it cost?

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_network_field.py --regimes large mild none \\
        --out runs/network-field/val.jsonl [--harvard ../shared/data/harvard-aanlib] [--limit N]
    .venv/bin/python bench/probe_network_field.py --summarise runs/network-field/*.jsonl

Every pair of ``unifuse evaluate``'s Harvard validation split (the checkpoint's own, degraded
moving images), in each misalignment regime, runs through ``FusionEngine`` twice: with the guard
weighing the network's field beside the matching's (``weigh_network_field=True``: the network runs,
the guard decides, and the network runs again with the kept field unless it kept its own), and
without (the guard decides first, the network runs once). One JSON line per pair: the estimate
each run kept, both end-point errors against the synthetic field (whole grid and the reference's
tissue), the largest difference between the two runs' fused and aligned images, and both run
times (``quality=False``: the quality maps cost the same in both). ``--summarise`` prints, per
regime and task, how often each run kept each estimate, the pairs whose outputs differ and the
mean time of each.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard
from napari_unifuse.engine.alignment_guard import tissue_mask
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.metrics.registration import end_point_error
from napari_unifuse.model.checkpoint import read_metadata

REPOSITORY = Path(__file__).resolve().parents[1]
TASKS = ["CT", "PET", "SPECT"]


def probe(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    engines = {weighed: FusionEngine(args.checkpoint, device="cpu", weigh_network_field=weighed)
               for weighed in (True, False)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as log:
        for regime in args.regimes:
            pairs = pairs_from_harvard(args.harvard, "val", TASKS, args.limit, seed=0, size=None,
                                       none_fraction=0.0, cases=cases, regime=regime)
            for pair in pairs:
                record: dict = {"regime": regime, "task": pair.task, "pair": pair.name}
                outputs = {}
                tissue = tissue_mask(pair.reference.array.astype(np.float32))
                for weighed, engine in engines.items():
                    start = time.perf_counter()
                    result = engine.run_fusion(pair.reference, pair.moving, quality=False)
                    seconds = time.perf_counter() - start
                    key = "weighed" if weighed else "decided_first"
                    record[key] = {
                        "kept": result.alignment_guard.kept,
                        "seconds": seconds,
                        "epe": end_point_error(result.displacement, pair.displacement),
                        "epe_tissue": end_point_error(result.displacement, pair.displacement, tissue),
                    }
                    outputs[weighed] = result
                record["max_fused_difference"] = float(np.abs(
                    outputs[True].fused.array.astype(np.float64) - outputs[False].fused.array).max())
                record["max_aligned_difference"] = float(np.abs(
                    outputs[True].aligned.array.astype(np.float64) - outputs[False].aligned.array).max())
                print(json.dumps(record), file=log, flush=True)
                print(f"{regime} {pair.name}: kept {record['weighed']['kept']} / {record['decided_first']['kept']}, "
                      f"{record['weighed']['seconds']:.2f} / {record['decided_first']['seconds']:.2f} s", flush=True)


def summarise(paths: list[Path]) -> None:
    records = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[record["regime"], record["task"]].append(record)
    print("| regime | task | pairs | kept, network weighed | kept, decided first | outputs differ | "
          "EPE tissue weighed / first | seconds weighed / first |")
    print("|---|---|---:|---|---|---:|---|---|")
    for (regime, task), rows in sorted(groups.items()):
        def kept(key: str) -> str:
            return ", ".join(f"{name} {count}" for name, count in sorted(Counter(r[key]["kept"] for r in rows).items()))

        def mean(key: str, column: str) -> float:
            return float(np.mean([r[key][column] for r in rows]))

        differ = sum(r["max_fused_difference"] > 0 or r["max_aligned_difference"] > 0 for r in rows)
        print(f"| {regime} | {task} | {len(rows)} | {kept('weighed')} | {kept('decided_first')} | {differ} | "
              f"{mean('weighed', 'epe_tissue'):.2f} / {mean('decided_first', 'epe_tissue'):.2f} | "
              f"{mean('weighed', 'seconds'):.2f} / {mean('decided_first', 'seconds'):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, default=REPOSITORY.parent / "shared" / "data" / "harvard-aanlib")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    parser.add_argument("--regimes", nargs="+", default=["large", "mild", "none"])
    parser.add_argument("--limit", type=int, help="pairs per task (default: the whole split)")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "runs" / "network-field" / "val.jsonl")
    parser.add_argument("--summarise", type=Path, nargs="+", help="print the table of these JSON-lines files")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise)
    else:
        probe(args)


if __name__ == "__main__":
    main()
