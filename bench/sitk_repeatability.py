"""Does SimpleITK's registration give the same field twice, and what does repeatability cost?

``engine.classical.register_sitk`` runs ITK on one thread with a fixed sampling seed. This runs it
``--runs`` times on the same phantom pair as shipped, and again with ITK's default thread count
(what it did before), and prints per mode: seconds per run, the largest difference between any
run's field and the first's (voxels), and the NCC of the aligned image to the truth per run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sitk_repeatability.py [--side 160] [--runs 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np

from napari_unifuse import benchmark
from napari_unifuse.data.misalign import warp_array
from napari_unifuse.data.pairs import SyntheticPair
from napari_unifuse.engine import classical
from napari_unifuse.metrics import registration_metrics


def measure(pair: SyntheticPair, runs: int) -> tuple[list[float], float, list[float]]:
    reference = pair.reference.array.astype(np.float32)
    moving = pair.moving.array.astype(np.float32)
    seconds, fields, nccs = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        field = classical.register_sitk(reference, moving, pair.reference.geometry)
        seconds.append(time.perf_counter() - start)
        fields.append(field)
        nccs.append(registration_metrics(warp_array(moving, field), pair.label.array)["ncc"])
    spread = max(float(np.abs(field - fields[0]).max()) for field in fields)
    return seconds, spread, nccs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=160)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    pair = benchmark.phantom_pair(3, args.side)
    modes = {"one ITK thread (shipped)": contextlib.nullcontext,
             "ITK's default threads": _default_threads}
    rows = []
    for name, context in modes.items():
        with context():
            seconds, spread, nccs = measure(pair, args.runs)
        rows.append(f"| {name} | {' / '.join(f'{s:.1f}' for s in seconds)} | {spread:.3f} | "
                    f"{' / '.join(f'{n:.4f}' for n in nccs)} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"SimpleITK rigid + B-spline (`engine.classical.register_sitk`) on the {args.side}³ phantom pair of "
        f"`unifuse bench`, {args.runs} runs per mode",
        "",
        "| mode | seconds per run | largest field difference to run 1 (voxels) | NCC to truth per run |",
        "|---|---|---:|---|",
        *rows,
    ])
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")
    return 0


@contextlib.contextmanager
def _default_threads():
    """register_sitk without its one-thread setting: ITK's own default thread count."""
    original = classical._one_itk_thread
    classical._one_itk_thread = contextlib.nullcontext
    try:
        yield
    finally:
        classical._one_itk_thread = original


if __name__ == "__main__":
    raise SystemExit(main())
