"""UniFuse with its bundled 3-D checkpoint against SimpleITK and ANTs on clinical-size 3-D pairs, in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_3d_pairs.py [--pairs motion-160 rigid-inverted-160 motion-256x256x180]
        [--methods sitk ants] [--also-weighed] [--also-without-dense] [--out bench/results/bench_3d_pairs.md]

Pairs (MNI phantoms, ``data.phantoms``; the truth is the clean moving image on the reference grid):

* ``motion-160``: ``benchmark.phantom_pair`` at 160³: T2 with motion artefacts, misaligned (rigid +
  elastic) onto T1 -- the pair of ``unifuse bench``.
* ``rigid-inverted-160``: a T1 reference at 160³ and, as the moving image, the same T1 with its
  contrast inverted inside the head, rigidly moved (5° about each axis, 6/-4/3 mm) and sampled on a
  coarser 128³ grid -- issue 18's rigid cross-contrast pair.
* ``motion-256x256x180``: the motion pair on a 256×256×180 grid.
* ``motion-512x512x200``: the motion pair on a CT-sized 512×512×200 grid (not run by default: about
  5 minutes for UniFuse alone on two cores).

Each method is timed once, end to end (UniFuse: ``FusionEngine.run_fusion`` on the pair as files
would give it; classical: resampling onto the reference grid, registration and wavelet fusion),
with the peak resident memory of the process and the NCC of the aligned moving image to the truth
inside the head. The machine load (``os.getloadavg``) is printed beside every row: the machine is
shared and timings under load are upper bounds. ``--also-weighed`` adds a second UniFuse row whose
guard weighs the network's own field although the checkpoint says not to (the two-pass engine of
before 2026-12-05), for a before/after in one run; ``--also-without-dense`` one whose guard does
not weigh the dense MIND refinement of the matching's field (the engine before the checkpoint asked
for it).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from napari_unifuse import benchmark
from napari_unifuse.data.misalign import warp_array
from napari_unifuse.data.pairs import make_pair
from napari_unifuse.data.phantoms import make_brain_phantoms
from napari_unifuse.engine import classical
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import ImageVolume, normalize_intensity, resample_to_reference
from napari_unifuse.metrics import registration_metrics

HEAD = 0.05  # normalised truth intensity above which a voxel is in the head


@dataclass
class BenchPair:
    name: str
    reference: ImageVolume
    moving: ImageVolume  # possibly on its own grid
    truth: ImageVolume  # clean moving contrast on the reference grid


def motion_pair(shape: tuple[int, int, int], seed: int = 0) -> BenchPair:
    images = make_brain_phantoms(shape, ("t1", "t2"))
    reference, label = (normalize_intensity(images[name], "mr")[0] for name in ("t1", "t2"))
    pair = make_pair(reference, label, "t1-t2-motion", seed)
    return BenchPair("motion-" + "x".join(map(str, shape)), pair.reference, pair.moving, pair.label)


def inverted(image: ImageVolume) -> ImageVolume:
    array = image.array / image.array.max()
    head = array > HEAD
    return replace(image, array=np.where(head, 1.05 - array, 0.0).astype(np.float32))


def rigid_inverted_pair(side: int = 160, moving_side: int = 128) -> BenchPair:
    reference = make_brain_phantoms((side,) * 3, ("t1",))["t1"]
    coarse = make_brain_phantoms((moving_side,) * 3, ("t1",))["t1"]
    truth = inverted(reference)
    moved = inverted(coarse)
    # Rigid motion about the volume centre in millimetres, applied on the coarse grid.
    spacing = coarse.geometry.spacing
    rotation = Rotation.from_euler("xyz", [5, 5, 5], degrees=True).as_matrix()
    shift_mm = np.array([6.0, -4.0, 3.0])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in coarse.array.shape], indexing="ij"))
    centre = (np.array(coarse.array.shape) - 1) / 2
    points_mm = (grid.reshape(3, -1) - centre[:, None]) * spacing[:, None]
    sampled_mm = rotation @ points_mm + shift_mm[:, None]
    displacement = (sampled_mm / spacing[:, None] + centre[:, None] - grid.reshape(3, -1)).reshape(grid.shape)
    moving = replace(moved, array=np.clip(warp_array(moved.array, displacement, order=1), 0, None).astype(np.float32))
    return BenchPair(f"rigid-inverted-{side}", reference, moving, truth)


PAIRS = {
    "motion-160": lambda: motion_pair((160, 160, 160)),
    "rigid-inverted-160": rigid_inverted_pair,
    "motion-256x256x180": lambda: motion_pair((256, 256, 180)),
    "motion-512x512x200": lambda: motion_pair((512, 512, 200)),
}
DEFAULT_PAIRS = ("motion-160", "rigid-inverted-160", "motion-256x256x180")


def head_ncc(aligned: np.ndarray, truth: np.ndarray) -> float:
    return registration_metrics(aligned, truth)["ncc"]


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def run_unifuse(engine: FusionEngine, pair: BenchPair, method: str = "unifuse") -> dict:
    with benchmark.peak_memory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        result = engine.run_fusion(pair.reference, pair.moving)
        seconds = time.perf_counter() - start
    aligned = result.aligned.array.astype(np.float32)
    return {"method": method, "seconds": seconds, "peak_gb": memory[1] / 1024,
            "ncc": head_ncc(aligned, pair.truth.array), "guard": result.alignment_guard.kept,
            "class": max(result.class_probs, key=result.class_probs.get),
            "timings": result.provenance["timings_s"], "tiles": result.provenance["tile_count"]}


def run_classical(method: str, pair: BenchPair) -> dict:
    with benchmark.peak_memory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        moving = resample_to_reference(pair.moving, pair.reference).array.astype(np.float32)
        reference = pair.reference.array.astype(np.float32)
        registration = classical.register(method, reference, moving, pair.reference.geometry)
        classical.fuse_classical("wavelet", reference, registration.aligned)
        seconds = time.perf_counter() - start
    return {"method": f"{method} + wavelet", "seconds": seconds, "peak_gb": memory[1] / 1024,
            "ncc": head_ncc(registration.aligned, pair.truth.array)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), choices=list(PAIRS))
    parser.add_argument("--methods", nargs="+", default=["sitk", "ants"])
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--also-weighed", action="store_true", help="add UniFuse with the network field weighed")
    parser.add_argument("--also-without-dense", action="store_true",
                        help="add UniFuse without the dense refinement among the guard's candidates")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    engine = FusionEngine(args.checkpoint, device="cpu")
    variants = [(label, FusionEngine(args.checkpoint, device="cpu", **option)) for label, option, wanted in (
        ("unifuse (network field weighed)", {"weigh_network_field": True}, args.also_weighed),
        ("unifuse (no dense refinement)", {"weigh_dense_refinement": False}, args.also_without_dense)) if wanted]
    methods = [m for m in args.methods if m != "ants" or classical.ants_available()]
    lines = [f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
             f"checkpoint {args.checkpoint}", "",
             "| pair | pipeline | time (s) | UniFuse / it | peak memory (GB) | NCC to truth | load 1/5/15 | notes |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    print("\n".join(lines), flush=True)
    for name in args.pairs:
        pair = PAIRS[name]()
        rows = [run_unifuse(engine, pair)]
        rows[0]["load"] = load()
        for label, variant in variants:
            rows.append(run_unifuse(variant, pair, label))
            rows[-1]["load"] = load()
        for method in methods:
            rows.append(run_classical(method, pair))
            rows[-1]["load"] = load()
        identity = head_ncc(resample_to_reference(pair.moving, pair.reference).array, pair.truth.array)
        unifuse_seconds = rows[0]["seconds"]
        for row in rows:
            notes = (f"guard kept {row['guard']}, class {row['class']}, {row['tiles']} tile(s); "
                     + ", ".join(f"{k} {v:.1f}" for k, v in row["timings"].items())) if "guard" in row else ""
            ratio = unifuse_seconds / row["seconds"]
            lines.append(f"| {name} | {row['method']} | {row['seconds']:.1f} | {ratio:.2f} | {row['peak_gb']:.2f} | "
                         f"{row['ncc']:.3f} | {row['load']} | {notes} |")
            print(lines[-1], flush=True)
        lines.append(f"| {name} | identity | – | – | – | {identity:.3f} | | |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
