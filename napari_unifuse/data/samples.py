"""napari sample data (napari.yaml): phantom pairs for each of the paper's degradation tasks.

Each function returns napari LayerData tuples: the reference, the moving image (degraded and
misaligned) and the ground truth (clean, aligned; hidden), placed in world millimetres by their
geometry. ``metadata["unifuse"]`` tells the workbench each layer's role and modality, the
degradation class and the true displacement ``u`` (voxels, see docs/architecture.md), so it can
show true error maps next to the predicted ones. Its ``"metadata"`` holds the modality where
``volume_from_layer_data`` reads a layer's metadata, as for a file our reader opened: the engine
then normalises and judges the image as that modality rather than guessing it.

Sizes. 3D samples are clinical size: the 1 mm MNI phantoms at full size, 176 x 216 x 180 voxels
of 1.0 mm (the head's bounding box, 176 x 215 x 179 mm, plus margins), like a 1 mm brain MRI.
``SMALL_SAMPLE_SHAPE_3D`` (64 x 80 x 64 voxels of 2.8 mm) is the same head for tests, which set
``SAMPLE_SHAPE_3D`` to it. 2D samples are 128 x 128 pixels of 1.7 mm (the metal simulation re-scans
the CT, which takes ~5x longer at 256^2). Pairs are built once per process and shape.
"""

from __future__ import annotations

import functools
from typing import Any

from napari_unifuse.data.pairs import SyntheticPair, make_pair
from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms
from napari_unifuse.io import ImageVolume

LayerData = tuple[Any, dict[str, Any], str]

FULL_SIZE_SHAPE_3D = (176, 216, 180)
SAMPLE_SHAPE_3D = FULL_SIZE_SHAPE_3D
SMALL_SAMPLE_SHAPE_3D = (64, 80, 64)
SAMPLE_SHAPE_2D = (128, 128)
# Fixed so that the sample looks the same every time it is opened.
_SEED = 2025
_COLORMAPS = {"pet": "inferno", "spect": "inferno"}
# Display windows: CT shows bone and soft tissue; the others span their value range.
_CONTRAST_LIMITS = {"ct": (-200.0, 1200.0)}
_LABELS = {"t1": "T1", "t2": "T2", "pd": "PD", "ct": "CT", "pet": "PET", "spect": "SPECT"}


@functools.lru_cache(maxsize=None)
def _sample_pair(task: str, ndim: int, shape: tuple[int, ...]) -> SyntheticPair:
    reference_modality, moving_modality = {
        "t1-t2-motion": ("t1", "t2"),
        "ct-pet-lowdose": ("ct", "pet"),
        "mri-ct-metal": ("t1", "ct"),
    }[task]
    modalities = (reference_modality, moving_modality)
    if ndim == 3:
        images = make_brain_phantoms(shape, modalities=modalities)
    else:
        images = make_brain_phantom_slices(shape, modalities=modalities)
    return make_pair(images[reference_modality], images[moving_modality], task, rng=_SEED)


def _layer(volume: ImageVolume, role: str, pair: SyntheticPair, name: str, **display: Any) -> LayerData:
    modality = volume.metadata["modality"]
    kwargs = {
        "name": name,
        "colormap": _COLORMAPS.get(modality, "gray"),
        **({"contrast_limits": _CONTRAST_LIMITS[modality]} if modality in _CONTRAST_LIMITS else {}),
        **volume.geometry.napari_kwargs(),
        **display,
        "metadata": {
            "unifuse": {
                "role": role,
                "modality": modality,
                "degradation": pair.degradation,
                "class_index": pair.class_index,
                "task": pair.params["task"],
                "displacement": pair.displacement,
                "geometry": volume.geometry.to_dict(),
                "metadata": {"modality": modality},
            }
        },
    }
    # Copies: napari layers own (and may edit) their data; the cached pair must stay intact.
    return (volume.array.copy(), kwargs, "image")


def _layers(task: str, ndim: int) -> list[LayerData]:
    pair = _sample_pair(task, ndim, SAMPLE_SHAPE_3D if ndim == 3 else SAMPLE_SHAPE_2D)
    reference = _LABELS[pair.reference.metadata["modality"]]
    moving = _LABELS[pair.moving.metadata["modality"]]
    return [
        _layer(pair.reference, "reference", pair, f"{reference} reference"),
        _layer(
            pair.moving, "moving", pair, f"{moving} moving ({pair.degradation}, misaligned)",
            blending="additive", opacity=0.7,
        ),
        _layer(pair.label, "label", pair, f"{moving} ground truth (clean, aligned)", visible=False),
    ]


def t1_t2_motion_3d() -> list[LayerData]:
    """3D phantom: T1 reference, T2 with MRI motion artifacts, misaligned."""
    return _layers("t1-t2-motion", 3)


def ct_pet_lowdose_3d() -> list[LayerData]:
    """3D phantom: CT reference, low-dose (noisy) FDG-PET, misaligned."""
    return _layers("ct-pet-lowdose", 3)


def mri_ct_metal_2d() -> list[LayerData]:
    """2D axial phantom: T1 reference, CT with metal artifacts and noise, misaligned."""
    return _layers("mri-ct-metal", 2)
