"""Synthetic two-"modality" test images for the metrics tests (no shared data needed)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import ellipse

# (centre row, centre col, radius rows, radius cols) as fractions of the image size, and the
# intensity each structure has in two modalities (contrasts differ, even reverse, between them).
_STRUCTURES = [
    ((0.50, 0.50, 0.42, 0.36), (0.35, 0.80)),
    ((0.40, 0.42, 0.12, 0.08), (0.90, 0.20)),
    ((0.62, 0.58, 0.10, 0.16), (0.60, 0.45)),
    ((0.30, 0.62, 0.06, 0.06), (0.10, 1.00)),
]


def phantom(shape: tuple[int, int], modality: int = 0, blur: float = 1.0) -> np.ndarray:
    """Smooth ellipse phantom in [0, 1]; modality 0 and 1 show the same anatomy with other contrasts."""
    image = np.zeros(shape)
    for (row, col, radius_row, radius_col), intensities in _STRUCTURES:
        rr, cc = ellipse(row * shape[0], col * shape[1], radius_row * shape[0], radius_col * shape[1], shape=shape)
        image[rr, cc] = intensities[modality]
    return np.clip(ndimage.gaussian_filter(image, blur), 0.0, 1.0)


@pytest.fixture
def source_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two 64×64 sources of the same anatomy in two contrasts, with a little texture so nothing is flat."""
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.normal(size=(64, 64)), 2.0) * 0.05
    a = np.clip(phantom((64, 64), 0) + texture, 0, 1)
    b = np.clip(phantom((64, 64), 1) - texture, 0, 1)
    return a, b


@pytest.fixture
def make_phantom():
    """The ``phantom`` factory (tests import nothing from conftest under --import-mode=importlib)."""
    return phantom
