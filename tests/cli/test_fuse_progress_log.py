"""`unifuse fuse` without a terminal (a batch's log file): no bar, but a line of where a long pair
stands at most every ``LOG_PROGRESS_EVERY_S`` seconds, so that a clinical volume's many minutes are
not passed in silence, and a short run's captured output stays clean."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from napari_unifuse.cli import fuse as fuse_module
from napari_unifuse.cli import main
from napari_unifuse.cli.fuse import TqdmProgress


def write_pair(folder):
    y, x = np.mgrid[:48, :48]
    disc = ((y - 24) ** 2 + (x - 24) ** 2 < 400).astype(np.float32)
    for name, centre in (("reference", 20), ("moving", 26)):
        blob = np.exp(-((y - centre) ** 2 + (x - 24) ** 2) / 40.0)
        Image.fromarray((120 * disc + 130 * blob).astype(np.uint8)).save(folder / f"{name}.png")
    return folder / "reference.png", folder / "moving.png"


def test_a_run_without_a_terminal_logs_its_stages_once_they_take_long(tmp_path, capsys, monkeypatch):
    reference, moving = write_pair(tmp_path)
    monkeypatch.setattr(fuse_module, "LOG_PROGRESS_EVERY_S", 0.0)  # every step counts as long
    assert main(["fuse", "--reference", str(reference), "--moving", str(moving), "--out", str(tmp_path / "out"),
                 "--method", "identity+average", "--no-quality", "--device", "cpu"]) == 0
    logged = [re.fullmatch(r"\[1/1\] moving: (.+) (\d+)/(\d+) \(\d+ s so far\)", line)
              for line in capsys.readouterr().err.splitlines()]
    stages = [match.group(1) for match in logged if match]
    # The initial alignment is a stage of its own, before the network's.
    assert {"validate", "initial alignment", "fuse", "compose"} <= set(stages)
    assert stages.index("initial alignment") < stages.index("fuse")
    assert ("fuse", "1", "1") in [match.groups() for match in logged if match]


def test_a_short_run_without_a_terminal_writes_no_progress(capsys):
    progress = TqdmProgress("pair")
    for done in range(3):
        progress("fuse", done, 2)
    progress.close()
    assert capsys.readouterr().err == ""
