"""Folders a user may not write to, as the tests' root user cannot otherwise meet them (root
ignores chmod)."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def deny_writes_in(monkeypatch):
    """``deny_writes_in(folder)``: creating a file in ``folder`` fails as in a read-only folder."""
    real_mkstemp = tempfile.mkstemp

    def deny(folder: Path) -> None:
        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / "probe"))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    return deny


@pytest.fixture
def deny_creating(monkeypatch):
    """``deny_creating(folder)``: creating ``folder`` fails as in a read-only parent."""
    real_mkdir = Path.mkdir

    def deny(folder: Path) -> None:
        def mkdir(self, *args, **kwargs):
            if self == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)

    return deny


@pytest.fixture
def built_engines(monkeypatch):
    """Every FusionEngine ``unifuse evaluate`` builds, in order."""
    from napari_unifuse.cli import evaluate as evaluate_module
    from napari_unifuse.engine.inference import FusionEngine

    engines = []

    class RecordingEngine(FusionEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(evaluate_module, "FusionEngine", RecordingEngine)
    return engines
