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
    # PIL's inverse uses coarser fixed-point coefficients: up to two levels off. It clips each channel where
    # the 8-bit rounding of Y, Cb, Cr leaves the gamut; ours keeps Y there (the tests below), so those differ.
    inside = _in_gamut(ycbcr / 255.0)
    assert inside.mean() > 0.95
    assert np.abs(ycbcr_to_rgb(ycbcr) - reference)[inside].max() <= 2.01 / 255


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


# The BT.601 full-range matrix as the standard writes it (JFIF 1.02 section 7), for independent checks.
_BT601 = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ _BT601[0]


@pytest.fixture
def fused_ycbcr() -> np.ndarray:
    """Any Y in [0, 1] beside any chroma, as a fused Y with a PET's carried chroma can be: many leave the gamut."""
    return np.random.default_rng(1).uniform(0.0, 1.0, size=(64, 64, 3))


def _in_gamut(ycbcr: np.ndarray) -> np.ndarray:
    rgb = (ycbcr - [0.0, 0.5, 0.5]) @ np.linalg.inv(_BT601).T
    return ((rgb >= 0) & (rgb <= 1)).all(axis=-1)


def test_pixels_in_gamut_are_converted_unchanged(fused_ycbcr):
    inside = _in_gamut(fused_ycbcr)
    assert 0.1 < inside.mean() < 0.9  # both kinds present
    plain = np.clip((fused_ycbcr - [0.0, 0.5, 0.5]) @ np.linalg.inv(_BT601).T, 0.0, 1.0).astype(np.float32)
    np.testing.assert_array_equal(ycbcr_to_rgb(fused_ycbcr)[inside], plain[inside])


def test_out_of_gamut_pixels_keep_their_fused_luma_and_hue(fused_ycbcr):
    """Clipping each channel shifted Y by up to 47/255 on Harvard PET; the fused structure is Y."""
    outside = ~_in_gamut(fused_ycbcr)
    rgb = ycbcr_to_rgb(fused_ycbcr)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    np.testing.assert_allclose(_luma(rgb)[outside], fused_ycbcr[outside][:, 0], atol=1e-6)
    chroma_in = fused_ycbcr[outside][:, 1:] - 0.5
    chroma_out = rgb[outside].astype(np.float64) @ _BT601[1:].T
    cross = chroma_in[:, 0] * chroma_out[:, 1] - chroma_in[:, 1] * chroma_out[:, 0]
    np.testing.assert_allclose(cross, 0.0, atol=1e-6)  # same direction about grey: same hue ...
    assert ((chroma_in * chroma_out).sum(axis=-1) >= -1e-9).all()  # ... not the opposite one
    assert (np.hypot(*chroma_out.T) <= np.hypot(*chroma_in.T) + 1e-6).all()  # only saturation drops


def test_chroma_is_reduced_no_more_than_needed(fused_ycbcr):
    """The kept share of chroma matches a brute-force search for the largest one that fits RGB."""
    inverse = np.linalg.inv(_BT601)
    pixels = fused_ycbcr[~_in_gamut(fused_ycbcr)][:8]
    shares = np.linspace(0.0, 1.0, 100_001)
    for pixel, rgb in zip(pixels, ycbcr_to_rgb(pixels)):
        candidates = np.stack([np.full_like(shares, pixel[0]), *(np.outer(pixel[1:] - 0.5, shares))], axis=-1)
        fits = ((candidates @ inverse.T >= -1e-12) & (candidates @ inverse.T <= 1 + 1e-12)).all(axis=-1)
        largest = shares[fits].max()
        kept = np.hypot(*(rgb.astype(np.float64) @ _BT601[1:].T)) / np.hypot(*(pixel[1:] - 0.5))
        assert abs(kept - largest) <= 2e-5


def test_bright_structure_under_saturated_red_stays_bright_and_red():
    red = rgb_to_ycbcr(np.array([[1.0, 0.0, 0.0]]))
    fused = red.copy()
    fused[:, 0] = 0.8  # the MR's bright structure won the max rule over the PET's luma (0.299)
    rgb = ycbcr_to_rgb(fused)[0]
    assert abs(_luma(rgb) - 0.8) <= 1e-6
    assert rgb[0] == pytest.approx(1.0) and rgb[1] == pytest.approx(rgb[2], abs=1e-6) and rgb[1] < 1.0
