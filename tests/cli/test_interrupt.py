"""Ctrl-C while SimpleITK registers in the background: the process exits with 130 instead of
aborting, which it did when Python shut down around ITK's C++ code ("FATAL: exception not rethrown");
the engine stops the registration when the interpreter exits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# A command that starts the engine's background registration and is interrupted while it runs.
SCRIPT = textwrap.dedent("""
    import argparse, sys, time
    import numpy as np
    from napari_unifuse import cli
    from napari_unifuse.engine import inference

    def interrupted_while_registering(args):
        volume = np.random.default_rng(0).random((96, 96, 96), dtype=np.float32)
        registration = inference._ClassicalInBackground(volume, np.roll(volume, 3, axis=0), (1.0, 1.0, 1.0), [])
        time.sleep(0.5)  # SimpleITK is inside its C++ code now, for seconds more
        assert registration._thread.is_alive()
        raise KeyboardInterrupt

    def parser():
        parser = argparse.ArgumentParser(prog="unifuse")
        parser.add_subparsers(dest="command", required=True).add_parser("probe").set_defaults(
            func=interrupted_while_registering)
        return parser

    cli.build_parser = parser
    sys.exit(cli.main(["probe"]))
""")


def test_an_interrupt_during_the_background_registration_exits_with_130():
    finished = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 130, finished.stderr
    assert "unifuse probe: interrupted" in finished.stderr and "FATAL" not in finished.stderr
