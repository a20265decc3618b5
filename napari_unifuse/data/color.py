"""RGB <-> YCbCr (ITU-R BT.601, full range) for colour-coded PET/SPECT.

Fusion papers (U2Fusion, BSAFusion, UniFuse's PET/SPECT tasks) fuse the luma channel Y with the
grey reference and carry the chroma CbCr of the functional image over unchanged. We use the
full-range ("JPEG/JFIF") variant of BT.601 -- the one PIL's ``convert("YCbCr")`` and OpenCV's
``COLOR_RGB2YCrCb`` implement -- because it keeps Y in [0, 1] for RGB in [0, 1], which is what the
model expects as an input; the studio-swing variant (MATLAB's ``rgb2ycbcr``) squeezes Y into
[16/255, 235/255].

Values are float32 in [0, 1]: Y, and Cb/Cr offset by 0.5 so neutral grey has Cb = Cr = 0.5.
"""

from __future__ import annotations

import numpy as np

from napari_unifuse.errors import InputError
from napari_unifuse.io.readers import COLOUR_UNIT_RANGE_SLACK

# BT.601 luma weights and the full-range chroma scalings (ITU-R BT.601; JFIF 1.02 section 7).
_RGB_TO_YCBCR = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ],
    dtype=np.float64,
)
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)
_CHROMA_OFFSET = np.array([0.0, 0.5, 0.5])


def _as_unit_float(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 1 or array.shape[-1] != 3:
        raise InputError(f"expected a colour image with 3 channels last, got shape {array.shape}", what)
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype != np.uint8:
            raise InputError(f"integer colour images must be uint8, got {array.dtype}: scale other colour to floats "
                             "in [0, 1] first (napari_unifuse.io.readers.colour_in_unit_range, as read_image does)",
                             what)
        return array.astype(np.float64) / 255.0
    return array.astype(np.float64)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB (uint8, or float in [0, 1]) -> (..., 3) float32 Y, Cb, Cr in [0, 1].

    Float RGB outside [0, 1] (8-bit colour stored as floats, 0-255) is refused: taken as [0, 1] it
    would saturate the luma, posterising every output made from it."""
    rgb = _as_unit_float(rgb, "RGB image")
    finite = rgb[np.isfinite(rgb)]
    if finite.size and (finite.min() < -COLOUR_UNIT_RANGE_SLACK or finite.max() > 1 + COLOUR_UNIT_RANGE_SLACK):
        raise InputError(f"float colour values span [{finite.min():g}, {finite.max():g}], outside [0, 1]: scale them "
                         "to [0, 1] first (napari_unifuse.io.readers.colour_in_unit_range, as read_image does)",
                         "RGB image")
    return (rgb @ _RGB_TO_YCBCR.T + _CHROMA_OFFSET).astype(np.float32)


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """(..., 3) float Y, Cb, Cr -> (..., 3) float32 RGB in [0, 1].

    After fusion, a fused Y with the functional image's chroma can leave the RGB gamut (a bright
    MR structure under saturated PET red). Such pixels have their chroma pulled toward grey just
    enough to fit (``_chroma_scale_into_gamut``), which keeps their Y, the fused structure, and
    their hue; clipping each channel instead would shift both. Pixels in gamut are left as they are.
    """
    ycbcr = _as_unit_float(ycbcr, "YCbCr image")
    rgb = (ycbcr - _CHROMA_OFFSET) @ _YCBCR_TO_RGB.T
    outside = ((rgb < 0.0) | (rgb > 1.0)).any(axis=-1)
    if outside.any():
        pulled = ycbcr[outside] - _CHROMA_OFFSET
        pulled[:, 1:] *= _chroma_scale_into_gamut(pulled)[:, None]
        rgb[outside] = pulled @ _YCBCR_TO_RGB.T
    # Only float rounding, or a Y itself outside [0, 1] (grey then, still out of range), is left to clip.
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def _chroma_scale_into_gamut(centred: np.ndarray) -> np.ndarray:
    """(n, 3) Y, Cb - 1/2, Cr - 1/2 -> (n,) the largest s in [0, 1] with Y, s Cb, s Cr inside the RGB cube.

    Each channel is linear in s: base + s * swing, base from Y alone. Its swing toward 1 (or 0)
    allows s up to the room left on that side over the swing; the tightest channel decides."""
    base = centred[:, :1] * _YCBCR_TO_RGB[:, 0]
    swing = centred[:, 1:] @ _YCBCR_TO_RGB[:, 1:].T
    room = np.where(swing > 0, 1.0 - base, base)
    with np.errstate(divide="ignore", invalid="ignore"):
        allowed = np.where(swing != 0, room / np.abs(swing), np.inf)
    return np.clip(allowed.min(axis=-1), 0.0, 1.0)
