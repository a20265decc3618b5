"""`unifuse train`: train or resume UniFuse from a YAML config (a file, or a packaged configs/*.yaml by name).

Several processes / GPUs: ``torchrun --nproc_per_node N -m napari_unifuse.cli train --config ...``
(DistributedDataParallel; NCCL on CUDA, Gloo on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from napari_unifuse.cli.arguments import add_device_argument, user_path
from napari_unifuse.engine.job import is_first_process
from napari_unifuse.training.config import list_packaged_configs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train UniFuse from a config file (resumable; torchrun for several processes)",
        description="Train UniFuse on synthetic degradations + misalignments of clean aligned pairs.",
    )
    parser.add_argument("--config", required=True, type=os.path.expanduser,
                        help="training config: a YAML file, or a packaged config's name (also as configs/NAME.yaml "
                             f"where no such file exists): {', '.join(list_packaged_configs())}. Installed outside "
                             "the checkout, a packaged config that reads data needs --data-root")
    parser.add_argument("--out", type=user_path, default=None, help="run folder (default: runs/<config name>)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from <out>/checkpoints/last.* with the run's own config.yaml; --config must "
                            "match it but for train.init_from, --max-steps, --lr and --batch-size may change it")
    start.add_argument("--init-from", type=os.path.expanduser, default=None, metavar="CHECKPOINT",
                       help="fine-tune: start from these weights (path or packaged name; overrides train.init_from)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that holds a run, removing its checkpoints, log and "
                             "split.json (config.yaml is rewritten)")
    parser.add_argument("--max-steps", type=int, default=None, help="total optimiser steps (overrides train.max_steps)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop at this step (checkpointed) without shortening the schedule; --resume continues")
    add_device_argument(parser)
    parser.add_argument("--data-root", type=user_path, default=None, help="overrides data.root of the config")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (overrides train.lr)")
    parser.add_argument("--batch-size", type=int, default=None, help="per process; overrides train.batch_size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    parser.set_defaults(func=run)


def _launcher() -> list[str]:
    """What starts `train` in this process: `unifuse`, or under torchrun its launch (torchrun's
    WORLD_SIZE and LOCAL_WORLD_SIZE), which sets the effective batch and the order of the samples."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE") or 1)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    except ValueError:
        return ["unifuse"]  # not torchrun's settings: refused when the run joins its processes
    if world_size <= 1 or per_node < 1:
        return ["unifuse"]
    nodes = world_size // per_node
    return ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []), "--nproc_per_node", str(per_node),
            "-m", "napari_unifuse.cli"]


def _command(args: argparse.Namespace) -> str:
    """The equivalent command line (`unifuse train ...`, or its torchrun launch), for the checkpoint's metadata."""
    parts = [*_launcher(), "train", "--config", args.config]
    for flag, value in (("--out", args.out), ("--max-steps", args.max_steps), ("--stop-at", args.stop_at),
                        ("--device", args.device),
                        ("--data-root", args.data_root), ("--init-from", args.init_from), ("--lr", args.lr),
                        ("--batch-size", args.batch_size)):
        if value is not None:
            parts += [flag, str(value)]
    parts += [flag for flag, given in (("--resume", args.resume), ("--overwrite", args.overwrite)) if given]
    return shlex.join(parts)


def _where_resume_continues(out: Path) -> str:
    """After a stop: the step --resume would continue from. For the main process only: it writes the
    checkpoints, and settles a save it was stopped in (another process would remove a save it is writing)."""
    from napari_unifuse.training.trainer import CHECKPOINTS_FOLDER, settle_interrupted_saves

    checkpoints = out / CHECKPOINTS_FOLDER
    settle_interrupted_saves(checkpoints)  # a save interrupted once committed is the checkpoint --resume takes
    try:
        step = json.loads((checkpoints / "last.json").read_text(encoding="utf-8"))["steps"]
    except (OSError, ValueError, KeyError):
        return f"no checkpoint in {out} yet; --resume starts it again from step 0"
    return f"the last checkpoint holds step {step}; --resume continues from it"


def _check_run_folder(out: Path) -> None:
    """Refuse an --out that is a file, or lies under one, or a symbolic link to nothing, before any
    work (the folder is made later)."""
    from napari_unifuse.engine.outputs import refuse_dangling_link
    from napari_unifuse.errors import InputError

    refuse_dangling_link(out)
    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == out else f"lies under {existing}, which is a file"
        raise InputError(f"--out {where}, not a folder: give a folder for the run (created if missing)", out)


def run(args: argparse.Namespace) -> int:
    from napari_unifuse.errors import InputError, UniFuseError
    from napari_unifuse.training.config import load_config
    from napari_unifuse.training.trainer import AnotherProcessStopped, resumed_config, run_config, train

    train_overrides = {key: value for key, value in (("max_steps", args.max_steps), ("batch_size", args.batch_size))
                       if value is not None}
    for key, value in train_overrides.items():
        if value < 1:
            raise InputError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    if args.lr is not None:
        if not args.lr > 0:
            raise InputError(f"--lr must be positive, got {args.lr}")
        train_overrides["lr"] = args.lr
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    _check_run_folder(out)
    # train.init_from, applied before the file is validated: a stage config may leave it to --init-from.
    starting_weights: dict[str, str | None] = {}
    if args.init_from is not None:
        # A file named on the command line is relative to the working directory, not to the config.
        given = Path(args.init_from)
        starting_weights["init_from"] = str(given.resolve()) if given.is_file() else args.init_from
    elif args.resume:
        # The run's own, as --resume takes no --init-from: a resume's weights are its last checkpoint's,
        # and the config a fine-tuning run was started with then matches its config.yaml.
        starting_weights["init_from"] = run_config(out).train.init_from
    config = load_config(args.config, train={**train_overrides, **starting_weights})
    if args.data_root:
        config = config.with_overrides(data={"root": str(Path(args.data_root).resolve())})
    if args.resume:
        config = resumed_config(out, config, **train_overrides)
    if args.stop_at is not None and args.stop_at < 1:
        raise InputError(f"--stop-at must be at least 1, got {args.stop_at}")
    try:
        result = train(config, out, device=args.device, resume=args.resume, command=_command(args),
                       progress=not args.no_progress, stop_at_step=args.stop_at, overwrite=args.overwrite)
    except KeyboardInterrupt:
        if is_first_process():  # the main prints "interrupted"
            print(f"unifuse train: {_where_resume_continues(out)}", file=sys.stderr)
        raise
    except AnotherProcessStopped as error:
        if is_first_process():
            raise UniFuseError(f"{error}; {_where_resume_continues(out)}") from None
        raise
    if result.rank != 0:
        return 0  # under torchrun only the first process reports
    # A score is None where the sidecar recorded it undefined (JSON has no NaN): a resumed run reports it so.
    scores = ", ".join(f"{name} {'n/a' if value is None else f'{value:.4f}'}"
                       for name, value in result.validation.items())
    print(f"step {result.step}: {result.last_checkpoint}" + (f" (validation: {scores})" if scores else ""))
    if result.best_checkpoint is not None:
        print(f"best checkpoint: {result.best_checkpoint}")
    return 0
