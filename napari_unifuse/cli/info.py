"""``unifuse info``: parameters and FLOPs per module of the UniFuse network, or (``--checkpoint``)
what a checkpoint is: its method, dimensions, classes, training crop, how it was trained, its
validation scores, the calibrations its sidecar carries and its limitations.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; convs,
matmuls, linears). It cannot see inside a fused CUDA scan and sees the torch scan only partly, so
whatever it attributed to the selective scans is replaced by an analytic count
(:meth:`SelectiveScan.flops`). Element-wise work (norms, activations, grid_sample) is not counted.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from napari_unifuse.classes import DEGRADATION_CLASSES
from napari_unifuse.cli.arguments import positive_int
from napari_unifuse.engine.inference import MAX_TILE_VOXELS
from napari_unifuse.errors import InputError
from napari_unifuse.model.checkpoint import (
    checkpoint_method,
    read_config,
    read_metadata,
    resolve_checkpoint,
    training_crop,
)
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.costs import measure, minimum_size
from napari_unifuse.model.scan import scan_backend

PRESETS = ("paper", "small")
DEFAULT_SIZE = {2: 256, 3: 64}
DEFAULT_PRESET, DEFAULT_DIMS = "paper", 3
# Sidecar sections written after training (bench/ calibration scripts) that change what the engine
# does with the checkpoint (resources/README.md); a checkpoint without one gets the defaults.
CALIBRATIONS = ("alignment_guard", "fusion_balance", "degradation_evidence", "coarse_readout")
_WIDTH = 100


def build_config(preset: str, spatial_dims: int) -> UniFuseConfig:
    return getattr(UniFuseConfig, preset)(spatial_dims)


def size_rules() -> str:
    """What --size accepts per preset and dimensionality, from the configs themselves."""
    rules = []
    for preset in PRESETS:
        for dims in DEFAULT_SIZE:
            config = build_config(preset, dims)
            rules.append(f"{preset} {dims}-D: a multiple of {config.size_multiple} and at least {minimum_size(config)}")
    return "; ".join(rules)


def _wrapped(label: str, text: str) -> list[str]:
    # Not at hyphens: commands and file names stay whole enough to copy.
    return textwrap.wrap(text, _WIDTH, initial_indent=f"{label}: ", subsequent_indent="  ",
                         break_on_hyphens=False, break_long_words=False)


def _number(value: Any) -> str:
    """A score as the sidecar has it: None where it was undefined (JSON has no NaN)."""
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _stages(metadata: dict[str, Any]) -> list[str]:
    """The training runs behind the weights, first to last, as far as the sidecar records them: each
    run's ``initial_weights`` holds the record of the run it started from, and that its own."""
    earlier = []
    record = metadata.get("initial_weights")
    while isinstance(record, dict) and record:
        earlier.insert(0, record)
        record = record.get("initial_weights")
    lines = []
    for position, run in enumerate(earlier):
        made_by = run.get("command") or f"{run.get('name') or run.get('checkpoint')} (command not recorded)"
        details = ", ".join([f"{run.get('steps')} steps",
                             *([f"{run['wall_time_s']} s on {run.get('device')}"] if run.get("wall_time_s") else []),
                             *([run["note"]] if run.get("note") else [])])
        lines += _wrapped("  first" if position == 0 else "  then", f"{made_by} ({details})")
    stage = ((metadata.get("training_config") or {}).get("train") or {}).get("stage", "full")
    # Several processes (torchrun) set the effective batch: the run is not the one a plain command repeats.
    world_size = metadata.get("world_size")
    processes = f" in each of {world_size} processes" if isinstance(world_size, int) and world_size > 1 else ""
    lines += _wrapped("  then" if earlier else "  trained", f"{metadata.get('command') or 'not recorded'} "
                      f"(config {metadata.get('config_file')}, train.stage {stage}, {metadata.get('steps')} steps, "
                      f"{metadata.get('wall_time_s')} s on {metadata.get('device')}{processes})")
    for command in metadata.get("resumed_with") or []:
        lines += _wrapped("  resumed", command or "not recorded")
    return lines


def describe_checkpoint(path_or_name: str) -> list[str]:
    """The lines ``unifuse info --checkpoint`` prints: the header's method and config, then the sidecar's record."""
    path = resolve_checkpoint(path_or_name)
    method, config = checkpoint_method(path), read_config(path)
    classes = (", ".join(DEGRADATION_CLASSES[:config.num_classes]) if hasattr(config, "num_classes")
               else "none (this method estimates no degradation)")
    lines = [f"checkpoint: {path}", f"method: {method}", f"dimensions: {config.spatial_dims}-D",
             f"degradation classes: {classes}"]
    metadata = read_metadata(path)
    sidecar = path.with_suffix(".json")
    if not metadata:
        state = "missing (" + sidecar.name + " is not beside it)" if not sidecar.is_file() else f"empty ({sidecar})"
        return lines + _wrapped("sidecar", f"{state}: the training crop, the training record, the calibrations and "
                                "the limitations are unknown, and the engine runs it with defaults; copy the .json "
                                "together with the .safetensors")
    crop = training_crop(metadata)
    lines += [f"sidecar: {sidecar}",
              f"name: {metadata.get('name') or path.stem}",
              "training crop: " + _crop_use(crop, config.spatial_dims),
              "training (first to last):", *_stages(metadata)]
    validation = metadata.get("validation") or {}
    if validation:
        lines += _wrapped("validation", ", ".join(f"{name} {_number(value)}" for name, value in validation.items()))
    carried = [name for name in CALIBRATIONS if name in metadata]
    absent = [name for name in CALIBRATIONS if name not in metadata]
    lines.append(f"calibrations: {', '.join(carried) or 'none'}"
                 + (f" (not calibrated, engine defaults: {', '.join(absent)})" if absent else ""))
    lines += _wrapped("limitations", metadata.get("limitations") or "none recorded")
    return lines


def _crop_use(crop: int | None, spatial_dims: int) -> str:
    """The training crop and what the engine does with it: 2-D images run in tiles of it; 3-D volumes
    run whole up to MAX_TILE_VOXELS, and only the degradation classifier reads windows of the crop."""
    if not crop:
        return "none recorded (whole inputs)"
    if spatial_dims == 2:
        return f"{crop} (inference tiles at this size)"
    largest = round(MAX_TILE_VOXELS ** (1 / 3))
    return (f"{crop} (the degradation classifier reads windows of this size; volumes run whole up to "
            f"{largest}³ voxels, in slabs beyond)")


def run(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        given = [flag for flag, value in (("--preset", args.preset), ("--dims", args.dims), ("--size", args.size))
                 if value is not None]
        if given:
            raise InputError(f"--checkpoint describes a trained checkpoint and {', '.join(given)} an untrained "
                             "network: give one or the other")
        print("\n".join(describe_checkpoint(args.checkpoint)))
        return 0
    preset = args.preset or DEFAULT_PRESET
    dims = args.dims or DEFAULT_DIMS
    config = build_config(preset, dims)
    size = DEFAULT_SIZE[dims] if args.size is None else args.size
    costs = measure(config, size)
    shape = "×".join([str(size)] * dims)
    print(f"UniFuse, preset {preset}, {dims}-D, input 1×1×{shape}, "
          f"scan backend {scan_backend('cpu')} (CPU)")
    print(f"{'module':<8}{'parameters':>14}{'GFLOPs':>12}{'(scan, analytic)':>20}")
    for cost in costs:
        print(f"{cost.label:<8}{cost.parameters:>14,}{cost.flops / 1e9:>12.3f}"
              f"{cost.scan_flops / 1e9:>20.4f}")
    print(f"{'total':<8}{sum(c.parameters for c in costs):>14,}"
          f"{sum(c.flops for c in costs) / 1e9:>12.3f}"
          f"{sum(c.scan_flops for c in costs) / 1e9:>20.4f}")
    print("FLOPs: FlopCounterMode (2 per multiply-add) for convs/matmuls; selective-scan FLOPs "
          "are estimated analytically; element-wise ops are not counted.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="parameters and FLOPs per module of the UniFuse network, or what a checkpoint is",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, metavar="NAME_OR_FILE",
                        help="describe a checkpoint (packaged name or .safetensors file) instead: method, "
                             "dimensions, classes, training crop, training runs, validation, calibrations, limitations")
    parser.add_argument("--preset", choices=PRESETS, default=None, help=f"default: {DEFAULT_PRESET}")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=None, help=f"default: {DEFAULT_DIMS}")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="side length of the square/cubic test input "
                             f"(default {DEFAULT_SIZE[2]} in 2-D, {DEFAULT_SIZE[3]} in 3-D); {size_rules()}")
    parser.set_defaults(func=run)
