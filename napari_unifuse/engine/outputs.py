"""The on-disk contract of one fused pair, written so that a half-written run never looks done.

``fused.<ext>``, ``aligned.<ext>`` (restored + aligned moving), ``displacement.<map ext>`` (ITK
displacement field, moving → reference), ``degradation.json`` and ``provenance.json``; ``<ext>`` is
``png`` for a raster-image reference, ``mha`` for a colour (RGB PET/SPECT) result on another
reference's grid or a sheared one NIfTI cannot hold (``io.writers.nifti_holds_grid``), ``nii.gz``
otherwise. With quality maps (``result.quality``)
also ``invented.<map ext>``, ``lost.<map ext>``, ``restoration_change.<map ext>``,
``uncertainty.<map ext>`` (when computed) and ``quality.json`` (thresholds, per-slice scores,
suspicious slices): float maps in the reference geometry. ``<map ext>`` (``map_extension``) is
``nii.gz``, even for PNG inputs (8 bits would round the maps away; a 2D NIfTI keeps the pixel
spacing), and ``mha`` on a sheared grid (a gantry-tilted CT): NIfTI's qform, which ITK tools read,
cannot hold a shear and would place them millimetres away from the reference. A NIfTI reference's
sheared sform is the exception: its outputs keep its qform and sform, each tool placing them as it
places the reference. Everything is first written into a hidden
staging folder next to the outputs and then renamed into place (a rename within one file system is
atomic), ``provenance.json`` last: it, with the four outputs written before it (``is_complete``),
is what marks a pair as finished for ``unifuse fuse --pairs`` resuming; a folder whose outputs were
since deleted is not finished, and is redone. ``metrics.json`` (given a label's metrics) is staged with them.

A folder is written for one run at a time: every file an earlier run left there under a name this
package writes (``known_output_names``) goes before the new files move in, so old and new never
mix; other files are left alone. No output may replace or remove an input: an input that sits at
one of those names in the folder is refused before anything is written. Two runs never write one
folder at once: ``output_folder_lock`` (an exclusive, non-blocking ``flock`` of the folder, which
leaves nothing in it) is held for the whole write, and
``unifuse fuse`` and the workbench hold it from their "already done?" check to the end of the
write; a second run finding it held is refused at once (``FolderBusyError``). Where the platform
has no such locks (no ``fcntl``: Windows) the folder is not locked.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_unifuse.engine.quality import UNCERTAINTY, QualityMaps
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError, UniFuseError
from napari_unifuse.io import ImageVolume, placement_metadata, write_image
from napari_unifuse.io.fields import write_displacement
from napari_unifuse.io.writers import nifti_holds_grid
from napari_unifuse.json_records import standard_json

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are written unlocked
    fcntl = None  # type: ignore[assignment]

PROVENANCE_FILE = "provenance.json"
DEGRADATION_FILE = "degradation.json"
# Float outputs (field, quality and review maps): NIfTI, MetaImage on a sheared grid NIfTI cannot hold (map_extension).
MAP_EXTENSIONS = ("nii.gz", "mha")
DISPLACEMENT_STEM = "displacement"
DISPLACEMENT_FILE = f"{DISPLACEMENT_STEM}.nii.gz"  # an ordinary run's field
QUALITY_FILE = "quality.json"
# Map name (engine.quality) → file name without its extension; the uncertainty is named for what it is on disk.
QUALITY_MAP_STEMS = {"invented": "invented", "lost": "lost", "restoration_change": "restoration_change",
                     UNCERTAINTY: "uncertainty"}
QUALITY_MAP_FILES = {name: f"{stem}.nii.gz" for name, stem in QUALITY_MAP_STEMS.items()}  # an ordinary run's
METRICS_FILE = "metrics.json"
# The hidden folder a run's outputs are written into before they move in together.
STAGING_PREFIX = ".unifuse-partial-"
REPORT_FILE = "report.html"  # engine.report's QC page of a run
# Without locks (no fcntl), a staging folder this recent may be another run's live one: left alone.
STALE_STAGING_SECONDS = 3600.0
# The workbench's review maps, saved beside the outputs: float maps, as map_extension says (MHA for PNG runs).
REVIEW_MAP_NAMES = ("alignment_error", "jacobian_determinant", "folding")
REVIEW_MAP_EXTENSIONS = MAP_EXTENSIONS
# FusionResult.output_extension: raster-image references, colour results on other grids, the rest.
IMAGE_EXTENSIONS = ("png", "mha", "nii.gz")


def cannot_write_there(folder: Path, error: OSError) -> InputError:
    """The one-line error for a folder the outputs cannot be written to (a file in its path, no
    permission, a read-only or full disk), naming the folder and the system's reason."""
    return InputError(f"cannot write there ({error.strerror or error})", folder)


def map_extension(volume: ImageVolume) -> str:
    """The extension of the float outputs on ``volume``'s grid (field, quality maps): NIfTI where it
    places them as every tool places the reference (``nifti_holds_grid``: a sheared grid only with the
    reference's own NIfTI forms), else MetaImage (a gantry-tilted CT), which holds the shear."""
    return "nii.gz" if nifti_holds_grid(volume) else "mha"


def output_file_names(extension: str, field_extension: str = "nii.gz") -> tuple[str, ...]:
    """The five outputs in the order they are moved into place; the completion marker comes last.
    ``extension``: the images' (``FusionResult.output_extension``); ``field_extension``: the
    displacement field's (``map_extension`` of the grid)."""
    return (f"fused.{extension}", f"aligned.{extension}", f"{DISPLACEMENT_STEM}.{field_extension}",
            DEGRADATION_FILE, PROVENANCE_FILE)


def quality_file_names(quality: QualityMaps, extension: str = "nii.gz") -> tuple[str, ...]:
    """The quality outputs of ``quality``: one file per map it holds (``extension``: the grid's
    ``map_extension``), then ``quality.json``."""
    return (*(f"{QUALITY_MAP_STEMS[name]}.{extension}" for name in quality.maps()), QUALITY_FILE)


def review_map_extension(result: FusionResult) -> str:
    """The extension of the workbench's review maps of ``result``: MetaImage for a PNG run (a 2D
    float image with its pixel spacing), else the grid's ``map_extension``."""
    return "mha" if result.output_extension == "png" else map_extension(result.fused)


def known_output_names() -> frozenset[str]:
    """Every file name ``write_fusion_outputs``, the QC page and the workbench give a run folder:
    the outputs for either image and map extension, the quality outputs, the label's metrics,
    ``report.html`` and the review maps."""
    return frozenset({*(name for extension in IMAGE_EXTENSIONS for field_extension in MAP_EXTENSIONS
                        for name in output_file_names(extension, field_extension)),
                      *(f"{stem}.{extension}" for stem in QUALITY_MAP_STEMS.values() for extension in MAP_EXTENSIONS),
                      QUALITY_FILE, METRICS_FILE, REPORT_FILE,
                      *(f"{name}.{extension}" for name in REVIEW_MAP_NAMES for extension in REVIEW_MAP_EXTENSIONS)})


def is_complete(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished run: ``provenance.json`` and the outputs written before it."""
    return not missing_outputs(out_dir)


def missing_outputs(out_dir: str | Path) -> list[str]:
    """The files of ``output_file_names`` that ``out_dir`` lacks, in their order; empty for a finished
    run. The images' and the field's extensions are those of the files there (a PNG run's
    ``fused.png``); where none of a kind is left, it is named with ``*`` (``fused.*``). Existence
    checks only: nothing is read."""
    folder = Path(out_dir)

    def extension_present(stems: Iterable[str], extensions: Iterable[str]) -> str:
        return next((extension for stem in stems for extension in extensions
                     if (folder / f"{stem}.{extension}").is_file()), "*")

    names = output_file_names(extension_present(("fused", "aligned"), IMAGE_EXTENSIONS),
                              extension_present((DISPLACEMENT_STEM,), MAP_EXTENSIONS))
    return [name for name in names if not (folder / name).is_file()]


def read_provenance(out_dir: str | Path) -> dict[str, Any] | None:
    """The provenance of the finished run in ``out_dir``; None where there is none, it is unreadable
    or it is not of the shape a run writes (another tool's ``provenance.json``)."""
    provenance = read_json_object(Path(out_dir) / PROVENANCE_FILE)
    return provenance if _is_run_provenance(provenance) else None


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, damaged or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_earlier_version_provenance(out_dir: str | Path) -> dict[str, Any] | None:
    """The provenance of a finished run in ``out_dir`` as versions before 2026-12-03 wrote it, when
    UniFuse was the only method and no method was recorded: the inputs and UniFuse's checkpoint and
    model config; None for any other (``read_provenance``'s, or none at all)."""
    provenance = read_json_object(Path(out_dir) / PROVENANCE_FILE)
    is_earlier = (provenance is not None and _has_run_sections(provenance) and "method" not in provenance
                  and isinstance(provenance.get("checkpoint"), dict) and isinstance(provenance.get("model_config"), dict))
    return provenance if is_earlier else None


def _is_run_provenance(provenance: Any) -> bool:
    """Whether ``provenance`` has the sections a run records, as JSON objects: inputs (one object
    per role) and method always; checkpoint, model_config and requested_settings where present."""
    return _has_run_sections(provenance) and isinstance(provenance.get("method"), dict)


def _has_run_sections(provenance: Any) -> bool:
    """Whether ``provenance`` holds inputs (one object per role) and, where present, checkpoint,
    model_config and requested_settings, as JSON objects."""
    if not isinstance(provenance, dict):
        return False
    inputs = provenance.get("inputs")
    return (isinstance(inputs, dict) and all(isinstance(source, dict) for source in inputs.values())
            and all(isinstance(provenance.get(section), dict | None)
                    for section in ("checkpoint", "model_config", "requested_settings")))


def refuse_overwriting_inputs(out_dir: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise an InputError naming the first input that writing outputs into ``out_dir`` would
    replace or remove: one that is (by path, link or hard link) a file of ``known_output_names``
    there. None entries (an optional input not given) are ignored."""
    out_dir = Path(out_dir)
    for source in (Path(source) for source in inputs if source is not None):
        for name in sorted(known_output_names()):
            if same_file(out_dir / name, source):
                raise InputError(f"this input sits where the {name} output goes and would be replaced; "
                                 "write the outputs to another folder", source)


def same_file(first: str | Path, second: str | Path) -> bool:
    """The same file by path, symbolic link or hard link; False when either does not exist (or is
    no file path at all, as a layer name)."""
    first, second = Path(first), Path(second)
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist: not the same file
        return False


class FolderBusyError(UniFuseError):
    """Another run (another ``unifuse fuse``, the workbench's Save) holds the folder's lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__(f"{folder}: another unifuse run is writing into this folder; wait for it to finish "
                         "or write the outputs to another folder")


@dataclass
class FolderLock:
    """A held ``output_folder_lock``; ``held`` is False where the folder could not be locked (no
    ``fcntl``, or a folder this process cannot create files in, where it cannot write outputs either)."""

    folder: Path
    held: bool


@contextmanager
def output_folder_lock(out_dir: str | Path) -> Iterator[FolderLock]:
    """Hold ``out_dir``'s write lock (creating the folder): raises ``FolderBusyError`` at once when
    another process (or another lock in this one) holds it. The lock is on the folder itself, so
    it leaves nothing behind (no file, no changed modification time); on release the folders this
    call created go again when nothing was put in them."""
    out_dir = Path(out_dir)
    if fcntl is None:
        yield FolderLock(out_dir, held=False)
        return
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]
    descriptor = _lock_descriptor(out_dir)
    try:
        yield FolderLock(out_dir, held=descriptor is not None)
    finally:
        # Removed while still locked: a run that opened the folder and locks it after this release
        # finds the path no longer names it, and locks the one there now.
        for folder in created:  # deepest first; only where still empty
            try:
                folder.rmdir()
            except OSError:
                break
        if descriptor is not None:
            os.close(descriptor)


def _lock_descriptor(out_dir: Path) -> int | None:
    """An open descriptor of the folder ``out_dir``, exclusively locked; None where the folder
    cannot be created or locked (no folder: nothing can be written there, and the write says why; a
    file system without locks: written unlocked)."""
    assert fcntl is not None
    while True:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:  # a releasing run removed the empty folder it had created: again
            continue
        except OSError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FolderBusyError(out_dir) from None
            return None  # a file system without locks (some network mounts)
        try:
            current = os.stat(out_dir)
        except FileNotFoundError:
            current = None
        opened = os.fstat(descriptor)
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return descriptor
        os.close(descriptor)  # locked a folder another run removed on release: lock the one there now


def write_json(data: Any, path: Path, *, atomic: bool = False) -> None:
    """Standard JSON: an undefined value (NaN, e.g. the SSIM of a blank slice, or ±inf) is ``null``.

    Python would write ``NaN``, which jq, JavaScript and most JSON readers outside Python reject.
    ``atomic``: written beside ``path`` and renamed over it, so a full disk or an interrupt leaves
    the earlier file whole, never a truncated one.
    """
    text = standard_json(data, indent=2) + "\n"
    if atomic:
        write_text_atomically(path, text)
    else:
        path.write_text(text, encoding="utf-8")


def write_text_atomically(path: Path, text: str, errors: str = "strict", newline: str | None = None) -> None:
    """Write ``text`` (UTF-8) to a hidden file beside ``path`` and rename it over ``path``: readers
    see the earlier file or the whole new one. The new file gets the usual permissions (umask).
    ``newline`` as ``open``'s: "" writes the text's line ends as they are (a CSV's own)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")  # a name no other writer picks
    try:
        temporary.write_text(text, encoding="utf-8", errors=errors, newline=newline)
        os.replace(temporary, path)
    except OSError as error:
        with suppress(OSError):  # on a read-only file system even removing a file that is not there fails
            temporary.unlink(missing_ok=True)
        if error.errno is None:
            raise
        # Name the file the caller asked for, not the hidden one beside it that failed.
        raise type(error)(error.errno, error.strerror, str(path)) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_writable_folder(folder: Path, keep: bool = True) -> None:
    """Create ``folder`` (with its parents) and create and remove a file in it, so that a folder a
    command cannot write to is refused (InputError, one line) before its work rather than after.
    ``keep=False`` removes again the folders this check created (a command refused later for
    another reason leaves nothing behind); they are created anew when the outputs are written."""
    refuse_dangling_link(folder)
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the --out folder ({error.strerror or error})", folder) from error
    try:
        handle, probe = tempfile.mkstemp(prefix=STAGING_PREFIX, dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise cannot_write_there(folder, error) from error
    finally:
        if not keep:
            for path in missing:  # deepest first
                try:
                    path.rmdir()
                except OSError:
                    break  # something else has been put there meanwhile: leave it


def refuse_dangling_link(folder: Path) -> None:
    """Raise an InputError when ``folder``, or a folder above it, is a symbolic link to nothing,
    naming the missing target: creating the folder fails there with "File exists", and the user,
    finding nothing at the path, cannot act on that."""
    for path in (folder, *folder.parents):
        if path.is_symlink() and not path.exists():
            target = Path(os.path.realpath(path))  # a relative link's, from the link's folder
            raise InputError(f"is a symbolic link to {target}, which does not exist: create {target} or choose "
                             "another --out", path)


def write_files_together(folder: Path, writers: Mapping[str, Callable[[Path], object]], *,
                         before_moving: Callable[[], None] | None = None,
                         lock: FolderLock | None = None) -> dict[str, Path]:
    """Write each file of ``folder`` (name -> what writes it, given the path to write) into a hidden
    staging folder there, and only once all are written move them into place, in ``writers``'
    order (the last one: the folder's completeness marker); ``before_moving`` runs in between (it
    removes an earlier run's files). Returns name -> final path.

    A failed write (a full disk) is an InputError naming the file, the folder's earlier files as
    they were; an InputError of a writer that names the staged file names the final one instead.
    The staging folder goes whatever happens; those of writes killed midway go first
    (``_remove_unused_staging``). ``lock``: the caller's held ``output_folder_lock`` of ``folder``;
    without one it is taken for the write (``FolderBusyError`` when another run holds it)."""
    if lock is None:
        with output_folder_lock(folder) as taken:
            return write_files_together(folder, writers, before_moving=before_moving, lock=taken)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_unused_staging(folder, lock)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    except OSError as error:
        raise cannot_write_there(folder, error) from error
    path, untouched = folder, "; the folder's earlier files are as they were"
    try:
        for name, write in writers.items():
            path = folder / name
            write(staging / name)
        untouched = ""
        if before_moving is not None:
            before_moving()
        for name in writers:
            path = folder / name
            os.replace(staging / name, path)
    except OSError as error:
        raise InputError(f"cannot be written ({error.strerror or error}){untouched}", path) from error
    except InputError as error:  # io's own, naming the staged file
        if not (isinstance(error.source, Path) and error.source.parent == staging):
            raise
        raise InputError(error.problem, folder / error.source.name) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: folder / name for name in writers}


def write_fusion_outputs(result: FusionResult, out_dir: str | Path, *, metrics: Mapping[str, float] | None = None,
                         remove_report: bool = False, report: Callable[[], str] | None = None,
                         extra_images: Mapping[str, ImageVolume] | None = None,
                         lock: FolderLock | None = None) -> dict[str, Path]:
    """Write the five outputs, the quality outputs when ``result.quality`` is set,
    ``metrics.json`` when ``metrics`` are given, ``report.html`` (the page ``report`` returns)
    when ``report`` is given and ``extra_images`` (file name → image: the workbench's review maps)
    into ``out_dir`` (created if needed); return name → final path. They all move in with the rest,
    before ``provenance.json``: a folder that looks done holds them whole.

    Files of ``known_output_names`` an earlier run left in ``out_dir`` are removed before the new
    ones move in; ``report.html`` only with ``remove_report`` or ``report``: a page written for
    this very result before it was saved is current. Refuses (InputError) before writing anything
    when that would replace or remove an input recorded in ``result.provenance``. ``lock``: the
    caller's held ``output_folder_lock`` of ``out_dir``; without one it is taken for the write
    (``FolderBusyError`` when another run holds it)."""
    out_dir = Path(out_dir)
    recorded_inputs = result.provenance.get("inputs", {}).values()
    refuse_overwriting_inputs(out_dir, (source.get("path") for source in recorded_inputs))
    if lock is None:
        with output_folder_lock(out_dir) as taken:
            return write_fusion_outputs(result, out_dir, metrics=metrics, remove_report=remove_report,
                                        report=report, extra_images=extra_images, lock=taken)
    geometry = result.fused.geometry
    float_extension = map_extension(result.fused)
    fused_name, aligned_name, field_name, *_ = output_file_names(result.output_extension, float_extension)
    writers: dict[str, Callable[[Path], object]] = {
        fused_name: lambda path: write_image(result.fused, path),
        aligned_name: lambda path: write_image(result.aligned, path),
        field_name: lambda path: write_displacement(result.displacement, geometry, path,
                                                    reference_metadata=result.fused.metadata,
                                                    moving_placement=result.moving_itk_placement),
        DEGRADATION_FILE: lambda path: write_json(result.degradation_report(), path),
    }
    quality = result.quality
    if quality is not None:
        for name, array in quality.maps().items():
            on_fused_grid = {"role": name, **placement_metadata(result.fused.metadata)}
            writers[f"{QUALITY_MAP_STEMS[name]}.{float_extension}"] = _image_writer(
                ImageVolume(array, geometry, on_fused_grid))
        writers[QUALITY_FILE] = lambda path: write_json(quality.to_dict(), path)
    if metrics is not None:
        writers[METRICS_FILE] = lambda path: write_json(dict(metrics), path)
    if report is not None:
        # errors="replace": an input path that is not UTF-8 (in the provenance) shows as "?".
        writers[REPORT_FILE] = lambda path: path.write_text(report(), encoding="utf-8", errors="replace")
    for name, volume in (extra_images or {}).items():
        writers[name] = _image_writer(volume)
    writers[PROVENANCE_FILE] = lambda path: write_json(result.provenance, path)  # the marker, last

    def remove_earlier_run() -> None:
        # Its marker first, so old and new files mixed never look complete.
        (out_dir / PROVENANCE_FILE).unlink(missing_ok=True)
        kept = set(writers) if remove_report or report is not None else {*writers, REPORT_FILE}
        for name in sorted(known_output_names() - kept):
            (out_dir / name).unlink(missing_ok=True)

    return write_files_together(out_dir, writers, before_moving=remove_earlier_run, lock=lock)


def _image_writer(volume: ImageVolume) -> Callable[[Path], object]:
    return lambda path: write_image(volume, path)


def _remove_unused_staging(out_dir: Path, lock: FolderLock) -> None:
    """Remove the staging folders of writes killed midway (SIGKILL skips their ``finally``), never
    one in use: under the folder's lock no other write is going on, so that is every one there;
    unlocked (no ``fcntl``), only those untouched for ``STALE_STAGING_SECONDS``."""
    for leftover in out_dir.glob(f"{STAGING_PREFIX}*"):
        if not lock.held:
            try:
                if time.time() - leftover.stat().st_mtime < STALE_STAGING_SECONDS:
                    continue
            except OSError:
                continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
