"""Training configuration: one YAML file (``configs/*.yaml``) -> frozen dataclasses.

Layout of a config file (every key optional except ``data.kind``; unknown and repeated keys are
errors so a typo or a second section never silently falls back to a default)::

    seed: 0
    model: {method: unifuse | bsafusion | mmif-amin, preset: small | paper, spatial_dims: 2 | 3,
            overrides: {<the network config's field>: value}}
    data:  {kind: harvard | phantom | folders, ...}   # see napari_unifuse.training.datasets
    train: {batch_size, max_steps, lr, min_lr, weight_decay, grad_clip, num_workers,
            log_every, val_every, val_batches, checkpoint_every, init_from, stage}
    loss:  {ce, moda, reg, smooth, ssim, inten, grad, crcb, restore,   # UniFuse's weights; other
            balance, fusion_target,                                   # methods: their own section
            moda_negatives, moda_anchors, temperature}                # (training.methods)

A partial ``train.stage`` (degradation_head, image_restoration, fusion_weight) reads only part
of ``train`` and ``loss`` (``STAGE_READS``): a key it would ignore is refused, and the loss terms
that cannot reach the module it trains weigh 0, so its logged total is the loss that trains.

Relative paths inside ``data`` (``root``) are resolved against the folder of the config file, so
``configs/harvard2d.yaml`` can say ``../../shared/data/harvard-aanlib`` (i.e. ``../shared/...``
seen from the repository root) and work from any working directory. So is ``train.init_from`` when
that file exists; a bare name (no folder, no suffix) always means a packaged checkpoint.

Numbers are range-checked here, at load, so that a value the optimiser, the schedule or the loss
would reject, or silently misuse (a negative ``grad_clip`` reverses the gradients), is named with
its allowed range before any training starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from napari_unifuse.errors import InputError


@dataclass(frozen=True)
class ModelSection:
    method: str = "unifuse"  # model.networks / training.methods
    preset: str = "small"
    spatial_dims: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSection:
    """Optimisation as in the paper (§4.2): AdamW 1e-4, cosine to 1e-6, gradient norm clipped at 1."""

    batch_size: int = 3
    max_steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    num_workers: int = 0
    log_every: int = 10
    val_every: int = 200
    val_batches: int = 8
    checkpoint_every: int = 200
    # Weights to start from (a .safetensors path or a packaged checkpoint name) for fine-tuning;
    # the optimiser and the schedule start afresh. A resumed run ignores it: it has its own weights.
    init_from: str | None = None
    # "full": train the network. "degradation_head": refit only UniFuse's degradation classifier on
    # the frozen read-outs of init_from's network (training.degradation_head); max_steps and
    # batch_size then count the head's steps and read-outs, data.train_length the crops read.
    # "image_restoration": train only UniFuse's image-space restoration path
    # (model.ufrf.ImageRestoration, model.overrides.image_restoration_width), added to init_from's
    # frozen network. "fusion_weight": refit only UniFuse's fusion weight head
    # (model.ufrf.RestorationFusion.fusion_weight_head), afresh, on init_from's frozen network.
    stage: str = "full"


HEAD_STAGE = "degradation_head"
IMAGE_RESTORATION_STAGE = "image_restoration"
FUSION_WEIGHT_STAGE = "fusion_weight"
STAGES = ("full", HEAD_STAGE, IMAGE_RESTORATION_STAGE, FUSION_WEIGHT_STAGE)
# Where the fusion and restoration losses expect the moving image (loss.fusion_target): moved by
# the network's own field (the paper's W(I_fine, φ)), or by the true field (the label where it
# lies, which the evaluation scores against).
FUSION_TARGETS = ("network_field", "true_field")
# The data kinds that read files under data.root (training.datasets.DATA_KEYS); phantoms are generated.
KINDS_WITH_ROOT = ("harvard", "folders")
# Counts below 1 train without ever logging, validating or checkpointing, or validate on nothing
# (val_batches 0: every score NaN and no best checkpoint).
TRAIN_COUNTS = ("batch_size", "max_steps", "log_every", "val_every", "val_batches", "checkpoint_every")
# What each partial stage reads of the train and loss sections (None: all of it). A config that
# sets another key would train as if it were absent (two head refits with loss.ce 0 and 1 gave the
# same weights), so config_from_dict refuses it and TrainConfig.to_dict leaves it out.
STAGE_READS: dict[str, dict[str, frozenset[str] | None]] = {
    # The head's own loop (training.degradation_head): cross-entropy on the read-outs, unclipped,
    # logged every 100 steps, validated and saved once at the end.
    HEAD_STAGE: {"train": frozenset({"stage", "init_from", "batch_size", "max_steps", "lr", "min_lr",
                                     "weight_decay", "num_workers", "val_batches"}),
                 "loss": frozenset()},
    # Only L_restore reaches the restoration path: the fusion reads the restored image detached, and
    # the class, the field and the fusion weight are frozen. fusion_target places L_restore's target.
    IMAGE_RESTORATION_STAGE: {"train": None, "loss": frozenset({"restore", "fusion_target"})},
    # Only the fusion losses reach the fusion weight head: the restored image enters the blend
    # detached, and with the field frozen L_crcb (the chroma moved by the field) moves nothing.
    FUSION_WEIGHT_STAGE: {"train": None, "loss": frozenset({"ssim", "inten", "grad", "balance", "fusion_target"})},
}


@dataclass(frozen=True)
class LossSection:
    """Weights of Eq. 15 (all 1 in the paper) plus our optional terms, and L_moda's sampling."""

    ce: float = 1.0
    moda: float = 1.0
    reg: float = 1.0
    smooth: float = 0.0
    ssim: float = 1.0
    inten: float = 1.0
    grad: float = 1.0
    crcb: float = 1.0
    restore: float = 1.0
    # Ours: max over the sources of (1 − SSIM(I_f, S)), i.e. minus the fused image's smaller
    # per-source gain up to a constant. Under Eq. 11–12 alone a copy of the MRI costs no more than
    # max fusion on PET/SPECT (measured on atlas pairs: 0.675 vs 0.675 PET, 0.586 vs 0.597 SPECT);
    # with this term at 3 a copy is the worst of copy, average, max and their mix on every task.
    balance: float = 3.0
    # One of FUSION_TARGETS (training.objective.fusion_target).
    fusion_target: str = "network_field"
    moda_negatives: int = 16
    moda_anchors: int = 256
    temperature: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    data: dict[str, Any]
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: Any = field(default_factory=LossSection)  # the method's loss section (training.methods)
    source: str | None = None  # the file it came from, for messages and metadata

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("source")
        # What the stage does not read is not part of the run (and a file may not set it).
        return without_unread_keys(values)

    def with_overrides(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with some fields of ``train``/``model``/``loss`` or keys of ``data`` replaced,
        validated as a config file would be (an override can break a range, e.g. lr below min_lr)."""
        if "root" in (sections.get("data") or {}) and self.data["kind"] not in KINDS_WITH_ROOT:
            raise InputError(f"data.kind {self.data['kind']} generates its pairs and reads no data.root: "
                             f"--data-root applies to {' and '.join(KINDS_WITH_ROOT)} configs", self.source)
        values = self.to_dict()
        # A copy may change the stage: this config's keys the new stage does not read are dropped,
        # while an override it does not read is refused like a file's.
        values["train"]["stage"] = (sections.get("train") or {}).get("stage", self.train.stage)
        values = without_unread_keys(values)
        for name, changes in sections.items():
            if changes:
                values[name] = {**values[name], **changes}
        return config_from_dict(values, self.source)


def _section(cls: type, values: Any, source: str | None, name: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise InputError(f"section '{name}' must be a mapping, got {type(values).__name__}", source)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"unknown keys in '{name}': {unknown}; allowed: {sorted(known)}", source)
    converted = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        if isinstance(default, bool) or default is None or isinstance(default, dict):
            converted[key] = value
        elif isinstance(default, (int, float)):
            try:
                if isinstance(value, bool):  # YAML's true/yes would otherwise count as 1
                    raise TypeError
                converted[key] = type(default)(value)
            except (TypeError, ValueError):
                raise InputError(f"'{name}.{key}' must be a number, got {value!r}", source) from None
            if isinstance(default, int) and converted[key] != value:
                raise InputError(f"'{name}.{key}' must be an integer, got {value!r}", source)
        else:
            converted[key] = value
    return cls(**converted)


def config_from_dict(values: dict[str, Any], source: str | None = None, base_dir: Path | None = None) -> TrainConfig:
    """Validate a parsed config; relative ``data.root`` is made absolute against ``base_dir``."""
    if not isinstance(values, dict):
        raise InputError("a training config must be a YAML mapping", source)
    allowed = {"seed", "model", "data", "train", "loss"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise InputError(f"unknown top-level keys {unknown}; allowed: {sorted(allowed)}", source)
    data = values.get("data")
    if not isinstance(data, dict) or "kind" not in data:
        raise InputError("'data' must be a mapping with a 'kind' (harvard, phantom or folders)", source)
    data = _root_resolved(data, base_dir)
    if isinstance(data.get("extra_sources"), list):
        data["extra_sources"] = [_root_resolved(extra, base_dir) if isinstance(extra, dict) else extra
                                 for extra in data["extra_sources"]]
    model = _section(ModelSection, values.get("model"), source, "model")
    from napari_unifuse.training.methods import objective_for  # its modules import this one

    objective = objective_for(model.method, source)
    if model.preset not in ("small", "paper"):
        raise InputError(f"model.preset must be 'small' or 'paper', got {model.preset!r}", source)
    if model.spatial_dims not in (2, 3):
        raise InputError(f"model.spatial_dims must be 2 or 3, got {model.spatial_dims}", source)
    train = _section(TrainSection, values.get("train"), source, "train")
    if train.init_from is not None and not isinstance(train.init_from, str):
        raise InputError(f"train.init_from must be a checkpoint path or name, got {train.init_from!r}", source)
    if train.init_from is not None and base_dir is not None and not _is_checkpoint_name(train.init_from):
        # A file next to the config wins; anything else stays as given (a path relative to the
        # working directory).
        beside_config = _against(base_dir, train.init_from)
        if beside_config.is_file():
            train = dataclasses.replace(train, init_from=str(beside_config))
    if train.stage not in STAGES:
        raise InputError(f"train.stage must be one of {list(STAGES)}, got {train.stage!r}", source)
    if train.stage != "full" and (model.method != "unifuse" or train.init_from is None):
        raise InputError(f"train.stage {train.stage!r} trains part of a trained UniFuse: it needs "
                         "model.method unifuse and train.init_from", source)
    if train.stage == IMAGE_RESTORATION_STAGE and not (model.overrides or {}).get("image_restoration_width"):
        raise InputError("train.stage 'image_restoration' trains the image-space restoration path: set "
                         "model.overrides.image_restoration_width (e.g. 16)", source)
    _refuse_keys_the_stage_ignores(train.stage, values, source)
    loss = _section(objective.loss_section, values.get("loss"), source, "loss")
    if train.stage in STAGE_READS:
        from napari_unifuse.training.objective import LOSS_TERMS  # it imports this module

        # The terms that cannot reach the trained module weigh nothing: the logged total is the loss that trains.
        loss = dataclasses.replace(loss, **{term: 0.0 for term in unread_keys(train.stage, "loss", LOSS_TERMS)})
    if isinstance(loss, LossSection) and loss.fusion_target not in FUSION_TARGETS:
        raise InputError(f"loss.fusion_target must be one of {list(FUSION_TARGETS)}, got {loss.fusion_target!r}",
                         source)
    _check_train_ranges(train, source)
    if isinstance(loss, LossSection):
        _check_loss_ranges(loss, source)
    _check_data_ranges(data, "data", source)
    if isinstance(data.get("extra_sources"), list):
        from napari_unifuse.training.datasets import INHERITED_DATA_KEYS

        inherited = {key: data[key] for key in INHERITED_DATA_KEYS if key in data}
        for number, extra in enumerate(data["extra_sources"]):
            if isinstance(extra, dict):
                _check_data_ranges({**inherited, **extra}, f"data.extra_sources[{number}]", source)
    seed = values.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}", source)
    return TrainConfig(
        data=data,
        seed=seed,
        model=model,
        train=train,
        loss=loss,
        source=source,
    )


def unread_keys(stage: str, section: str, keys: Iterable[str]) -> set[str]:
    """Those of ``keys`` (of the ``train`` or ``loss`` section) that ``stage`` does not read."""
    reads = STAGE_READS.get(stage, {}).get(section)
    return set() if reads is None else set(keys) - reads


def without_unread_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A parsed config without the train and loss keys its stage does not read: what a run folder's
    config.yaml written before the stage refused them holds (the run still resumes), and what a
    copy of a config made for another stage holds (``TrainConfig.with_overrides``)."""
    train = values.get("train")
    stage = train.get("stage", "full") if isinstance(train, dict) else "full"
    stripped = dict(values)
    for section in ("train", "loss"):
        if isinstance(values.get(section), dict):
            unread = unread_keys(stage, section, values[section])
            stripped[section] = {key: value for key, value in values[section].items() if key not in unread}
    return stripped


def _refuse_keys_the_stage_ignores(stage: str, values: dict[str, Any], source: str | None) -> None:
    ignored = [f"{section}.{key}" for section in ("train", "loss") if isinstance(values.get(section), dict)
               for key in sorted(unread_keys(stage, section, values[section]))]
    if not ignored:
        return
    reads = [f"{section}: {', '.join(sorted(STAGE_READS[stage][section] or ())) or 'nothing'}"
             for section in ("train", "loss") if STAGE_READS[stage][section] is not None]
    raise InputError(f"train.stage {stage!r} does not use {', '.join(ignored)}: remove "
                     f"{'it' if len(ignored) == 1 else 'them'} (it reads {'; '.join(reads)})", source)


def _require(allowed: bool, key: str, bounds: str, value: Any, source: str | None) -> None:
    if not allowed:
        raise InputError(f"{key} must be {bounds}, got {value!r}", source)


def _check_train_ranges(train: TrainSection, source: str | None) -> None:
    for name in TRAIN_COUNTS:
        _require(getattr(train, name) >= 1, f"train.{name}", "at least 1", getattr(train, name), source)
    _require(train.num_workers >= 0, "train.num_workers", "at least 0", train.num_workers, source)
    # The comparisons are False for NaN, so NaN is refused with the rest.
    _require(0 < train.lr < math.inf, "train.lr", "a finite number above 0", train.lr, source)
    # min_lr above lr would make the cosine schedule climb instead of decay.
    _require(0 <= train.min_lr <= train.lr, "train.min_lr", f"between 0 and train.lr ({train.lr:g})",
             train.min_lr, source)
    _require(0 <= train.weight_decay < math.inf, "train.weight_decay", "a finite number of at least 0",
             train.weight_decay, source)
    # clip_grad_norm_ scales the gradients by max/norm: 0 zeroes them and a negative max reverses
    # them (gradient ascent). .inf clips nothing.
    _require(train.grad_clip > 0, "train.grad_clip", "above 0 (.inf: no clipping)", train.grad_clip, source)


def _check_loss_ranges(loss: LossSection, source: str | None) -> None:
    from napari_unifuse.training.objective import LOSS_TERMS  # it imports this module

    for name in LOSS_TERMS:
        # A negative weight would maximise its loss.
        _require(0 <= getattr(loss, name) < math.inf, f"loss.{name}", "a finite number of at least 0",
                 getattr(loss, name), source)
    for name in ("moda_negatives", "moda_anchors"):
        _require(getattr(loss, name) >= 1, f"loss.{name}", "at least 1", getattr(loss, name), source)
    _require(0 < loss.temperature < math.inf, "loss.temperature", "a finite number above 0", loss.temperature,
             source)


def _check_data_ranges(section: dict[str, Any], where: str, source: str | None) -> None:
    """The tasks, folder layout and values (DATA_VALUES) of one data source; its other keys are
    checked where the datasets are built (training.datasets)."""
    if section.get("kind") == "folders":
        from napari_unifuse.training.datasets import folder_layout  # it imports torch

        try:
            folder_layout(section)
        except InputError as error:
            raise InputError(f"{where}: {error.problem}", source) from None
    if "misalignment" in section:
        from napari_unifuse.data.misalign import misalignment_from_options

        try:
            misalignment_from_options(section["misalignment"])
        except InputError as error:
            raise InputError(f"{where}.misalignment: {error.problem}", source) from None
    if "tasks" in section:
        tasks = section["tasks"]
        _require(isinstance(tasks, (list, tuple)) and len(tasks) > 0, f"{where}.tasks",
                 "a list of at least one task", tasks, source)
    for name, (allowed, bounds) in DATA_VALUES.items():
        if name in section:
            _require(allowed(section[name]), f"{where}.{name}", bounds, section[name], source)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # YAML's true is no number


def _is_integer(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_size(value: Any) -> bool:
    """Unset, one size, or one per axis (how many is checked against model.spatial_dims where the
    datasets are built). A string is none: "32" would be read as the sizes 3 and 2."""
    sizes = value if isinstance(value, (list, tuple)) else [value]
    return value is None or (len(sizes) > 0 and all(_is_integer(size, 1) for size in sizes))


# The data keys whose values the datasets convert, each with what it must be: checked at load, so
# that a wrong one is named in one line instead of failing in a conversion (or being read as
# something else: a whole_image_degradations string as its letters). The comparisons are False for
# NaN, so NaN is refused with the rest; the kinds' own checks (tasks, crop against the images) come
# where the datasets are built (training.datasets).
DATA_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "none_fraction": (lambda value: _is_number(value) and 0 <= value <= 1, "a number between 0 and 1"),
    "severity": (lambda value: isinstance(value, (list, tuple)) and len(value) == 2
                 and all(_is_number(bound) for bound in value) and 0 <= value[0] <= value[1] <= 1,
                 "[low, high], two numbers with 0 <= low <= high <= 1"),
    "val_fraction": (lambda value: _is_number(value) and 0 <= value < 1, "a number of at least 0 and below 1"),
    "split_seed": (lambda value: _is_integer(value, 0), "a non-negative integer"),
    "samples_per_case": (lambda value: _is_integer(value, 1), "an integer of at least 1"),
    # val_length 0 validates on nothing: every score NaN and no best checkpoint.
    "train_length": (lambda value: _is_integer(value, 1), "an integer of at least 1"),
    "val_length": (lambda value: _is_integer(value, 1), "an integer of at least 1"),
    "crop": (_is_size, "one size or one per axis, integers of at least 1"),
    "size": (_is_size, "one size or one per axis, integers of at least 1"),
    "whole_image_degradations": (lambda value: isinstance(value, (list, tuple))
                                 and all(isinstance(name, str) for name in value),
                                 "a list of degradation names, e.g. [motion]"),
}


def _is_checkpoint_name(init_from: str) -> bool:
    """A bare name (``unifuse-2d-harvard``) names a packaged checkpoint, never a file beside the config."""
    path = Path(init_from)
    return path.name == init_from and not path.suffix


def _root_resolved(section: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """A copy of a ``data`` section whose relative ``root`` is made absolute against ``base_dir``."""
    if base_dir is None or section.get("root") is None:
        return dict(section)
    return {**section, "root": str(_against(base_dir, section["root"]))}


def _against(base_dir: Path, path: str) -> Path:
    """``path`` from a config file: relative ones are relative to the file's folder."""
    path = Path(str(path)).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def packaged_config_dir() -> Path:
    """The packaged training configs (``napari_unifuse/configs`` links to ``configs/``)."""
    return Path(str(resources.files("napari_unifuse") / "configs"))


def list_packaged_configs() -> list[str]:
    """Names of the packaged training configs, usable with :func:`load_config`."""
    folder = packaged_config_dir()
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def _config_file(path: Path) -> Path:
    """``path`` when it is a file; else the packaged config it names: a bare name (``harvard2d-cpu``,
    ``.yaml`` or not) or ``configs/<name>.yaml``, the checkout's path that the README and the bundled
    checkpoints' recorded commands give, so that those commands also run from an installed package."""
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")) and path.suffix in ("", ".yaml"):
        packaged = packaged_config_dir() / f"{path.stem}.yaml"
        if packaged.is_file():
            return packaged
    available = ", ".join(list_packaged_configs()) or "none"
    raise InputError(f"training config not found: give a YAML file or a packaged config's name ({available})",
                     path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word, so a second ``train:`` section
    would drop the whole first one: a repeated key is refused, naming it and both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            # A merge (<<) brings in keys that the mapping's own keys are meant to replace.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise yaml.YAMLError(f"key {key!r} is given twice (lines {first_lines[key]} and {line}), and only "
                                     "the last would count: keep one of them, or merge them into one")
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a repeated key (yaml.YAMLError); every config read goes through it."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(path: str | Path, **overrides: dict[str, Any]) -> TrainConfig:
    """Read and validate a training config YAML file, or a packaged one by name (``harvard2d-cpu``);
    ``overrides`` (section → fields, the command line's) replace the file's fields before the
    validation, which judges the config they make (a stage's ``--init-from`` supplies the
    ``train.init_from`` the file leaves out)."""
    path = _config_file(Path(path))
    try:
        values = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise InputError(f"not valid YAML: {error}", path) from None
    if isinstance(values, dict):
        for name, changes in overrides.items():
            section = values.get(name)
            if changes and (section is None or isinstance(section, dict)):
                values[name] = {**(section or {}), **changes}
    return config_from_dict(values, source=str(path), base_dir=path.resolve().parent)
