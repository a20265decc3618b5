"""What a fusion run needs to be reproduced: input and checkpoint hashes, versions, timings."""

from __future__ import annotations

import hashlib
import platform
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import napari_unifuse
from napari_unifuse.io import ImageVolume

_CHUNK = 1 << 20


def sha256_of_path(path: str | Path) -> str:
    """SHA-256 of a file, or of a directory's files (a DICOM series) in sorted relative-path order.

    A directory's hash covers each file's relative name and content, so renaming or changing any
    slice of a series changes it.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def describe_source(source: str | None) -> dict[str, Any]:
    """Path and hash of an input that came from disk; in-memory data (a napari layer) has neither."""
    if source is None or not Path(source).exists():
        return {"path": source, "sha256": None}
    return {"path": str(Path(source).resolve()), "sha256": sha256_of_path(source)}


def sha256_of_array(array: np.ndarray) -> str:
    """SHA-256 of an array's values (C order), what identifies data that has no file."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def describe_input(image: ImageVolume) -> dict[str, Any]:
    """``describe_source`` of an input image; for in-memory data (a napari layer, a bundled sample)
    also ``array_sha256``, the hash of the values it holds, so a saved run can be tied to its data."""
    described = describe_source(image.source)
    if described["sha256"] is None:
        described["array_sha256"] = sha256_of_array(image.array)
    return described


def software_versions() -> dict[str, str]:
    return {
        "napari_unifuse": napari_unifuse.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StageTimer:
    """Wall-clock seconds per named stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.failed_stage: str | None = None  # the innermost stage an exception left, for its message

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.failed_stage = self.failed_stage or name
            raise
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)
