"""`unifuse` command line: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
``build_parser`` imports every sub-command module (so ``unifuse --help`` loads torch and the
engine), skipping one that is missing from the package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from napari_unifuse.engine.device import is_out_of_memory
from napari_unifuse.errors import UniFuseError

SUBCOMMAND_MODULES = ("synth", "fuse", "report", "evaluate", "train", "info", "bench", "view")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unifuse",
        description="Align, restore and fuse degraded, misaligned multimodal medical images (UniFuse).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"napari_unifuse.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"napari_unifuse.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def _one_line_warning(command: str):
    """``warnings.showwarning`` for a command line: the message, not the file and source line it
    came from (which tell a user nothing)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"unifuse {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


def main(argv: list[str] | None = None) -> int:
    # Reports print µ, ², ³, ↑: a terminal or CI log with an ASCII locale gets escapes, not a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores Python's own display when the command is done
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.func(args) or 0)
    except UniFuseError as error:
        print(f"unifuse {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unifuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        # The engine explains its own (stage and size); this is the rest: training, evaluation, metrics.
        print(f"unifuse {args.command}: error: out of memory ({error}); close other programs and run again, "
              "or give it smaller or coarser images", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
