"""Failure-case annotations: saved the moment they are made, reloaded with the run.

Each run directory holds one append-only JSON-lines file. Appending (rather than rewriting a
JSON document) means a crash can lose at most the record being written, never earlier ones, and
every record reaches the disk (flush + fsync) before `add` returns. Deleting appends a tombstone,
so the file is also an audit trail of who flagged and withdrew what. Any line that cannot be used
(torn by a crash, not UTF-8, not a record, a category or field from a newer version) is skipped on
reading (``AnnotationStore.skipped`` says which and why) and never rewritten, and the next record
starts on a line of its own, so one bad line neither hides the other records nor blocks new ones.

A flag records the content hashes of the input pair it was made on. A run folder may later hold a
run of other inputs (``unifuse fuse --overwrite`` after an input was replaced): its old flags are
kept, and ``InputHashes`` tells them apart, so the report and the cohort export never present them
as about the new result.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from napari_unifuse.engine.outputs import PROVENANCE_FILE, STAGING_PREFIX, read_json_object, write_text_atomically
from napari_unifuse.engine.provenance import sha256_of_array, sha256_of_path
from napari_unifuse.errors import InputError, UniFuseError
from napari_unifuse.io import ImageVolume, read_image
from napari_unifuse.io.image import STORED_AXIS_ORDER, single_slice_axis_of

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
    "about_other_inputs",
)
# A cohort export's header is a few hundred characters: the first line of another file is read no further.
COHORT_HEADER_READ_LIMIT = 4096
# about_other_inputs: whether the flag was made on other input arrays than its run folder's run (an
# earlier run's, replaced with --overwrite); "unknown" where the flag or the run records no hashes.
OTHER_INPUTS_ANSWERS = {True: "yes", False: "no", None: "unknown"}
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


def describe_location(annotation: Annotation, image_shape: Sequence[int]) -> str:
    """Where ``annotation`` is, for a reviewer: "slice x = 23", "region on z = 5", or "image" /
    "region" for a 2D image or a one-slice volume, which is one (``image_shape``: the annotated
    image's spatial shape)."""
    if len(image_shape) < 3 or single_slice_axis_of(image_shape) is not None or annotation.slice_index is None:
        return "region" if annotation.region_kind else "image"
    coordinate = f"{AXIS_LETTERS[annotation.slice_axis]} = {annotation.slice_index}"
    return f"region on {coordinate}" if annotation.region_kind else f"slice {coordinate}"


def slice_of_region(voxel_points: Sequence[Sequence[float]], shape: Sequence[int],
                    viewed_axis: int | None = None) -> tuple[int, int]:
    """(array axis, index) of the slice a drawn shape lies on, from its vertices in voxel indices of
    a volume of ``shape``: the axis along which it is flat (the viewed one when it is flat along
    several, e.g. a line), so a region keeps its own slice whatever slice is in view. On a one-slice
    volume that is its one slice, the image, whatever plane of it was in view."""
    indices = np.round(np.asarray(voxel_points, dtype=float)).astype(int)
    flat_axes = [axis for axis in range(len(shape)) if np.all(indices[:, axis] == indices[0, axis])]
    one_slice_axis = single_slice_axis_of(shape)
    if one_slice_axis is not None:
        axis = one_slice_axis
    elif not flat_axes:
        raise InputError("a region crosses several slices; draw each region in the 2D view", "region")
    else:
        axis = viewed_axis if viewed_axis in flat_axes else flat_axes[0]
    index = int(indices[0, axis])
    # Not flat along a one-slice volume's slice: it strays off the one voxel the image is thick.
    if axis not in flat_axes or not 0 <= index < shape[axis]:
        raise InputError("a region lies outside the image; draw it on the image", "region")
    return axis, index


def slice_in_world_axis_order(volume: ImageVolume, axis: int, index: int) -> tuple[int, int]:
    """(array axis, index) on the grid of ``volume.in_world_axis_order()`` of slice ``index`` along
    array ``axis`` of ``volume`` as it is stored: the grid a run's outputs lie on, on which flags
    count slices. An image a script placed with slices stored head to foot, or with permuted axes,
    names its slices otherwise than the run that reads it."""
    if volume.is_in_world_axis_order:
        return axis, index
    # in_world_axis_order transposes by world_axis_order() (new axis j is stored axis order[j]), then
    # reverses its new first axis where the slices ran head to foot.
    new_axis = volume.geometry.world_axis_order().index(axis)
    if new_axis == 0 and volume.slices_stored_head_to_foot:
        return new_axis, volume.spatial_shape[axis] - 1 - index
    return new_axis, index


# Since when flags count a volume's slices on its grid in world axis order (napari's slider steps, as
# the outputs do): versions before (22873cd, 576ac67, 74728c1 included) counted them as the file, or
# a script's layer, stores them, so on a volume stored head to foot or with permuted axes their slice
# may name another one (head to foot: slice k then is slice n-1-k now).
SLICES_COUNTED_IN_WORLD_ORDER_SINCE = datetime(2026, 12, 7, 12, 21, 13, tzinfo=timezone.utc)


def flags_perhaps_counted_as_stored(annotations: Iterable[Annotation], volume: ImageVolume) -> list[Annotation]:
    """The flags on a slice of ``volume`` made before ``SLICES_COUNTED_IN_WORLD_ORDER_SINCE``, when
    ``volume`` is not stored in world axis order (read from a file that stores it otherwise, or a
    layer that holds it so): their slice numbers may be counted as stored. A flag records no version,
    only when it was made, so this cannot be told for certain: they are for the reviewer to check.
    A flag whose time cannot be read counts as early."""
    if volume.ndim != 3 or volume.single_slice_axis is not None or (
            volume.is_in_world_axis_order and STORED_AXIS_ORDER not in volume.metadata):
        return []
    return [annotation for annotation in annotations
            if annotation.slice_index is not None and not _made_since(annotation, SLICES_COUNTED_IN_WORLD_ORDER_SINCE)]


def _made_since(annotation: Annotation, moment: datetime) -> bool:
    try:
        created = datetime.fromisoformat(annotation.created)
    except ValueError:
        return False
    if created.tzinfo is None:  # a hand-edited time without a zone: ours are written in UTC
        created = created.replace(tzinfo=timezone.utc)
    return created >= moment


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
        self.skipped: list[SkippedLine] = []  # what the last `load` had to skip, for the reviewer to see

    @property
    def warnings(self) -> list[str]:
        """``skipped`` as messages for the reviewer, each naming the file, the line and why."""
        return [str(line) for line in self.skipped]

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
        :func:`_read_line`) are skipped, each named with its line number in ``skipped``: every
        valid record still counts, and the file is only read, never rewritten."""
        self.skipped = []
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
                        self.skipped.append(SkippedLine(self.path, line_number, str(problem)))
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
class SkippedLine:
    """A line of an ``annotations.jsonl`` that loading skipped: the file, its line number and why."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: line {self.line} is unreadable ({self.reason}) and was skipped; the other annotations " \
               "are intact"


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


@dataclass(frozen=True)
class InputHashes:
    """The ``sha256_of_array`` hashes under which a run's reference and moving arrays may be flagged
    (None: not known). A volume has two: its array as read, and as a napari layer holds it (in
    world-axis order, another array for a coronal or sagittal volume), which is what the workbench
    hashes when a flag is made."""

    reference: frozenset[str] | None
    moving: frozenset[str] | None

    @classmethod
    def of_volumes(cls, reference: ImageVolume, moving: ImageVolume) -> InputHashes:
        return cls(_array_hashes(reference), _array_hashes(moving))

    @classmethod
    def of_digests(cls, reference: str | None, moving: str | None) -> InputHashes:
        """From one ``sha256_of_array`` per input (None where it is not known)."""
        return cls(*(frozenset({digest}) if digest else None for digest in (reference, moving)))

    @classmethod
    def of_run(cls, run_dir: str | os.PathLike) -> InputHashes:
        """The inputs of the finished run in ``run_dir``, as its provenance.json records them: the
        ``array_sha256`` of an input that came from memory; an input read from a file is read again,
        when the file still holds what the run read (its recorded sha256). Unknown otherwise (no run,
        the file since changed or gone)."""
        inputs = (read_json_object(Path(run_dir) / PROVENANCE_FILE) or {}).get("inputs")
        if not isinstance(inputs, dict):
            inputs = {}
        return cls(*(_recorded_array_hashes(inputs.get(role)) for role in ("reference", "moving")))

    def made_on_other_inputs(self, annotation: Annotation) -> bool | None:
        """Whether ``annotation`` was made on other arrays than these: True when a hash it records is
        not this input's, False when every hash both sides know agrees, None when nothing compares."""
        compared = [flagged in current for flagged, current in ((annotation.reference_sha256, self.reference),
                                                                (annotation.moving_sha256, self.moving))
                    if flagged is not None and current is not None]
        return (not all(compared)) if compared else None


def _array_hashes(volume: ImageVolume) -> frozenset[str]:
    return frozenset({sha256_of_array(volume.array), sha256_of_array(volume.in_world_axis_order().array)})


def _recorded_array_hashes(described: object) -> frozenset[str] | None:
    """``InputHashes`` of one input from its provenance record (``provenance.describe_input``)."""
    if not isinstance(described, dict):
        return None
    if isinstance(described.get("array_sha256"), str):
        return frozenset({described["array_sha256"]})
    path, file_sha256 = described.get("path"), described.get("sha256")
    if not isinstance(path, str) or not isinstance(file_sha256, str):
        return None
    try:
        if sha256_of_path(path) != file_sha256:
            return None  # replaced since the run: its arrays are no longer on disk
        return _array_hashes(read_image(path))
    except (OSError, UniFuseError):
        return None


@dataclass(frozen=True)
class CohortExport:
    """What ``export_cohort`` wrote: its rows, how many of them were made on other inputs than their
    run's (``about_other_inputs`` "yes"), and the annotation lines it skipped as unusable."""

    rows: int
    about_other_inputs: int
    skipped: list[SkippedLine]


def export_cohort(run_dirs: Iterable[str | os.PathLike], csv_path: str | os.PathLike) -> CohortExport:
    """Write every live annotation of several runs to one CSV, each saying whether it was made on
    other inputs than its run folder's run (``InputHashes.of_run``). Lines that cannot be used are
    not exported: the result names them.

    The CSV is composed in memory and renamed over ``csv_path`` whole, so a full disk or a run that
    cannot be read leaves an earlier export whole, never a truncated one. A target that cannot take
    it is refused before any run is read (``check_cohort_target``)."""
    csv_path = Path(csv_path)
    check_cohort_target(csv_path)
    rows = about_other_inputs = 0
    skipped: list[SkippedLine] = []
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()
    for run_dir in run_dirs:
        store = AnnotationStore(run_dir)
        annotations = store.load()
        skipped += store.skipped
        # Reading the run's inputs again is the costly part: only flags that record hashes need it.
        run_inputs = (InputHashes.of_run(run_dir) if any(a.reference_sha256 or a.moving_sha256 for a in annotations)
                      else InputHashes(None, None))
        for annotation in annotations:
            other_inputs = run_inputs.made_on_other_inputs(annotation)
            about_other_inputs += other_inputs is True
            record = asdict(annotation)
            record["region_world"] = json.dumps(record["region_world"])
            writer.writerow({"run": _readable_path(run_dir), **record,
                             "about_other_inputs": OTHER_INPUTS_ANSWERS[other_inputs]})
            rows += 1
    # The csv module ends its rows itself: written untranslated, as csv's own files must be. A text
    # that is not UTF-8 (a reviewer from a Latin-1 $USER keeps its byte as a lone surrogate) is
    # written escaped, as \udce9, rather than losing the whole export.
    write_text_atomically(csv_path, table.getvalue(), errors="backslashreplace", newline="")
    return CohortExport(rows, about_other_inputs, skipped)


def _readable_path(path: str | os.PathLike) -> str:
    """``path`` as UTF-8 text: the bytes of a name that is not UTF-8 (a Latin-1 folder unpacked on
    Linux) written as ``\\xe9``: a UTF-8 CSV cannot hold them as they are."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def check_cohort_target(csv_path: Path) -> None:
    """Refuse (InputError) a cohort CSV path in a folder that does not exist, one that is a folder,
    and a file that holds something else than a cohort export (a ``--pairs`` table, say): a path
    typed by hand must not replace it. An earlier export, of this version or an older one, may be."""
    if not csv_path.parent.is_dir():
        raise InputError("there is no such folder; choose an existing folder for the cohort CSV", csv_path.parent)
    if csv_path.is_dir():
        raise InputError("is a folder; choose a file name ending in .csv", csv_path)
    if csv_path.exists() and not _holds_a_cohort_export(csv_path):
        raise InputError("is not a cohort export (its header names other columns), so it is not replaced; choose "
                         "another file name", csv_path)


def _holds_a_cohort_export(path: Path) -> bool:
    """Whether ``path`` is empty (nothing to lose) or headed as a cohort export: "run" first and only
    cohort columns, which every version's export keeps (later versions added columns). utf-8-sig:
    an export that a spreadsheet saved again as "CSV UTF-8" starts with a byte order mark."""
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
        header = next(csv.reader([handle.readline(COHORT_HEADER_READ_LIMIT)]), [])
    return not header or (header[0] == "run" and set(header) <= set(EXPORT_COLUMNS))


@dataclass(frozen=True)
class TreeFolder:
    """One folder of a runs tree (``walk_runs_tree``): its files, and its subfolders apart from the
    hidden staging folders of a run being written (``staging``), which belong to their run."""

    path: Path
    files: list[str]
    subfolders: list[str]
    staging: list[str]


def walk_runs_tree(root: str | os.PathLike, on_unreadable: Callable[[Path, OSError], object] | None = None
                   ) -> Iterator[TreeFolder]:
    """Every folder below ``root`` (itself included), top down, as the QC index and the cohort export
    both see a cohort: symbolic links to folders followed (a cohort is often gathered from links),
    each real folder once (a link back up the tree would loop), staging folders not entered. Folders
    that cannot be listed go to ``on_unreadable(folder, error)``."""
    root = Path(root)
    seen: set[str] = set()

    def unreadable(error: OSError) -> None:
        if on_unreadable is not None:
            on_unreadable(Path(error.filename) if error.filename is not None else root, error)

    for folder, subfolders, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or two links to one run
            subfolders.clear()
            continue
        seen.add(real)
        staging = [name for name in subfolders if name.startswith(STAGING_PREFIX)]
        subfolders[:] = [name for name in subfolders if name not in staging]
        yield TreeFolder(Path(folder), files, list(subfolders), staging)


def find_runs(root: str | os.PathLike) -> Sequence[Path]:
    """Run directories below ``root`` that hold annotations (for a cohort export), found as the QC
    index finds runs (``walk_runs_tree``)."""
    return sorted(folder.path for folder in walk_runs_tree(root) if ANNOTATIONS_FILE in folder.files)
