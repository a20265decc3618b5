"""BT.601 full-range YCbCr checked against PIL's independent (integer) implementation."""

import numpy as np
import pytest
from PIL import Image

from napari_unifuse.data.color import rgb_to_ycbcr, ycbcr_to_rgb
from napari_unifuse.errors import InputError


@pytest.fixture
def random_rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)


def test_rgb_to_ycbcr_matches_pil(random_rgb):
    reference = np.asarray(Image.fromarray(random_rgb, "RGB").convert("YCbCr"), dtype=np.float64) / 255
    ours = rgb_to_ycbcr(random_rgb)
    # PIL works in 8-bit integer arithmetic: it may round to the neighbouring level.
    assert np.abs(ours - reference).max() <= 1.01 / 255


def test_ycbcr_to_rgb_matches_pil(random_rgb):
    ycbcr = np.asarray(Image.fromarray(random_rgb, "RGB").convert("YCbCr"))
    reference = np.asarray(Image.fromarray(ycbcr, "YCbCr").convert("RGB"), dtype=np.float64) / 255
    # PIL's inverse uses coarser fixed-point coefficients: up to two levels off.
    assert np.abs(ycbcr_to_rgb(ycbcr) - reference).max() <= 2.01 / 255


def test_round_trip_and_ranges(random_rgb):
    rgb = random_rgb / 255.0
    ycbcr = rgb_to_ycbcr(rgb)
    assert ycbcr.dtype == np.float32
    assert ycbcr.min() >= -1e-6 and ycbcr.max() <= 1 + 1e-6
    np.testing.assert_allclose(ycbcr_to_rgb(ycbcr), rgb, atol=1e-5)
    # Grey carries no chroma: Y equals the grey level and Cb = Cr = 1/2.
    grey = rgb_to_ycbcr(np.full((2, 2, 3), 0.3))
    np.testing.assert_allclose(grey[..., 0], 0.3, atol=1e-6)
    np.testing.assert_allclose(grey[..., 1:], 0.5, atol=1e-6)


def test_bad_input_raises():
    with pytest.raises(InputError, match="3 channels"):
        rgb_to_ycbcr(np.zeros((4, 4)))
    with pytest.raises(InputError, match="uint8"):
        rgb_to_ycbcr(np.zeros((4, 4, 3), dtype=np.uint16))


def test_float_colour_outside_unit_range_is_refused_not_saturated(random_rgb):
    """8-bit colour stored as floats (0-255) would saturate the luma; a hair outside [0, 1] is float rounding."""
    with pytest.raises(InputError, match=r"span \[0, 255\], outside \[0, 1\].*colour_in_unit_range"):
        rgb_to_ycbcr(np.array([[[0.0, 0.0, 0.0], [255.0, 255.0, 255.0]]]))
    with pytest.raises(InputError, match="colour_in_unit_range"):
        rgb_to_ycbcr(np.zeros((4, 4, 3), dtype=np.uint16))
    np.testing.assert_allclose(rgb_to_ycbcr(np.full((2, 2, 3), 1 + 1e-6))[..., 0], 1.0, atol=1e-5)
