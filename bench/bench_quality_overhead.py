"""Time the quality stage adds to a default run on the bundled 3D sample (target: at most 30 %).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_quality_overhead.py [--sample t1_t2_motion_3d]
        [--repeats 3] [--threads 1]

Runs ``FusionEngine.run_fusion`` on the sample pair with ``quality=False`` and with the default
quality settings (fidelity maps + ``engine.uncertainty.DEFAULT_PASSES`` perturbed passes),
alternately, ``--repeats`` times each. Prints the fastest end-to-end time of each and their ratio,
and, within each run with quality, the quality stage's seconds against the other stages' of the
same run: on a shared machine that share is the robust number (the end-to-end times of two runs
differ by whatever the neighbours did meanwhile).
"""

from __future__ import annotations

import argparse
import time

import torch

from napari_unifuse.data.samples import SAMPLE_SHAPE_2D, SMALL_SAMPLE_SHAPE_3D, _sample_pair
from napari_unifuse.engine.inference import FusionEngine

SAMPLES = {"t1_t2_motion_3d": ("t1-t2-motion", 3, "unifuse-3d-phantom"),
           "ct_pet_lowdose_3d": ("ct-pet-lowdose", 3, "unifuse-3d-phantom"),
           "mri_ct_metal_2d": ("mri-ct-metal", 2, "unifuse-2d-harvard")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default="t1_t2_motion_3d", choices=sorted(SAMPLES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task, ndim, checkpoint = SAMPLES[args.sample]
    # The size the overhead was measured at; bench/bench_3d_sample.py times the clinical-size sample.
    pair = _sample_pair(task, ndim, SMALL_SAMPLE_SHAPE_3D if ndim == 3 else SAMPLE_SHAPE_2D)
    engine = FusionEngine(checkpoint, device="cpu")
    engine.run_fusion(pair.reference, pair.moving, quality=False)  # warm-up: first-call allocations
    plain, with_quality, parts, shares = [], [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        engine.run_fusion(pair.reference, pair.moving, quality=False)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = engine.run_fusion(pair.reference, pair.moving)
        with_quality.append(time.perf_counter() - start)
        parts.append(result.quality.seconds)
        timings = result.provenance["timings_s"]
        shares.append(timings["quality"] / (sum(timings.values()) - timings["quality"]))
    best_plain, best_quality = min(plain), min(with_quality)
    fastest_parts = {name: min(p[name] for p in parts) for name in parts[0]}
    print(f"sample {args.sample} {tuple(pair.reference.array.shape)}, {args.threads} thread(s), "
          f"{args.repeats} repeats, kept field: {result.alignment_guard.kept}")
    print(f"run without quality: {best_plain:.2f} s (all: {', '.join(f'{t:.2f}' for t in plain)})")
    print(f"run with quality:    {best_quality:.2f} s (all: {', '.join(f'{t:.2f}' for t in with_quality)})")
    print("quality stage parts (fastest): " + ", ".join(f"{k} {v:.2f} s" for k, v in fastest_parts.items()))
    print(f"overhead ratio (fastest with / fastest without - 1): {best_quality / best_plain - 1:.1%}")
    print(f"quality stage / the other stages of the same run: {', '.join(f'{share:.1%}' for share in shares)} "
          f"(median {sorted(shares)[len(shares) // 2]:.1%})")


if __name__ == "__main__":
    main()
