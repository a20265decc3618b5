"""warp(): the project's displacement convention, checked against scipy.ndimage."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unifuse.errors import InputError
from napari_unifuse.model.warp import warp


def _smooth_field(rng, shape, amplitude):
    noise = rng.standard_normal((len(shape), *shape))
    field = np.stack([ndimage.gaussian_filter(component, sigma=3) for component in noise])
    return amplitude * field / np.abs(field).max()


@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 14)])
def test_zero_field_is_identity(shape):
    image = torch.rand(2, 3, *shape)
    displacement = torch.zeros(2, len(shape), *shape)
    torch.testing.assert_close(warp(image, displacement), image, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shift", [(2, -3), (1, -2, 3)])
def test_integer_translation_moves_image_by_exactly_that_amount(shift):
    shape = (12, 14, 16)[-len(shift):]
    image = torch.rand(1, 1, *shape)
    displacement = torch.tensor(shift, dtype=torch.float32).view(1, -1, *[1] * len(shift))
    warped = warp(image, displacement.expand(1, len(shift), *shape).contiguous())
    # out[x] = image[x + shift] wherever x + shift lies inside the image, zero elsewhere.
    expected = torch.zeros_like(image)
    target = tuple(slice(max(0, -s), size - max(0, s)) for s, size in zip(shift, shape))
    source = tuple(slice(t.start + s, t.stop + s) for t, s in zip(target, shift))
    expected[(..., *target)] = image[(..., *source)]
    torch.testing.assert_close(warped, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 28), (12, 14, 10)])
@pytest.mark.parametrize(("padding_mode", "scipy_mode"),
                         [("zeros", "grid-constant"), ("border", "nearest")])
def test_agrees_with_scipy_map_coordinates_on_a_smooth_field(shape, padding_mode, scipy_mode):
    rng = np.random.default_rng(0)
    image = rng.random(shape)
    field = _smooth_field(rng, shape, amplitude=3.0)
    positions = np.indices(shape) + field
    expected = ndimage.map_coordinates(image, positions, order=1, mode=scipy_mode)
    warped = warp(torch.from_numpy(image)[None, None].float(),
                  torch.from_numpy(field)[None].float(), padding_mode=padding_mode)
    np.testing.assert_allclose(warped[0, 0].numpy(), expected, atol=1e-5)


def test_gradient_reaches_the_displacement():
    image = torch.rand(1, 1, 16, 16)
    displacement = torch.full((1, 2, 16, 16), 0.3, requires_grad=True)
    warp(image, displacement).sum().backward()
    assert displacement.grad.abs().sum() > 0


def test_wrong_displacement_shape_is_rejected():
    with pytest.raises(InputError, match=r"displacement must have shape \(1, 2, 8, 8\)"):
        warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
