"""PNG/JPG pictures read as viewers show them: upright by their EXIF orientation, at their full bit depth."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from napari_unifuse.errors import InputError
from napari_unifuse.io import read_image

_EXIF_ORIENTATION_TAG = 0x0112
_PNG_RGB, _PNG_GREY_ALPHA, _PNG_RGBA = 2, 4, 6


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION_TAG] = orientation
    return exif


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_16bit_png(path, pixels: np.ndarray, colour_type: int, orientation: int | None = None):
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour), optionally with an eXIf chunk."""
    rows, columns = pixels.shape[:2]
    scanlines = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 on each row
    header = struct.pack(">IIBBBBB", columns, rows, 16, colour_type, 0, 0, 0)
    exif = b"" if orientation is None else _png_chunk(b"eXIf", _exif(orientation).tobytes(8).removeprefix(b"Exif\0\0"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + exif
                     + _png_chunk(b"IDAT", zlib.compress(scanlines)) + _png_chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("colour", [False, True], ids=["grey", "rgb"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_apply_it(orientation, colour, tmp_path, rng):
    shape = (5, 7, 3) if colour else (5, 7)  # not square: a turn changes the shape
    stored = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(stored).save(path, exif=_exif(orientation))
    volume = read_image(path)
    with Image.open(path) as picture:
        shown = np.asarray(ImageOps.exif_transpose(picture))
    np.testing.assert_array_equal(volume.array, shown)
    assert volume.array.flags.c_contiguous
    warnings = volume.metadata.get("warnings", [])
    if orientation == 1:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith(f"EXIF orientation {orientation} applied: the picture is read upright")


def test_a_rotated_jpeg_is_read_upright_and_says_so(tmp_path, rng):
    """A phone photo of a film: stored lying on its side, tagged "turn 90° clockwise to show"."""
    upright = np.kron(rng.integers(0, 256, (16, 10), dtype=np.uint8), np.ones((8, 8), np.uint8))  # 128 × 80
    path = tmp_path / "film.jpg"
    Image.fromarray(np.rot90(upright)).save(path, exif=_exif(6), quality=95)  # stored 80 × 128
    volume = read_image(path)
    assert volume.array.shape == (128, 80)
    assert np.abs(volume.array.astype(int) - upright).mean() < 3  # JPEG's loss only
    assert volume.metadata["warnings"] == [
        "EXIF orientation 6 applied: the picture is read upright as viewers show it (its stored pixels turned 90° "
        "clockwise)"]


def test_16bit_colour_png_keeps_its_16_bits(tmp_path, rng):
    """12-bit data in a 16-bit RGB PNG: Pillow alone keeps the high byte (at most 15 of 4080)."""
    stored = rng.integers(0, 4096, (6, 9, 3)).astype(np.uint16)
    volume = read_image(_write_16bit_png(tmp_path / "rgb16.png", stored, _PNG_RGB))
    assert volume.is_rgb and volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, stored / 65535, rtol=1e-6)
    assert "warnings" not in volume.metadata


def test_16bit_rgba_png_keeps_its_16_bits_and_notes_its_transparency(tmp_path, rng):
    stored = rng.integers(0, 4096, (6, 9, 4)).astype(np.uint16)
    stored[..., 3] = 65535
    stored[:2, :, 3] = 30000  # a third of the picture see-through
    volume = read_image(_write_16bit_png(tmp_path / "rgba16.png", stored, _PNG_RGBA))
    np.testing.assert_allclose(volume.array, stored[..., :3] / 65535, rtol=1e-6)
    (warning,) = volume.metadata["warnings"]
    assert warning.startswith("transparency ignored: 33.3 % of the pixels")


def test_16bit_grey_saved_as_rgb_is_a_16bit_grey_image(tmp_path, rng):
    grey = rng.integers(0, 4096, (6, 9)).astype(np.uint16)
    volume = read_image(_write_16bit_png(tmp_path / "grey_as_rgb16.png", np.dstack([grey] * 3), _PNG_RGB))
    assert not volume.is_rgb
    np.testing.assert_array_equal(volume.array, grey)
    assert volume.array.dtype == np.uint16


def test_16bit_colour_png_is_turned_upright_too(tmp_path, rng):
    stored = rng.integers(0, 4096, (6, 9, 3)).astype(np.uint16)
    volume = read_image(_write_16bit_png(tmp_path / "rgb16.png", stored, _PNG_RGB, orientation=8))
    np.testing.assert_allclose(volume.array, np.rot90(stored) / 65535, rtol=1e-6)
    assert volume.metadata["warnings"][0].startswith("EXIF orientation 8 applied")


def test_16bit_grey_alpha_png_is_refused_rather_than_cut_to_8_bits(tmp_path, rng):
    stored = np.dstack([rng.integers(0, 4096, (6, 9)), np.full((6, 9), 65535)]).astype(np.uint16)
    path = _write_16bit_png(tmp_path / "ga16.png", stored, _PNG_GREY_ALPHA)
    with pytest.raises(InputError, match="16-bit grey \\+ alpha PNG.*save it as 16-bit greyscale") as caught:
        read_image(path)
    assert str(path) in str(caught.value)
