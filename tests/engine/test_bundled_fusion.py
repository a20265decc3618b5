"""The shipped checkpoints fuse: structure that only one source holds reaches the fused image.

The first shipped fusion was a copy of the reference (NCC 0.998 to the MRI, CT bone lost); these
tests run the trained weights on constructed pairs where that failure is visible.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import ImageVolume


def _disc(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grids = np.indices(shape, dtype=float)
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


def _fused_luma(engine: FusionEngine, reference: np.ndarray, moving: np.ndarray, geometry) -> np.ndarray:
    result = engine.run_fusion(ImageVolume(reference, geometry), ImageVolume(moving, geometry),
                               reference_modality="mr", moving_modality="ct" if reference.ndim == 2 else "mr")
    return np.asarray(result.fused.array, dtype=np.float32)


@pytest.fixture(scope="module")
def engine_2d() -> FusionEngine:
    return FusionEngine("unifuse-2d-harvard", device="cpu")


def test_a_bright_structure_of_either_source_alone_reaches_the_fused_image(engine_2d):
    """An MRI and a CT of the same slice, each with a bright disc that the other lacks (on a 0-255
    scale, as atlas PNGs are)."""
    phantoms = make_brain_phantom_slices((128, 128), ("t1", "ct"))
    geometry = phantoms["t1"].geometry
    reference = np.clip(phantoms["t1"].array, 0, 1)
    moving = np.clip((phantoms["ct"].array + 300.0) / 1400.0, 0, 1)  # HU -> an atlas-PNG-like CT window
    in_moving, in_reference = _disc(reference.shape, (70, 45), 7), _disc(reference.shape, (60, 85), 7)
    moving = np.where(in_moving, 1.0, moving)
    reference = np.where(in_reference, 1.0, reference)
    fused = _fused_luma(engine_2d, (reference * 255).astype(np.uint8), (moving * 255).astype(np.uint8), geometry)
    fused = fused / 255.0 if fused.max() > 1.5 else fused
    # Where only the CT is bright the fused image must be well above the MRI, and vice versa.
    assert fused[in_moving].mean() > reference[in_moving].mean() + 0.25
    assert fused[in_reference].mean() > moving[in_reference].mean() + 0.25
    # Not a copy of either source.
    head = (reference > 0.05) | (moving > 0.05)
    for source in (reference, moving):
        assert np.corrcoef(fused[head], source[head])[0, 1] < 0.97


def test_the_3d_checkpoint_carries_t2_contrast_into_the_fused_volume():
    phantoms = make_brain_phantoms((40, 48, 40), ("t1", "t2"))
    geometry = phantoms["t1"].geometry
    t1, t2 = (np.clip(phantoms[name].array / np.percentile(phantoms[name].array, 99.5), 0, 1).astype(np.float32)
              for name in ("t1", "t2"))
    fused = _fused_luma(FusionEngine("unifuse-3d-phantom", device="cpu"), t1, t2, geometry)
    head = (t1 > 0.05) | (t2 > 0.05)
    # CSF is bright in T2 and dark in T1: the fused image must show it brighter than the T1 does.
    csf = (t2 > 0.7) & (t1 < 0.35) & head
    assert csf.sum() > 20
    assert fused[csf].mean() > t1[csf].mean() + 0.15
    assert np.corrcoef(fused[head], t1[head])[0, 1] < 0.97


@pytest.mark.parametrize(("sample", "modality", "degradation"),
                         [("t1-t2-motion", "t2", "motion"), ("ct-pet-lowdose", "pet", "lowdose")])
def test_the_3d_checkpoint_tells_each_degraded_sample_from_its_clean_label(sample, modality, degradation):
    # The head reads the patch statistics alone (configs/phantom3d-cpu-head.yaml): its calls are
    # evidence on every task (likelihood ratios of 13 in the sidecar), so the engine adds no caveat.
    from napari_unifuse.data import samples

    engine = FusionEngine("unifuse-3d-phantom", device="cpu")
    pair = samples._sample_pair(sample, 3, samples.SMALL_SAMPLE_SHAPE_3D)
    degraded = engine.run_fusion(pair.reference, pair.moving, moving_modality=modality, quality=False)
    clean = engine.run_fusion(pair.reference, pair.label, moving_modality=modality, quality=False)
    assert degraded.predicted_class == degradation and degraded.class_caveat is None
    assert clean.predicted_class == "none" and clean.class_caveat is None
    assert clean.class_probs[degradation] < degraded.class_probs[degradation] - 0.2


def test_the_2d_checkpoint_names_the_metal_of_the_bundled_sample(engine_2d):
    # The sample's CT is in Hounsfield units, through the engine's CT window: the head fitted on the
    # atlas PNGs alone read it as low dose (p 0.82); configs/harvard2d-cpu-head.yaml adds phantom
    # MRI-CT slices to the refit and it reads metal with p 0.81.
    from napari_unifuse.data import samples

    pair = samples._sample_pair("mri-ct-metal", 2, samples.SAMPLE_SHAPE_2D)
    result = engine_2d.run_fusion(pair.reference, pair.moving, quality=False)
    assert result.predicted_class == pair.degradation == "metal"
    assert result.class_probs["metal"] > 0.5
