"""MIND-based local misalignment map: blind to contrast, sensitive to displaced structure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_unifuse.errors import InputError
from napari_unifuse.metrics import local_misalignment_map


def edge_and_flat_masks(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels on clear edges of the image, and pixels at least 4 pixels away from any edge."""
    strength = np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1))
    edges = strength > 0.5 * strength.max()
    flat = ~ndimage.binary_dilation(strength > 0.02 * strength.max(), iterations=4)
    return edges, flat


def test_an_intensity_inverted_copy_scores_near_zero(make_phantom):
    image = make_phantom((64, 64), 0)
    inverted = 1.0 - image  # a different "modality": every contrast reversed
    assert np.abs(image - inverted).mean() > 0.3  # intensities disagree everywhere...
    assert local_misalignment_map(image, inverted).max() < 1e-9  # ...structure does not


def test_another_modality_of_the_same_anatomy_scores_far_below_a_shift(make_phantom):
    image = make_phantom((64, 64), 0)
    # Modality 1 gives every structure another contrast (some edges reverse polarity).
    other_modality = local_misalignment_map(image, make_phantom((64, 64), 1))
    shifted = local_misalignment_map(image, np.roll(image, 3, axis=1))
    edges, _ = edge_and_flat_masks(image)
    assert other_modality[edges].mean() < 0.1 * shifted[edges].mean()
    assert other_modality.mean() < 0.5 * shifted.mean()


def test_a_shifted_copy_is_high_along_edges_and_low_in_flat_regions(make_phantom):
    image = make_phantom((64, 64), 0)
    misalignment = local_misalignment_map(image, np.roll(image, 3, axis=1))
    edges, flat = edge_and_flat_masks(image)
    assert misalignment.shape == image.shape
    # An edge facing a flat patch scores up to 0.34-0.43 in 2D (see the module docstring); edge pixels
    # that still overlap the shifted edge score less.
    assert misalignment[edges].mean() > 0.15
    assert misalignment[flat].mean() < 0.1 * misalignment[edges].mean()


def test_volumes_keep_their_shape_and_flat_images_agree(make_phantom):
    volume = np.stack([make_phantom((32, 32), 0)] * 6)
    misalignment = local_misalignment_map(volume, np.roll(volume, 2, axis=2))
    assert misalignment.shape == volume.shape
    assert misalignment.max() > 0.3
    flat = np.zeros((16, 16))
    np.testing.assert_array_equal(local_misalignment_map(flat, flat + 3.0), 0.0)


def test_mismatched_shapes_raise_input_error():
    with pytest.raises(InputError, match="same shape"):
        local_misalignment_map(np.zeros((16, 16)), np.zeros((16, 15)))
