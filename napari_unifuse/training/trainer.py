"""The training loop: one process, or several under ``torchrun`` (DistributedDataParallel).

The config's ``model.method`` picks the network (``model.networks``) and its objective: losses
and validation (``training.methods``); checkpoints record the method.

Optimisation follows the paper (§4.2): AdamW at 1e-4, cosine annealing to 1e-6 over
``train.max_steps`` (per iteration), gradient L2 norm clipped at 1.

Reproducibility. The model is initialised from ``seed``; each sample's degradation and
misalignment come from ``(seed, epoch, index)`` (training.datasets); the order of samples from
``DistributedSampler(seed)`` and the epoch; the global torch generator (L_moda's random
negatives) is re-seeded at every step from ``(seed, rank, step)``. So the RNG state at any step
is a function of the step, and a resumed run continues exactly as an uninterrupted one would.

Fine-tuning: ``train.init_from`` (``--init-from``) starts from a checkpoint's weights with a fresh
optimiser and schedule, e.g. to adapt FA to a changed, untrained initial alignment.
``train.stage: degradation_head`` refits only UniFuse's degradation classifier on the frozen
network's read-outs (training.degradation_head): one process, minutes, not resumable.
``train.stage: image_restoration`` adds UniFuse's image-space restoration path
(model.ufrf.ImageRestoration) to ``init_from``'s network and trains it alone: everything else stays
as ``init_from`` has it, in evaluation mode, so the class, the field and the fusion weights do not
move; only L_restore reaches the path (the fusion reads the restored image detached). The crops
are moved by their true field, as the engine restores a pair with the field its guard kept
(training.objective.AlignedRestorationModel).
``train.stage: fusion_weight`` refits UniFuse's fusion weight head alone, afresh (w = 0.5), on
``init_from``'s frozen network in evaluation mode; only the fusion losses reach it (the restored
image enters the blend detached).

Resuming (``resume=True``) continues the run folder's own config (``config.yaml``): the config
given may change only ``RESUMABLE_TRAIN_SETTINGS`` (``resumed_config`` builds it for ``--resume``).
The learning rate is a function of the step and that config, so a resumed run with another ``lr``
or ``max_steps`` follows the schedule its files state. The log loses the records after the
restored step, which the resumed run writes again. A fresh run refuses a folder that holds one,
unless told to ``overwrite`` it.

Run folder (``--out``)::

    config.yaml                 the resolved config
    log.jsonl                   one JSON line per logged step ("train", with the lr it used) and per validation ("val");
                                under torchrun a step's losses are rank 0's, over its own share of the batch
    split.json                  the cases of the training and validation splits (data with cases): a
                                resume refuses data whose cases changed, which would reshuffle them;
                                every checkpoint's sidecar records them too, under "split"
    checkpoints/last.safetensors + last.json       weights + metadata (model.checkpoint)
    checkpoints/last.state.pt   optimizer / step, tensors and numbers only,
                                read back with torch.load(weights_only=True)
    checkpoints/best.safetensors + best.json       best validation fusion_gain_min so far (a copy-proof fusion score)
    checkpoints/.saving-NAME/   a save in progress (see below); never read as a checkpoint

config.yaml, split.json and the log a resume cuts back are each replaced as one file (written
beside it and renamed over it): a kill or a full disk during the write leaves the earlier one.

One run at a time: a run holds its folder's lock (engine.outputs.output_folder_lock; rank 0 under
torchrun) from before its first look at the folder to its end, and another run into the folder
(a requeued ``--resume``, a second fresh run) is refused in one line.

A checkpoint NAME is three files (NAME.safetensors, NAME.json, NAME.state.pt) that replace the
previous three as one: they are written into ``.saving-NAME/``, a ``COMMITTED`` marker is written
beside them, and only then are they moved into place. A save cut short (killed, out of disk) before
the marker leaves the previous set intact and is discarded; one cut short after it is finished by
the next ``--resume`` (or save). A resume also refuses files from different steps (a hand-mixed
folder) and another number of processes than the run used (``world_size``: it sets the effective
batch and the order of the samples). A run interrupted before its first checkpoint is resumed from
step 0.

Under torchrun a process that stops (an error, a signal) ends the job: the others, waiting for it in
a collective, raise ``AnotherProcessStopped`` (one line) rather than the backend's own error, and
waits at a barrier are taken in short polls so that SIGTERM and Ctrl-C are met at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from napari_unifuse import __version__
from napari_unifuse.engine.distributed import setup_distributed
from napari_unifuse.engine.job import is_first_process
from napari_unifuse.engine.outputs import write_text_atomically
from napari_unifuse.engine.provenance import sha256_of_path
from napari_unifuse.errors import CheckpointError, InputError, UniFuseError
from napari_unifuse.json_records import standard_json
from napari_unifuse.model import UniFuseConfig
from napari_unifuse.model.checkpoint import (
    COMMITTED,
    STAGING_PREFIX,
    SUFFIX,
    load_weights,
    save_checkpoint,
    training_crop,
)
from napari_unifuse.model.costs import minimum_size
from napari_unifuse.model.networks import build_network
from napari_unifuse.training.config import (
    FUSION_WEIGHT_STAGE,
    HEAD_STAGE,
    IMAGE_RESTORATION_STAGE,
    TrainConfig,
    config_from_dict,
    read_yaml,
    without_unread_keys,
)
from napari_unifuse.training.datasets import NetworkSides, build_datasets
from napari_unifuse.training.degradation_head import (
    HEAD_INPUT_FIELDS,
    HEAD_MODULE,
    collect_readouts,
    degradation_head,
    fit_degradation_head,
)
from napari_unifuse.training.harvard import RECORDED_SPLIT_KEY
from napari_unifuse.training.methods import BEST_SCORE, objective_for
from napari_unifuse.training.objective import AlignedRestorationModel

# The module train.stage image_restoration adds and trains (model.ufrf.ImageRestoration).
IMAGE_RESTORATION_MODULE = "ufrf.image_restoration"
# The module train.stage fusion_weight refits.
FUSION_WEIGHT_MODULE = "ufrf.fusion_weight_head"
# The stages that train one module of a frozen network, and that module.
STAGE_MODULES = {IMAGE_RESTORATION_STAGE: IMAGE_RESTORATION_MODULE, FUSION_WEIGHT_STAGE: FUSION_WEIGHT_MODULE}
# The train settings a resumed run may change (--max-steps, --lr, --batch-size): any other change
# would train the rest of the run on something its files do not describe.
RESUMABLE_TRAIN_SETTINGS = ("max_steps", "lr", "batch_size")
# A run's weights: RUN/checkpoints/last.safetensors and best.safetensors.
CHECKPOINTS_FOLDER = "checkpoints"
# The cases of each split, recorded when the run starts: the split is drawn over the cases found,
# so a case added to or removed from the data folder would reshuffle it under a resumed run.
SPLIT_FILE = "split.json"
# What gloo says in a process whose peer in a collective has gone (its connection closed or reset):
# the job's other process stopped, and its own message says why.
_LOST_PEER_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
# How often a process waiting at a barrier looks whether the others have come (and meets a signal).
BARRIER_POLL_SECONDS = 0.05


class AnotherProcessStopped(UniFuseError):
    """Under torchrun: another process of the job stopped while this one waited for it."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Path
    best_checkpoint: Path | None
    validation: dict[str, float] = field(default_factory=dict)
    seconds_per_step: float = float("nan")
    rank: int = 0


def model_config(config: TrainConfig) -> UniFuseConfig:
    """The UniFuse config of a ``model.method: unifuse`` training config."""
    preset = UniFuseConfig.paper if config.model.preset == "paper" else UniFuseConfig.small
    base = preset(spatial_dims=config.model.spatial_dims)
    return UniFuseConfig.from_dict({**base.to_dict(), **config.model.overrides})


def trainable_sides(network_config: Any) -> NetworkSides:
    """The sides a network of ``network_config`` trains on: multiples of its size multiple and, for
    UniFuse, at least ``model.costs.minimum_size`` and two patches, as L_moda's contrastive loss
    draws each patch token's negatives among the others (a 4×4 crop of 4-pixel patches has none)."""
    multiple = network_config.size_multiple
    if isinstance(network_config, UniFuseConfig):
        return NetworkSides(multiple, max(minimum_size(network_config), 2 * network_config.patch_size))
    return NetworkSides(multiple, multiple)


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class _ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the batches already trained on in a resumed epoch."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


@dataclass(frozen=True)
class _SampleProblem:
    """A sample a DataLoader worker process could not draw, passed back as data: torch re-raises a
    worker's exception with the worker's whole traceback as its message."""

    message: str


class _ProblemsPassedBack(Dataset):
    """``dataset``, with its UniFuseErrors (a case that cannot be read, a degradation it cannot take)
    returned as ``_SampleProblem``s."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except UniFuseError as error:
            return _SampleProblem(str(error))


def _batch_or_problem(samples: list[Any]) -> Any:
    problem = next((sample for sample in samples if isinstance(sample, _SampleProblem)), None)
    return problem if problem is not None else default_collate(samples)


class SampleLoader(DataLoader):
    """A DataLoader whose worker processes' problems with a sample are raised in this process as the
    one-line InputError they would be without workers (``num_workers`` 0: the error as it is)."""

    def __init__(self, dataset: Dataset, **options: Any) -> None:
        if options.get("num_workers"):
            dataset, options["collate_fn"] = _ProblemsPassedBack(dataset), _batch_or_problem
        super().__init__(dataset, **options)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, _SampleProblem):
                raise InputError(batch.message)
            yield batch


def _is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective's failure because another process of the job has gone."""
    return (isinstance(error, RuntimeError) and dist.is_initialized() and dist.get_world_size() > 1
            and any(message in str(error) for message in _LOST_PEER_MESSAGES))


@contextlib.contextmanager
def _another_process_stopping_said() -> Iterator[None]:
    """A collective's failure because another process stopped, as ``AnotherProcessStopped``: that
    process says why, and the backend's traceback here would bury it."""
    try:
        yield
    except RuntimeError as error:
        if _is_lost_peer(error):
            raise AnotherProcessStopped("another process of this job stopped (see its message, if it gave one, "
                                        "above)") from None
        raise


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        device: str = "auto",
        resume: bool = False,
        command: str | None = None,
        progress: bool = True,
        stop_at_step: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        # Where this invocation stops; the learning-rate schedule still spans train.max_steps.
        self.stop_at_step = min(stop_at_step or config.train.max_steps, config.train.max_steps)
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINTS_FOLDER
        self.resume = resume
        self.overwrite = overwrite
        if resume and overwrite:
            raise UniFuseError("--resume continues the run and --overwrite starts it afresh: pass one of them")
        # Held from before the first look at the folder to the end of fit(): another run into it (a
        # --resume requeued while this one trains) would clean up this run's save in progress and
        # rewrite its log. setup_distributed comes later, so the rank is read from torchrun's environment.
        self._run_folder_lock = contextlib.ExitStack()
        if is_first_process():
            self._run_folder_lock.enter_context(_run_folder_lock(self.run_dir))
        try:
            self._open(config, device=device, resume=resume, command=command, progress=progress)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder for another run (fit() does, once done)."""
        self._run_folder_lock.close()

    def _open(self, config: TrainConfig, *, device: str, resume: bool, command: str | None,
              progress: bool) -> None:
        # Here, before the processes first talk: none may see the files another has begun to write.
        previous_run = self._previous_run_files()
        if previous_run and not (resume or self.overwrite):
            raise UniFuseError(f"{self.run_dir} holds a run ({', '.join(previous_run)}): pass --resume to "
                               "continue it, --overwrite to start afresh, or choose another --out")
        if not previous_run:
            _refuse_replacing_a_config_no_run_wrote(self.run_dir, config)
        self.command = command
        # The --resume invocations after the command that started the run, in order (_restore).
        self.resumed_with: list[str | None] = []
        self.progress = progress
        self.dist = setup_distributed(device)
        self.step = 0
        self.best_score = -math.inf
        self.best_validation: dict[str, float] = {}
        self.validation: dict[str, float] = {}
        self.previous_seconds = 0.0
        if resume:
            # A save cut short: rank 0 finishes or discards it before any process reads the checkpoint.
            if self.dist.is_main:
                settle_interrupted_saves(self.checkpoint_dir)
            self._barrier()
        # --resume of a run interrupted before its first checkpoint: it starts again, as a fresh run would.
        self.restarting = resume and not any(
            path.exists() for path in (self.checkpoint_dir / "last.safetensors", self.checkpoint_dir / "last.json",
                                       self._state_path("last")))

        torch.manual_seed(config.seed)
        self.objective = objective_for(config.model.method, config.source)
        self.network = build_network(config.model.method, config.model.preset, config.model.spatial_dims,
                                     config.model.overrides).to(self.dist.device)
        # Provenance of a fine-tuning run's starting weights, kept in every checkpoint it writes.
        self.initial_weights: dict[str, Any] | None = None
        if config.train.init_from is not None and (not resume or self.restarting):
            path, metadata = load_weights(self.network, config.train.init_from,
                                          **_module_the_stage_initialises(config))
            self.initial_weights = {
                "checkpoint": str(path), "sha256": sha256_of_path(path),
                **{key: metadata.get(key) for key in ("name", "command", "seed", "steps", "wall_time_s", "device")},
                # The crop its network was trained on: a stage trains one module of that network
                # and leaves the size it reads at inference as it was (model.checkpoint.training_crop).
                "training_crop": self._initial_training_crop(path, metadata),
                # Its own start, and so on back: `unifuse info` lists every run behind the weights.
                **({"initial_weights": metadata["initial_weights"]} if metadata.get("initial_weights") else {}),
            }
        self.training_model: torch.nn.Module = (
            AlignedRestorationModel(self.network) if config.train.stage == IMAGE_RESTORATION_STAGE
            else self.objective.training_model(self.network, config.loss))
        if self.dist.world_size > 1:
            # DDP compares each gradient's strides with its parameter's. A few convolutions of the
            # feature alignment (model.fa, model.attention) get channels-last gradients whose strides
            # differ from their weights' only in dimensions of size 1: the same memory layout, so
            # torch's notice (shown as if it were ours) points at nothing to fix. Filtered once, not
            # around every backward pass: leaving catch_warnings resets the once-per-place memory of
            # every other warning, which then repeats at each step.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.training_model = DistributedDataParallel(
                self.training_model,
                device_ids=[self.dist.local_rank] if self.dist.device.type == "cuda" else None,
            )
        train = config.train
        if train.stage in STAGE_MODULES:
            for name, parameter in self.network.named_parameters():
                parameter.requires_grad_(name.startswith(STAGE_MODULES[train.stage] + "."))
        self.trained_parameters = [parameter for parameter in self.network.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trained_parameters, lr=train.lr, weight_decay=train.weight_decay)
        self.train_set, self.val_set = build_datasets(
            config.data, seed=config.seed, spatial_dims=config.model.spatial_dims,
            sides=trainable_sides(self.network.config),
        )
        if config.train.stage == HEAD_STAGE and (resume or self.dist.world_size > 1):
            raise UniFuseError("train.stage 'degradation_head' runs in one process and is not resumable: "
                               "run it again without --resume or torchrun (it takes minutes)")
        if resume:
            self._restore()

    def _initial_training_crop(self, path: Path, metadata: dict[str, Any]) -> int | None:
        """The crop ``init_from``'s network was trained on; this run's own where its sidecar, which
        says, is missing: None would make inference of this run's checkpoint read whole images, which
        a network trained on crops misreads (model.checkpoint.training_crop), while a stage run
        normally crops as its network was trained."""
        if path.with_suffix(".json").is_file():
            return training_crop(metadata)
        own = training_crop({"training_config": self.config.to_dict()})
        if self.dist.is_main:
            print(f"unifuse train: warning: {path.with_suffix('.json')} is missing, so the crop {path.name} was "
                  f"trained on is unknown; its checkpoints record this run's ({own or 'whole images'}) for inference",
                  file=sys.stderr, flush=True)
        return own

    def _split(self) -> dict[str, list[str]]:
        return {"train": self.train_set.case_names(), "validation": self.val_set.case_names()}

    def _learning_rate(self, step: int) -> float:
        """The learning rate after ``step`` steps: cosine annealing from ``lr`` to ``min_lr`` over ``max_steps``.

        Closed form of the config, not a scheduler's saved state, so that a run resumed with another
        ``lr`` or ``max_steps`` follows the new cosine from the current step.
        """
        train = self.config.train
        progress = min(step, train.max_steps) / train.max_steps
        learning_rate = train.min_lr + (train.lr - train.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # lr × (rate / lr), as the LambdaLR scheduler this replaces computed it: the runs behind the
        # shipped checkpoints repeat bit for bit.
        return train.lr * (learning_rate / train.lr)

    # ------------------------------------------------------------------------------ checkpoints

    def _state_path(self, name: str) -> Path:
        return self.checkpoint_dir / f"{name}.state.pt"

    def _previous_run_files(self) -> list[str]:
        """What a run left in the run folder, that a fresh run would mix its own with."""
        log = self.run_dir / "log.jsonl"
        checkpoints = self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.iterdir())
        return [name for name, present in (("log.jsonl", log.is_file()), ("checkpoints/", checkpoints)) if present]

    def _staging_dir(self, name: str) -> Path:
        return self.checkpoint_dir / f"{STAGING_PREFIX}{name}"

    def _restore(self) -> None:
        _refuse_changes(run_config(self.run_dir), self.config, self.run_dir)
        weights = self.checkpoint_dir / "last.safetensors"
        state_path = self._state_path("last")
        if self.restarting:
            # Interrupted before its first checkpoint: the run starts again (fit() drops the log
            # records of the attempt; a best.* it saved is replaced at the first validation).
            if self.dist.is_main:
                print(f"unifuse train: {self.run_dir} has no checkpoint yet: starting it from step 0", flush=True)
            return
        _refuse_changed_split(self.run_dir, self._split())
        if not weights.is_file() or not state_path.is_file():
            raise CheckpointError(f"nothing to resume in {self.checkpoint_dir} (no last.safetensors / last.state.pt)")
        if not weights.with_suffix(".json").is_file():
            raise CheckpointError(f"{weights.with_suffix('.json')}: missing; the run folder cannot be resumed")
        _, sidecar = load_weights(self.network, weights)
        state = _read_state(state_path, self.dist.device)
        step = int(state["step"])
        if sidecar.get("steps") != step:
            raise CheckpointError(f"{self.checkpoint_dir}: last.json records step {sidecar.get('steps')} but "
                                  f"last.state.pt step {step}: the checkpoint's files come from different saves "
                                  "and the run folder cannot be resumed (restore them from one save, or start afresh "
                                  "with --overwrite)")
        recorded = sidecar.get("world_size")
        if recorded is not None and int(recorded) != self.dist.world_size:
            how = ("a plain run (without torchrun)" if int(recorded) == 1
                   else f"torchrun with {recorded} processes in all (torchrun --nproc_per_node {recorded} ...)")
            raise InputError(f"{self.run_dir} was trained by {recorded} process(es) and this run has "
                             f"{self.dist.world_size}: the number of processes sets the effective batch and the order "
                             f"of the samples, so resume it with {how}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = step
        # Checked before fit() rewrites config.yaml: a run cannot go back to an earlier step.
        if self.step > self.config.train.max_steps:
            raise InputError(f"{self.run_dir} is already at step {self.step}, past --max-steps "
                             f"{self.config.train.max_steps}: give more steps to continue it")
        if self.step > self.stop_at_step:
            raise InputError(f"{self.run_dir} is already at step {self.step}, past --stop-at {self.stop_at_step}")
        self.best_score = float(state["best_score"])
        self.previous_seconds = float(state["seconds"])
        self.best_validation = sidecar.get("best_validation", {})
        self.validation = sidecar.get("validation", {})
        self.initial_weights = sidecar.get("initial_weights")
        # The command that started the run stays its record (a --resume names neither its data nor its
        # schedule); each --resume is listed after it.
        self.resumed_with = [*sidecar.get("resumed_with", []), self.command]
        self.command = sidecar.get("command")

    def _metadata(self, seconds: float) -> dict[str, Any]:
        split = self._split()
        return {
            "command": self.command,
            **({"resumed_with": self.resumed_with} if self.resumed_with else {}),
            "process_command": " ".join(getattr(sys, "orig_argv", sys.argv)),
            "training_config": self.config.to_dict(),
            "config_file": self.config.source,
            "seed": self.config.seed,
            "steps": self.step,
            "wall_time_s": round(seconds, 2),
            "device": _device_description(self.dist.device),
            "world_size": self.dist.world_size,
            "napari_unifuse": __version__,
            "torch": torch.__version__,
            "validation": self.validation,
            "best_validation": self.best_validation,
            **({"initial_weights": self.initial_weights} if self.initial_weights else {}),
            # The cases behind the weights, as split.json lists them: an evaluation of another copy of
            # the data (a case more or less) would draw another split (training.harvard.recorded_split).
            **({RECORDED_SPLIT_KEY: split} if any(split.values()) else {}),
        }

    def _save(self, name: str, seconds: float) -> Path:
        """Checkpoint ``name``: its three files replace the previous three as one (see the module docstring)."""
        staging = self._staging_dir(name)
        _settle_interrupted_save(staging, self.checkpoint_dir)
        staging.mkdir(parents=True)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_score": self.best_score,
            "seconds": seconds,
        }
        previous = self.checkpoint_dir / f"{name}{SUFFIX}"
        with _written_or_refused(staging / f"{name}{SUFFIX}", previous):
            save_checkpoint(self.network, staging / name, self._metadata(seconds))
        with _written_or_refused(staging / f"{name}.state.pt", previous):
            torch.save(state, staging / f"{name}.state.pt")
        for path in staging.iterdir():
            _sync(path)
        _sync(staging)
        # The commit point: from here on the new set is the checkpoint, even if this process dies.
        (staging / COMMITTED).write_bytes(b"")
        _sync(staging / COMMITTED)
        _sync(staging)
        _settle_interrupted_save(staging, self.checkpoint_dir)
        return self.checkpoint_dir / f"{name}.safetensors"

    # ------------------------------------------------------------------------------ the loop

    def _log(self, record: dict[str, Any]) -> None:
        with (self.run_dir / "log.jsonl").open("a", encoding="utf-8") as stream:
            stream.write(standard_json(record) + "\n")

    def _forget_records_after_the_restored_step(self) -> None:
        """An interrupted run logged steps after its last checkpoint, which the resumed run logs again."""
        log = self.run_dir / "log.jsonl"
        if not log.is_file():
            return
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            if record.get("step", 0) <= self.step:
                kept.append(line)
        _write_run_file(log, "".join(kept))

    def _clear_previous_run(self) -> None:
        """Remove the earlier run's files that this run's would not replace: its checkpoints, its log,
        and its split (a run on generated pairs records none, and a stale one refused its resumes)."""
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        for name in ("log.jsonl", SPLIT_FILE):
            (self.run_dir / name).unlink(missing_ok=True)

    def _loader(self, sampler: _ResumableSampler) -> DataLoader:
        return SampleLoader(
            self.train_set,
            batch_size=self.config.train.batch_size,
            sampler=sampler,
            num_workers=self.config.train.num_workers,
            drop_last=True,
            pin_memory=self.dist.device.type == "cuda",
        )

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            self.close()

    def _write_run_files(self) -> None:
        """Start the run folder's files: the earlier run's removed (``overwrite``) or cut back to the
        restored step (``resume``), this run's config and split recorded."""
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            self._clear_previous_run()
        if self.resume:
            self._forget_records_after_the_restored_step()
        _write_run_file(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        split = self._split()
        if any(split.values()):
            _write_run_file(self.run_dir / SPLIT_FILE, json.dumps(split, indent=2) + "\n")
        else:
            (self.run_dir / SPLIT_FILE).unlink(missing_ok=True)  # an earlier run's, on data with cases

    def _batches_per_epoch(self, sampler: _ResumableSampler) -> int:
        """Batches per epoch of this process; a split too small for one batch is refused."""
        cfg = self.config
        batches_per_epoch = len(sampler) // cfg.train.batch_size
        if batches_per_epoch == 0:
            # What sets the number of samples: the phantom's train_length; a folder's cases × samples_per_case;
            # the Harvard pairs, one sample each.
            more = {"phantom": "raise data.train_length",
                    "folders": "draw more samples per case (data.samples_per_case) or add cases"}.get(
                cfg.data.get("kind"), "add cases (a Harvard pair is one sample)")
            raise UniFuseError(
                f"the training split has {len(self.train_set)} samples: too few for batch size "
                f"{cfg.train.batch_size} on {self.dist.world_size} process(es); {more}, or lower the batch size "
                "(--batch-size)"
            )
        return batches_per_epoch

    def _fit(self) -> TrainResult:
        cfg = self.config
        train = cfg.train
        if train.stage == HEAD_STAGE:
            self._write_run_files()
            return self._refit_degradation_head()
        sampler = _ResumableSampler(
            self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
            seed=cfg.seed, drop_last=True,
        )
        # Refused before the run folder is touched: a refused --overwrite keeps the earlier run, and a
        # refused --resume leaves the config.yaml that later resumes continue.
        batches_per_epoch = self._batches_per_epoch(sampler)
        self._write_run_files()
        val_loader = SampleLoader(self.val_set, batch_size=train.batch_size, num_workers=train.num_workers)

        start_time = time.perf_counter()
        first_step = self.step
        epoch, done_in_epoch = divmod(self.step, batches_per_epoch)
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            # disable=None: drawn on a terminal only; a log file would get every redraw (log.jsonl has the steps).
            bar = tqdm(total=self.stop_at_step, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       disable=None)
        self._enter_training_mode()
        while self.step < self.stop_at_step:
            sampler.set_epoch(epoch)
            sampler.skip = done_in_epoch * train.batch_size
            self.train_set.set_epoch(epoch)
            for batch in self._loader(sampler):
                terms = self._train_step(_to_device(batch, self.dist.device))
                self.step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms['total']:.4f}")
                seconds = self.previous_seconds + time.perf_counter() - start_time
                last = self.step == self.stop_at_step
                if self.dist.is_main and (self.step % train.log_every == 0 or last):
                    self._log({"kind": "train", "step": self.step, "epoch": epoch, "seconds": round(seconds, 3),
                               **terms})
                if self.step % train.val_every == 0 or last:
                    self._validate(val_loader, seconds)
                if self.step % train.checkpoint_every == 0 or last:
                    self._checkpoint(seconds)
                if last:
                    break
            epoch, done_in_epoch = epoch + 1, 0
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start_time
        steps_run = self.step - first_step
        best = self.checkpoint_dir / "best.safetensors"
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            last_checkpoint=self.checkpoint_dir / "last.safetensors",
            best_checkpoint=best if best.is_file() else None,
            validation=self.validation,
            seconds_per_step=elapsed / steps_run if steps_run else float("nan"),
            rank=self.dist.rank,
        )

    def _refit_degradation_head(self) -> TrainResult:
        """``train.stage: degradation_head``: see training.degradation_head."""
        train = self.config.train
        start_time = time.perf_counter()
        self.train_set.set_epoch(0)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.train_set), desc="read-outs", unit="crop", dynamic_ncols=True, disable=None)
        readouts, labels = collect_readouts(self.network, self.train_set, self.dist.device,
                                            batch_size=train.batch_size, num_workers=train.num_workers,
                                            progress=None if bar is None else lambda done, _total: bar.update(done - bar.n))
        if bar is not None:
            bar.close()
        self._log({"kind": "readouts", "samples": len(labels), "rows": readouts.shape[1],
                   "seconds": round(time.perf_counter() - start_time, 3),
                   "class_counts": torch.bincount(labels).tolist()})

        def log(step: int, loss: float) -> None:
            self._log({"kind": "train", "step": step, "ce": loss,
                       "seconds": round(time.perf_counter() - start_time, 3)})

        fit_degradation_head(degradation_head(self.network), readouts.to(self.dist.device), labels.to(self.dist.device),
                             steps=train.max_steps, batch_size=train.batch_size,
                             learning_rate=self._learning_rate,
                             weight_decay=train.weight_decay, seed=self.config.seed, log=log)
        self.step = train.max_steps
        seconds = time.perf_counter() - start_time
        val_loader = SampleLoader(self.val_set, batch_size=train.batch_size, num_workers=train.num_workers)
        self.validation = self.objective.validate(self.network, val_loader, self.dist.device, train.val_batches)
        self._log({"kind": "val", "step": self.step, **self.validation})
        path = self._save("last", seconds)
        return TrainResult(run_dir=self.run_dir, step=self.step, last_checkpoint=path, best_checkpoint=None,
                           validation=self.validation, seconds_per_step=seconds / train.max_steps,
                           rank=self.dist.rank)

    def _enter_training_mode(self) -> None:
        self.training_model.train()
        if self.config.train.stage in STAGE_MODULES:
            # The frozen network stays in evaluation mode: the classifier's running standardisation
            # (model.layers.RunningStandardize) would otherwise follow the batches and change p.
            self.network.eval()
            self.network.get_submodule(STAGE_MODULES[self.config.train.stage]).train()

    def _train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        torch.manual_seed(step_seed(self.config.seed, self.dist.rank, self.step))
        learning_rate = self._learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        terms = self.objective.losses(self.training_model(batch), batch, self.config.loss)
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters, self.config.train.grad_clip)
        self.optimizer.step()
        values = {name: float(value.detach()) for name, value in terms.items()}
        values["grad_norm"] = float(grad_norm)
        values["lr"] = learning_rate
        if not math.isfinite(values["total"]):
            raise UniFuseError(f"training diverged at step {self.step + 1}: loss terms {values}")
        return values

    def _validate(self, val_loader: DataLoader, seconds: float) -> None:
        # Rank 0 evaluates the whole validation split; the others wait at the barrier.
        if self.dist.is_main:
            scores = self.objective.validate(self.network, val_loader, self.dist.device, self.config.train.val_batches)
            self.validation = scores
            self._log({"kind": "val", "step": self.step, **scores})
            if math.isfinite(scores[BEST_SCORE]) and scores[BEST_SCORE] > self.best_score:
                self.best_score = scores[BEST_SCORE]
                self.best_validation = {"step": self.step, **scores}
                self._save("best", seconds)
        self._enter_training_mode()
        self._barrier()

    def _checkpoint(self, seconds: float) -> None:
        if self.dist.is_main:
            self._save("last", seconds)
        self._barrier()

    def _barrier(self) -> None:
        """Wait for the other processes (rank 0 validating, saving) in short polls: a wait inside the
        backend would hold off SIGTERM and Ctrl-C until they come."""
        if self.dist.world_size > 1:
            waiting = dist.barrier(async_op=True)
            while not waiting.is_completed():
                time.sleep(BARRIER_POLL_SECONDS)
            waiting.wait()  # raises the backend's error, if the barrier failed


@contextlib.contextmanager
def _written_or_refused(path: Path, previous: Path) -> Iterator[None]:
    """A checkpoint file the disk could not take (full, read-only) is one line, not a traceback:
    the writers fail without an OSError (torch's zip writer says "unexpected pos", safetensors raises
    its SafetensorError), and the save in progress is discarded, so the previous checkpoint (whose
    weights are ``previous``) stands; the first save of a run has none, and says so."""
    try:
        yield
    except (RuntimeError, SafetensorError, OSError) as error:
        kept = ("The previous checkpoint is kept" if previous.is_file()
                else f"There is no earlier {previous.name} to keep")
        raise UniFuseError(f"{path}: the checkpoint could not be written ({error}); is the disk full? "
                           f"{kept}") from error


def _write_run_file(path: Path, text: str) -> None:
    """Replace a run file (config.yaml, split.json, log.jsonl) as one: a kill or a full disk during
    the write leaves the earlier file whole, so the run can still be resumed."""
    try:
        write_text_atomically(path, text)
    except OSError as error:
        raise UniFuseError(f"{path}: could not be written ({error.strerror or error}); is the disk full? "
                           f"{path.name} is left as it was") from error


@contextlib.contextmanager
def _run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s folder lock (engine.outputs: on the folder itself, so a resume finds no
    stray lock file in it); a second run finding it held is refused in one line."""
    from napari_unifuse.engine.outputs import FolderBusyError, output_folder_lock

    try:
        with output_folder_lock(run_dir):
            yield
    except FolderBusyError:
        raise UniFuseError(f"another unifuse train is using {run_dir}: wait for it to finish, "
                           "or choose another --out") from None


def _sync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries where the system allows) to the disk."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a folder on Windows
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _settle_interrupted_save(staging: Path, checkpoint_dir: Path) -> None:
    """Finish a committed save in ``staging`` (move its files into ``checkpoint_dir``) or discard an
    uncommitted one (the previous files are intact); then remove ``staging``."""
    if not staging.is_dir():
        return
    if (staging / COMMITTED).is_file():
        for path in sorted(staging.iterdir()):
            if path.name != COMMITTED and path.is_file():
                # Another process settling the same save (every torchrun process interrupted at
                # once) may have moved it first.
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, checkpoint_dir / path.name)
        _sync(checkpoint_dir)
    shutil.rmtree(staging, ignore_errors=True)


def settle_interrupted_saves(checkpoint_dir: str | Path) -> None:
    """Finish or discard every save cut short in a run's checkpoints folder (``_settle_interrupted_save``)."""
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_dir():
        for staging in sorted(checkpoint_dir.glob(f"{STAGING_PREFIX}*")):
            _settle_interrupted_save(staging, checkpoint_dir)


def _read_state(path: Path, device: torch.device) -> dict[str, Any]:
    """A ``*.state.pt`` written by ``Trainer._save``; anything else is a CheckpointError naming the file."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable training state ({type(error).__name__}); "
                              "the run folder cannot be resumed") from None
    missing = [key for key in ("optimizer", "step", "best_score", "seconds")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training state (no {', '.join(missing)}); "
                              "the run folder cannot be resumed")
    return state


def run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run folder was trained with (its ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"nothing to resume in {path.parent} (no config.yaml)")
    try:
        values = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise CheckpointError(f"{path}: not valid YAML ({error})") from None
    # No base folder: its paths were resolved when it was written.
    return config_from_dict(without_unread_keys(values) if isinstance(values, dict) else values, source=str(path))


def _refuse_replacing_a_config_no_run_wrote(run_dir: Path, config: TrainConfig) -> None:
    """A run records its resolved config as ``run_dir/config.yaml``. In a folder that holds no run
    yet, a config.yaml there is a user's (``--config myrun/config.yaml --out myrun``), unless it is
    exactly what a run writes (yaml.safe_dump's layout, no comments: a run stopped before its first
    log line, which --resume or a rerun continues): refused rather than replaced without a word."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if yaml.safe_dump(read_yaml(text), sort_keys=False) == text:
            return
    except yaml.YAMLError:
        pass  # not even YAML: no run wrote it
    given = config.source is not None and Path(config.source).resolve() == path.resolve()
    whose = "the config given (--config)" if given else "a config.yaml no run wrote"
    raise InputError(f"is {whose}, and a run into {run_dir} records its resolved config there, which would replace "
                     "this file and its comments: keep your config outside the run folder (e.g. "
                     f"{run_dir.name}.yaml beside it) or choose another --out", path)


def _refuse_changed_split(run_dir: Path, split: dict[str, list[str]]) -> None:
    """A resumed run trains and validates on the cases it started with: cases added to or removed
    from the data reshuffle the split, so held-out cases would train and the best checkpoint would
    compare scores over different validation sets."""
    path = run_dir / SPLIT_FILE
    if not any(split.values()) or not path.is_file():
        # Generated pairs (the phantom) have no cases; a split.json beside them is a stale one (the
        # config, data.kind included, is the run's own) that --overwrite once left behind.
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable ({error}); the run folder cannot be resumed") from None
    if not isinstance(recorded, dict) or not all(isinstance(names, list) for names in recorded.values()):
        raise CheckpointError(f"{path}: not the split a run records; the run folder cannot be resumed")
    if recorded == split:
        return
    before = {name for names in recorded.values() for name in names}
    now = {name for names in split.values() for name in names}
    changes = "; ".join(f"{what}: {_listed(names)}" for what, names in
                        (("added", now - before), ("removed", before - now)) if names) or "cases moved between splits"
    raise InputError(f"{run_dir}: the data's cases changed since the run started ({changes}), which would change "
                     "its training/validation split; restore the data as it was, or start afresh with --overwrite")


def _listed(names: set[str], shown: int = 5) -> str:
    first = sorted(names)[:shown]
    return ", ".join(first) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _flattened(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# The settings that make a run what it is: a config that changes them is named first, on its own line.
_WHAT_A_RUN_IS = {
    "model.method": "{run} is a {before} run; the config given trains {now}",
    "data.kind": "{run} trained on {before} data; the config given trains on {now} data",
}
# Not what a run is, but where it reads: a packaged data config installed from a wheel reads a root inside
# site-packages, so the same config needs the run's --data-root again at each --resume.
_DATA_ROOT_MOVED = "{run} read its data from {before}; the config given reads {now}: give --data-root {before} again"


def _refuse_changes(saved: TrainConfig, requested: TrainConfig, run_dir: Path) -> None:
    """A resumed run continues its own config: ``requested`` may differ only in RESUMABLE_TRAIN_SETTINGS."""
    before, now = _flattened(saved.to_dict()), _flattened(requested.to_dict())
    changeable = {f"train.{name}" for name in RESUMABLE_TRAIN_SETTINGS}
    changed = sorted(key for key in before.keys() | now.keys()
                     if key not in changeable and before.get(key) != now.get(key))
    if changed:
        # Another method's or data kind's config is the likely slip; in the field list it is one of ~40.
        lines = [sentence.format(run=run_dir, before=before.get(key), now=now.get(key))
                 for key, sentence in _WHAT_A_RUN_IS.items() if key in changed]
        # Under another data kind the root is part of another config: --data-root would not mend it.
        if "data.root" in changed and "data.kind" not in changed:
            lines.append(_DATA_ROOT_MOVED.format(run=run_dir, before=before["data.root"], now=now["data.root"]))
            changed.remove("data.root")
        if changed:
            verb = "differs" if len(changed) == 1 else "differ"
            lines.append(f"{run_dir} was trained with another config ({', '.join(changed)} {verb} from its "
                         "config.yaml): resume with the config it was started with, or choose another --out")
        raise CheckpointError("\n".join(lines))


def resumed_config(run_dir: str | Path, requested: TrainConfig, **train_overrides: Any) -> TrainConfig:
    """The config ``--resume`` continues with: the run's own, with ``train_overrides`` (explicit
    RESUMABLE_TRAIN_SETTINGS) on top. ``requested``, the config given now, must match the run's in
    all other settings: its values of RESUMABLE_TRAIN_SETTINGS do not count, as a ``--max-steps`` or
    ``--lr`` of an earlier invocation is in the run's config but not in the file."""
    saved = run_config(run_dir)
    _refuse_changes(saved, requested, Path(run_dir))
    _say_which_settings_are_kept(saved, requested, train_overrides)
    return dataclasses.replace(saved.with_overrides(train=train_overrides), source=requested.source)


def _say_which_settings_are_kept(saved: TrainConfig, requested: TrainConfig, train_overrides: dict[str, Any]) -> None:
    """Names the RESUMABLE_TRAIN_SETTINGS whose value in the config given is not the run's and is
    not taken: a resume changes them only by their flags, and a max_steps raised in the file would
    otherwise end the run where it was without a word. A note on the standard output (rank 0), like
    the restart's: a run started with --max-steps and resumed without it is no mistake."""
    kept = [f"train.{name} {getattr(saved.train, name)}, not the config file's {getattr(requested.train, name)}: "
            f"pass --{name.replace('_', '-')} {getattr(requested.train, name)} to change it"
            for name in RESUMABLE_TRAIN_SETTINGS
            if name not in train_overrides and getattr(requested.train, name) != getattr(saved.train, name)]
    if kept and is_first_process():
        print(f"unifuse train: --resume keeps the run's {'; '.join(kept)}", flush=True)


def _module_the_stage_initialises(config: TrainConfig) -> dict[str, Any]:
    """``load_weights``' options for a stage's ``init_from``: the module the stage (re)initialises
    keeps the network's own weights, and the config fields that shape only it may differ."""
    if config.train.stage == HEAD_STAGE:
        return {"except_module": HEAD_MODULE, "fields_of_that_module": HEAD_INPUT_FIELDS}
    if config.train.stage == IMAGE_RESTORATION_STAGE:
        # Always initialised afresh, so that the run gives the same weights from the network it
        # extends as from a checkpoint that already has a trained path (the shipped one).
        return {"except_module": IMAGE_RESTORATION_MODULE, "fields_of_that_module": ("image_restoration_width",)}
    if config.train.stage == FUSION_WEIGHT_STAGE:
        # Afresh (w = 0.5 everywhere) for the same reason: a checkpoint that holds a refit gives the same run.
        return {"except_module": FUSION_WEIGHT_MODULE}
    return {}


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    command: str | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train (or resume) the network of ``config.model.method`` as ``config`` says; see the module docstring.

    ``stop_at_step``: stop there (validating and checkpointing) although the schedule runs to
    ``train.max_steps``; ``resume=True`` later continues as if never stopped. ``overwrite``: a
    fresh run into a folder that holds one first removes its checkpoints, log and split.
    """
    stopped = False
    try:
        # Inside the group's life: a lost peer is told by its backend's error while the group is up.
        with _another_process_stopping_said():
            trainer = Trainer(config, run_dir, device=device, resume=resume, command=command, progress=progress,
                              stop_at_step=stop_at_step, overwrite=overwrite)
            return trainer.fit()
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        # Not on a stop: a barrier it left still waits in the group, and destroying the group would
        # wait with it for the other processes; the process ends right after.
        if dist.is_initialized() and dist.get_world_size() > 1 and not stopped:
            dist.destroy_process_group()
