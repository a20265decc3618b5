"""The Harvard Whole Brain Atlas (AANLIB) pairs: indexing and a patient-independent split.

Layout (see the data folder's README): ``<root>/<TASK>/<MODALITY>/<id>.png`` (or ``.PNG``) with TASK one of
``CT-MRI``, ``PET-MRI``, ``SPECT-MRI``; the two modality folders of a task hold the same file
names, one pair per name. MRI is the reference; CT (grayscale) or PET/SPECT (RGB pseudo-colour)
is the moving image.

Why ``case = id // 1000``. Every id is a 4- or 5-digit number: the atlas case followed by a
3-digit slice number (``2004`` -> case 2 slice 4, ``16003`` -> case 16, ``32003`` -> case 32,
``41113`` -> case 41 slice 113; slice numbers in the collection run from 2 to 113). Neighbouring
slices of one case are near copies, so a random split would leak. The same case number also means
the same subject *across* task folders: the MRIs of cases 21 and 28 in ``CT-MRI`` and
``SPECT-MRI`` are byte-identical images (checked on the shared copy), so the split groups by case
number over all folders, never per folder.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from napari_unifuse.engine.job import is_first_process
from napari_unifuse.errors import InputError

# task folder -> (reference modality folder, moving modality folder, moving modality)
HARVARD_TASKS: dict[str, tuple[str, str, str]] = {
    "CT-MRI": ("MRI", "CT", "ct"),
    "PET-MRI": ("MRI", "PET", "pet"),
    "SPECT-MRI": ("MRI", "SPECT", "spect"),
}
SLICE_DIGITS = 3


@dataclass(frozen=True)
class HarvardPair:
    task: str  # task folder name, e.g. "PET-MRI"
    pair_id: str  # file stem, e.g. "30045"
    reference_path: Path
    moving_path: Path
    modality: str  # moving modality: "ct", "pet" or "spect"

    @property
    def case(self) -> int:
        return case_of(self.pair_id)

    @property
    def name(self) -> str:
        """How messages name the pair, e.g. "PET-MRI pair 30045"."""
        return f"{self.task} pair {self.pair_id}"


def case_of(pair_id: str) -> int:
    """Atlas case number of an id: all digits but the last three (``16003`` -> 16)."""
    if not pair_id.isdigit() or len(pair_id) <= SLICE_DIGITS:
        raise InputError(f"expected a numeric id of at least {SLICE_DIGITS + 1} digits, got {pair_id!r}", pair_id)
    return int(pair_id) // 10**SLICE_DIGITS


def index_harvard(root: str | Path, tasks: tuple[str, ...] = tuple(HARVARD_TASKS)) -> list[HarvardPair]:
    """All pairs under ``root`` for the given task folders, sorted by (task, id)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("Harvard data folder not found (set data.root in the config or --data-root)", root)
    pairs: list[HarvardPair] = []
    for task in tasks:
        if task not in HARVARD_TASKS:
            raise InputError(f"unknown Harvard task {task!r}; known: {sorted(HARVARD_TASKS)}", root)
        reference_name, moving_name, modality = HARVARD_TASKS[task]
        reference_dir, moving_dir = root / task / reference_name, root / task / moving_name
        if not reference_dir.is_dir() or not moving_dir.is_dir():
            raise InputError(f"expected folders {task}/{reference_name} and {task}/{moving_name}", root)
        reference_files, moving_files = _png_files(reference_dir), _png_files(moving_dir)
        unmatched = sorted(reference_files.keys() ^ moving_files.keys())
        if unmatched:
            raise InputError(f"{task}: files without a partner in the other folder: {unmatched[:5]}", root)
        for pair_id in sorted(reference_files, key=lambda stem: (len(stem), stem)):
            try:
                case_of(pair_id)  # validates the name
            except InputError as error:
                raise InputError(error.problem, reference_files[pair_id]) from None
            pairs.append(HarvardPair(task, pair_id, reference_files[pair_id], moving_files[pair_id], modality))
    if not pairs:
        raise InputError("no PNG pairs found", root)
    return pairs


def _png_files(folder: Path) -> dict[str, Path]:
    """The PNG files of ``folder`` by stem, their suffix in any case (``.PNG`` from some exporters).

    Hidden files are left out with a warning naming the folder: macOS writes an AppleDouble
    ``._NAME.png`` beside every file it copies to a foreign disk, which no image reader can open
    and which a file browser does not show."""
    files: dict[str, Path] = {}
    hidden = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".png" or not path.is_file():
            continue
        if path.name.startswith("."):
            hidden.append(path.name)
            continue
        if path.stem in files:
            raise InputError(f"two files of id {path.stem}: {files[path.stem].name} and {path.name}; keep one", folder)
        files[path.stem] = path
    if hidden and is_first_process():
        warnings.warn(f"{folder}: {len(hidden)} hidden file(s) left out ({', '.join(hidden[:5])}"
                      f"{', ...' if len(hidden) > 5 else ''}; macOS writes ._NAME files beside copied ones)",
                      stacklevel=3)
    return files


def split_cases(pairs: list[HarvardPair], val_fraction: float, seed: int) -> tuple[list[HarvardPair], list[HarvardPair]]:
    """Deterministic (train, validation) split with every case entirely on one side.

    Cases are visited in an order drawn from ``seed``; a case joins validation while every task
    folder it appears in still has fewer than ``ceil(val_fraction * pairs in that folder)``
    validation pairs. A folder with a single case keeps it for training. Whole cases overshoot
    the fraction a little (PET-MRI has only 3 cases: one of them is a third of that folder).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}", "data.val_fraction")
    tasks_of_case: dict[int, set[str]] = {}
    pairs_per_task_case: dict[tuple[str, int], int] = {}
    pairs_per_task: dict[str, int] = {}
    for pair in pairs:
        tasks_of_case.setdefault(pair.case, set()).add(pair.task)
        pairs_per_task_case[pair.task, pair.case] = pairs_per_task_case.get((pair.task, pair.case), 0) + 1
        pairs_per_task[pair.task] = pairs_per_task.get(pair.task, 0) + 1
    cases_per_task = {task: sum(1 for (t, _) in pairs_per_task_case if t == task) for task in pairs_per_task}
    target = {task: math.ceil(val_fraction * count) for task, count in pairs_per_task.items()}
    taken = dict.fromkeys(pairs_per_task, 0)

    validation_cases: set[int] = set()
    order = np.random.default_rng(seed).permutation(sorted(tasks_of_case))
    for case in order.tolist():
        tasks = tasks_of_case[case]
        if all(taken[t] < target[t] and cases_per_task[t] > 1 for t in tasks):
            validation_cases.add(case)
            for task in tasks:
                taken[task] += pairs_per_task_case[task, case]
    train = [p for p in pairs if p.case not in validation_cases]
    validation = [p for p in pairs if p.case in validation_cases]
    return train, validation


# The sidecar key under which a training run records the cases of its split (training.trainer): what
# its split.json holds, {"train": [case, ...], "validation": [case, ...]}, a Harvard case by its number.
RECORDED_SPLIT_KEY = "split"


class RecordedSplit(NamedTuple):
    train: list[HarvardPair]  # pairs of the cases the run trained on
    validation: list[HarvardPair]  # pairs of the cases it held out
    unrecorded: list[HarvardPair]  # pairs of cases the run never had (another copy of the atlas)


def recorded_split(metadata: dict[str, Any], pairs: list[HarvardPair]) -> RecordedSplit | None:
    """``pairs`` split by the cases a checkpoint's run recorded (its sidecar ``metadata``), or None
    where it recorded none (checkpoints of earlier versions, runs on other data than the Harvard kind).

    ``split_cases`` over another copy of the atlas (a case more or less) draws another split, and
    would hold out cases the checkpoint trained on. A case is one subject in every task folder (see
    the module docstring), so a pair belongs to its case's side whatever its task."""
    recorded = metadata.get(RECORDED_SPLIT_KEY)
    data = (metadata.get("training_config") or {}).get("data") or {}
    if recorded is None or data.get("kind") != "harvard":
        return None
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(side), list)
                                                 for side in ("train", "validation")):
        raise InputError(f"the checkpoint's '{RECORDED_SPLIT_KEY}' is not the lists of training and validation "
                         "cases a run records", RECORDED_SPLIT_KEY)
    # data.extra_sources' cases are recorded as "extra_sources[k]:NAME": not the main section's Harvard cases.
    train, validation = ({int(name) for name in recorded[side] if str(name).isdigit()}
                         for side in ("train", "validation"))
    return RecordedSplit(train=[pair for pair in pairs if pair.case in train],
                         validation=[pair for pair in pairs if pair.case in validation],
                         unrecorded=[pair for pair in pairs if pair.case not in train | validation])


def read_harvard_pair(pair: HarvardPair) -> tuple[np.ndarray, np.ndarray]:
    """(reference, moving) as float32 in [0, 1]: the MRI (y, x) and CT (y, x) or PET/SPECT RGB (y, x, 3).

    The pseudo-colour images stay RGB here: ``data.pairs.make_pair`` degrades their luma and warps
    all of Y, Cb, Cr, and the dataset then fuses Y and carries CbCr (data.color).
    """
    reference = _reference_gray(_read_png(pair.reference_path, pair), pair.reference_path)
    moving = _read_png(pair.moving_path, pair)
    _refuse_two_sizes(pair, reference.shape, moving.shape[:2])
    if moving.ndim == 3 and moving.shape[-1] in (3, 4) and not _is_gray_rgb(moving):
        if moving.dtype != np.uint8:
            raise InputError(f"expected 8-bit PNG, got {moving.dtype}", pair.moving_path)
        return reference, moving[..., :3].astype(np.float32) / 255.0
    return reference, _as_gray(moving, pair.moving_path)


def pair_shape(pair: HarvardPair) -> tuple[int, int]:
    """The (height, width) of a pair, each file checked whole against its checksums and decoded
    (two seconds for the whole atlas): a file that cannot be read, a 16-bit grey one, a blank
    image (one value or colour everywhere, which the folders kind refuses too) and two images of
    different sizes are refused before training, not at the step that first draws them."""
    from PIL import Image

    shapes = []
    for path in (pair.reference_path, pair.moving_path):
        reference_folder, moving_folder, _ = HARVARD_TASKS[pair.task]
        folder = reference_folder if path == pair.reference_path else moving_folder
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.verify()
            with Image.open(path) as image:  # verify() leaves the image unusable: opened again to decode it
                colour = _one_colour(image)
                mode = image.mode
        except (OSError, SyntaxError, ValueError) as error:  # Pillow's reasons for a file it cannot read
            raise _unreadable(path, pair, error) from None
        if mode in DEEP_GREY_MODES:
            # The atlas' 8-bit scale (read_harvard_pair divides by 255) does not hold for it.
            raise InputError(f"{pair.name}: the {folder} image is a 16-bit grey PNG, and the Harvard layout reads "
                             "8-bit PNGs, as the atlas stores them: save it as 8-bit, train it with data.kind folders "
                             "(which reads any bit depth, as unifuse fuse does) or remove the pair", path)
        if colour is not None:
            # As a label missing the reference would, a blank image trains the network to ignore it.
            held = (f"one value everywhere ({colour[0]})" if len(colour) == 1
                    else f"one colour everywhere (RGB {', '.join(map(str, colour))})")
            raise InputError(f"{pair.name}: the {folder} image holds {held}: a blank image teaches the network "
                             "nothing of its pair; remove the pair", path)
        shapes.append((height, width))
    _refuse_two_sizes(pair, *shapes)
    return shapes[0]


# Pillow's modes of a grey PNG of more than 8 bits: the reader of read_harvard_pair gives them as
# uint16 (a 16-bit colour PNG it gives as 8-bit RGB, which trains as it is).
DEEP_GREY_MODES = ("I", "I;16", "I;16B", "I;16L")


def _one_colour(image) -> tuple[float, ...] | None:
    """The value of every pixel of a Pillow ``image`` per band, transparency aside, or None where
    pixels differ (from Pillow's extrema: no array is made)."""
    bands = image.getbands()
    extrema = image.getextrema()
    if len(bands) == 1:  # Pillow gives one band's (low, high) unnested
        extrema = (extrema,)
    colour = [(low, high) for band, (low, high) in zip(bands, extrema) if band != "A"]
    if any(low != high for low, high in colour):
        return None
    return tuple(low for low, _ in colour)


def _read_png(path: Path, pair: HarvardPair) -> np.ndarray:
    from skimage.io import imread

    try:
        return imread(path)
    except (OSError, SyntaxError, ValueError) as error:
        raise _unreadable(path, pair, error) from None


def _unreadable(path: Path, pair: HarvardPair, error: Exception) -> InputError:
    return InputError(f"{pair.name}: not a readable PNG ({error}); replace the file or remove the pair", path)


def _refuse_two_sizes(pair: HarvardPair, reference: tuple[int, ...], moving: tuple[int, ...]) -> None:
    """The two images of a pair are aligned on one grid: different sizes are no pair."""
    if tuple(reference[:2]) != tuple(moving[:2]):
        reference_folder, moving_folder, _ = HARVARD_TASKS[pair.task]
        raise InputError(f"{pair.name}: the {moving_folder} image is {moving[1]}×{moving[0]} pixels and the "
                         f"{reference_folder} {reference[1]}×{reference[0]}; the two images of a pair must be the "
                         "same size, aligned: replace them or remove the pair", pair.moving_path)


def _is_gray_rgb(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


def _reference_gray(image: np.ndarray, path: Path) -> np.ndarray:
    """The reference in [0, 1]; a colour one by its BT.601 luma, as unifuse fuse reads a colour
    reference (its red channel alone would train on another image than fusion gives the network)."""
    if image.ndim == 3 and image.shape[-1] in (3, 4) and not _is_gray_rgb(image):
        from napari_unifuse.data.color import rgb_to_ycbcr

        return rgb_to_ycbcr(image[..., :3])[..., 0]
    return _as_gray(image, path)


def _as_gray(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 3:
        # Grayscale stored as RGB(A): the channels are equal, keep one.
        image = image[..., 0]
    if image.ndim != 2:
        raise InputError(f"expected a 2D image, got shape {image.shape}", path)
    if image.dtype != np.uint8:
        raise InputError(f"expected 8-bit PNG, got {image.dtype}", path)
    return image.astype(np.float32) / 255.0
