"""Save / load network weights as safetensors (never pickles) with their method and config.

``<name>.safetensors`` holds the weights and, in its header, the method (``model.networks``:
unifuse, bsafusion, mmif-amin; absent in older files, which are UniFuse) and the config the weights
belong to (so a lone weights file can be checked and rebuilt). ``<name>.json`` next to it holds the
same method and config plus the caller's metadata (training command, seed, wall time, device,
metrics) for people and tools. Bare names resolve to the packaged
``resources/checkpoints/<name>.safetensors``.

Loading refuses weights holding NaN or inf (they fuse every image to black) and a sidecar that is
not a JSON object, that describes other weights than the header's, or whose training crop (which
the engine tiles and reads the degradation classifier at) is not a side the network can run on.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from napari_unifuse.errors import CheckpointError, InputError
from napari_unifuse.json_records import standard_json
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.costs import minimum_size
from napari_unifuse.model.networks import NETWORKS, config_from_dict, network_class, network_method

SUFFIX = ".safetensors"
# Every method's config goes under this key (the package's name for "the network config").
_CONFIG_KEY = "unifuse_config"
_METHOD_KEY = "method"
DEFAULT_METHOD = "unifuse"  # checkpoints written before methods were recorded
_MAX_LISTED = 5
# A training run saves checkpoint NAME into NAME's folder/.saving-NAME/, marks it COMMITTED once
# complete, then moves its files beside the previous ones (training.trainer.Trainer._save).
STAGING_PREFIX = ".saving-"
COMMITTED = "COMMITTED"
_RESTORE_SIDECAR = "copy the .json saved with these weights beside them, or remove it to run with defaults"


def checkpoint_dir() -> Path:
    """The packaged checkpoints folder (``napari_unifuse/resources`` links to ``resources/``)."""
    return Path(str(resources.files("napari_unifuse") / "resources" / "checkpoints"))


def list_checkpoints(method: str | None = None) -> list[str]:
    """Names of the packaged checkpoints (of ``method`` only, when given), usable with :func:`load_checkpoint`."""
    folder = checkpoint_dir()
    names = sorted(path.stem for path in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    return [name for name in names if method is None or checkpoint_method(folder / f"{name}{SUFFIX}") == method]


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A path to an existing file, or a bare name of a packaged checkpoint.

    A file of that bare name in the working directory is used before the packaged checkpoint, a
    folder is not: an earlier ``--out`` named like a bundled checkpoint must not shadow it."""
    path = Path(path_or_name)
    if path.is_file():
        _refuse_a_file_beside_the_weights(path)
        _refuse_an_unfinished_save(path)
        return path
    packaged = _packaged_checkpoint(path_or_name)
    if packaged is not None:
        return packaged
    if path.is_dir():
        # A training run's folder: its weights are in checkpoints/ (best and last).
        found = sorted(path.glob(f"*{SUFFIX}")) or sorted(path.glob(f"checkpoints/*{SUFFIX}"))
        hint = f"; pass one of its weights files: {', '.join(str(file) for file in found)}" if found else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    available = ", ".join(list_checkpoints()) or "none"
    raise CheckpointError(f"checkpoint {str(path_or_name)!r} not found (neither a file nor a "
                          f"packaged checkpoint; packaged: {available})")


# The files a checkpoint NAME keeps beside NAME.safetensors (training.trainer), and what each one
# is: read as weights, they fail deep in safetensors ("header too large").
_BESIDE_THE_WEIGHTS = {
    ".json": "a checkpoint's JSON sidecar (its metadata)",
    ".state.pt": "a training run's resume state (optimiser and step, read by `unifuse train --resume`)",
}


def _refuse_a_file_beside_the_weights(path: Path) -> None:
    for suffix, what in _BESIDE_THE_WEIGHTS.items():
        if path.name.lower().endswith(suffix):
            weights = path.with_name(path.name[:-len(suffix)] + SUFFIX)
            beside = (f"pass the weights beside it, {weights}" if weights.is_file()
                      else f"its weights, {weights.name}, are not beside it")
            raise CheckpointError(f"{path} is {what}, not its weights: {beside}")


def _packaged_checkpoint(path_or_name: str | Path) -> Path | None:
    """The packaged checkpoint ``path_or_name`` names, when it is a bare name (with or without
    the suffix) of one; None otherwise."""
    path = Path(path_or_name)
    if path.name != str(path_or_name) or path.suffix not in ("", SUFFIX):
        return None
    packaged = checkpoint_dir() / f"{path.stem}{SUFFIX}"
    return packaged if packaged.is_file() else None


def _refuse_an_unfinished_save(path: Path) -> None:
    """A save killed while its files moved in leaves a mix of the new (say the .json) and the old
    (the weights): refused, not read, until the run's ``--resume`` finishes the move (reading
    code never writes a run folder, which that run may still be saving into)."""
    staging = path.parent / f"{STAGING_PREFIX}{path.stem}"
    if (staging / COMMITTED).is_file():
        run = path.parent.parent
        raise CheckpointError(f"{path}: an interrupted save of {path.stem} is beside it ({staging.name}), so its "
                              f"files may come from two saves; finish it with `unifuse train --config "
                              f"{run / 'config.yaml'} --out {run} --resume`, or wait if that run is still saving")


def save_checkpoint(model: nn.Module, path: str | Path,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors is appended if missing) and its ``.json`` sidecar; ``model`` is
    any network of ``model.networks`` (its method is recorded in both)."""
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    tensors = {name: tensor.detach().cpu().contiguous()
               for name, tensor in model.state_dict().items()}
    method = network_method(model)
    save_file(tensors, str(path), metadata={_METHOD_KEY: method, _CONFIG_KEY: json.dumps(config)})
    sidecar = {"method": method, "config": config, **(metadata or {})}
    path.with_suffix(".json").write_text(standard_json(sidecar, indent=2) + "\n", encoding="utf-8")
    return path


def load_checkpoint(path_or_name: str | Path, map_location: str | torch.device = "cpu",
                    expected_config: UniFuseConfig | None = None,
                    method: str | None = DEFAULT_METHOD) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network saved at ``path_or_name``; returns (model in eval mode, metadata).

    ``method``: the method the caller wants (a UniFuse by default); a checkpoint of another method
    is refused with a message naming the one it is for. ``None`` accepts any method.
    ``expected_config``: fail unless the checkpoint was saved for exactly this config.
    Raises :class:`CheckpointError` for a missing, corrupt or mismatching checkpoint.
    """
    path = resolve_checkpoint(path_or_name)
    found, config, tensors = _read(path, map_location)
    if method is not None:
        check_method(path, found, method)
    if expected_config is not None:
        _check_config(expected_config, config, path)
    model = network_class(found)(config)
    _load_tensors(model, tensors, path)
    model.to(map_location).eval()
    return model, _read_metadata(path, found, config)


def load_weights(model: nn.Module, path_or_name: str | Path, *, except_module: str | None = None,
                 fields_of_that_module: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Load a checkpoint's weights into an existing ``model`` built for the same method and config;
    returns (the checkpoint's path, its metadata).

    ``except_module`` (a module's name in the state dict, e.g. ``"dapl.classifier"``) keeps that
    module's weights as the model has them, for a refit that re-initialises it; the config fields
    in ``fields_of_that_module``, which shape only that module, may then differ."""
    path = resolve_checkpoint(path_or_name)
    found, config, tensors = _read(path, next(model.parameters()).device)
    check_method(path, found, network_method(model))
    _check_config(model.config, config, path, ignored=fields_of_that_module if except_module else ())
    if except_module is not None:
        prefix = except_module + "."
        own = {name: tensor for name, tensor in model.state_dict().items() if name.startswith(prefix)}
        if not own:
            raise CheckpointError(f"{path}: the model has no module {except_module!r} to keep")
        tensors = {**{name: tensor for name, tensor in tensors.items() if not name.startswith(prefix)}, **own}
    _load_tensors(model, tensors, path)
    return path, _read_metadata(path, found, config)


def read_metadata(path_or_name: str | Path) -> dict[str, Any]:
    """A checkpoint's JSON sidecar (how it was trained), checked against its header; the weights are not read."""
    path = resolve_checkpoint(path_or_name)
    method, config, _ = _read(path, "cpu", with_tensors=False)
    return _read_metadata(path, method, config)


def set_metadata_section(path_or_name: str | Path, key: str, value: Any) -> Path:
    """Set one top-level section of a checkpoint's JSON sidecar (a calibration written after
    training); the weights are not touched. Returns the sidecar's path."""
    path = resolve_checkpoint(path_or_name)
    metadata = read_metadata(path)
    metadata[key] = value
    sidecar = path.with_suffix(".json")
    sidecar.write_text(standard_json(metadata, indent=2) + "\n", encoding="utf-8")
    return sidecar


def training_crop(metadata: dict[str, Any]) -> int | None:
    """Side of the random crops a checkpoint was trained on (its sidecar's ``data.crop``), or None
    when it saw whole images or does not say.

    A network whose degradation classifier pools Mamba read-outs over the whole input meets a
    different token count, and so different pooled statistics, on larger inputs: the CPU-trained
    2D checkpoint classified 128² crops of the validation pairs right and every whole 256² slice
    as low-dose. Inference therefore tiles at this size unless told otherwise.

    A run of a partial ``train.stage`` reports its network's crop (recorded in ``initial_weights``),
    not its own: it trained one module on the network's read-outs and leaves those as they were.
    """
    config = metadata.get("training_config") or {}
    initial = metadata.get("initial_weights") or {}
    if (config.get("train") or {}).get("stage", "full") != "full" and "training_crop" in initial:
        return initial["training_crop"]
    crop = (config.get("data") or {}).get("crop")
    if not crop:
        return None
    return int(max(crop)) if isinstance(crop, (list, tuple)) else int(crop)


def read_config(path_or_name: str | Path):
    """The config a checkpoint was saved for, from its header alone (no weights are read): a
    ``UniFuseConfig`` for UniFuse, the method's own config class otherwise."""
    return _read(resolve_checkpoint(path_or_name), "cpu", with_tensors=False)[1]


def checkpoint_method(path_or_name: str | Path) -> str:
    """The method a checkpoint's weights belong to, from its header alone."""
    return _read(resolve_checkpoint(path_or_name), "cpu", with_tensors=False)[0]


def check_method(path: Path, found: str, wanted: str) -> None:
    if found != wanted:
        # No option named: fuse gives a method by --method, evaluate by --methods NAME=CHECKPOINT.
        raise CheckpointError(f"{path} holds {found} weights, not {wanted} ones; use it with the {found} "
                              f"method or pick a {wanted} checkpoint")


def _read(path: Path, device, with_tensors: bool = True) -> tuple[str, Any, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from error
    if _CONFIG_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file without a UniFuse config in its header")
    method = header.get(_METHOD_KEY, DEFAULT_METHOD)
    if method not in NETWORKS:
        raise CheckpointError(f"{path}: holds weights of an unknown network {method!r} (saved by a newer "
                              f"napari-unifuse?); known: {', '.join(NETWORKS)}")
    try:
        config = config_from_dict(method, json.loads(header[_CONFIG_KEY]))
    except (json.JSONDecodeError, InputError, TypeError) as error:
        raise CheckpointError(f"{path}: invalid {method} config in the header ({error})") from error
    return method, config, tensors


def config_differences(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields two configs (their ``to_dict()``) set differently: name -> (mine, theirs), in the
    order of ``mine``'s fields, then any only ``theirs`` has."""
    return {name: (mine.get(name), theirs.get(name)) for name in dict.fromkeys([*mine, *theirs])
            if mine.get(name) != theirs.get(name)}


def _check_config(expected, found, path: Path, ignored: tuple[str, ...] = ()) -> None:
    if hasattr(expected, "differences"):
        differences = expected.differences(found)
    else:
        differences = dict(sorted(config_differences(expected.to_dict(), found.to_dict()).items()))
    differences = {name: values for name, values in differences.items() if name not in ignored}
    if differences:
        listed = "; ".join(f"{name}: model has {mine}, checkpoint has {theirs}"
                           for name, (mine, theirs) in differences.items())
        # Training from it (--init-from) needs the checkpoint's values: say where a training config takes them.
        settings = [f"model.spatial_dims: {differences['spatial_dims'][1]}"] if "spatial_dims" in differences else []
        overrides = ", ".join(f"{name}: {json.dumps(theirs)}" for name, (_, theirs) in differences.items()
                              if name != "spatial_dims")
        settings += [f"model.overrides: {{{overrides}}}"] if overrides else []
        raise CheckpointError(f"{path}: checkpoint was saved for another config ({listed}); to train from it, "
                              f"give the training config {' and '.join(settings)}")


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [f"{name} {tuple(tensors[name].shape)} (model: {tuple(tensor.shape)})"
                   for name, tensor in expected.items()
                   if name in tensors and tensors[name].shape != tensor.shape]
    problems = [f"{label}: {', '.join(names[:_MAX_LISTED])}"
                + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")
                for label, names in (("missing tensors", missing),
                                     ("unexpected tensors", unexpected),
                                     ("mismatching shapes", wrong_shape)) if names]
    if problems:
        # Its header's config builds this version's network, whose tensors differ: saved by an earlier
        # version of the package whose network has changed since (or edited by hand).
        raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(problems)}); a checkpoint saved "
                              "by an earlier version of napari-unifuse, whose network has changed since, is refused "
                              "so: fuse with the version that trained it, or train it again with this one (its "
                              "sidecar's command, `unifuse info --checkpoint` shows it)")
    _refuse_non_finite(tensors, path)
    model.load_state_dict(tensors)


def _refuse_non_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # NaN or inf weights (a diverged run, corrupted bytes) load and run, and fuse every image to black.
    corrupt = [name for name, tensor in tensors.items()
               if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if corrupt:
        first = tensors[corrupt[0]]
        count = int((~torch.isfinite(first)).sum())
        others = f", and {len(corrupt) - 1} more tensors hold some" if len(corrupt) > 1 else ""
        raise CheckpointError(f"{path}: corrupt weights: tensor {corrupt[0]} holds {count} NaN or infinite values "
                              f"of {first.numel()}{others}; download or train the checkpoint again")


def _read_metadata(path: Path, method: str, config) -> dict[str, Any]:
    """The JSON sidecar beside ``path`` ({} when there is none), refused with a CheckpointError naming it
    unless it is an object that describes the header's ``method`` and ``config`` and whose fields the
    engine reads (``training_crop``) hold what they should."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{sidecar}: not UTF-8 text, so not JSON metadata ({error}); "
                              f"{_RESTORE_SIDECAR}") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{sidecar}: invalid JSON metadata ({error}); {_RESTORE_SIDECAR}") from error
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{sidecar}: the JSON metadata is {_json_kind(metadata)}, not an object of named "
                              f"fields; {_RESTORE_SIDECAR}")
    _check_sidecar_describes_the_weights(sidecar, metadata, method, config)
    training = _section(sidecar, metadata, "training_config")
    _section(sidecar, training, "training_config.train")  # training_crop and `unifuse info` read its stage
    _check_crop(sidecar, "training_config.data.crop", _section(sidecar, training, "training_config.data").get("crop"),
                config)
    initial = _section(sidecar, metadata, "initial_weights")
    _check_crop(sidecar, "initial_weights.training_crop", initial.get("training_crop"), config)
    _section(sidecar, metadata, "validation")  # `unifuse info` lists its named scores
    limitations = metadata.get("limitations")
    if limitations is not None and not isinstance(limitations, str):
        raise CheckpointError(f"{sidecar}: 'limitations' is {_json_kind(limitations)}, not text; {_RESTORE_SIDECAR}")
    return metadata


def _check_sidecar_describes_the_weights(sidecar: Path, metadata: dict[str, Any], method: str, config) -> None:
    # A sidecar copied from another checkpoint would apply its training crop and calibrations silently.
    described = metadata.get(_METHOD_KEY, DEFAULT_METHOD)
    if described != method:
        raise CheckpointError(f"{sidecar} describes {described} weights but the weights are {method} ones: the "
                              f"sidecar belongs to another checkpoint; {_RESTORE_SIDECAR}")
    if "config" not in metadata:
        return
    try:
        recorded = config_from_dict(method, _section(sidecar, metadata, "config")).to_dict()
    except (InputError, TypeError) as error:
        raise CheckpointError(f"{sidecar}: invalid {method} config under 'config' ({error}); "
                              f"{_RESTORE_SIDECAR}") from error
    weights = config.to_dict()
    differing = list(config_differences(weights, recorded))
    if differing:
        key = differing[0]
        others = f" (and {len(differing) - 1} more config fields differ)" if len(differing) > 1 else ""
        raise CheckpointError(f"{sidecar} describes {key} {json.dumps(recorded[key])} but the weights are {key} "
                              f"{json.dumps(weights[key])}{others}: the sidecar belongs to another checkpoint; "
                              f"{_RESTORE_SIDECAR}")


def _section(sidecar: Path, parent: dict[str, Any], key: str) -> dict[str, Any]:
    """``parent``'s field named by the last part of the dotted ``key``: an object, or {} when absent or null."""
    value = parent.get(key.rsplit(".", 1)[-1])
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{sidecar}: '{key}' is {_json_kind(value)}, not an object of named fields; "
                              f"{_RESTORE_SIDECAR}")
    return value


def _check_crop(sidecar: Path, key: str, crop: Any, config) -> None:
    """A recorded training crop (null: whole images) must be sides the network can have been trained on;
    the engine tiles and reads its degradation classifier at it."""
    if crop is None:
        return
    smallest = minimum_size(config) if isinstance(config, UniFuseConfig) else config.size_multiple
    sides = crop if isinstance(crop, list) else [crop]
    if not sides or not all(isinstance(side, int) and not isinstance(side, bool) and side >= smallest
                            for side in sides):
        raise CheckpointError(f"{sidecar}: '{key}' is {json.dumps(crop)}, not a training crop of this network (a "
                              f"whole number of voxels, at least {smallest}, one or one per axis, or null for whole "
                              f"images); {_RESTORE_SIDECAR}")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {bool: "true or false", list: "a list", str: "a string", dict: "an object"}
    return kinds.get(type(value), "a number")
