"""The `unifuse` entry point on a terminal or CI log whose locale is ASCII."""

from __future__ import annotations

import os
import subprocess
import sys


def test_reports_with_non_ascii_characters_print_as_escapes_under_an_ascii_locale():
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONIOENCODING"}
    environment.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    completed = subprocess.run(
        [sys.executable, "-m", "napari_unifuse.cli", "info", "--preset", "small", "--dims", "2", "--size", "32"],
        capture_output=True, timeout=120, env=environment)
    assert completed.returncode == 0, completed.stderr.decode("ascii", "replace")
    assert "1\\xd71\\xd732\\xd732" in completed.stdout.decode("ascii")  # "1×1×32×32", escaped
