"""How the alignment guard decides on Harvard pairs: as the atlas aligned them, and shifted by 5 px.

    .venv/bin/python bench/probe_alignment_guard.py [--harvard ../shared/data/harvard-aanlib]
        [--checkpoint unifuse-2d-harvard] [--split val|train] [--tasks CT-MRI,PET-MRI,SPECT-MRI]
        [--pairs 10] [--shift 3,4] [--weigh-network-field | --no-weigh-network-field]
        [--min-credible-motion 0]

Each pair runs through ``FusionEngine`` twice: as the atlas stores it (the correct field is zero)
and with the moving image moved by ``--shift`` voxels (the correct field is that constant shift).
Per task and condition the script prints which estimates the guard weighed, how often each was
kept, the mean displacement of the field "before" the guard and of the kept one, both fields'
end-point errors against the correct field, over the reference's tissue, the guard's time and
that of the second tiled pass (restoring and fusing with a kept field that is not the network's).
"Before" is the network's field where the guard weighs it (what the engine output before there was
a guard), else the initial alignment's (the field the network would have refined): the bundled
``unifuse-2d-harvard`` weighs no network field (its sidecar's ``weigh_network_field``);
``--weigh-network-field`` makes the engine weigh it whatever the checkpoint says, and
``--min-credible-motion`` replaces the checkpoint's floor on credible motion (k was calibrated
without one: 0). Then, for each factor k of ``--factors``, how many pairs would keep the identity
and the mean end-point error of the fields kept, everything else as the engine asked, and every
challenge's gain in units of its noise (z = gain / noise): what k is calibrated on
(docs/alignment_guard.md, with ``--split train``).
The split is the one `unifuse evaluate` uses for ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_unifuse.cli.evaluate import checkpoint_split
from napari_unifuse.data.misalign import warp_array
from napari_unifuse.engine import inference
from napari_unifuse.engine.alignment_guard import FOREGROUND_FRACTION, IDENTITY, GuardDecision, choose_displacement
from napari_unifuse.engine.inference import FUSE_KEPT_STAGE, NETWORK, FusionEngine
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.io import ImageVolume, read_image
from napari_unifuse.model.checkpoint import read_metadata
from napari_unifuse.training.harvard import index_harvard, split_cases

REPOSITORY = Path(__file__).resolve().parents[1]


class RecordingGuard:
    """The engine's guard, deciding as the engine's call asks (its floor, blur, spacing and field of
    view), keeping the estimates it was handed and the decisions other factors k would make with
    everything else as the engine asked. The engine's last call in a run is its final guard."""

    def __init__(self, factors: tuple[float, ...]) -> None:
        self.factors = factors
        self.estimates: dict[str, np.ndarray] = {}
        self.kept_by_factor: dict[float, str] = {}

    def __call__(self, moving: np.ndarray, reference: np.ndarray, estimates: Mapping[str, np.ndarray],
                 **options: Any) -> GuardDecision:
        self.estimates = dict(estimates)
        self.kept_by_factor = {k: choose_displacement(moving, reference, estimates, **{**options, "factor": k}).kept
                               for k in self.factors}
        return choose_displacement(moving, reference, estimates, **options)


def unguarded_estimate(estimates: Mapping[str, np.ndarray]) -> str:
    """The estimate standing for "before the guard": the network's field where the guard weighed it,
    else the initial alignment (the first estimate weighed, the field the network would refine)."""
    return NETWORK if NETWORK in estimates else next(iter(estimates))


def describe_run(result: FusionResult, recorder: RecordingGuard, tissue: np.ndarray,
                 truth: np.ndarray) -> dict[str, Any]:
    """One run's row: what the guard weighed and kept, the fields' sizes and end-point errors against
    ``truth`` (ndim, 1, 1) over ``tissue``, the guard's and the second pass's time, the challenges' z
    and, per k of the sweep, the kept field's end-point error and whether it is the identity."""

    def mean_norm(field: np.ndarray) -> float:
        return float(np.linalg.norm(field, axis=0)[tissue].mean())

    decision = result.alignment_guard
    before = unguarded_estimate(recorder.estimates)
    fields = {IDENTITY: np.zeros_like(recorder.estimates[before]), **recorder.estimates}
    return {
        "weighed": tuple(recorder.estimates),
        "before": before,
        "kept": decision.kept,
        "|u| before": mean_norm(fields[before]), "|u| after": mean_norm(result.displacement),
        "EPE before": mean_norm(fields[before] - truth), "EPE after": mean_norm(result.displacement - truth),
        "guard s": result.provenance["timings_s"]["guard"],
        "second pass s": result.provenance["timings_s"].get(FUSE_KEPT_STAGE, 0.0),
        "z": {f"{c.challenger}/{c.incumbent}": c.gain / max(c.noise, 1e-12) for c in decision.challenges},
        "EPE by k": {k: mean_norm(fields[kept] - truth) for k, kept in recorder.kept_by_factor.items()},
        "identity by k": {k: kept == IDENTITY for k, kept in recorder.kept_by_factor.items()},
    }


def moved_by(image: ImageVolume, shift: tuple[float, float]) -> ImageVolume:
    """The moving image translated by ``shift``: the constant field ``shift`` takes it back."""
    field = np.broadcast_to(np.array(shift, np.float32)[:, None, None], (2, *image.spatial_shape))
    moved = warp_array(image.array.astype(np.float32), -field)
    return dataclasses.replace(image, array=np.clip(np.round(moved), 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, default=REPOSITORY.parent / "shared" / "data" / "harvard-aanlib")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--tasks", default="CT-MRI,PET-MRI,SPECT-MRI")
    parser.add_argument("--pairs", type=int, default=10, help="pairs per task, evenly spread over the split")
    parser.add_argument("--shift", default="3,4", help="voxels (y, x) of the shifted condition")
    parser.add_argument("--factors", default="2,3,4,5,6,8", help="values of k for the sweep table")
    parser.add_argument("--weigh-network-field", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the guard weighs the network's field (default: as the checkpoint says)")
    parser.add_argument("--min-credible-motion", type=float, default=None,
                        help="the guard's floor in voxels (default: the checkpoint's; 0: none, as k was calibrated)")
    args = parser.parse_args()
    shift = tuple(float(v) for v in args.shift.split(","))
    torch.set_num_threads(1)
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    train, validation = split_cases(index_harvard(args.harvard), val_fraction=cases.val_fraction, seed=cases.seed)
    engine = FusionEngine(args.checkpoint, device="cpu", weigh_network_field=args.weigh_network_field)
    if args.min_credible_motion is not None:
        engine.min_credible_motion = args.min_credible_motion
    recorder = RecordingGuard(tuple(float(k) for k in args.factors.split(",")))
    inference.choose_displacement = recorder

    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for task in args.tasks.split(","):
        pairs = [pair for pair in (validation if args.split == "val" else train) if pair.task == task]
        for pair in pairs[:: max(1, len(pairs) // args.pairs)][: args.pairs]:
            reference, atlas = read_image(pair.reference_path), read_image(pair.moving_path)
            tissue = reference.array > FOREGROUND_FRACTION * np.percentile(reference.array, 99)
            for condition, moving, correct in (("aligned", atlas, (0.0, 0.0)), ("shifted", moved_by(atlas, shift), shift)):
                result = engine.run_fusion(reference, moving)
                row = describe_run(result, recorder, tissue, np.array(correct, np.float32)[:, None, None])
                rows[task, condition].append(row)
                print(task, pair.pair_id, condition, f"weighed {'+'.join(row['weighed'])}, kept", row["kept"],
                      "  ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)),
                      "  ".join(f"z {k} {v:.1f}" for k, v in row["z"].items()), flush=True)

    candidates = [IDENTITY, *dict.fromkeys(name for group in rows.values() for row in group for name in row["weighed"])]
    befores = dict.fromkeys(row["before"] for group in rows.values() for row in group)
    print(f"\nWeighed: {', '.join(candidates[1:])}; \"before\" is the field of {' / '.join(befores)}")
    print(f"| task | condition | pairs | kept {' / '.join(candidates)} | mean |u| before → after (px) "
          "| EPE before → after (px) | guard s | second pass s |")
    print("|---|---|---:|---|---|---|---:|---:|")
    for (task, condition), group in rows.items():
        kept = [sum(row["kept"] == name for row in group) for name in candidates]

        def mean(key: str) -> float:
            return float(np.mean([row[key] for row in group]))

        print(f"| {task} | {condition} | {len(group)} | {' / '.join(map(str, kept))} | "
              f"{mean('|u| before'):.1f} → {mean('|u| after'):.1f} | {mean('EPE before'):.1f} → {mean('EPE after'):.1f} | "
              f"{mean('guard s'):.2f} | {mean('second pass s'):.2f} |")
    print(f"\nSweep of k (kept identity, mean EPE px): {', '.join(f'{task} {condition}' for task, condition in rows)}")
    for k in recorder.factors:
        cells = [f"{sum(row['identity by k'][k] for row in group)}/{len(group)}, "
                 f"{np.mean([row['EPE by k'][k] for row in group]):.2f}" for group in rows.values()]
        print(f"k = {k:g}: " + " | ".join(cells))
    for (task, condition), group in rows.items():
        for challenge in group[0]["z"]:
            values = sorted(row["z"][challenge] for row in group if challenge in row["z"])
            print(f"z {task} {condition} {challenge}: " + " ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
