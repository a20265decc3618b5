"""`unifuse` command line: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
``build_parser`` imports every sub-command module (so ``unifuse --help`` loads torch and the
engine), skipping one that is missing from the package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from napari_unifuse import __version__
from napari_unifuse.engine.job import is_first_process
from napari_unifuse.errors import UniFuseError

SUBCOMMAND_MODULES = ("synth", "fuse", "report", "evaluate", "train", "info", "bench", "view")


class _CommandLineParser(argparse.ArgumentParser):
    """``unifuse``'s own parser: an option given before any command is named (argparse said only
    that the command was missing)."""

    TOP_LEVEL_OPTIONS = ("-h", "--help", "--version")

    def parse_args(self, args=None, namespace=None):
        given = sys.argv[1:] if args is None else list(args)
        if given and given[0].startswith("-") and given[0] not in self.TOP_LEVEL_OPTIONS:
            self.error(f"unrecognized option {given[0]}: give the command first, its options after it "
                       "(unifuse COMMAND --help lists them)")
        return super().parse_args(given, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _CommandLineParser(
        prog="unifuse",
        description="Align, restore and fuse degraded, misaligned multimodal medical images (UniFuse).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun stopping its workers, a scheduler's time limit, `kill`) or SIGHUP (the
    terminal or ssh session closed), met as Ctrl-C is: the run unwinds, so that its staging folders
    and locks go, and the command says so."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


# Signals that stop a command as SIGTERM does; SIGHUP is POSIX only.
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
# 128 + SIGPIPE: the status of a shell tool whose reader (`| head`) stopped; Windows has no SIGPIPE.
BROKEN_PIPE_STATUS = 128 + getattr(signal, "SIGPIPE", 13)


@contextmanager
def _signals_handled(handler, *numbers: signal.Signals) -> Iterator[None]:
    """The signals ``numbers`` handled by ``handler`` (a ``signal`` handler) within the block, as
    they were afterwards (``main`` called in-process); only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in numbers}
    for number in numbers:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, earlier in previous.items():
            signal.signal(number, earlier)


def describe_os_error(error: OSError) -> str:
    """A file system's refusal in one line: the file and the system's reason ("Permission denied",
    "No space left on device")."""
    files = [str(name) for name in (error.filename, error.filename2) if name is not None]
    reason = error.strerror or str(error)
    return f"{' -> '.join(files)}: {reason}" if files else reason


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; ``argv`` None: the process's own arguments (the console script)."""
    # Reports print µ, ², ³, ↑: a terminal or CI log with an ASCII locale gets escapes, not a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    command = "unifuse"
    try:
        with _signals_handled(_raise_terminated, *TERMINATING_SIGNALS):
            # Inside the try: the parser imports torch and the engine, seconds in which Ctrl-C may come.
            args = build_parser().parse_args(argv)
            command = f"unifuse {args.command}"
            with warnings.catch_warnings():  # restores Python's own display when the command is done
                warnings.showwarning = _one_line_warning(args.command)
                return int(args.func(args) or 0)
    except UniFuseError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output stopped (`| head`): end as a shell tool does, quietly. The
        # output still buffered must not be flushed at exit into the closed pipe (another error).
        with suppress(OSError, ValueError):  # a stdout without a file descriptor (in-process) flushes nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
        status = 128 + signum
        said = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(signum, "terminated (its terminal closed)")
        # A second signal (a terminal or `timeout` signals the whole process group) must not cut
        # the goodbye short with a traceback.
        with _signals_handled(signal.SIG_IGN, signal.SIGINT, *TERMINATING_SIGNALS):
            if is_first_process():  # torchrun stops every process of the job: one says so
                print(f"{command}: {said}", file=sys.stderr)
            if argv is None:
                # Stopped, the process has nothing left to finish, and a normal shutdown can abort
                # ("terminate called without an active exception": a C++ thread pool of ITK/ANTs
                # caught mid-way), which would turn its exit status into 134.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        return status
    except Exception as error:
        from napari_unifuse.engine.device import is_out_of_memory

        if is_out_of_memory(error):
            # The engine explains its own (stage and size); this is the rest: training, evaluation, metrics.
            print(f"{command}: error: out of memory ({error}); close other programs and run again, "
                  "or give it smaller or coarser images", file=sys.stderr)
            return 2
        if isinstance(error, OSError):  # a read-only folder, a full disk, an unreadable file
            print(f"{command}: error: {describe_os_error(error)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
