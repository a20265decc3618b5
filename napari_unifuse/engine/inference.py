"""FusionEngine: one fusion method applied to a (reference, moving) pair, with no GUI in sight.

The method (``engine.methods``: UniFuse by default, BSAFusion, MMIF-AMIN, a classical pipeline)
supplies the initial alignment and the per-tile prediction; everything below is shared.

The pipeline, stage by stage (each reported through ``progress`` and preceded by a cancel check):

1. ``validate``  refuse inputs the model cannot use, with a message naming the image.
2. ``normalise`` map each image to [0, 1] (``io.normalize_intensity``; the mapping is recorded).
   An RGB PET/SPECT image gives its luma Y to the model; its chroma CbCr is carried along.
3. ``resample``  put the moving image on the reference grid in physical space
   (``io.resample_to_reference``), so the network only predicts the residual misalignment; the
   registrations and the guard read it there, while the tiles, the aligned image and the carried
   chroma read a moving image on another grid once, on its own grid, through the field
   (``_MovingOffGrid``). Where it
   covers only part of the grid, the matching, SimpleITK, the dense refinement and the guard see the
   reference only inside its field of view (``moving_field_of_view``), and the run warns when the
   kept field still moves it past that field of view. Where
   SimpleITK competes (``classical registration`` below) its registration starts here, on a
   thread of its own (one ITK thread, so that its field repeats), beside ``classify`` and the
   matching.
   ``classify``  (methods that estimate the degradation) read it on the moving image as given, on
                 its own grid and before any move, the reference resampled onto that grid
                 (interpolation would smooth the noise, ghosts and streaks the head reads), and on a
                 coarser copy where the checkpoint is calibrated for it (``engine.coarse_readout``).
                 Every tile of ``fuse`` is routed by that reading, which is the result's class (the
                 provenance's ``degradation_read_on``).
4. ``fuse``      pad to the method's size multiple, move the moving image by the method's initial
                 alignment (once, on the whole input), run its tile prediction over blended tiles,
                 crop back.
   ``classical registration``  (methods that refine the alignment, 3-D volumes) SimpleITK's
                 rigid + B-spline field (waited for here) competes with the matching's under the
                 alignment guard's rule; the winner is the initial alignment the network refines
                 (see ``CLASSICAL_STAGE``).
5. ``guard``     (guarded methods: UniFuse, MMIF-AMIN after a registration)
                 ``engine.alignment_guard``: keep the identity, the initial field (matching or
                 SimpleITK) or the network's (UniFuse), whichever beats the simpler ones by more
                 than the similarity's noise.
   ``fuse (kept field)``  when that is not the method's own field, run the tiles again with the
                 kept field as the whole field (``refine(..., fixed_field=True)``), so that the
                 restored and fused images are the ones for the displacement reported.
   ``dense refinement``  (where the checkpoint says it pays; before the wait for SimpleITK) the
                 matching's field refined by a dense MIND optimisation, which the guard weighs after
                 the initial field (``DENSE_STAGE``).
   Where the network's own field is not weighed (a method that refines none; a checkpoint whose
   sidecar says its field never won, ``alignment_guard.weighs_network_field``), ``guard`` comes
   before ``fuse``, and the tiles run once, with the kept field.
   For a method that fuses by a blend (UniFuse) and a checkpoint that calibrated one, the
   reference's share of the blend is then capped pair by pair (``engine.fusion_balance``; the
   provenance's ``fusion_balance``).
6. ``compose``   warp the carried chroma (and what the intensity window clipped) with the kept
   field, recombine RGB, map the restored moving image back to its own intensity units.
7. ``quality``   (``quality=True``) ``engine.quality``: where not to trust the result (invented and
   lost structure, restoration change; the alignment's spread over ``uncertainty_passes``
   perturbed passes of the matching's local stage, ``engine.uncertainty``).

Nothing here writes files: ``engine.outputs.write_fusion_outputs`` does, after a run succeeded,
so a cancelled or failed run leaves the disk untouched.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import numbers
import threading
import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from napari_unifuse.data.color import rgb_to_ycbcr, ycbcr_to_rgb
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.alignment_guard import (
    GuardDecision,
    choose_displacement,
    credible_motion_floor,
    similarity_blur,
    weighs_dense_refinement,
    weighs_network_field,
)
from napari_unifuse.engine.class_evidence import class_evidence, evidence_table
from napari_unifuse.engine.classical import grid_geometry, refine_dense, register_sitk
from napari_unifuse.engine.coarse_readout import coarse_readout
from napari_unifuse.engine.device import is_out_of_memory, out_of_memory_explained, resolve_device
from napari_unifuse.engine.fusion_balance import fusion_balance
from napari_unifuse.engine.input_checks import minimum_input_side, minimum_padded_side, model_dimensions
from napari_unifuse.engine.methods import (
    DENSE,
    MATCHING,
    SIMPLEITK,
    FusionMethod,
    NetworkMethod,
    method_for_network,
    method_from_checkpoint,
)
from napari_unifuse.engine.outputs import same_file
from napari_unifuse.engine.progress import CancelToken, ProgressCallback, ignore_progress
from napari_unifuse.engine.provenance import (
    StageTimer,
    describe_input,
    image_record,
    sha256_of_path,
    software_versions,
    stored_order,
    utc_timestamp,
)
from napari_unifuse.engine.quality import QualityMaps, quality_maps
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.engine.tiling import (
    BlendedPrediction,
    TilePrediction,
    TileSize,
    auto_tile_shape,
    predict_tiled,
    tile_layout,
)
from napari_unifuse.engine.uncertainty import DEFAULT_PASSES, uncertainty_on_matching_level
from napari_unifuse.engine.uncertainty import DEFINITION as UNCERTAINTY_DEFINITION
from napari_unifuse.errors import CheckpointError, InputError, RegistrationError, UniFuseError
from napari_unifuse.io import (
    Geometry,
    ImageVolume,
    IntensityMapping,
    grid_coverage,
    normalize_intensity,
    placement_metadata,
    resample_to_reference,
    resample_to_spacing,
)
from napari_unifuse.io.fields import itk_placement
from napari_unifuse.io.nifti_xforms import NIFTI_XFORMS, NiftiXforms
from napari_unifuse.io.normalize import FLOAT32_MAX, MODALITY_ALIASES, darkest_to_zero
from napari_unifuse.io.readers import is_picture, real_finite_values
from napari_unifuse.io.resample import resample_displaced
from napari_unifuse.io.writers import nifti_holds_grid, png_holds
from napari_unifuse.model.checkpoint import config_differences, training_crop
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.networks import config_from_dict, network_method
from napari_unifuse.model.repeatable import one_thread
from napari_unifuse.model.scan import scan_backend
from napari_unifuse.model.warp import warp

# Cb and Cr are stored offset by 0.5 (neutral grey); shifting them to 0 before resampling and
# warping makes the zero fill outside the moving image's field of view colourless.
_CHROMA_NEUTRAL = 0.5
# The network's own field, which the guard weighs after the initial one (MATCHING or SIMPLEITK).
NETWORK = "network"
# 3-D only: SimpleITK's rigid + B-spline registration (Mattes MI) competes with the structural
# matching as the field the network refines. On 3-D volumes it aligns better than the matching (the
# MNI motion pair at 160³: output NCC 0.956 with its field against 0.895 with the matching's,
# bench/results/profile_3d_after.txt and profile_3d_before.txt); on the 2-D
# Harvard slices it is worse than the matching on large misalignments and than the identity on mild
# ones (CT-MRI NCC 0.68 against 0.81, 0.78 against 0.83; docs/results/methods.md), so 2-D keeps
# the matching alone.
CLASSICAL_STAGE = "classical registration"
# The method's own first estimate of the field (UniFuse's structural matching), before the network.
INITIAL_ALIGNMENT_STAGE = "initial alignment"
# Thinner volumes (a few slices) leave SimpleITK's pyramid nothing to stand on; the matching
# handles them in-plane.
CLASSICAL_MIN_SIDE = 16
FUSE_KEPT_STAGE = "fuse (kept field)"
# Where the checkpoint says it pays (``alignment_guard.weighs_dense_refinement``): the structural
# matching's field refined by a dense MIND instance optimisation (ConvexAdam's Adam stage), which
# the guard weighs after the initial alignment. The matching's local step leaves 2-4 voxel
# non-rigid residuals on a grid too coarse for them; on the 128³ phantom pairs the refinement of the
# kept field takes CT -> PET's from 2.91 to 1.89 voxels (bench/probe_dense_3d.py). It refines the
# matching's field, not SimpleITK's, so that it can run while SimpleITK registers.
DENSE_STAGE = "dense refinement"
# Reading the degradation on the moving image as given: its own grid, before the resampling and any move.
CLASSIFY_STAGE = "classify"
QUALITY_STAGE = "quality"
# One try of the tiled forward pass: the device and the tile size (None: the whole input).
Attempt = tuple[torch.device, TileSize]
# Largest 3-D forward pass by default, in voxels: 176³ (with unifuse-3d-phantom on a CPU, a 160³
# pass peaks at about 3 GB; bench/results/profile_3d_after.txt). Larger volumes run in the fewest
# tiles of at most this many voxels (``tiling.auto_tile_shape``: slabs rather than cubes).
MAX_TILE_VOXELS = 176**3
# What a colour moving image's class evidence asks for: the modality its colours do not tell.
COLOUR_MODALITY_HINT = ("give it (unifuse fuse --moving-modality pet or spect; the workbench's Advanced ▸ moving "
                        "modality; moving_modality= in Python)")
# How a one-slice volume was fused as a 2-D image (provenance's "single_slice" note).
RESAMPLED_ONTO_THE_SLICE = ("a one-slice volume, fused as a 2D image on its in-plane grid after the moving image was "
                            "resampled onto the slice in 3D; outputs are back on the slice's 3D grid")
PLACED_BESIDE_A_2D_IMAGE = ("a one-slice volume beside a 2D image, fused as the 2D image of its slice, placed in its "
                            "plane as a 2D NIfTI of the same affine is; a one-slice reference's outputs are back on "
                            "its 3D grid, colour ones (2D throughout) on its plane")


@dataclasses.dataclass
class _PreparedImage:
    """A model-ready channel on the reference grid plus what is needed to undo the preparation."""

    luma: ImageVolume  # float32 [0, 1], the model's input
    mapping: IntensityMapping
    chroma: np.ndarray | None  # (2, *spatial) Cb, Cr minus 0.5, for RGB inputs
    dtype: np.dtype
    # Moving image only: what clipping to [0, 1] removed (mapping.scaled - mapping.apply; zero
    # inside the window), or None when nothing was; see _clipped_part.
    clipped: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _MovingOffGrid:
    """A moving image on a grid other than the reference's, prepared on its own grid: the tiles'
    moving image, the clipped residual and the chroma are read from it once through the field
    (``io.resample_displaced``). Taken onto the reference grid first and then warped, they were
    interpolated twice, and blurrier than the field gives (a moving image aligned onto a 4.5 mm-slice
    reference: NCC to the truth 0.90 against 0.95); the quality maps compare the restored image with
    it too. The registrations, the guard and the uncertainty passes keep the image on the reference
    grid (``_onto_reference_grid``)."""

    prepared: _PreparedImage
    reference: ImageVolume

    def moved(self, channels: np.ndarray, displacement: np.ndarray) -> np.ndarray:
        """``channels`` (C, *own grid) at every reference voxel moved by ``displacement`` (voxels)."""
        return resample_displaced(channels, self.prepared.luma.geometry, self.reference, displacement)


def fallback_plan(
    device: torch.device, padded_shape: tuple[int, ...], tile_size: TileSize, smallest_side: int
) -> list[Attempt]:
    """The (device, tile size) attempts made in turn while inference runs out of memory.

    First the requested tile size; then cubes of half its largest side again and again down to
    ``smallest_side``, the smallest tile the model takes (``input_checks.minimum_padded_side``, as
    for a ``--tile-size``); on CUDA, finally the CPU with the requested tile size (slow, but host
    memory is usually larger).
    """
    attempts: list[Attempt] = [(device, tile_size)]
    side = max(padded_shape) if tile_size is None else max(tile_size) if isinstance(tile_size, tuple) else tile_size
    while side > smallest_side:
        side = max(smallest_side, side // 2)
        attempts.append((device, side))
    if device.type == "cuda":
        attempts.append((torch.device("cpu"), tile_size))
    return attempts


def _checked_tile_size(tile_size: object) -> int | None:
    """``tile_size`` as the engine takes it (voxels per side, or None for the default), or an
    InputError saying what it must be: a string or a tuple failed later with a bare TypeError."""
    if tile_size is None:
        return None
    if isinstance(tile_size, numbers.Integral) and not isinstance(tile_size, bool) and tile_size > 0:
        return int(tile_size)
    raise InputError(f"tile_size must be one positive whole number of voxels per side (e.g. 64), or None for "
                     f"the default; got {tile_size!r}")


def _unknown_calibration_warnings(method: FusionMethod) -> list[str]:
    """Trained weights run without their metadata: the calibrations and training crop live there,
    so the pipeline would change silently. A weights file still loads without its sidecar (its header
    holds the config); a network passed in memory carries none of it unless ``checkpoint_info`` does."""
    if method.checkpoint_metadata:
        return []
    path = method.checkpoint
    if path is not None:
        missing = f"checkpoint {path.name} has no sidecar {path.with_suffix('.json').name} next to it"
        remedy = "copy the .json with the .safetensors"
    elif isinstance(method, NetworkMethod):
        missing = "the network passed in memory came without its checkpoint's metadata"
        remedy = "pass checkpoint_info=metadata, the second value load_checkpoint returns"
    else:
        return []
    return [f"{missing}: its training crop and calibrations (alignment guard, fusion balance, class evidence) are "
            f"unknown, so defaults are used and results differ from the trained pipeline's; {remedy}"]


_PASS_ITS_OWN_METADATA = ("pass the metadata load_checkpoint returned beside this network "
                          "(network, metadata = load_checkpoint(NAME)), or None to run with defaults")


def _checked_checkpoint_info(checkpoint_info: object, method: FusionMethod) -> dict[str, Any]:
    """``checkpoint_info`` as a dict ({} for None), or an InputError unless it is one whose method and
    config, where it records them, are those of ``method``'s network: another checkpoint's metadata would
    apply that checkpoint's training crop and calibrations silently, as a sidecar copied from another
    checkpoint would (``load_checkpoint`` refuses that one by the same comparison)."""
    if checkpoint_info is None:
        return {}
    if not isinstance(checkpoint_info, dict):
        raise InputError(f"checkpoint_info is {checkpoint_info!r:.80} (a {type(checkpoint_info).__name__}), not a "
                         f"checkpoint's metadata: it takes the dict load_checkpoint returns beside the network "
                         f"(network, metadata = load_checkpoint(NAME)), or None; a checkpoint's name goes first, "
                         f"in place of the network")
    network = method.network if isinstance(method, NetworkMethod) else None
    own_method = network_method(network) if network is not None else None
    described = checkpoint_info.get("method", own_method)
    if described != own_method:
        runs = f"the network is a {own_method} one" if own_method else f"the {method.name} method runs no network"
        raise InputError(f"checkpoint_info describes {described} weights but {runs}, so it is another checkpoint's "
                         f"metadata; {_PASS_ITS_OWN_METADATA}")
    if network is None or "config" not in checkpoint_info:
        return checkpoint_info
    values = checkpoint_info["config"]
    try:
        if not isinstance(values, dict):
            raise TypeError(f"it is a {type(values).__name__}, not named fields")
        recorded = config_from_dict(own_method, values).to_dict()
    except (InputError, TypeError) as error:
        raise InputError(f"checkpoint_info's config is not a {own_method} config ({error}); "
                         f"{_PASS_ITS_OWN_METADATA}") from error
    differing = "; ".join(f"{key}: {json.dumps(there)} there, {json.dumps(here)} in the network"
                          for key, (here, there) in config_differences(network.config.to_dict(), recorded).items())
    if differing:
        raise InputError(f"checkpoint_info describes a network of another config ({differing}), so it is another "
                         f"checkpoint's metadata; {_PASS_ITS_OWN_METADATA}")
    return checkpoint_info


def requested_settings(tile_size: int | None, *, reference_modality: str, moving_modality: str, quality: bool,
                       uncertainty_passes: int) -> dict[str, Any]:
    """What a caller chose beside the inputs, method and checkpoint, as ``provenance.json`` records
    it: a batch resumes a pair only when these are the same (``unifuse fuse``)."""
    return {
        "tile_size": tile_size,
        "reference_modality": MODALITY_ALIASES.get(reference_modality, reference_modality),
        "moving_modality": MODALITY_ALIASES.get(moving_modality, moving_modality),
        "quality": quality,
        "uncertainty_passes": uncertainty_passes if quality else None,
    }


class FusionEngine:
    """A loaded method ready to fuse pairs; load once, call :meth:`run_fusion` per pair.

    ``model_or_checkpoint`` is an ``engine.methods.FusionMethod`` (``load_method``), a network of
    ``model.networks`` (a ``UniFuse`` module, ...) or a checkpoint name/path for ``model.checkpoint``
    (the method its header names).
    ``tile_size`` (voxels per side) splits large inputs into blended tiles. ``None``: 3-D inputs
    run in the fewest tiles of at most ``MAX_TILE_VOXELS`` (the whole input when it fits), and
    UniFuse's degradation classifier reads windows of the checkpoint's training crop
    (``model.checkpoint.training_crop``; ``DegradationAwarePromptLearning.readout_window``), so
    that its answer does not depend on the tile size; 2-D checkpoints keep running in tiles of
    their training crop (their images are small, and their outputs stay as they were evaluated).
    ``weigh_network_field``: whether the guard weighs the network's own field (UniFuse's FA) beside
    the initial alignment; ``None``: as the checkpoint says (``alignment_guard.weighs_network_field``).
    When it does not, the guard decides before the network runs, and the network runs once.
    ``weigh_dense_refinement``: whether the guard also weighs the structural matching's field refined
    by the dense MIND optimisation (``DENSE_STAGE``); ``None``: as the checkpoint says
    (``alignment_guard.weighs_dense_refinement``).
    ``checkpoint_info``: for a network passed in memory, its checkpoint's metadata (the sidecar, the
    second value ``model.checkpoint.load_checkpoint`` returns): the training crop and calibrations are
    read from it as from the checkpoint loaded by name, so the results are the same; without it they
    are unknown, and the runs say so. Metadata recording another method or config than the network's
    (another checkpoint's) is refused with an InputError. It is recorded as the provenance's
    checkpoint; for a checkpoint loaded here by name or path, it adds fields to that record.
    """

    def __init__(
        self,
        model_or_checkpoint: FusionMethod | nn.Module | str | Path,
        device: str = "auto",
        tile_size: int | None = None,
        checkpoint_info: dict[str, Any] | None = None,
        weigh_network_field: bool | None = None,
        weigh_dense_refinement: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        # As asked ("auto" included), for the provenance: its "device" says where the run went.
        self.requested_device = str(device)
        tile_size = _checked_tile_size(tile_size)
        if isinstance(model_or_checkpoint, nn.Module):
            self.method = method_for_network(model_or_checkpoint)
        elif isinstance(model_or_checkpoint, FusionMethod):
            self.method = model_or_checkpoint
        else:
            self.method = method_from_checkpoint(model_or_checkpoint)
        path = self.method.checkpoint
        checkpoint_info = _checked_checkpoint_info(checkpoint_info, self.method)
        if path is None and checkpoint_info:
            # A network loaded by the caller runs the pipeline it runs loaded by name (load_checkpoint's metadata).
            self.method.checkpoint_metadata = dict(checkpoint_info)
        metadata = self.method.checkpoint_metadata
        self.checkpoint_warnings = _unknown_calibration_warnings(self.method)
        try:
            self.min_credible_motion = credible_motion_floor(metadata)
            self.similarity_blur = similarity_blur(metadata)
            self.degradation_evidence = evidence_table(metadata)
            self.coarse_readout = coarse_readout(metadata, DEGRADATION_CLASSES)
            self.fusion_balance = fusion_balance(metadata)
            checkpoint_weighs = weighs_network_field(metadata)
            checkpoint_refines = weighs_dense_refinement(metadata)
        except ValueError as error:
            raise CheckpointError(f"{path or 'checkpoint_info'}: {error}") from error
        if metadata:  # else the network keeps the read-out it was built or loaded with
            crop = training_crop(metadata)
            self.method.use_training_crop(crop)
            if self.method.config.spatial_dims == 2:
                tile_size = tile_size or crop
        if path is None:
            note = "model passed in memory" if isinstance(model_or_checkpoint, nn.Module) else "no trained weights"
            self.checkpoint_info = {"name": None, "note": note, **checkpoint_info}
        else:
            recorded = dict(metadata)
            recorded.pop("config", None)  # recorded once, as model_config
            self.checkpoint_info = {
                "name": self.method.checkpoint_name or str(path), "path": str(path.resolve()),
                "sha256": sha256_of_path(path), "metadata": recorded, **checkpoint_info,
            }
        self.method.to(self.device)
        self.config = self.method.config
        self.tile_size = tile_size
        self.weigh_network_field = self.method.refines_alignment and (
            checkpoint_weighs if weigh_network_field is None else weigh_network_field)
        self.weigh_dense_refinement = self.method.refines_alignment and (
            checkpoint_refines if weigh_dense_refinement is None else weigh_dense_refinement)

    @property
    def checkpoint_name(self) -> str:
        return str(self.checkpoint_info.get("name") or "the in-memory model")

    def run_fusion(
        self,
        reference: ImageVolume,
        moving: ImageVolume,
        *,
        reference_modality: str = "auto",
        moving_modality: str = "auto",
        progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
        quality: bool = True,
        uncertainty_passes: int = DEFAULT_PASSES,
    ) -> FusionResult:
        """Align, restore and fuse ``moving`` onto ``reference``; see the module docstring.

        ``quality``: also compute ``result.quality`` (``engine.quality``), with
        ``uncertainty_passes`` perturbed alignment passes for the uncertainty map (0: no map).

        A 3-D volume stored with permuted axes (a coronal or sagittal NIfTI) or with its slices from
        head to foot is fused in world axis order (``ImageVolume.in_world_axis_order``), as the
        workbench shows it: the network is not invariant to the order of its axes, so the axis order
        and the slice direction a file stores do not change the result, and per-slice outputs run
        along world z, foot to head. An in-plane flip (LPS against RAS storage) is not undone: it
        stays in the geometry, the network sees the image mirrored, and a network method's outputs
        differ slightly from those of the unflipped files. The outputs lie on the reference's voxels
        in that order (the same world positions); the provenance records the stored order
        (``reoriented_from_axes``, ``slices_reversed``)."""
        result = self._run_fusion(reference, moving, reference_modality=reference_modality,
                                  moving_modality=moving_modality, progress=progress, cancel=cancel,
                                  quality=quality, uncertainty_passes=uncertainty_passes)
        return _record_stored_order(result, reference, moving)

    def _run_fusion(
        self,
        reference: ImageVolume,
        moving: ImageVolume,
        *,
        reference_modality: str,
        moving_modality: str,
        progress: ProgressCallback,
        cancel: CancelToken | None,
        quality: bool,
        uncertainty_passes: int,
    ) -> FusionResult:
        """:meth:`run_fusion` without the record of a volume's stored axis order."""
        _refuse_non_volumes(reference, moving)
        reoriented_roles = _reoriented_roles(reference, moving)
        if reoriented_roles:
            result = self.run_fusion(reference.in_world_axis_order(), moving.in_world_axis_order(),
                                     reference_modality=reference_modality, moving_modality=moving_modality,
                                     progress=progress, cancel=cancel, quality=quality,
                                     uncertainty_passes=uncertainty_passes)
            return _world_axis_order_result(result, {"reference": reference, "moving": moving}, reoriented_roles)
        beside = one_slice_beside_2d(reference, moving)
        if beside is not None:
            result = self.run_fusion(*beside, reference_modality=reference_modality, moving_modality=moving_modality,
                                     progress=progress, cancel=cancel, quality=quality,
                                     uncertainty_passes=uncertainty_passes)
            return _one_slice_beside_2d_result(result, reference, moving)
        cancel = cancel or CancelToken()
        timer = StageTimer()
        warnings: list[str] = list(self.checkpoint_warnings)

        @contextmanager
        def stage(name: str):
            cancel.raise_if_cancelled()
            progress(name, 0, 1)
            with timer.stage(name):
                yield
            progress(name, 1, 1)

        with torch.inference_mode(), _out_of_memory_explained(timer, reference, self.device):
            with stage("validate"):
                given = {"reference": describe_input(reference), "moving": describe_input(moving)}  # as handed in
                reference, moving = self.validate(reference, moving)
                warnings.extend(picture_placement_warnings(reference, moving) + overlap_warnings(reference, moving))
            planar = single_slice_pair(reference, moving)
            if planar is not None:
                result = self.run_fusion(*planar, reference_modality=reference_modality,
                                         moving_modality=moving_modality, progress=progress, cancel=cancel,
                                         quality=quality, uncertainty_passes=uncertainty_passes)
                return _single_slice_result(result, reference, moving, RESAMPLED_ONTO_THE_SLICE)
            with stage("normalise"):
                reference_ready = _prepare(reference, reference_modality)
                moving_ready = _prepare(moving, moving_modality)
                moving_ready.clipped = _clipped_part(moving, moving_ready)
                warnings.extend(_beyond_float32_warnings(moving))
                # A modality guessed from ambiguous intensities (io.normalize) must reach the user, not
                # only the provenance's intensity_mappings.
                warnings.extend(f"{image.source or role}: {ready.mapping.warning}" for role, image, ready in
                                (("reference", reference, reference_ready), ("moving", moving, moving_ready))
                                if ready.mapping.warning)
                if reference_ready.chroma is not None and moving_ready.chroma is not None:
                    # One colour can be carried (_compose): say which, or a reviewer reads the fused
                    # image's grey where the reference was coloured as the reference's own.
                    warnings.append(f"{reference.source or 'reference'}: both images are in colour; the fused "
                                    "image is coloured by the moving image alone, the reference's colours are "
                                    "not in it (the fusion is of luma, Y)")
            with stage("resample"):
                off_grid = None if moving.on_grid_of(reference) else _MovingOffGrid(moving_ready, reference)
                on_grid = _onto_reference_grid(moving_ready, reference, with_carried_channels=off_grid is None)
                field_of_view = moving_field_of_view(moving, reference)
            spacing = tuple(float(s) for s in reference.geometry.spacing)
            classical = None
            if self._registers_classically(on_grid.luma.array.shape):
                classical = _ClassicalInBackground(within_field_of_view(reference_ready.luma.array, field_of_view),
                                                   on_grid.luma.array, spacing, warnings)
            degradation = None
            with _stopped_when_done(classical):
                if self.method.estimates_degradation:
                    with stage(CLASSIFY_STAGE):  # on the moving image as given, not the resampled one
                        degradation = self._read_degradation(moving_ready.luma, reference_ready.luma, progress,
                                                          cancel, warnings)
                moving_ready = on_grid
                prediction, decision, run_info = self._fuse_and_guard(
                    moving_ready.luma.array, reference_ready.luma.array, timer, stage, progress, cancel, warnings,
                    spacing=spacing, class_probs=None if degradation is None else degradation[0], classical=classical,
                    field_of_view=field_of_view, off_grid=off_grid,
                )
            warnings.extend(moved_beyond_field_of_view_warnings(field_of_view, prediction["displacement"], spacing))
            if degradation is not None:
                prediction["class_probs"], prediction["slice_class_probs"], run_info["degradation_read_on"] = degradation
            with stage("compose"):
                result = self._compose(reference, moving, reference_ready, moving_ready, prediction, off_grid)
            if quality:
                with stage(QUALITY_STAGE):
                    result.quality = self._quality(reference_ready.luma, moving_ready.luma.array, prediction,
                                                   uncertainty_passes, cancel, field_of_view, off_grid)

        warnings.extend(reader_and_content_warnings(reference, moving))
        evidence = class_evidence(self.degradation_evidence, result.predicted_class,
                                  _evidence_modality(moving_modality, moving, moving_ready.mapping,
                                                     self.degradation_evidence or {}))
        if evidence is not None and not evidence.informative:
            message = evidence.message(result.class_probs[result.predicted_class])
            if moving.is_rgb and evidence.image_modality == "auto":
                message += f"; a colour image does not say its modality: {COLOUR_MODALITY_HINT}"
            warnings.append(message)
        result.warnings = warnings
        result.alignment_guard = decision
        result.class_evidence = evidence
        balance = run_info.pop("fusion_balance")
        result.fusion_balance = balance
        result.provenance = {
            "created": utc_timestamp(),
            "inputs": {
                "reference": {**given["reference"], **image_record(reference)},
                "moving": {**given["moving"], **image_record(moving)},
            },
            "method": self.method.describe(),
            "checkpoint": self.checkpoint_info,
            "model_config": self.config.to_dict(),
            "requested_device": self.requested_device,
            "requested_settings": requested_settings(self.tile_size, reference_modality=reference_modality,
                                                     moving_modality=moving_modality, quality=quality,
                                                     uncertainty_passes=uncertainty_passes),
            **run_info,
            "alignment_guard": decision.to_dict() if decision is not None else None,
            "degradation_evidence": evidence.to_dict() if evidence is not None else None,
            "fusion_balance": balance.to_dict() if balance is not None else None,
            **({"quality": _quality_provenance(result.quality, uncertainty_passes)} if result.quality else {}),
            "versions": software_versions(),
            "timings_s": timer.seconds,
            "intensity_mappings": {"reference": reference_ready.mapping.to_dict(),
                                   "moving": moving_ready.mapping.to_dict()},
            "outputs": {
                "fused": "float32 in [0, 1] (8-bit for PNG), reference geometry",
                "aligned": "restored moving image moved by the kept field onto the reference, moving intensity units "
                           "(RGB: float32 in [0, 1])",
                "displacement": "ITK displacement field (LPS mm) on the reference grid, moving -> reference; "
                                "the estimate alignment_guard kept",
            },
            "warnings": warnings,
        }
        return result

    # ---- stages --------------------------------------------------------------------------------
    def validate(self, reference: ImageVolume, moving: ImageVolume) -> tuple[ImageVolume, ImageVolume]:
        """Refuse inputs the model cannot use, with a message naming the image and the limit; return
        both with values the model can read (``io.readers.real_finite_values``: magnitude of complex
        data, 0/1 for masks, no NaN or infinity), each change noted among the image's warnings."""
        # 4D and other dimensionalities cannot reach here: ImageVolume's Geometry is 2D or 3D.
        if reference.single_slice_axis is None:  # a one-slice volume is checked as the 2D image it is
            self.method.check_dimensions(reference.ndim, reference.source or "reference image")
        usable = []
        for role, image in (("reference", reference), ("moving", moving)):
            source = image.source or f"the {role} image"
            if image.array.size == 0:
                raise InputError(f"the {role} image is empty (shape {image.array.shape})", source)
            try:
                array, notes = real_finite_values(image.array)
            except InputError as error:
                raise InputError(f"the {role} image: {error.problem}", source) from error
            if array is not image.array:
                warnings = [*image.metadata.get("warnings", []), *notes]
                image = dataclasses.replace(image, array=array, metadata={**image.metadata, "warnings": warnings})
            usable.append(image)
        reference, moving = usable
        beside = one_slice_beside_2d(reference, moving)
        if beside is not None:  # run_fusion fuses it as this 2-D pair
            self.validate(*beside)
            return reference, moving
        refuse_mixed_dimensions(reference, moving)
        if moving.single_slice_axis is not None and reference.single_slice_axis is None:
            raise InputError(
                f"the moving image is a single slice (shape {moving.array.shape}) but the reference a volume "
                f"(shape {reference.array.shape}); fuse it onto the matching slice of the reference "
                "(the reference one slice too)", moving.source or "moving image")
        dims = model_dimensions(reference)
        if self.config.spatial_dims != dims:
            what = (f"a single slice stored as a 3D volume (shape {reference.array.shape}), fused as 2D"
                    if reference.single_slice_axis is not None else f"{dims}D")
            if not isinstance(self.method, NetworkMethod):  # no weights: only how it was loaded is wrong
                raise InputError(
                    f"this method was built for {self.config.spatial_dims}D images but the images are {what}; "
                    f"load it for them: load_method({self.method.name!r}, spatial_dims={dims})",
                    self.method.name)
            raise InputError(
                f"this checkpoint is a {self.config.spatial_dims}D model but the images are {what}; "
                f"use a {dims}D checkpoint", self.checkpoint_name)
        _refuse_too_small(reference, self.config, self.tile_size)
        return reference, moving

    def _registers_classically(self, shape: tuple[int, ...]) -> bool:
        """Whether SimpleITK's field competes with the matching's for a pair of this shape on the
        reference grid (3-D volumes thick enough for its pyramid, methods that refine the field)."""
        return self.method.refines_alignment and len(shape) == 3 and min(shape) >= CLASSICAL_MIN_SIDE

    def _fuse_and_guard(
        self,
        moving: np.ndarray,
        reference: np.ndarray,
        timer: StageTimer,
        stage: Callable[[str], AbstractContextManager[None]],
        progress: ProgressCallback,
        cancel: CancelToken,
        warnings: list[str],
        spacing: tuple[float, ...] | None = None,
        class_probs: np.ndarray | None = None,
        classical: _ClassicalInBackground | None = None,
        field_of_view: np.ndarray | None = None,
        off_grid: _MovingOffGrid | None = None,
    ) -> tuple[dict[str, np.ndarray], GuardDecision | None, dict[str, Any]]:
        """The ``initial alignment``, ``fuse``, ``guard`` and (when needed) ``fuse (kept field)`` stages: padded, tiled
        forward passes with the out-of-memory fallback; returns arrays cropped back to the input.
        ``spacing`` (mm per array axis) guides the structural matching's image pyramid.
        ``class_probs`` (Ñ,): the degradation the ``classify`` stage read, which every tile then
        uses in place of its own reading. ``classical``: SimpleITK's registration of this pair,
        running since the resampling (:meth:`_registers_classically`); its stage is the wait for it.
        ``field_of_view``: where the moving image has data on the grid (``moving_field_of_view``;
        None: everywhere); the alignment estimates see the reference only there, and the guard scores
        only there (:func:`within_field_of_view`). ``off_grid``: the moving image on its own grid when
        that is not the reference's (None: ``moving`` is it), which the tiles then read once through
        the field (:class:`_MovingOffGrid`)."""
        multiple = self.config.size_multiple
        spatial = moving.shape
        crop = (slice(None), *(slice(0, side) for side in spatial))
        padding = [(0, -side % multiple) for side in spatial]
        # Zero padding: after normalisation 0 is background, what the model saw around anatomy.
        pair = torch.from_numpy(np.stack([np.pad(moving, padding), np.pad(reference, padding)]).astype(np.float32))
        tile_size = self.tile_size or auto_tile_shape(tuple(pair.shape[1:]), multiple, MAX_TILE_VOXELS)
        attempts = fallback_plan(self.device, tuple(pair.shape[1:]), tile_size, minimum_padded_side(self.config))
        reference_seen = within_field_of_view(reference, field_of_view)
        matched_reference = pair[None, 1:2] if field_of_view is None else torch.from_numpy(
            np.pad(reference_seen, padding))[None, None]
        # Structural matching runs once on the whole input (one rigid estimate for every tile, and
        # no tile reads past its edge for it); tiles get the moved image and their part of the field.
        # A stage of its own: on a clinical volume it takes a minute, which the progress and an
        # out-of-memory message must not put on the stage before or on the network's "fuse".
        with stage(INITIAL_ALIGNMENT_STAGE):
            with torch.no_grad():
                matching = self.method.initial_alignment(pair[None, 0:1], matched_reference, spacing=spacing,
                                                         check_cancelled=cancel.raise_if_cancelled).cpu()
        initial_name, initial, initial_decision = self.method.initial_alignment_name, matching, None
        refined = None
        if self.weigh_dense_refinement:
            # Before the wait for SimpleITK, which registers on one thread of its own: the wait then
            # hides the refinement, on one torch thread beside it (on two it took 8.9 s at 160³ and
            # SimpleITK 1.5 s longer, where both fit in SimpleITK's time on a core each).
            cancel.raise_if_cancelled()
            with stage(DENSE_STAGE), one_thread() if classical is not None else nullcontext():
                refined = refine_dense(reference_seen, moving, matching[0][crop].numpy(),
                                       check_cancelled=cancel.raise_if_cancelled)
        if classical is not None:
            with stage(CLASSICAL_STAGE):
                initial_name, initial, initial_decision = self._matching_or_simpleitk(
                    moving, reference, matching, classical.result(cancel), padding, spacing, field_of_view)
        estimates = {initial_name: initial[0][crop].numpy()}
        padded_fields = {initial_name: initial}
        if refined is not None:
            estimates[DENSE] = refined
            padded_fields[DENSE] = torch.from_numpy(np.pad(refined, [(0, 0), *padding], mode="edge"))[None]
        routing = None if class_probs is None else torch.from_numpy(class_probs).float()[None]
        decision = None
        if self.method.guarded and not self.weigh_network_field:
            # Nothing the network does can change the decision: make it first, run the network once.
            with stage("guard"):
                decision = choose_displacement(moving, reference, estimates, min_credible_motion=self.min_credible_motion,
                                               blur_voxels=self.similarity_blur, spacing=spacing,
                                               field_of_view=field_of_view)
            kept = padded_fields.get(decision.kept, torch.zeros_like(initial))
            # The candidates the guard turned down, three fields of the volume's size at most, would
            # otherwise live through the network pass, the run's peak (1.9 GB at 512×512×200).
            del matching, refined, initial, estimates, padded_fields
            with timer.stage("fuse"):
                blended, attempts = self._fuse_tiles(pair, kept, True, routing, "fuse", attempts, progress, cancel,
                                                     warnings, off_grid)
        else:
            with timer.stage("fuse"):
                blended, attempts = self._fuse_tiles(pair, initial, False, routing, "fuse", attempts, progress,
                                                     cancel, warnings, off_grid)
            if self.method.guarded:
                with stage("guard"):
                    decision = choose_displacement(moving, reference, {
                        **estimates, NETWORK: blended.dense[2 : 2 + len(spatial)][crop].numpy()},
                        min_credible_motion=self.min_credible_motion,
                        blur_voxels=self.similarity_blur, spacing=spacing, field_of_view=field_of_view)
                if decision.kept != NETWORK:
                    kept = padded_fields.get(decision.kept, torch.zeros_like(initial))
                    cancel.raise_if_cancelled()
                    with timer.stage(FUSE_KEPT_STAGE):
                        blended, attempts = self._fuse_tiles(pair, kept, True, routing, FUSE_KEPT_STAGE, attempts,
                                                             progress, cancel, warnings, off_grid)
        self.method.to(self.device)
        device, tile_size = attempts[0]
        tile_shape, overlap = tile_layout(tuple(pair.shape[1:]), tile_size, multiple)
        dense = blended.dense[crop].numpy()
        ndim = len(spatial)
        fused, restored = np.clip(dense[0], 0.0, 1.0), np.clip(dense[1], 0.0, 1.0)
        balance = None
        if self.fusion_balance is not None and dense.shape[0] > 2 + ndim:  # the method blends: w is its last map
            fused, _, balance = self.fusion_balance.apply(reference, restored, dense[2 + ndim])
        return (
            {
                "fused": fused,
                "restored": restored,
                "displacement": np.ascontiguousarray(dense[2 : 2 + ndim], dtype=np.float32),
                "class_probs": blended.per_tile.numpy(),
                "slice_class_probs": blended.per_slice[: spatial[0] if ndim == 3 else 1].numpy(),
            },
            decision,
            {
                **({"initial_alignment": initial_decision.to_dict()} if initial_decision is not None else {}),
                **({"network_field_weighed": self.weigh_network_field,
                    "dense_refinement_weighed": self.weigh_dense_refinement} if self.method.refines_alignment else {}),
                "fusion_balance": balance,
                "device": str(device),
                "scan_backend": scan_backend(device),
                "tile_shape": list(tile_shape),
                "tile_overlap": list(overlap),
                "tile_count": blended.tile_count,
            },
        )

    def _matching_or_simpleitk(self, moving: np.ndarray, reference: np.ndarray, matching: torch.Tensor,
                               simpleitk: np.ndarray | None, padding: list[tuple[int, int]],
                               spacing: tuple[float, ...] | None, field_of_view: np.ndarray | None = None,
                               ) -> tuple[str, torch.Tensor, GuardDecision | None]:
        """The initial alignment: the structural matching's ``matching`` (1, ndim, *padded) or
        SimpleITK's field ``simpleitk`` (ndim, *spatial; None when it failed), whichever the guard
        prefers, scored inside ``field_of_view``, motion counted in voxels of the finest axis of
        ``spacing`` (mm per array axis).
        Returns (its name, it padded, the decision or None)."""
        if simpleitk is None:
            return self.method.initial_alignment_name, matching, None
        crop = (slice(None), *(slice(0, side) for side in moving.shape))
        decision = choose_displacement(moving, reference, {MATCHING: matching[0][crop].numpy(), SIMPLEITK: simpleitk},
                                       min_credible_motion=self.min_credible_motion, blur_voxels=self.similarity_blur,
                                       spacing=spacing, field_of_view=field_of_view)
        if decision.kept != SIMPLEITK:
            return self.method.initial_alignment_name, matching, decision
        return SIMPLEITK, torch.from_numpy(np.pad(simpleitk, [(0, 0), *padding], mode="edge"))[None], decision

    def _fuse_tiles(
        self,
        pair: torch.Tensor,
        field: torch.Tensor,
        fixed_field: bool,
        class_probs: torch.Tensor | None,
        stage: str,
        attempts: list[Attempt],
        progress: ProgressCallback,
        cancel: CancelToken,
        warnings: list[str],
        off_grid: _MovingOffGrid | None = None,
    ) -> tuple[BlendedPrediction, list[Attempt]]:
        """The network over blended tiles of the padded (moving, reference) ``pair``, the moving
        image moved by ``field`` (1, ndim, *padded) first (read once on its own grid where ``off_grid``
        holds it); ``class_probs`` (1, Ñ): the degradation every tile uses (None: each tile's own).
        Returns the prediction and the attempts from the one that fitted in memory on, so that a
        second pass starts there."""
        if off_grid is None:
            moving = warp(pair[None, 0:1], field)[0]
        else:
            spatial = off_grid.reference.spatial_shape
            on_reference = field[0][(slice(None), *(slice(0, side) for side in spatial))].numpy()
            sampled = off_grid.moved(off_grid.prepared.luma.array[None], on_reference)
            # The padding beyond the reference's grid stays zero, the background the pair is padded with.
            moving = torch.from_numpy(np.pad(sampled, [(0, 0), *((0, padded - side) for padded, side in
                                                                 zip(pair.shape[1:], spatial))]))
        # Channels: the moved moving image, the reference, the field; each tile stacks its part of them.
        moved = (moving, pair[1:2], field[0])
        spatial_dims = self.config.spatial_dims

        def predictor(device: torch.device) -> Callable[[torch.Tensor], TilePrediction]:
            routing = None if class_probs is None else class_probs.to(device)

            def predict(tile: torch.Tensor) -> TilePrediction:
                batch = tile[None].to(device)
                output = self.method.predict_tile(batch[:, 0:1], batch[:, 1:2], batch[:, 2:], fixed_field=fixed_field,
                                                  class_probs=routing)
                maps = [output.fused[0], output.restored[0], output.displacement[0]]
                if output.fusion_weight is not None:
                    maps.append(output.fusion_weight[0])
                dense = torch.cat(maps)
                return _tile_prediction(dense, output.class_probs, output.slice_class_probs, spatial_dims)

            return predict

        return self._tiled(predictor, moved, stage, attempts, progress, cancel, warnings)

    def _read_degradation(self, moving: ImageVolume, reference: ImageVolume, progress: ProgressCallback,
                          cancel: CancelToken, warnings: list[str]
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
        """The degradation read on the moving image as given, before any resampling or move: (p
        (Ñ,), per-slice p on the reference's slices (Z or 1, Ñ), where it was read); None if the
        method returned none.

        The heads read noise, ghosts and streaks, which interpolation smooths (on the atlas a
        half-pixel linear move lowers the spectral slope by 0.9, where low dose raises it by
        0.14-0.21): onto a finer reference grid, a 2.8 mm motion T2 and a 2 mm low-dose PET read as
        clean (bench/results/class_own_grid.md). With a ``coarse_readout`` calibration
        (``engine.coarse_readout``) a coarser copy is read too, for artefacts larger than the head's
        window."""
        native = self._classify_on_grid(moving, reference, progress, cancel, warnings)
        if native is None:
            return None
        where: dict[str, Any] = {"shape": list(moving.spatial_shape),
                                 "spacing_mm": [float(s) for s in moving.geometry.spacing], "coarse_copy": None}
        readout = self.coarse_readout
        if readout is None or not readout.applies_to(moving.geometry.spacing):
            return (*native, where)
        copy = resample_to_spacing(moving, readout.spacing_mm)
        coarse = self._classify_on_grid(copy, reference, progress, cancel, warnings)
        if coarse is None:
            return (*native, where)
        where["coarse_copy"] = {**readout.to_dict(), "shape": list(copy.spatial_shape),
                                "native_class_probs": [float(p) for p in native[0]],
                                "coarse_class_probs": [float(p) for p in coarse[0]]}
        return (readout.combine(native[0], coarse[0], DEGRADATION_CLASSES),
                readout.combine(native[1], coarse[1], DEGRADATION_CLASSES), where)

    def _classify_on_grid(self, moving: ImageVolume, reference: ImageVolume, progress: ProgressCallback,
                          cancel: CancelToken, warnings: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """``classify_tile`` over tiles of ``moving`` on its grid, the reference resampled onto it:
        (p (Ñ,), per-slice p on the reference's slices), or None for no estimate. A volume is read
        with its axes in the reference's order (:func:`_reference_axes_first`)."""
        multiple = self.config.size_multiple
        spatial_dims = self.config.spatial_dims
        if spatial_dims == 3:
            moving = _reference_axes_first(moving, reference)
        spatial = moving.spatial_shape
        padding = [(0, -side % multiple) for side in spatial]
        reference_here = resample_to_reference(reference, moving).array
        pair = torch.from_numpy(np.stack([np.pad(moving.array, padding),
                                          np.pad(reference_here, padding)]).astype(np.float32))
        tile_size = self.tile_size or auto_tile_shape(tuple(pair.shape[1:]), multiple, MAX_TILE_VOXELS)

        def predictor(device: torch.device) -> Callable[[torch.Tensor], TilePrediction]:
            def predict(tile: torch.Tensor) -> TilePrediction:
                batch = tile[None].to(device)
                read = self.method.classify_tile(batch[:, 0:1], batch[:, 1:2])
                class_probs, slice_class_probs = (None, None) if read is None else read
                return _tile_prediction(tile[:0], class_probs, slice_class_probs, spatial_dims)

            return predict

        blended, _ = self._tiled(predictor, (pair,), CLASSIFY_STAGE,
                                 fallback_plan(self.device, tuple(pair.shape[1:]), tile_size,
                                               minimum_padded_side(self.config)),
                                 progress, cancel, warnings)
        if blended.per_tile.numel() == 0:
            return None
        per_slice = blended.per_slice[: spatial[0] if spatial_dims == 3 else 1].numpy()
        if spatial_dims == 3:
            per_slice = _slices_onto(per_slice, blended.per_tile.numpy(), moving, reference)
        return blended.per_tile.numpy(), per_slice

    def _tiled(
        self,
        predictor: Callable[[torch.device], Callable[[torch.Tensor], TilePrediction]],
        image: tuple[torch.Tensor, ...],
        stage: str,
        attempts: list[Attempt],
        progress: ProgressCallback,
        cancel: CancelToken,
        warnings: list[str],
    ) -> tuple[BlendedPrediction, list[Attempt]]:
        """``predictor(device)`` over blended tiles of ``image`` (channel groups on one grid, as
        ``predict_tiled`` takes them), trying each attempt (device, tile size) in turn while one
        runs out of memory; returns the attempts from the one that fitted."""
        for index, (device, tile_size) in enumerate(attempts):
            tile_shape, overlap = tile_layout(tuple(image[0].shape[1:]), tile_size, self.config.size_multiple)
            try:
                self.method.to(device)
                blended = predict_tiled(predictor(device), image, tile_shape, overlap,
                                        progress=progress, cancel=cancel, stage=stage)
                return blended, attempts[index:]
            except Exception as error:  # a CPU's failed allocation is a plain RuntimeError: see is_out_of_memory
                if not is_out_of_memory(error):
                    raise
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if index + 1 < len(attempts):
                    next_device, next_size = attempts[index + 1]
                    warnings.append(
                        f"the {stage!r} stage ran out of memory on {device} with tiles of {tile_shape}; "
                        f"retrying it with tile size {next_size or 'whole input'} on {next_device}")
        # Every plan ends on the CPU; only tiles above the model's smallest leave a smaller tile size to try.
        if max(tile_shape) > minimum_padded_side(self.config):
            remedy = "free memory or use a smaller tile size"
        else:
            remedy = "these are the smallest tiles this model takes: free memory (close other programs) and run again"
        raise UniFuseError(f"out of memory in the {stage!r} stage even with {tile_shape} tiles on {device}; {remedy}")

    def _quality(
        self,
        reference: ImageVolume,
        moving: np.ndarray,
        prediction: dict[str, np.ndarray],
        uncertainty_passes: int,
        cancel: CancelToken,
        field_of_view: np.ndarray | None = None,
        off_grid: _MovingOffGrid | None = None,
    ) -> QualityMaps:
        """The quality maps from the model's [0, 1] images on the reference grid: the moving input
        warped by the kept field (before restoration), the restored and the fused luma; the spread
        of the alignment over ``uncertainty_passes`` perturbed moving images; and which part of each
        slice lies outside the moving image's ``field_of_view`` (None: it reaches every voxel). The
        uncertainty passes see the reference as the alignment estimates saw it (:func:`within_field_of_view`), so
        that they measure the spread of the problem whose field was kept. ``off_grid``: the moving image
        on its own grid when that is not the reference's; the maps then compare the restored image with
        the moving image read once through the field, as the tiles read it, so that the restoration-change
        map holds no interpolation difference (the uncertainty passes keep the image on the reference grid)."""
        timer = StageTimer()
        moving_tensor = torch.from_numpy(moving)[None, None]
        field = torch.from_numpy(prediction["displacement"])[None]
        spacing = reference.geometry.spacing
        uncertainty, threshold = None, None
        if uncertainty_passes > 0:
            # Methods without a structural matching of their own are probed with UniFuse's default one.
            step = getattr(self.config, "matching_step", UniFuseConfig().matching_step)
            with timer.stage("uncertainty"):
                reference_seen = torch.from_numpy(within_field_of_view(reference.array, field_of_view))[None, None]
                uncertainty, threshold = uncertainty_on_matching_level(
                    reference_seen, moving_tensor, field, spacing, step, passes=uncertainty_passes, cancel=cancel)
        with timer.stage("maps"):
            if off_grid is None:
                warped = warp(moving_tensor, field)[0, 0].numpy()
            else:
                warped = off_grid.moved(off_grid.prepared.luma.array[None], prediction["displacement"])[0]
            quality = quality_maps(reference.array, warped, prediction["restored"], prediction["fused"],
                                   spacing=spacing, uncertainty_mm=uncertainty,
                                   uncertainty_threshold_mm=threshold,
                                   uncertainty_definition=UNCERTAINTY_DEFINITION, field_of_view=field_of_view)
        quality.seconds = dict(timer.seconds)
        return quality

    def _compose(
        self,
        reference: ImageVolume,
        moving: ImageVolume,
        reference_ready: _PreparedImage,
        moving_ready: _PreparedImage,
        prediction: dict[str, np.ndarray],
        off_grid: _MovingOffGrid | None = None,
    ) -> FusionResult:
        geometry = reference.geometry
        fused, restored, u = prediction["fused"], prediction["restored"], prediction["displacement"]
        field = torch.from_numpy(u)[None]

        # What the model did not see follows the luma: moved by the same (kept) field, read once on the
        # moving image's own grid where that is not the reference's, as the luma was.
        carried_from = moving_ready if off_grid is None else off_grid.prepared

        def moved(channels: np.ndarray | None) -> np.ndarray | None:
            if channels is None:
                return None
            if off_grid is not None:
                return off_grid.moved(channels, u)
            return warp(torch.from_numpy(channels)[None], field)[0].numpy()

        moving_chroma = moved(carried_from.chroma)
        if carried_from.clipped is not None:
            restored = restored + moved(carried_from.clipped[None])[0]
        carried_chroma = moving_chroma if moving_chroma is not None else reference_ready.chroma
        if carried_chroma is not None:
            fused = _recombine_rgb(fused, carried_chroma)
        restored_units = moving_ready.mapping.inverse(restored)
        if moving_chroma is not None:
            aligned = _recombine_rgb(restored_units, moving_chroma)
        else:
            aligned = _to_dtype(restored_units, moving_ready.dtype)
        # Outputs take the reference's format; NIfTI holds no colour, so an RGB result on a grid
        # with geometry goes to MetaImage, which keeps both. PNG holds 8-bit pictures only, so the
        # aligned image of a scanner image (CT in HU) onto a PNG goes to MetaImage too, and so do
        # outputs on a sheared grid NIfTI would place upright in ITK tools (a tilted CT; a NIfTI
        # reference's sheared sform is held with its qform, as the reference holds it: nifti_holds_grid).
        # Two pictures give PNGs unless the aligned image's pixels do not fit one (a signed or
        # float DICOM picture without position).
        if is_picture(reference) and is_picture(moving) and png_holds(aligned, moving_chroma is not None):
            extension = "png"
        else:
            to_metaimage = carried_chroma is not None or is_picture(reference) or not nifti_holds_grid(reference)
            extension = "mha" if to_metaimage else "nii.gz"
        probs = prediction["class_probs"]
        on_reference_grid = placement_metadata(reference.metadata)  # written where the reference is shown
        return FusionResult(
            fused=ImageVolume(fused.astype(np.float32), geometry, {"role": "fused", **on_reference_grid}, None,
                              carried_chroma is not None),
            aligned=ImageVolume(aligned, geometry, {"role": "aligned", **on_reference_grid}, None,
                                moving_chroma is not None),
            displacement=u,
            class_names=DEGRADATION_CLASSES,
            class_probs={name: float(p) for name, p in zip(DEGRADATION_CLASSES, probs)},
            slice_class_probs=prediction["slice_class_probs"],
            output_extension=extension,
            moving_itk_placement=itk_placement(moving),
        )


# ---- helpers ---------------------------------------------------------------------------------
# Below this share of the reference grid reached by the moving image, the run says so: elsewhere the
# outputs hold no moving data of their own (FUSION_OUTSIDE_THE_MOVING_IMAGE). Below the second, so little is
# shared that the headers are the likelier fault (a PNG beside a NIfTI, a wrong origin), and the
# warning says what to check; a small field of view inside a large one stays possible. A moving
# image wholly outside the reference grid is refused: its resampling would be all zeros.
PARTIAL_COVERAGE_WARNING = 0.5
HEADERS_SUSPECT = 0.01


FUSION_OUTSIDE_THE_MOVING_IMAGE = ("there is no moving data: the aligned and fused images hold there only what the "
                                   "alignment moved in from the covered part (nothing where it moved none)")
# The kept field moving the moving image's data farther than this (voxels of the finest axis) past its
# field of view is said: a field that slides the covered slab fills reference slices it never imaged.
MOVED_BEYOND_FIELD_OF_VIEW_VOXELS = 3.0


def moving_field_of_view(moving: ImageVolume, reference: ImageVolume) -> np.ndarray | None:
    """Where ``moving`` has data on the reference grid (boolean, the reference's spatial shape), by
    the inside test ``resample_to_reference`` and ``grid_coverage`` apply; None where it reaches every
    voxel, so that a full-coverage run computes exactly what it computes without this mask."""
    if moving.on_grid_of(reference):  # the usual case, without a resampling of the volume's size
        return None
    ones = ImageVolume(np.ones(moving.spatial_shape, np.uint8), moving.geometry)
    inside = resample_to_reference(ones, reference, "nearest").array.astype(bool)
    return None if inside.all() else inside


def within_field_of_view(reference: np.ndarray, field_of_view: np.ndarray | None) -> np.ndarray:
    """The reference as the alignment estimates see it: blanked where the moving image has no data
    (``field_of_view``; None: as it is). Its tissue there, against the moving image's zeros, rewarded
    the matching for sliding the covered slab into it (a half-coverage phantom slid 10 mm through-plane)."""
    return reference if field_of_view is None else reference * field_of_view


def moved_beyond_field_of_view_warnings(field_of_view: np.ndarray | None, displacement: np.ndarray,
                                        spacing: tuple[float, ...]) -> list[str]:
    """A warning when the kept ``displacement`` (voxels, on the reference grid) brings the moving
    image's data more than ``MOVED_BEYOND_FIELD_OF_VIEW_VOXELS`` past its ``field_of_view``. With patient
    motion between the scans, the case the alignment corrects, that is the anatomy which moved there; with
    a wrong field it is what the moving image holds elsewhere, which only a look at those slices tells.
    (It said "unless the header misplaces the image", which read as a fault on correct alignments.)"""
    if field_of_view is None:
        return []
    reached = warp(torch.from_numpy(field_of_view.astype(np.float32))[None, None],
                   torch.from_numpy(displacement)[None])[0, 0].numpy() > 0.5
    # How far (mm) each voxel outside the field of view lies from it.
    distance_mm = ndimage.distance_transform_edt(~field_of_view, sampling=spacing)
    filled = reached & ~field_of_view
    farthest_mm = float(distance_mm[filled].max()) if filled.any() else 0.0
    if farthest_mm <= MOVED_BEYOND_FIELD_OF_VIEW_VOXELS * min(spacing):
        return []
    where = ""
    if field_of_view.ndim == 3:
        slices = np.flatnonzero(filled.any(axis=(1, 2)))
        where = f" (slices {slices[0]}-{slices[-1]})"
    share = 100 * filled.sum() / (~field_of_view).sum()  # of the part not covered, as the sentence says
    return [f"the kept alignment moves the moving image up to {farthest_mm:.0f} mm past where its header places its "
            f"field of view, onto {'<1' if share < 1 else f'{share:.0f}'} % of the part of the reference grid it "
            f"does not cover by its header{where}: expected when the patient moved between the scans; check the "
            "alignment there before trusting those slices"]


def picture_placement_warnings(reference: ImageVolume, moving: ImageVolume) -> list[str]:
    """Where a PNG or JPG's place in space is a guess, whatever the overlap: paired with a scanner
    image (a picture's 1 mm pixels from the origin against the scanner's millimetres), or with a
    picture of another size (laid over it from the first pixel, where a crop or a zoom may have
    moved the anatomy)."""
    if is_picture(reference) and is_picture(moving):
        if reference.spatial_shape == moving.spatial_shape:
            return []
        sizes = " and ".join(_pixels(image) for image in (reference, moving))
        return [f"the two pictures differ in size ({sizes}): they are laid over each other from their "
                "top-left pixel, 1 pixel = 1 mm; if one was cropped or zoomed, check the overlay, or give two "
                "pictures of the same size"]
    if not (is_picture(reference) or is_picture(moving)):
        return []
    picture, scanner = (reference, moving) if is_picture(reference) else (moving, reference)
    return [f"{picture.source} is a picture without position or pixel size, {scanner.source or 'the other image'} "
            "a scanner image with both: they are overlaid as if the picture's pixels were 1 mm wide from the "
            "scanner's origin; check the overlay, or give both images in one format"]


def _plane_height_warnings(reference: ImageVolume, moving: ImageVolume) -> list[str]:
    """Two 2-D NIfTI slices whose headers put them in different axial planes: a 2-D grid has no
    height, so they are fused in one plane, which may join two slices of different anatomy."""
    if reference.ndim != 2 or moving.ndim != 2:
        return []
    forms = [NiftiXforms.from_metadata(image.metadata) for image in (reference, moving)]
    heights = [None if form is None else form.plane_height() for form in forms]
    if heights[0] is None or heights[1] is None:
        return []
    apart = abs(heights[0] - heights[1])
    if apart <= 0.5 * float(min(reference.geometry.spacing)):
        return []
    return [f"the two 2-D NIfTI slices lie in different planes by their headers (the reference at z = "
            f"{heights[0]:g} mm, the moving image at z = {heights[1]:g} mm, {apart:g} mm apart); 2-D images are "
            "fused within one plane: check that they show the same slice of the anatomy"]


def the_reference(reference: ImageVolume) -> str:
    """The reference as a message names it: with its file where it has one (in-memory images have none)."""
    return f"the reference ({reference.source})" if reference.source else "the reference"


def _pixels(image: ImageVolume) -> str:
    """A picture's size as people say it, width×height."""
    return "×".join(str(side) for side in reversed(image.spatial_shape)) + " pixels"


def overlap_warnings(reference: ImageVolume, moving: ImageVolume,
                     outside: str = FUSION_OUTSIDE_THE_MOVING_IMAGE) -> list[str]:
    """What a run should say of how much of the reference grid the moving image reaches in space;
    an InputError when it reaches none of it. ``outside``: what the outputs hold where it does not."""
    coverage = grid_coverage(moving, reference)
    if coverage >= PARTIAL_COVERAGE_WARNING:
        return _plane_height_warnings(reference, moving)
    if coverage >= HEADERS_SUSPECT:
        return [f"the moving image covers only {100 * coverage:.0f} % of the reference grid in space; "
                f"elsewhere {outside}"]

    def centre(image: ImageVolume) -> np.ndarray:
        middle = (np.asarray(image.spatial_shape, dtype=np.float64) - 1) / 2
        return image.geometry.index_to_world[:-1] @ np.append(middle, 1.0)

    distance = float(np.linalg.norm(centre(moving) - centre(reference)))
    hint = ("a picture (a PNG or JPG, or a DICOM image without position) has no position in the scanner (its "
            "first pixel sits at the origin): pair it with another picture, or save both images as NIfTI" if is_picture(reference) != is_picture(moving) else
            "check the two files' origins and orientations (their affines), or resample one onto the other")
    # Either header may be the wrong one: the message names both files.
    named = the_reference(reference)
    if is_picture(reference) and is_picture(moving):  # no headers: they meet at the first pixel
        apart = f"pictures of {_pixels(reference)} and {_pixels(moving)}, laid over each other from the top-left pixel"
        hint = "give two pictures of the same size"
    else:
        apart = f"their headers put their centres {distance:.0f} mm apart"
    if coverage == 0:
        raise InputError(f"the moving image does not overlap {named} in space ({apart}); {hint}",
                         moving.source or "moving image")
    return [f"the moving image reaches only {100 * coverage:.1f} % of {named}'s grid in space ({apart}); {hint}"]


def _out_of_memory_explained(timer: StageTimer, reference: ImageVolume,
                             device: torch.device) -> AbstractContextManager[None]:
    """An allocation that fails anywhere in a run (the tiled passes shrink their tiles first)
    becomes a message that names the stage and the size, instead of an allocator's traceback."""
    where = "CUDA GPU" if device.type == "cuda" else "computer"
    remedy = "run on the CPU, " if device.type == "cuda" else ""
    return out_of_memory_explained(lambda: (
        f"the {where} ran out of memory during the {timer.failed_stage or 'fusion'!r} stage on a "
        f"{'x'.join(map(str, reference.spatial_shape))} pair ({_voxel_count(reference.spatial_shape)}); "
        f"free memory (close other programs; in napari, layers you no longer need) and run again, {remedy}or fuse "
        "a cropped or coarser copy of the volumes. Nothing was written and the inputs are unchanged."))


def _voxel_count(shape: tuple[int, ...]) -> str:
    """A grid's size as a reader takes it in: millions for a volume, the count itself below one (a
    32³ pair said "0.0 M voxels")."""
    count = math.prod(shape)
    return f"{count / 1e6:.1f} M voxels" if count >= 1_000_000 else f"{count:,} voxels"


class _ClassicalInBackground:
    """SimpleITK's registration of a pair (:func:`_classical_estimate`) on a thread of its own,
    started once the pair is on one grid. It runs on one ITK thread, so that the same pair gives
    the same field every run; meanwhile the classify stage and the structural matching use the
    other cores (160³ on two cores: 23 s for the three side by side against 30 s one after the
    other; the whole run 61.5-61.8 s against 65.1 s warm).

    A run that ends early (cancelled, interrupted, failed) :meth:`stop`s it, and so does the
    interpreter's exit (``atexit``): a process that shuts down around a thread inside ITK's C++
    code aborts ("FATAL: exception not rethrown"), and a cancelled run should not keep a core busy."""

    _running: ClassVar[weakref.WeakSet[_ClassicalInBackground]] = weakref.WeakSet()

    def __init__(self, reference: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...],
                 warnings: list[str]) -> None:
        self._estimate: np.ndarray | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._register, args=(reference, moving, spacing, warnings),
                                        name="unifuse-simpleitk", daemon=True)
        self._running.add(self)
        self._thread.start()

    def _register(self, reference: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...],
                  warnings: list[str]) -> None:
        try:
            self._estimate = _classical_estimate(reference, moving, spacing, warnings, self._stop)
        except BaseException as error:  # handed to the run's own thread by result()
            self._error = error

    def result(self, cancel: CancelToken) -> np.ndarray | None:
        """The field (voxels), or None when SimpleITK failed or could not run (a warning says so). Handed over once:
        this object keeps no reference, so that the field goes once the guard has turned it down.
        The wait ends when ``cancel`` is set."""
        while self._thread.is_alive():
            cancel.raise_if_cancelled()
            self._thread.join(_CANCEL_POLL_SECONDS)
        if self._error is not None:
            raise self._error
        estimate, self._estimate = self._estimate, None
        return estimate

    def stop(self) -> None:
        """Stop the registration at its next iteration and wait for the thread (a no-op once done)."""
        self._stop.set()
        self._thread.join(_STOP_TIMEOUT_SECONDS)

    @classmethod
    def stop_all(cls) -> None:
        for registration in list(cls._running):
            registration.stop()


@contextmanager
def _stopped_when_done(registration: _ClassicalInBackground | None) -> Iterator[None]:
    """Stop a background registration however the block ends: a no-op once its field was taken,
    and a cancelled, interrupted or failed run leaves no registration running."""
    try:
        yield
    finally:
        if registration is not None:
            registration.stop()


# How often a wait for SimpleITK looks at the cancel token, and how long a stop waits for it: a
# stopped registration ends at its next iteration or pyramid level (4 s at 96³ on a busy core).
_CANCEL_POLL_SECONDS = 0.2
_STOP_TIMEOUT_SECONDS = 60.0
atexit.register(_ClassicalInBackground.stop_all)


def _classical_estimate(reference: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...] | None,
                        warnings: list[str], stop: threading.Event | None = None) -> np.ndarray | None:
    """SimpleITK's field for the pair (voxels), or None with a warning when it fails or cannot run:
    it is one candidate among several, so its failure (a flat image, no overlap) must not fail the run."""
    flat = [role for role, image in (("reference where the moving image has data", reference),
                                     ("moving image on the reference grid", moving)) if np.ptp(image) == 0]
    if flat:
        # Said plainly: ITK would refuse with its internals ("Refusing to change spacing from [1, 1] to [0.03, 0]").
        warnings.append(f"SimpleITK registration was not run: the {' and the '.join(flat)} "
                        f"{'is' if len(flat) == 1 else 'are'} flat; the alignment guard weighs the other estimates without it")
        return None
    try:
        field = register_sitk(reference, moving, grid_geometry(spacing, reference.ndim), stop=stop)
    except RegistrationError as error:
        warnings.append(f"SimpleITK registration failed ({error.cause}); the alignment guard weighs the other estimates without it")
        return None
    return field.astype(np.float32)


def _quality_provenance(quality: QualityMaps, uncertainty_passes: int) -> dict[str, Any]:
    """What the quality maps mean and cost: definitions, thresholds, passes, seconds per part."""
    return {"definitions": quality.definitions, "thresholds": quality.thresholds, "flag_level": quality.flag_level,
            "uncertainty_passes": uncertainty_passes, "seconds": quality.seconds,
            "suspicious_slices": quality.suspicious_slices()}


def _evidence_modality(requested: str, moving: ImageVolume, mapping: IntensityMapping,
                       calibrated: Collection[str]) -> str:
    """The moving image's modality for the class's calibration: the user's; else what the image says
    of itself (its header's modality, Hounsfield air for CT); "auto" (the weakest calibrated modality)
    where MR is only the normalisation's guess for an image that says nothing, and for a colour image
    (PET or SPECT, which its colours do not tell apart). A modality, given or
    in the header, is looked up as named before its normalisation alias: the 3-D checkpoint
    calibrates "t2", which normalises as "mr", and a T2 read as "mr" was judged uncalibrated."""
    given = requested.lower()
    if given != "auto":
        return given if given in calibrated else MODALITY_ALIASES.get(given, given)
    tag = str(moving.metadata.get("modality", "")).lower()
    if tag in calibrated:
        return tag
    if moving.is_rgb:  # its luma mapping's name, "rgb", is no modality: a colour PET and SPECT look alike
        return "auto"
    guessed = mapping.modality == "mr" and MODALITY_ALIASES.get(tag, tag) != "mr"
    return "auto" if guessed else mapping.modality


def _prepare(image: ImageVolume, modality: str) -> _PreparedImage:
    """The model's [0, 1] input: normalised grey values, or the luma of an RGB image."""
    if not image.is_rgb:
        normalised, mapping = normalize_intensity(image, modality)
        return _PreparedImage(normalised, mapping, None, image.array.dtype)
    ycbcr = rgb_to_ycbcr(image.array)
    # The luma is windowed for display like an 8-bit image: same rule (background to 0, never clipped).
    mapping = darkest_to_zero(ycbcr[..., 0], 1.0, "luma", "rgb", "BT.601 luma of an RGB image")
    luma = dataclasses.replace(image, array=mapping.apply(ycbcr[..., 0]), is_rgb=False)
    chroma = np.moveaxis(ycbcr[..., 1:], -1, 0) - _CHROMA_NEUTRAL
    return _PreparedImage(luma, mapping, chroma, image.array.dtype)


def _clipped_part(image: ImageVolume, prepared: _PreparedImage) -> np.ndarray | None:
    """What the model's [0, 1] window cut off ``image`` (None when nothing). It is carried past the
    model like the chroma and added back before the inverse mapping, so that the aligned output
    keeps the input's hottest PET voxels, metal above the CT window and the MR tails."""
    if image.is_rgb:
        return None  # the luma mapping never clips
    clipped = prepared.mapping.scaled(image.array) - prepared.luma.array
    return clipped if clipped.any() else None


def _beyond_float32_warnings(moving: ImageVolume) -> list[str]:
    """A float64 moving image's values past float32's range, which the aligned image, float32 like
    every output, holds at that limit (``io.normalize``): no scanner measures such values (an
    overflowed conversion does), and the limit keeps the output finite where a cast made ±inf."""
    array = moving.array
    if moving.is_rgb or not np.issubdtype(array.dtype, np.floating) or array.dtype.itemsize <= 4:
        return []
    beyond = np.count_nonzero((array > FLOAT32_MAX) | (array < -FLOAT32_MAX))
    if not beyond:
        return []
    return [f"{moving.source or 'moving'}: {beyond} voxel{'s' if beyond != 1 else ''} beyond float32's range "
            f"(±{FLOAT32_MAX:.3g}), which the outputs are written in: the aligned image holds them at that limit"]


def _onto_reference_grid(moving: _PreparedImage, reference: ImageVolume,
                         with_carried_channels: bool = True) -> _PreparedImage:
    """``moving`` on the reference grid; its chroma and clipped part only ``with_carried_channels``:
    where the moving image is read on its own grid (``_MovingOffGrid``) nothing reads them here, and a
    clinical CT's clipped part would be 300 MB more through the network pass."""
    def resampled(channel: np.ndarray) -> np.ndarray:
        return resample_to_reference(dataclasses.replace(moving.luma, array=channel), reference).array

    carried = with_carried_channels
    return dataclasses.replace(
        moving,
        luma=resample_to_reference(moving.luma, reference),
        chroma=None if moving.chroma is None or not carried else
        np.stack([resampled(c) for c in moving.chroma]).astype(np.float32),
        clipped=None if moving.clipped is None or not carried else resampled(moving.clipped).astype(np.float32),
    )


def _recombine_rgb(luma: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    ycbcr = np.stack([luma, *(chroma + _CHROMA_NEUTRAL)], axis=-1)
    return ycbcr_to_rgb(ycbcr)


def _to_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Back to the input's pixel type, so an 8-bit PNG or int16 CT comes out as it went in."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.round(array), info.min, info.max).astype(dtype)
    return array.astype(np.float32)


def refuse_mixed_dimensions(reference: ImageVolume, moving: ImageVolume) -> None:
    """An InputError for a 2D reference with a 3D moving image or the reverse: no method fuses such
    a pair, and nothing can place one image in the other's space."""
    if reference.ndim != moving.ndim:
        # What a reader noted may say why (a colour picture in NIfTI read as three grey slices).
        notes = [f"{image.source or role}: {note}" for role, image in (("reference", reference), ("moving", moving))
                 for note in image.metadata.get("warnings", [])]
        raise InputError(f"the reference is {_describe_dims(reference)} but the moving image is "
                         f"{_describe_dims(moving)}; both must be 2D or both 3D"
                         + "".join(f" (the reader noted: {note})" for note in notes), moving.source or "moving image")


def _describe_dims(image: ImageVolume) -> str:
    return f"an RGB {image.ndim}D image" if image.is_rgb else f"{image.ndim}D (shape {image.array.shape})"


def reader_and_content_warnings(reference: ImageVolume, moving: ImageVolume) -> list[str]:
    """What the readers noted about each input, and inputs with nothing in them to align or fuse."""
    warnings = [f"{image.source or role}: {warning}" for role, image in (("reference", reference), ("moving", moving))
                for warning in image.metadata.get("warnings", [])]
    # Only what holds for every method: one that restores still changes the image it fuses with itself.
    nothing_to_fuse = "there is nothing to align, and the fusion has no second image to add; give two different images"
    if reference.source and moving.source and same_file(reference.source, moving.source):
        warnings.append(f"{reference.source} is both the reference and the moving image: {nothing_to_fuse}")
    elif _same_image(reference, moving):
        warnings.append(f"{reference.source or 'the reference'} and {moving.source or 'the moving image'} hold the "
                        f"same image on the same grid: {nothing_to_fuse}")
    for role, image in (("reference", reference), ("moving", moving)):
        # A colour picture is constant when every pixel has one colour, not when R = G = B.
        pixels = np.asarray(image.array).reshape(-1, 3) if image.is_rgb else np.asarray(image.array).reshape(-1, 1)
        finite = pixels[np.isfinite(pixels).all(axis=1)]
        if finite.size and (finite == finite[0]).all():
            value = ", ".join(f"{channel:g}" for channel in finite[0])
            value = f"colour ({value})" if image.is_rgb else value
            # UniFuse's fused image is not the other one: the fusion balance caps the reference's
            # share, and the rest is the restored blank image (its fused image is about 0.34 × the reference).
            warnings.append(f"{image.source or role}: the {role} image is constant ({value} everywhere): "
                            "there is no structure to align or fuse: the fused image is no fusion (the other "
                            "image blended with a flat one)")
    return warnings


def _same_image(reference: ImageVolume, moving: ImageVolume) -> bool:
    """Whether two inputs hold the same values on the same grid (two copies of one file, say)."""
    return (reference.is_rgb == moving.is_rgb and reference.array.shape == moving.array.shape
            and moving.on_grid_of(reference) and np.array_equal(reference.array, moving.array, equal_nan=True))


def _tile_prediction(dense: torch.Tensor, class_probs: torch.Tensor | None,
                     slice_class_probs: torch.Tensor | None, spatial_dims: int) -> TilePrediction:
    """A tile's outputs as ``predict_tiled`` blends them: ``dense`` (K, *tile) and the method's
    (1, Ñ) and (1, S, Ñ) degradation probabilities, every z slice of a 3-D tile taking those of the
    slab that contains it; zero columns for a method that estimates no degradation (the result
    reports them as "unknown")."""
    if class_probs is None or slice_class_probs is None:
        return TilePrediction(dense=dense, per_slice=dense.new_zeros(1, 0), per_tile=dense.new_zeros(0))
    slab_probs = slice_class_probs[0]  # (S, Ñ): S slabs along z (3D), S = 1 (2D)
    if spatial_dims == 3:
        depth = dense.shape[1]
        slab_probs = slab_probs[torch.arange(depth, device=slab_probs.device) * slab_probs.shape[0] // depth]
    return TilePrediction(dense=dense, per_slice=slab_probs, per_tile=class_probs[0])


def _reoriented_roles(reference: ImageVolume, moving: ImageVolume) -> list[str]:
    """The roles of the 3-D inputs not stored in world axis order (``ImageVolume.in_world_axis_order``:
    a coronal NIfTI, or slices stored from head to foot); a 2-D image is drawn as stored."""
    return [role for role, image in (("reference", reference), ("moving", moving)) if not image.is_in_world_axis_order]


def _record_stored_order(result: FusionResult, reference: ImageVolume, moving: ImageVolume) -> FusionResult:
    """``result``'s provenance recording each 3-D input reoriented to world axis order (its metadata's
    ``io.image.STORED_AXIS_ORDER``: by ``run_fusion`` for the CLI and the API, by our napari reader for
    the workbench) as its file stores it: shape, grid and ``reoriented_from_axes``, and, for a
    reoriented reference, on which grid the outputs lie. Every entry point so records one file alike."""
    for role, image in (("reference", reference), ("moving", moving)):
        stored = stored_order(image)
        if not stored:
            continue
        result.provenance["inputs"][role].update(stored)
        if role == "reference":
            axes = stored["reoriented_from_axes"]
            reversal = ", its slices reversed to run from foot to head" if stored["slices_reversed"] else ""
            result.provenance["outputs"]["grid"] = (
                f"the reference's voxels in world axis order (its stored array axes {list(axes)} transposed so "
                f"that axis 0 runs along world z, axial slices{reversal}; NIfTI forms permuted alike): the same "
                "world positions as the reference's; per-slice outputs run along world z, foot to head")
    return result


def _world_axis_order_result(result: FusionResult, given: dict[str, ImageVolume],
                             reoriented_roles: list[str]) -> FusionResult:
    """The result of a pair fused in world axis order, each reoriented input described as handed in
    (``given``: for in-memory data, the hash of its array as stored); its stored shape, grid and order
    the inner run recorded (``_record_stored_order``)."""
    for role in reoriented_roles:
        result.provenance["inputs"][role].update(describe_input(given[role]))
    return result


def _reference_axes_first(moving: ImageVolume, reference: ImageVolume) -> ImageVolume:
    """``moving`` (3-D) with its array axes reordered to run along the reference's: first the one
    most parallel in world space to the reference's axis 0, the slices the user scrolls, then the
    one more parallel to its axis 1. The method reads per-slice probabilities along array axis 0,
    so a volume stored sagittal-first onto an axial reference would spread an artefact in a few
    axial slices over all of them. The same voxels at the same world positions; a volume already
    in the reference's order (ties keep the stored one) is returned as is."""
    cosines = np.abs(reference.geometry.direction.T @ moving.geometry.direction)  # reference axis × moving axis
    first = int(np.argmax(cosines[0]))
    second, third = (axis for axis in range(3) if axis != first)
    if cosines[1, third] > cosines[1, second]:
        second, third = third, second
    axes = (first, second, third)
    if axes == (0, 1, 2):
        return moving
    return dataclasses.replace(moving, array=np.ascontiguousarray(moving.array.transpose(axes)),
                               geometry=moving.geometry.transposed(axes))


def _slices_onto(per_slice: np.ndarray, overall: np.ndarray, moving: ImageVolume,
                 reference: ImageVolume) -> np.ndarray:
    """Per-slice probabilities read on the moving grid's z slices (Zm, Ñ) -> the reference's
    (Zr, Ñ): each reference slice takes the mean, over a 3 × 3 grid of its in-plane points inside
    the moving image's field of view, of the moving slices' probabilities linearly interpolated at
    each point's position along the moving z axis; ``overall`` where no point is inside."""
    reference_shape, moving_shape = reference.spatial_shape, moving.spatial_shape
    to_moving = np.linalg.inv(moving.geometry.index_to_world) @ reference.geometry.index_to_world
    fractions = np.array([1 / 6, 1 / 2, 5 / 6])
    rows, columns = np.meshgrid(fractions * (reference_shape[1] - 1), fractions * (reference_shape[2] - 1),
                                indexing="ij")
    slices = np.arange(reference_shape[0], dtype=np.float64)
    points = np.stack(np.broadcast_arrays(slices[:, None], rows.ravel()[None], columns.ravel()[None]), axis=-1)
    index = np.concatenate([points, np.ones((*points.shape[:2], 1))], axis=-1) @ to_moving.T  # (Zr, 9, 4)
    inside = np.all((index[..., :3] >= -0.5) & (index[..., :3] <= np.array(moving_shape) - 0.5), axis=-1)
    z = np.clip(index[..., 0], 0, moving_shape[0] - 1)
    interpolated = np.stack([np.interp(z, np.arange(moving_shape[0]), column) for column in per_slice.T], axis=-1)
    counts = inside.sum(axis=1)[:, None]
    mean = (interpolated * inside[..., None]).sum(axis=1) / np.maximum(counts, 1)
    return np.where(counts > 0, mean, overall[None]).astype(np.float32)


def _refuse_non_volumes(reference: object, moving: object) -> None:
    """An API caller's arrays, not images: say how to make them images rather than fail on ``.source``."""
    for role, image in (("reference", reference), ("moving", moving)):
        if not isinstance(image, ImageVolume):
            kind = f"{type(image).__module__}.{type(image).__qualname__}"
            raise InputError(f"the {role} image is not an ImageVolume (got {kind}): wrap arrays in "
                             "ImageVolume(array, Geometry.identity(array.ndim)) (or a Geometry of their spacing, "
                             "origin and direction), or read files with napari_unifuse.io.read_image", "run_fusion")


def _refuse_too_small(reference: ImageVolume, config: UniFuseConfig, tile_size: int | None) -> None:
    """The reference grid (what the network runs on) and the tiles must be as large as the model's
    cost volume needs (``engine.input_checks``); say so, with the limit, before the network fails."""
    smallest = minimum_input_side(config)
    axes = [axis for axis, side in enumerate(reference.spatial_shape)
            if side < smallest and axis != reference.single_slice_axis]
    if axes:
        names = "zyx"[-reference.ndim:]
        listing = ", ".join(f"{names[axis]} ({reference.spatial_shape[axis]})" for axis in axes)
        raise InputError(
            f"the reference (shape {reference.array.shape}) is too small for this model along {listing}: "
            f"it needs at least {smallest} voxels along every axis (a one-slice volume is fused as 2D)",
            reference.source or "reference image")
    if tile_size is not None and tile_size < minimum_padded_side(config):
        raise InputError(f"tiles of {tile_size} voxels are too small for this model: it needs at least "
                         f"{minimum_padded_side(config)}", "tile size")


def single_slice_pair(reference: ImageVolume, moving: ImageVolume) -> tuple[ImageVolume, ImageVolume] | None:
    """A one-slice reference volume and its moving image as 2D images on the slice's in-plane grid, or
    None when the reference is not a single slice.

    The moving image (a slice or a whole volume) is first resampled onto the slice in 3D, so that
    its position and orientation in the scanner are honoured; both 2D images then share one
    in-plane grid (the slice's spacing, identity direction) and the 2D resampling is the identity.
    """
    axis = reference.single_slice_axis
    if axis is None:
        return None
    on_slice = resample_to_reference(moving, reference)
    # On the slice's grid now, it is placed as the slice is: a 3-D volume's NIfTI forms would put it at
    # the volume's height, another plane than the slice's (``_plane_height_warnings``).
    on_slice = dataclasses.replace(on_slice, metadata={
        **{key: value for key, value in on_slice.metadata.items() if key != NIFTI_XFORMS},
        **placement_metadata(reference.metadata)})
    plane = Geometry(np.delete(reference.geometry.spacing, axis), np.zeros(2), np.eye(2))

    def in_plane(image: ImageVolume) -> ImageVolume:
        return dataclasses.replace(image, array=np.take(image.array, 0, axis=axis), geometry=plane)

    return in_plane(reference), in_plane(on_slice)


def one_slice_beside_2d(reference: ImageVolume, moving: ImageVolume,
                        moving_role: str = "moving image") -> tuple[ImageVolume, ImageVolume] | None:
    """A one-slice volume beside a 2-D image as the 2-D pair it is, or None for any other pair.

    NIfTI tools store a 2-D slice as (x, y) or as (x, y, 1): the reader keeps a grey (x, y, 1) a
    one-slice volume but reads an (x, y) slice, and a colour one either way, as a 2-D image. The
    volume is taken as the 2-D image of its slice, placed as the reader places a 2-D NIfTI of the
    same affine (its in-plane axes and origin; the plane's height stays in its NIfTI forms, for
    ``_plane_height_warnings``). An InputError where one plane cannot hold both: a slice in a
    coronal, sagittal or oblique plane (a 2-D image lies in an axial one), or a PNG or JPG (no
    position) beside a slice placed in the scanner. ``moving_role`` names ``moving`` in those messages
    (evaluate hands a label in its place).
    """
    if sorted((reference.ndim, moving.ndim)) != [2, 3]:
        return None
    volume, image = (reference, moving) if reference.ndim == 3 else (moving, reference)
    axis = volume.single_slice_axis
    if axis is None:
        return None  # a whole volume beside a 2-D image: refuse_mixed_dimensions says so
    volume_role, image_role = ("reference", moving_role) if volume is reference else (moving_role, "reference")
    if is_picture(image):
        raise InputError(f"the {image_role} is a picture (a PNG or JPG, or a DICOM image without position), "
                         f"without position or pixel size, but the {volume_role} a one-slice volume placed in the scanner: save both images the same way "
                         "(both as PNG or both as NIfTI)", image.source or image_role)
    in_plane = [other for other in range(3) if other != axis]
    if np.abs(volume.geometry.direction[0, in_plane]).max() > 1e-6:  # world z is the first component
        raise InputError(f"the {volume_role} is a one-slice volume in a coronal, sagittal or oblique plane but the "
                         f"{image_role} a 2-D image, which lies in an axial plane: save both slices the same way "
                         "(both 2-D, or both one-slice volumes)", volume.source or volume_role)
    # The in-plane axes' world y and x: Geometry.from_ras_affine's 2-D block of the same affine.
    plane = Geometry.from_index_to_world(volume.geometry.index_to_world[np.ix_([1, 2, 3], [*in_plane, 3])])
    flat = dataclasses.replace(volume, array=np.take(volume.array, 0, axis=axis), geometry=plane)
    return (flat, moving) if volume is reference else (reference, flat)


def _one_slice_beside_2d_result(result: FusionResult, reference: ImageVolume, moving: ImageVolume) -> FusionResult:
    """The result of the 2-D pair ``one_slice_beside_2d`` made of ``reference`` and ``moving``: a one-slice
    reference gets its outputs back on its 3-D grid, unless they are in colour (2-D throughout the
    package, ``io.image.ImageVolume``: they stay on the slice's plane, where the reader puts an RGB
    (x, y, 1) NIfTI); the one-slice volume is recorded as handed in."""
    if reference.ndim == 3 and not (result.fused.is_rgb or result.aligned.is_rgb):
        return _single_slice_result(result, reference, moving, PLACED_BESIDE_A_2D_IMAGE)
    role, volume = ("reference", reference) if reference.ndim == 3 else ("moving", moving)
    result.provenance["inputs"][role].update(shape=list(volume.array.shape), geometry=volume.geometry.to_dict())
    result.provenance["single_slice"] = {"role": role, "axis": volume.single_slice_axis,
                                         "note": PLACED_BESIDE_A_2D_IMAGE}
    return result


def _single_slice_result(result: FusionResult, reference: ImageVolume, moving: ImageVolume,
                         note: str) -> FusionResult:
    """The 2D result of a one-slice reference put back on its 3D grid: images with the slice axis
    restored, the field with a zero component along it, one class row per z slice; ``note`` says in
    the provenance how the 2D pair was made."""
    axis = reference.single_slice_axis

    def on_grid(image: ImageVolume) -> ImageVolume:
        return dataclasses.replace(image, array=np.expand_dims(image.array, axis), geometry=reference.geometry,
                                   metadata={**image.metadata, **placement_metadata(reference.metadata)})

    displacement = np.insert(np.expand_dims(result.displacement, axis + 1), axis, 0.0, axis=0)
    slices = reference.spatial_shape[0]
    provenance = result.provenance
    for role, image in (("reference", reference), ("moving", moving)):
        provenance["inputs"][role].update(shape=list(image.array.shape), geometry=image.geometry.to_dict())
    provenance["single_slice"] = {"role": "reference", "axis": axis, "note": note}
    quality = result.quality
    if quality is not None:
        quality = dataclasses.replace(
            QualityMaps.from_maps({name: np.expand_dims(array, axis) for name, array in quality.maps().items()},
                                  quality.thresholds, flag_level=quality.flag_level,
                                  definitions=quality.definitions, seconds=quality.seconds),
            outside_moving=quality.outside_moving)  # one slice either way
    moving_placement = itk_placement(moving)
    if moving.ndim == 2:  # beside the slice (one_slice_beside_2d): ITK's in-plane placement, the plane's height kept
        in_plane_placement, moving_placement = moving_placement, np.eye(4)
        moving_placement[1:, 1:] = in_plane_placement
    return dataclasses.replace(
        result, fused=on_grid(result.fused), aligned=on_grid(result.aligned),
        displacement=np.ascontiguousarray(displacement, dtype=np.float32),
        slice_class_probs=np.repeat(result.slice_class_probs[:1], slices, axis=0), provenance=provenance,
        quality=quality, moving_itk_placement=moving_placement)
