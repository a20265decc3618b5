"""Failure-case annotations: saved the moment they are made, reloaded with the run.

Each run directory holds one append-only JSON-lines file. Appending (rather than rewriting a
JSON document) means a crash can lose at most the record being written, never earlier ones, and
every record reaches the disk (flush + fsync) before `add` returns. Deleting appends a tombstone,
so the file is also an audit trail of who flagged and withdrew what. Any line that cannot be used
(torn by a crash, not UTF-8, not a record, a category or field from a newer version) is skipped on
reading (``AnnotationStore.warnings`` says which and why) and never rewritten, and the next record
starts on a line of its own, so one bad line neither hides the other records nor blocks new ones.
"""

from __future__ import annotations

import csv
import getpass
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from napari_unifuse.errors import InputError, UniFuseError

FAILURE_CATEGORIES: tuple[str, ...] = (
    "misalignment",
    "residual artifact",
    "hallucinated structure",
    "lost structure",
    "restoration change",
    "intensity/contrast distortion",
    "wrong degradation class",
    "other",
)
ANNOTATIONS_FILE = "annotations.jsonl"
# What a flag is about: a method's fused output, or the input pair itself (flagged before any run,
# so it says nothing about a method and records none).
OUTPUT_SUBJECT, INPUTS_SUBJECT = "output", "inputs"
ANNOTATION_SUBJECTS: tuple[str, ...] = (OUTPUT_SUBJECT, INPUTS_SUBJECT)
# One column per Annotation field, each once, after the run: run, subject and method lead because a
# cohort table is read per case and per method compared.
EXPORT_COLUMNS = (
    "run",
    "subject",
    "method",
    "id",
    "created",
    "reviewer",
    "category",
    "note",
    "slice_index",
    "slice_axis",
    "region_kind",
    "region_world",
    "reference_sha256",
    "moving_sha256",
)
# Array axis of a volume's slice → the voxel coordinate it fixes (arrays are z, y, x); named by
# coordinate, not by anatomical plane, because the array axes need not be axial/coronal/sagittal.
AXIS_LETTERS = ("z", "y", "x")


@dataclass(frozen=True)
class Annotation:
    """One flagged failure: a whole slice, or a drawn region (points/shapes in world mm)."""

    category: str
    reviewer: str
    note: str = ""
    slice_index: int | None = None
    slice_axis: int = 0
    region_kind: str | None = None  # "points" | "shapes" | None for a whole slice
    # Each region's vertices in world mm: a polygon's corners, a path's points, an ellipse's outline.
    region_world: list[list[list[float]]] = field(default_factory=list)
    # The fusion method whose output is flagged, when runs of several are compared; None for a flag
    # on the inputs (``subject`` "inputs").
    method: str | None = "unifuse"
    subject: str = OUTPUT_SUBJECT  # one of ANNOTATION_SUBJECTS
    # sha256 (engine.provenance.sha256_of_array) of the reference and moving arrays the flag was made
    # on: a file replaced in place ties its old flags to the old pixels. None in older records.
    reference_sha256: str | None = None
    moving_sha256: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def __post_init__(self) -> None:
        if self.category not in FAILURE_CATEGORIES:
            raise InputError(
                f"unknown category {self.category!r}; choose one of {', '.join(FAILURE_CATEGORIES)}",
                "annotation",
            )
        if not isinstance(self.reviewer, str) or not self.reviewer.strip():
            raise InputError("the reviewer's name is required", "annotation")
        if self.subject not in ANNOTATION_SUBJECTS:
            raise InputError(f"unknown subject {self.subject!r}; one of {', '.join(ANNOTATION_SUBJECTS)}",
                             "annotation")
        if self.subject == INPUTS_SUBJECT and self.method is not None:
            raise InputError("a flag on the inputs is about no method; record method None", "annotation")
        if self.subject == OUTPUT_SUBJECT and (not isinstance(self.method, str) or not self.method.strip()):
            raise InputError("name the method the annotation is about (e.g. unifuse)", "annotation")
        if self.slice_index is None and not self.region_world:
            raise InputError("flag a slice or draw a region to annotate", "annotation")
        # A record read back from disk may hold anything: values the listing and the report would
        # trip over later are refused here, where loading skips the record with a warning.
        if not isinstance(self.note, str) or not isinstance(self.id, str) or not isinstance(self.created, str):
            raise InputError("note, id and created must be text", "annotation")
        if not (self.slice_index is None or _is_integer(self.slice_index)) or not (
                _is_integer(self.slice_axis) and 0 <= self.slice_axis < len(AXIS_LETTERS)):
            raise InputError(f"slice {self.slice_index!r} along axis {self.slice_axis!r} is not a slice of a volume",
                             "annotation")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def describe_subject(annotation: Annotation) -> str:
    """What ``annotation`` is about, for a listing or a report: the method whose output it flags, or
    "inputs" for a flag made on the input pair before any run."""
    return INPUTS_SUBJECT if annotation.subject == INPUTS_SUBJECT else str(annotation.method)


def describe_location(annotation: Annotation, volume_ndim: int) -> str:
    """Where ``annotation`` is, for a reviewer: "slice x = 23", "region on z = 5", or "image" /
    "region" for a 2D image (``volume_ndim``: the annotated image's dimensions)."""
    if volume_ndim < 3 or annotation.slice_index is None:
        return "region" if annotation.region_kind else "image"
    coordinate = f"{AXIS_LETTERS[annotation.slice_axis]} = {annotation.slice_index}"
    return f"region on {coordinate}" if annotation.region_kind else f"slice {coordinate}"


def slice_of_region(voxel_points: Sequence[Sequence[float]], shape: Sequence[int],
                    viewed_axis: int | None = None) -> tuple[int, int]:
    """(array axis, index) of the slice a drawn shape lies on, from its vertices in voxel indices of
    a volume of ``shape``: the axis along which it is flat (the viewed one when it is flat along
    several, e.g. a line), so a region keeps its own slice whatever slice is in view."""
    indices = np.round(np.asarray(voxel_points, dtype=float)).astype(int)
    flat_axes = [axis for axis in range(len(shape)) if np.all(indices[:, axis] == indices[0, axis])]
    if not flat_axes:
        raise InputError("a region crosses several slices; draw each region in the 2D view", "region")
    axis = viewed_axis if viewed_axis in flat_axes else flat_axes[0]
    index = int(indices[0, axis])
    if not 0 <= index < shape[axis]:
        raise InputError("a region lies outside the image; draw it on the image", "region")
    return axis, index


ELLIPSE_OUTLINE_VERTICES = 36


def ellipse_outline(corners: Sequence[Sequence[float]], vertices: int = ELLIPSE_OUTLINE_VERTICES) -> list[list[float]]:
    """``vertices`` points on the ellipse inscribed in the (possibly rotated) rectangle whose four
    corners, in order, are ``corners`` (napari's ellipse data), in the corners' coordinates: stored
    as they are, the corners would read as a rectangle to anyone using the exported regions."""
    corner = np.asarray(corners, dtype=float)
    if corner.shape[0] != 4:
        raise InputError(f"an ellipse needs the 4 corners of its bounding box, got {corner.shape[0]}", "region")
    centre = corner.mean(axis=0)
    half_first_side, half_second_side = (corner[1] - corner[0]) / 2, (corner[3] - corner[0]) / 2
    angles = np.linspace(0.0, 2 * np.pi, vertices, endpoint=False)
    outline = centre + np.cos(angles)[:, None] * half_first_side + np.sin(angles)[:, None] * half_second_side
    return outline.tolist()


def default_reviewer() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


class AnnotationStore:
    """The annotations of one run, persisted in ``run_dir/annotations.jsonl``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ANNOTATIONS_FILE
        self.warnings: list[str] = []  # what the last `load` had to skip, for the reviewer to see

    def add(self, annotation: Annotation) -> Annotation:
        self._append({"action": "add", **asdict(annotation)})
        return annotation

    def delete(self, annotation_id: str, reviewer: str) -> None:
        if not reviewer.strip():
            raise InputError("the reviewer's name is required to withdraw an annotation", "annotation")
        if annotation_id not in {a.id for a in self.load()}:
            raise InputError(f"no annotation with id {annotation_id}", self.path)
        self._append(
            {
                "action": "delete",
                "id": annotation_id,
                "reviewer": reviewer,
                "created": datetime.now(timezone.utc).isoformat(),
            }
        )

    def load(self) -> list[Annotation]:
        """The live annotations, in the order they were made. Lines that cannot be used (see
        :func:`_read_line`) are skipped, each named with its line number in ``warnings``: every
        valid record still counts, and the file is only read, never rewritten."""
        self.warnings = []
        if not self.path.exists():
            return []
        live: dict[str, Annotation] = {}
        try:
            # Bytes, not text: one line that is not UTF-8 must not stop the lines after it.
            with self.path.open("rb") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        entry = _read_line(line)
                    except UnusableLine as problem:
                        self.warnings.append(f"{self.path}: line {line_number} is unreadable ({problem}) and was "
                                             "skipped; the other annotations are intact")
                        continue
                    if isinstance(entry, Annotation):
                        live[entry.id] = entry
                    else:
                        live.pop(entry.annotation_id, None)
        except OSError as error:
            reason = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error))
            raise UniFuseError(f"cannot read {ANNOTATIONS_FILE} in {self.run_dir}: {reason}") from error
        return list(live.values())

    def _append(self, record: dict) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # A torn last line (no newline) would swallow this record: start a line of our own.
            separator = "\n" if self._ends_mid_line() else ""
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(separator + json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            reason = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error))
            raise UniFuseError(f"cannot write {ANNOTATIONS_FILE} in {self.run_dir}: {reason}; choose another "
                               "runs folder") from error

    def _ends_mid_line(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"


class UnusableLine(ValueError):
    """Why one line of ``annotations.jsonl`` cannot be used; loading skips it with this reason."""


@dataclass(frozen=True)
class Withdrawal:
    """A tombstone line: the annotation ``annotation_id`` was withdrawn."""

    annotation_id: str


_ANNOTATION_FIELDS = frozenset(item.name for item in fields(Annotation))
_REQUIRED_FIELDS = frozenset(item.name for item in fields(Annotation)
                             if item.default is MISSING and item.default_factory is MISSING) | {"id"}


def _read_line(line: bytes) -> Annotation | Withdrawal:
    """One line of ``annotations.jsonl`` as the annotation it adds or the withdrawal it records;
    ``UnusableLine`` when it is neither (written by a newer version, torn by a crash, edited by hand)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise UnusableLine("not UTF-8 text") from None
    except json.JSONDecodeError:
        raise UnusableLine("not a complete JSON record: a write interrupted by a crash?") from None
    if not isinstance(record, dict):
        raise UnusableLine(f"a JSON {type(record).__name__}, not a record")
    action = record.pop("action", "add")
    if action == "delete":
        if not isinstance(record.get("id"), str):
            raise UnusableLine("a withdrawal that names no annotation id")
        return Withdrawal(record["id"])
    if action != "add":
        raise UnusableLine(f"unknown action {action!r}")
    unknown = sorted(record.keys() - _ANNOTATION_FIELDS)
    if unknown:
        raise UnusableLine(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: written by a "
                           "newer version?")
    missing = sorted(_REQUIRED_FIELDS - record.keys())
    if missing:
        raise UnusableLine(f"no {', '.join(missing)}")
    try:
        return Annotation(**record)
    except InputError as error:
        raise UnusableLine(error.problem) from None


def export_cohort(run_dirs: Iterable[str | os.PathLike], csv_path: str | os.PathLike) -> int:
    """Write every live annotation of several runs to one CSV; returns the number of rows."""
    rows = 0
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        for run_dir in run_dirs:
            for annotation in AnnotationStore(run_dir).load():
                record = asdict(annotation)
                record["region_world"] = json.dumps(record["region_world"])
                writer.writerow({"run": str(run_dir), **record})
                rows += 1
    return rows


def find_runs(root: str | os.PathLike) -> Sequence[Path]:
    """Run directories below ``root`` that hold annotations (for a cohort export)."""
    return sorted(path.parent for path in Path(root).rglob(ANNOTATIONS_FILE))
