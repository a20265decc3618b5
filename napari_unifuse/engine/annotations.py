"""Failure-case annotations: saved the moment they are made, reloaded with the run.

Each run directory holds one append-only JSON-lines file. Appending (rather than rewriting a
JSON document) means a crash can lose at most the record being written, never earlier ones, and
every record reaches the disk (flush + fsync) before `add` returns. Deleting appends a tombstone,
so the file is also an audit trail of who flagged and withdrew what.
"""

from __future__ import annotations

import csv
import getpass
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from napari_unifuse.errors import InputError

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
# One column per Annotation field, each once, after the run: run and method lead because a cohort
# table is read per case and per method compared.
EXPORT_COLUMNS = (
    "run",
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
)


@dataclass(frozen=True)
class Annotation:
    """One flagged failure: a whole slice, or a drawn region (points/shapes in world mm)."""

    category: str
    reviewer: str
    note: str = ""
    slice_index: int | None = None
    slice_axis: int = 0
    region_kind: str | None = None  # "points" | "shapes" | None for a whole slice
    region_world: list[list[list[float]]] = field(default_factory=list)
    method: str = "unifuse"  # the fusion method the flag is about, when runs of several are compared
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def __post_init__(self) -> None:
        if self.category not in FAILURE_CATEGORIES:
            raise InputError(
                f"unknown category {self.category!r}; choose one of {', '.join(FAILURE_CATEGORIES)}",
                "annotation",
            )
        if not self.reviewer.strip():
            raise InputError("the reviewer's name is required", "annotation")
        if not self.method.strip():
            raise InputError("name the method the annotation is about (e.g. unifuse)", "annotation")
        if self.slice_index is None and not self.region_world:
            raise InputError("flag a slice or draw a region to annotate", "annotation")


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

    def add(self, annotation: Annotation) -> Annotation:
        self._append({"action": "add", **asdict(annotation)})
        return annotation

    def delete(self, annotation_id: str, reviewer: str) -> None:
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
        """The live annotations, in the order they were made."""
        if not self.path.exists():
            return []
        live: dict[str, Annotation] = {}
        with self.path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    # Only the last line can be torn (append-only writes); earlier ones are intact.
                    raise InputError(f"line {line_number} is not valid JSON", self.path) from None
                action = record.pop("action", "add")
                if action == "delete":
                    live.pop(record["id"], None)
                else:
                    live[record["id"]] = Annotation(**record)
        return list(live.values())

    def _append(self, record: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


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
