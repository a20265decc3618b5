"""Mutual-information refinement: the soft MI against scikit-learn, rotations against SciPy, and
recovery of known motions between modalities."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from napari_unifuse.data.misalign import Misalignment, RandomMisalignment
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.model.mi_refinement import (
    BINS,
    linear_bins,
    mi_refinement,
    optimise_deformable,
    optimise_rigid,
    rotation_matrices,
    soft_mutual_information,
)
from napari_unifuse.model.warp import identity_grid


def _pair(moving_modality: str, size: int = 128) -> tuple[torch.Tensor, np.ndarray]:
    slices = make_brain_phantom_slices((size, size), ("t1", moving_modality))
    reference, label = (slices[name].array for name in ("t1", moving_modality))
    label = (label - label.min()) / (label.max() - label.min())
    return torch.from_numpy(reference)[None, None].float(), label.astype(np.float32)


def _head_error(estimate: torch.Tensor, truth: np.ndarray, reference: torch.Tensor) -> float:
    head = reference[0, 0].numpy() > 0.05
    return float(np.linalg.norm(estimate[0].numpy() - truth, axis=0)[head].mean())


def test_soft_mi_on_bin_centres_is_histogram_mi():
    """Values on bin centres fall in one bin each, so the linear-Parzen histogram is the plain one:
    the MI equals scikit-learn's ``mutual_info_score`` of the bin labels (nats)."""
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    a = rng.integers(0, BINS, 4000)
    b = np.where(rng.random(4000) < 0.7, (a * 3) % BINS, rng.integers(0, BINS, 4000))
    values = [torch.from_numpy(x / (BINS - 1))[None].double() for x in (a, b)]
    ours = soft_mutual_information(linear_bins(values[0]), torch.ones_like(values[0]), values[1])
    # rel 1e-6: the 1e-10 guards inside the logarithm shift the value by ~1e-8.
    assert float(ours) == pytest.approx(mutual_info_score(a, b), rel=1e-6)


def test_soft_mi_counts_only_the_mask_and_has_a_gradient():
    rng = np.random.default_rng(1)
    reference = torch.from_numpy(rng.random((1, 2000)))
    moving = reference.clone().requires_grad_(True)
    mask = torch.zeros_like(reference)
    mask[:, :1000] = 1
    shuffled = moving.detach().clone()
    shuffled[:, 1000:] = torch.from_numpy(rng.random((1, 1000)))  # changes only unmasked voxels
    bins = linear_bins(reference)
    value = soft_mutual_information(bins, mask, moving)
    assert float(value.detach()) == pytest.approx(float(soft_mutual_information(bins, mask, shuffled)))
    value.sum().backward()
    assert moving.grad[:, :1000].abs().sum() > 0 and moving.grad[:, 1000:].abs().sum() == 0


def test_rotation_matrices_match_scipy():
    vectors = np.array([[0.3, -0.2, 0.5], [0.0, 0.0, 0.0], [-1.0, 0.4, 0.1]])
    ours = rotation_matrices(torch.from_numpy(vectors)).numpy()
    np.testing.assert_allclose(ours, Rotation.from_rotvec(vectors).as_matrix(), atol=1e-12)
    angle = 0.4
    planar = rotation_matrices(torch.tensor([[angle]], dtype=torch.float64))[0].numpy()
    np.testing.assert_allclose(planar, [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def test_rigid_optimisation_recovers_a_rotation_and_shift_between_modalities():
    """CT moved 8° and (5, −6) px against a T1 reference: MI alone brings it back to within a
    pixel or so inside the head, from no motion."""
    reference, label = _pair("ct")
    motion = Misalignment(shape=label.shape, matrix=Rotation.from_euler("z", 8, degrees=True).as_matrix()[:2, :2],
                          translation=np.array([5.0, -6.0]), elastic_coefficients=np.zeros((2, 8, 8)), params={})
    truth = motion.displacement()
    moving = torch.from_numpy(motion.apply(label))[None, None].float()
    estimate = optimise_rigid(moving, reference, torch.zeros(1, 2, *label.shape))
    identity = _head_error(torch.zeros(1, 2, *label.shape), truth, reference)
    assert identity > 7.0
    assert _head_error(estimate, truth, reference) < 0.2 * identity


def test_deformable_optimisation_improves_an_elastic_warp():
    reference, label = _pair("pet")
    draw = RandomMisalignment(max_rotation_deg=0.0, max_translation_fraction=0.0,
                              max_elastic_fraction=0.05).draw(label.shape, np.random.default_rng(4))
    truth = draw.displacement()
    moving = torch.from_numpy(draw.apply(label))[None, None].float()
    zero = torch.zeros(1, 2, *label.shape)
    estimate = optimise_deformable(moving, reference, zero, spacing=32)
    assert _head_error(estimate, truth, reference) < 0.7 * _head_error(zero, truth, reference)


def test_refinement_keeps_a_good_start_and_runs_under_inference_mode():
    """Started from the true field (as the structural estimate) and a useless rigid start, the
    result stays near the truth, also where the caller disabled autograd (the engine)."""
    reference, label = _pair("t2", size=96)
    draw = RandomMisalignment(max_elastic_fraction=0.0).draw(label.shape, np.random.default_rng(2))
    truth = torch.from_numpy(draw.displacement())[None].float()
    moving = torch.from_numpy(draw.apply(label))[None, None].float()
    with torch.inference_mode():
        refined = mi_refinement(moving, reference, truth, [torch.zeros_like(truth)], spacing=32)
    assert _head_error(refined, truth[0].numpy(), reference) < 1.0


@pytest.mark.parametrize("flat", ["reference", "moving"])
def test_a_flat_image_keeps_the_structural_estimate(flat):
    image = torch.rand(2, 1, 64, 64)
    constant = torch.full_like(image, 0.3)
    moving, reference = (constant, image) if flat == "moving" else (image, constant)
    structural = identity_grid((64, 64))[None].repeat(2, 1, 1, 1) * 0.01
    refined = mi_refinement(moving, reference, structural, [torch.zeros_like(structural)], spacing=32)
    torch.testing.assert_close(refined, structural)
