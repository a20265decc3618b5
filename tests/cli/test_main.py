"""The `unifuse` entry point on a terminal or CI log whose locale is ASCII."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from napari_unifuse.cli import main


def test_reports_with_non_ascii_characters_print_as_escapes_under_an_ascii_locale():
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONIOENCODING"}
    environment.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    completed = subprocess.run(
        [sys.executable, "-m", "napari_unifuse.cli", "info", "--preset", "small", "--dims", "2", "--size", "32"],
        capture_output=True, timeout=120, env=environment)
    assert completed.returncode == 0, completed.stderr.decode("ascii", "replace")
    assert "1\\xd71\\xd732\\xd732" in completed.stdout.decode("ascii")  # "1×1×32×32", escaped


@pytest.mark.parametrize("size", ["0", "-4"])
def test_info_refuses_a_size_below_one_in_one_line(size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--preset", "small", "--dims", "2", "--size", size])
    assert exit_info.value.code == 2
    assert f"unifuse info: error: argument --size: must be at least 1, got {size}" in capsys.readouterr().err


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 9.00 GiB for an array"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory")], ids=["numpy", "torch"])
def test_any_command_out_of_memory_is_a_message_not_a_traceback(monkeypatch, capsys, error):
    def exhausted(args):
        raise error

    monkeypatch.setattr("napari_unifuse.cli.info.run", exhausted)
    assert main(["info", "--preset", "small", "--dims", "2"]) == 2
    assert "unifuse info: error: out of memory" in capsys.readouterr().err


def test_any_command_keeps_the_traceback_of_a_bug(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("napari_unifuse.cli.info.run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", "--preset", "small", "--dims", "2"])


def test_a_warning_prints_as_one_line_naming_the_command_and_python_display_comes_back(monkeypatch, capsys):
    def warns(args):
        warnings.warn("PNG cannot store spacing", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr("napari_unifuse.cli.info.run", warns)
    shown_before = warnings.showwarning
    assert main(["info", "--preset", "small", "--dims", "2"]) == 0
    assert capsys.readouterr().err == "unifuse info: warning: PNG cannot store spacing\n"
    assert warnings.showwarning is shown_before


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/runs/out/summary.json"),
                                   OSError(28, "No space left on device", "/runs/out/fused.nii.gz"),
                                   IsADirectoryError(21, "Is a directory", "/runs/out/summary.json")],
                         ids=["read-only", "full-disk", "directory"])
def test_a_file_system_refusal_is_one_line_naming_the_file(monkeypatch, capsys, error):
    def refused(args):
        raise error

    monkeypatch.setattr("napari_unifuse.cli.info.run", refused)
    assert main(["info", "--preset", "small", "--dims", "2"]) == 2
    assert capsys.readouterr().err == f"unifuse info: error: {error.filename}: {error.strerror}\n"


def test_ctrl_c_while_the_parser_imports_the_commands_is_one_line(monkeypatch, capsys):
    """`build_parser` imports torch and the engine: seconds in which Ctrl-C printed a traceback."""
    import napari_unifuse.cli as cli

    def importing():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", importing)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "unifuse: interrupted\n"


def test_the_interrupt_handler_needs_nothing_the_parser_may_be_half_way_through_importing():
    """Its goodbye asked the rank from a module that imports torch: a Ctrl-C while the parser imported
    torch met it half loaded (a segfault, or "partially initialized module 'torch'")."""
    code = ("import sys, napari_unifuse.cli\n"
            "from napari_unifuse.engine.job import is_first_process\n"
            "assert is_first_process() and 'torch' not in sys.modules, sorted(sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={key: value for key, value in os.environ.items() if key != "RANK"})
    assert completed.returncode == 0, completed.stderr


def test_an_interrupted_console_script_exits_130_at_once_and_in_process_the_handler_comes_back(monkeypatch,
                                                                                               capsys):
    """The console script leaves at once: a normal shutdown with a C++ thread pool caught mid-way
    aborted (exit 134). Called in-process, main returns, with Ctrl-C's handler as it was."""
    import signal

    import napari_unifuse.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("napari_unifuse.cli.info.run", interrupted)
    before = signal.getsignal(signal.SIGINT)
    assert main(["info", "--preset", "small", "--dims", "2"]) == 130
    assert signal.getsignal(signal.SIGINT) is before

    exits = []

    def exit_now(status):
        exits.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(cli.os, "_exit", exit_now)
    monkeypatch.setattr(sys, "argv", ["unifuse", "info", "--preset", "small", "--dims", "2"])
    with pytest.raises(SystemExit):
        main()
    assert exits == [130] and capsys.readouterr().err.endswith("unifuse info: interrupted\n")


@pytest.mark.parametrize(("signal_name", "status", "said"), [
    # torchrun stopping its workers, a scheduler's time limit: the run used to die where it stood,
    # leaving its staging folders, with no word and exit 143.
    ("SIGTERM", 143, "terminated"),
    # A terminal or ssh session closed under a run: it died with exit 129 and no word, leaving an
    # empty pair folder (train its config.yaml).
    ("SIGHUP", 129, "terminated (its terminal closed)"),
])
def test_a_stopping_signal_unwinds_the_command_like_ctrl_c_and_says_so(monkeypatch, capsys, signal_name, status, said):
    import signal
    import time

    number = getattr(signal, signal_name)
    unwound = []

    def long_command(args):
        try:
            os.kill(os.getpid(), number)
            time.sleep(10)
        finally:
            unwound.append(True)  # where the staging folders and locks go

    monkeypatch.setattr("napari_unifuse.cli.info.run", long_command)
    before = signal.getsignal(number)
    assert main(["info", "--preset", "small", "--dims", "2"]) == status
    assert unwound == [True]
    assert capsys.readouterr().err == f"unifuse info: {said}\n"
    assert signal.getsignal(number) is before


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    """`unifuse info | head -1`: the reader closing the pipe was printed as "error: Broken pipe" (exit 2)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has stopped before the command writes: every write meets a closed pipe
    try:
        completed = subprocess.run([sys.executable, "-c", "import sys; from napari_unifuse.cli import main; "
                                    "sys.exit(main(['info', '--preset', 'small', '--dims', '2']))"],
                                   stdout=write_end, stderr=subprocess.PIPE, timeout=300)
    finally:
        os.close(write_end)
    assert completed.stderr.decode() == ""
    assert completed.returncode == 141  # 128 + SIGPIPE, as a shell tool killed by it


def test_version_is_printed(capsys):
    from napari_unifuse import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"unifuse {__version__}\n"


@pytest.mark.parametrize("command", ["fuse", "evaluate", "bench", "train"])
def test_every_commands_device_option_says_what_auto_picks(command, capsys):
    """fuse, evaluate and bench listed --device {auto,cuda,cpu} with no word on the default."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "auto (default): CUDA when a GPU is available, else the CPU" in " ".join(capsys.readouterr().out.split())


def test_an_option_before_any_command_is_named(capsys):
    """`unifuse --bogus` said only "the following arguments are required: command"."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--bogus", "fuse"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "unifuse: error: unrecognized option --bogus: give the command first, its options after it "
        "(unifuse COMMAND --help lists them)")
