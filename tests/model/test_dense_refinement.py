"""Dense MIND instance optimisation (ConvexAdam's Adam stage): recovers a small smooth warp across
modalities, keeps a flat pair's start, and composes after its start."""

import numpy as np
import pytest
import torch

from napari_unifuse.data.misalign import MildMisalignment
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.errors import Cancelled
from napari_unifuse.model.dense_refinement import dense_refinement, level_factor
from napari_unifuse.model.smoothing import gaussian_blur


def _t1_ct_pair(size: int = 128):
    slices = make_brain_phantom_slices((size, size), ("t1", "ct"))
    reference = slices["t1"].array.astype(np.float32)
    ct = np.clip((slices["ct"].array + 300.0) / 1400.0, 0, 1).astype(np.float32)
    return reference, ct


def _head_error(field: torch.Tensor, truth: np.ndarray, head: np.ndarray) -> float:
    return float(np.linalg.norm(field[0].numpy() - truth, axis=0)[head].mean())


def test_a_mild_residual_warp_between_modalities_is_mostly_undone():
    reference, label = _t1_ct_pair()
    draw = MildMisalignment().draw(reference.shape, np.random.default_rng(3))
    truth = draw.displacement()
    moving = np.clip(draw.apply(label, order=3), 0, 1)
    field = dense_refinement(torch.from_numpy(moving)[None, None], torch.from_numpy(reference)[None, None],
                             torch.zeros(1, 2, *reference.shape))
    head = reference > 0.05
    before = float(np.linalg.norm(truth, axis=0)[head].mean())
    assert _head_error(field, truth, head) < 0.6 * before


def test_an_aligned_pair_moves_by_about_a_voxel_at_most():
    """T1 and CT descriptors differ even where the images are aligned (skull and scalp look unlike
    each other), so the optimum sits about a voxel off (1.1 voxels in the head here): that bias is
    why the engine's alignment guard, not this stage, decides whether a pair is moved at all."""
    reference, label = _t1_ct_pair()
    field = dense_refinement(torch.from_numpy(label)[None, None], torch.from_numpy(reference)[None, None],
                             torch.zeros(1, 2, *reference.shape))
    head = torch.from_numpy(reference > 0.05)
    assert float(field.norm(dim=1)[0][head].mean()) < 1.5


@pytest.mark.parametrize("shape", [(64, 64, 3), (32, 32, 2), (4, 4, 200), (768, 768, 5)])
def test_a_volume_too_thin_for_a_level_keeps_its_start(shape):
    """A few slices under a large in-plane grid leave the level one or two voxels thick, too thin
    for its filters: the start comes back instead of an error."""
    generator = torch.Generator().manual_seed(0)
    moving, reference = (torch.rand(1, 1, *shape, generator=generator) for _ in range(2))
    start = torch.full((1, 3, *shape), 0.5)
    torch.testing.assert_close(dense_refinement(moving, reference, start), start)


def test_a_flat_pair_keeps_its_start():
    start = torch.full((1, 2, 32, 32), 1.5)
    flat = torch.full((1, 1, 32, 32), 0.4)
    torch.testing.assert_close(dense_refinement(flat, flat, start), start)


def test_the_level_has_at_most_the_voxel_budget_and_halves_at_least():
    assert level_factor((256, 256)) == 2
    assert level_factor((128, 128, 128)) == 2
    assert level_factor((160, 160, 160)) == 3  # 54³ voxels; 80³ would exceed the budget
    assert level_factor((256, 256, 180)) == 4


def test_every_adam_step_checks_for_a_cancel_and_a_cancel_stops_at_the_next_one(cancel_after):
    generator = torch.Generator().manual_seed(0)
    moving, reference = (gaussian_blur(torch.rand(1, 1, 48, 48, generator=generator), 2.0) for _ in range(2))
    start = torch.zeros(1, 2, 48, 48)
    uncancelled: list[int] = []
    dense_refinement(moving, reference, start, cancel_after(uncancelled, allowed=10_000))
    assert len(uncancelled) >= 60  # one check per Adam step

    cancelled: list[int] = []
    with pytest.raises(Cancelled):
        dense_refinement(moving, reference, start, cancel_after(cancelled, allowed=3))
    assert len(cancelled) == 4  # the step after the cancel never ran
