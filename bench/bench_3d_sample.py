"""The bundled 3D sample as a user meets it: what a click on Run costs and what it says.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_3d_sample.py [--sample t1_t2_motion_3d] [--small]
        [--threads 2] [--checkpoint unifuse-3d-phantom] [--weigh-network-field]

Runs ``FusionEngine.run_fusion`` (default settings, quality maps included: what the workbench's
Run does before it draws the layers) on the sample pair at the size ``unifuse view`` opens it
(``--small``: the 64 × 80 × 64 test size). Prints the shape, the wall time and each stage's, the
process's peak resident memory, the kept alignment estimate, the predicted degradation class
against the declared one, how many brain slices name the declared class with p ≥ 0.6 and how many rank it first, and the
suspicious slices of the quality maps.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from napari_unifuse.data import samples
from napari_unifuse.engine.inference import FusionEngine

SAMPLES = {"t1_t2_motion_3d": "t1-t2-motion", "ct_pet_lowdose_3d": "ct-pet-lowdose"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default="t1_t2_motion_3d", choices=sorted(SAMPLES))
    parser.add_argument("--small", action="store_true", help="the test size instead of the bundled one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom", help="a bundled name or a .safetensors path")
    parser.add_argument("--weigh-network-field", action="store_true",
                        help="the guard weighs the network's field although the checkpoint says not to (two passes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = samples.SMALL_SAMPLE_SHAPE_3D if args.small else samples.SAMPLE_SHAPE_3D
    pair = samples._sample_pair(SAMPLES[args.sample], 3, shape)
    engine = FusionEngine(args.checkpoint, device="cpu", weigh_network_field=True if args.weigh_network_field else None)
    start = time.perf_counter()
    result = engine.run_fusion(pair.reference, pair.moving)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # Slices through the head: the reference (a T1 in [0, 1] or a CT in HU) scaled to its own range.
    reference = pair.reference.array
    low, high = float(reference.min()), float(np.percentile(reference, 99))
    brain = np.flatnonzero(((reference - low) / (high - low)).reshape(shape[0], -1).mean(axis=1) > 0.05)
    declared = result.class_names.index(pair.degradation)
    named = int((result.slice_class_probs[brain, declared] >= 0.6).sum())
    on_top = int((result.slice_class_probs[brain].argmax(axis=1) == declared).sum())
    print(f"sample {args.sample} {shape}, {args.threads} thread(s): {seconds:.1f} s end to end, "
          f"peak resident memory {peak_gb:.1f} GB")
    print("stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.provenance["timings_s"].items()))
    print(f"tiles: {result.provenance['tile_count']} of {result.provenance['tile_shape']}; "
          f"alignment kept: {result.alignment_guard.kept if result.alignment_guard else 'n/a'}")
    print(f"class: predicted {result.predicted_class} "
          f"({', '.join(f'{k} {v:.2f}' for k, v in result.class_probs.items())}), declared {pair.degradation}; "
          f"{named} of {brain.size} brain slices name it with p >= 0.6, {on_top} rank it first")
    if result.quality is not None:
        suspicious = result.quality.suspicious_slices()
        print(f"quality maps: {len(suspicious)} of {result.quality.slice_count} slices suspicious: {suspicious}")


if __name__ == "__main__":
    main()
