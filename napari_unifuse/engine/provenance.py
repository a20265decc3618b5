"""What a fusion run needs to be reproduced: input and checkpoint hashes, versions, timings."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import napari_unifuse
from napari_unifuse.io import ImageVolume
from napari_unifuse.io.digests import sha256_of_array
from napari_unifuse.io.image import STORED_AXIS_ORDER, STORED_SLICES_REVERSED
from napari_unifuse.io.readers import dicom_series, file_format

_CHUNK = 1 << 20
# git answers in milliseconds; one stuck on a network filesystem must not hold up a run.
_GIT_TIMEOUT_S = 2.0


def sha256_of_path(path: str | Path) -> str:
    """SHA-256 of a file, or of the DICOM files ``read_image`` reads for ``path`` (a series folder,
    or a ``.dcm`` file, which is read with the rest of its series) in sorted relative-name order.

    A series' hash covers each of its files' names (relative to the series folder) and contents,
    so renaming or changing any slice changes it, while other files beside the series (a run's
    outputs, a note left there) do not: they are not the image that was read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = {"": path}  # a plain file: its content alone (hashing an empty name adds nothing)
    if file_format(path) == "dicom":
        folder = path if path.is_dir() else path.parent
        files = {Path(os.path.relpath(file, folder)).as_posix(): Path(file) for file in dicom_series(path)[1]}
    for name in sorted(files):
        digest.update(name.encode())
        with files[name].open("rb") as stream:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def absolute_as_given(path: str | Path) -> Path:
    """``path`` made absolute without following its symlinks: the path a user named an input by
    (a git-annex/DataLad ``s1/ct.png``, not the ``store/SHA256E-...`` blob it links to). ``..`` is
    folded only where that still names the same file: after a symlinked folder it means the
    target's parent, so there it stays."""
    absolute = Path(path).absolute()
    folded = Path(os.path.normpath(absolute))
    return folded if folded.resolve() == absolute.resolve() else absolute


def describe_source(source: str | None) -> dict[str, Any]:
    """Path (as given, made absolute), the file it resolves to where a symlink makes that another
    (``resolved_path``), and hash of an input that came from disk; in-memory data (a napari layer)
    has neither."""
    if source is None or not Path(source).exists():
        return {"path": source, "sha256": None}
    given, resolved = absolute_as_given(source), Path(source).resolve()
    described: dict[str, Any] = {"path": str(given)}
    if resolved != given:
        described["resolved_path"] = str(resolved)
    return {**described, "sha256": sha256_of_path(source)}


# What names a DICOM series to a person and to a PACS query, among the tags read_image keeps.
_DICOM_SERIES_TAGS = ("SeriesInstanceUID", "SeriesDescription", "Modality")


def describe_input(image: ImageVolume) -> dict[str, Any]:
    """``describe_source`` of an input image; for in-memory data (a napari layer, a bundled sample)
    also ``array_sha256``, the hash of the values it holds, so a saved run can be tied to its data.
    An image read from a DICOM series (also through a napari layer, which keeps its metadata) gets
    ``dicom``: the series' SeriesInstanceUID, SeriesDescription and Modality where present, since
    its path names only a folder or one slice of it."""
    described = describe_source(image.source)
    if described["sha256"] is None:
        described["array_sha256"] = sha256_of_array(image.array)
    if "dicom_series" in image.metadata:
        header = image.metadata.get("header", {})
        described["dicom"] = {tag: header[tag] for tag in _DICOM_SERIES_TAGS if tag in header}
    return described


def stored_order(image: ImageVolume) -> dict[str, Any]:
    """How a 3-D input reoriented to world axis order (its metadata's ``io.image.STORED_AXIS_ORDER``:
    by ``run_fusion`` for the CLI and the API, by our napari reader for the workbench) is stored in its
    file: shape, grid, ``reoriented_from_axes`` and ``slices_reversed``; {} for an input used as stored
    (a one-slice volume's 2-D slice too: its volume's record holds it)."""
    axes = image.metadata.get(STORED_AXIS_ORDER)
    if axes is None or len(axes) != image.ndim:
        return {}
    back = np.argsort(axes).tolist()  # the stored axis i is the volume's axis back[i]
    return {"shape": [image.array.shape[axis] for axis in back], "geometry": image.stored_geometry().to_dict(),
            "reoriented_from_axes": list(axes), "slices_reversed": bool(image.metadata.get(STORED_SLICES_REVERSED))}


def image_record(image: ImageVolume) -> dict[str, Any]:
    """An input's array shape, grid and whether it is colour, as a run records each input."""
    return {"shape": list(image.array.shape), "geometry": image.geometry.to_dict(), "rgb": image.is_rgb}


def describe_label(label: ImageVolume) -> dict[str, Any]:
    """A label as the reference and moving image are described (``describe_input``, ``image_record``
    and, where it was reoriented, ``stored_order``), so that every entry point records its file,
    series, grid and stored order alike."""
    return {**describe_input(label), **image_record(label), **stored_order(label)}


def software_versions() -> dict[str, Any]:
    """What computed a run besides its inputs and settings: the packages' versions; the git revision
    (``source_revision``) of a napari_unifuse imported from a checkout, whose behaviour changes commit
    to commit under one version number; and torch's CPU thread counts, which change how sums are
    split and so the outputs' last bits. Outside the settings a rerun is compared on
    (``requested_settings``): the same request on another machine or commit is still done."""
    revision = source_revision(Path(napari_unifuse.__file__).parent)
    return {
        "napari_unifuse": napari_unifuse.__version__,
        **({"napari_unifuse_revision": revision} if revision is not None else {}),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


@functools.cache  # once per process: the code a process runs does not change under it
def source_revision(folder: Path) -> dict[str, Any] | None:
    """The commit of the git checkout whose tracked files ``folder`` holds, and whether they differ
    from it there (``dirty``: changed or new files under ``folder``); None where git is missing,
    does not answer in time, or ``folder`` is not tracked (an installed wheel, or one in a
    virtual environment inside an unrelated checkout)."""
    # The caller's GIT_DIR or GIT_WORK_TREE would name another repository than the folder's.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("GIT_")}

    def git(*arguments: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *arguments], cwd=folder, env=environment,
                              capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=True).stdout.strip()

    try:
        if not git("ls-files", "--", "."):
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "."))}
    except (OSError, subprocess.SubprocessError):
        return None


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
