"""Calibrate the coarse degradation read-out of a 3-D checkpoint (``engine.coarse_readout``).

    OMP_NUM_THREADS=2 .venv/bin/python bench/coarse_readout.py [--checkpoint unifuse-3d-phantom]
        [--spacing 2.8] [--classes motion] [--out bench/results/coarse_readout.md] [--write]

For each 3-D sample task at the bundled size (1 mm, 176 × 216 × 180: T1 + motion T2, CT + low-dose
PET, MRI + metal CT), degraded and misaligned as the sample is, and its clean aligned label, the
engine's class read-out on the moving image as given (``FusionEngine._classify_on_grid``, what the
``classify`` stage runs) is printed three ways: on the image's own grid, on an anti-aliased copy of
``--spacing`` mm voxels (``io.resample_to_spacing``), and combined as ``CoarseReadout.combine`` does
for ``--classes``. Per way: the probabilities, and how many brain slices name the declared class
with p >= 0.6 and rank it first. ``--write`` stores ``{"spacing_mm", "classes", "command"}`` as the
checkpoint sidecar's ``coarse_readout`` section, which the engine then applies.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from napari_unifuse.data import samples
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.coarse_readout import METADATA_KEY, CoarseReadout
from napari_unifuse.engine.inference import FusionEngine, _prepare
from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.io import resample_to_spacing
from napari_unifuse.model.checkpoint import set_metadata_section

TASKS = ("t1-t2-motion", "ct-pet-lowdose", "mri-ct-metal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--spacing", type=float, default=2.8)
    parser.add_argument("--classes", nargs="+", default=["motion"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/coarse_readout.md"))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "bench/coarse_readout.py " + shlex.join(sys.argv[1:])
    engine = FusionEngine(args.checkpoint, device="cpu")
    readout = CoarseReadout(args.spacing, tuple(args.classes))
    rows = []
    for task in TASKS:
        pair = samples._sample_pair(task, 3, samples.SAMPLE_SHAPE_3D)
        reference = _prepare(pair.reference, "auto").luma
        brain = np.flatnonzero(reference.array.reshape(reference.array.shape[0], -1).mean(axis=1) > 0.05)
        for declared, moving_volume in ((pair.degradation, pair.moving), ("none", pair.label)):
            moving = _prepare(moving_volume, "auto").luma
            native = _read(engine, moving, reference)
            coarse = _read(engine, resample_to_spacing(moving, args.spacing), reference)
            combined = tuple(readout.combine(n, c, DEGRADATION_CLASSES) for n, c in zip(native, coarse))
            column = DEGRADATION_CLASSES.index(declared)
            for way, (probs, per_slice) in (("own grid", native), (f"{args.spacing:g} mm copy", coarse),
                                            ("combined", combined)):
                named = int((per_slice[brain, column] >= 0.6).sum())
                first = int((per_slice[brain].argmax(axis=1) == column).sum())
                rows.append(f"| {task} | {declared} | {way} | {DEGRADATION_CLASSES[int(np.argmax(probs))]} | "
                            + " | ".join(f"{p:.2f}" for p in probs) + f" | {named} / {first} of {brain.size} |")
                print(rows[-1], flush=True)
    header = ("| sample | moving image | read on | named | " + " | ".join(DEGRADATION_CLASSES)
              + " | brain slices: declared class p ≥ 0.6 / first |\n|---|---|---|---|" + "---:|" * 5)
    text = (f"# Coarse degradation read-out: `{args.checkpoint}`\n\n`{command}` (the engine's read-out of the "
            "moving image as given: the bundled 1 mm samples, degraded and misaligned, and their clean aligned "
            f"labels; combined for {', '.join(args.classes)} as `engine.coarse_readout` does).\n\n"
            + header + "\n" + "\n".join(rows) + "\n")
    args.out.write_text(text, encoding="utf-8")
    if args.write:
        sidecar = set_metadata_section(args.checkpoint, METADATA_KEY, {**readout.to_dict(), "command": command})
        print(f"wrote {METADATA_KEY} to {sidecar}")


def _read(engine: FusionEngine, moving, reference) -> tuple[np.ndarray, np.ndarray]:
    read = engine._classify_on_grid(moving, reference, lambda *_: None, CancelToken(), [])
    if read is None:
        raise SystemExit(f"{engine.checkpoint_name} estimates no degradation")
    return read


if __name__ == "__main__":
    main()
