"""No traceback, whatever the file: malformed and unusual NIfTI files through `unifuse fuse`.

Every file of the table is given once as the reference and once as the moving image (the other one
a plain volume), through the CLI's ``main`` in-process, so that any exception other than the
``UniFuseError`` the CLI turns into one line fails the test. Each run must end in exit code 0 with
complete outputs, or exit code 2 with one ``unifuse fuse: error: ...`` line; where the right outcome
is known, the table says which (and what the message or the warning says).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_unifuse.cli import main
from napari_unifuse.engine.outputs import is_complete
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import save_checkpoint

# NIfTI-1 header byte offsets (nifti1.h).
_SIZEOF_HDR, _DIM, _DATATYPE, _PIXDIM, _VOX_OFFSET, _SCL_SLOPE, _MAGIC = 0, 40, 70, 76, 108, 112, 344
_QFORM_CODE, _SROW_X = 252, 280  # qform_code, sform_code (int16 each); srow_x, srow_y, srow_z (4 float32 each)
_SPACING_MM = 2.0
_SHAPE = (12, 14, 10)  # nibabel (x, y, z) of the plain partner and of most table entries


def blob(shape: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.exp(-3 * sum(g**2 for g in grids))


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    affine = np.diag([_SPACING_MM] * 3 + [1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def patched(path: Path, offset: int, fmt: str, *values) -> Path:
    """An uncompressed NIfTI with bytes at ``offset`` overwritten (little-endian ``fmt``)."""
    data = bytearray(save(path, (100 * blob(_SHAPE)).astype(np.float32)).read_bytes())
    data[offset : offset + struct.calcsize("<" + fmt)] = struct.pack("<" + fmt, *values)
    path.write_bytes(bytes(data))
    return path


def truncated(path: Path, compressed: bool) -> Path:
    whole = save(path, (100 * blob((20, 20, 20))).astype(np.float32)).read_bytes()
    if compressed:
        whole = gzip.compress(whole)
    path.write_bytes(whole[: len(whole) * 2 // 3])
    return path


def with_affine(linear: np.ndarray) -> Callable[[Path], Path]:
    """A file whose sform holds ``linear`` (no qform): written into the header bytes, because
    nibabel refuses to build a qform from a singular or non-finite matrix."""
    affine = np.eye(4)[:3]
    affine[:, :3] = linear

    def build(path: Path) -> Path:
        path = patched(path, _QFORM_CODE, "hh", 0, 1)  # qform unset, sform "scanner"
        data = bytearray(path.read_bytes())
        data[_SROW_X : _SROW_X + 48] = struct.pack("<12f", *affine.ravel())
        path.write_bytes(bytes(data))
        return path

    return build


def with_array(make: Callable[[], np.ndarray]) -> Callable[[Path], Path]:
    return lambda path: save(path, make())


def bool_nifti(path: Path) -> Path:
    """A mask declared as DT_BINARY (datatype 1, 1 bit per voxel), which nibabel cannot read."""
    path = patched(path, _DATATYPE, "hh", 1, 1)
    return path


def inf_voxels() -> np.ndarray:
    array = (100 * blob(_SHAPE)).astype(np.float32)
    array[0, 0, :3] = np.inf
    array[-1, -1, :2] = -np.inf
    return array


def complex_volume() -> np.ndarray:
    return (100 * blob(_SHAPE) * np.exp(1j * np.linspace(0, 3, _SHAPE[2]))).astype(np.complex64)


OK, ERROR = "ok", "error"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    suffix: str = ".nii.gz"
    # Expected (outcome, text in the message or a warning) as reference and as moving; None: either
    # outcome is acceptable, as long as it is one of the two.
    as_reference: tuple[str, str] | None = None
    as_moving: tuple[str, str] | None = None


def both(outcome: str, text: str) -> dict[str, tuple[str, str]]:
    return {"as_reference": (outcome, text), "as_moving": (outcome, text)}


SHEAR = np.array([[2.0, 0.8, 0.0], [0.0, 2.0, 0.0], [0.0, 0.3, 2.0]])
CASES = [
    # 348 byte-swapped: nibabel takes the header for big-endian.
    Case("sizeof_hdr_flipped", lambda p: patched(p, _SIZEOF_HDR, "i", 0x5C010000), ".nii"),
    Case("datatype_unknown", lambda p: patched(p, _DATATYPE, "h", 9999), ".nii", **both(ERROR, "NIfTI")),
    Case("dim0_out_of_range", lambda p: patched(p, _DIM, "h", 9), ".nii", **both(ERROR, "NIfTI")),
    Case("dim_negative", lambda p: patched(p, _DIM + 2, "h", -12), ".nii", **both(ERROR, "")),
    Case("vox_offset_past_end", lambda p: patched(p, _VOX_OFFSET, "f", 1e9), ".nii", **both(ERROR, "NIfTI")),
    Case("magic_garbage", lambda p: patched(p, _MAGIC, "4s", b"xyz\0"), ".nii"),
    Case("scl_slope_inf", lambda p: patched(p, _SCL_SLOPE, "f", float("inf")), ".nii"),
    Case("pixdim_nan", lambda p: patched(p, _PIXDIM + 4, "f", float("nan")), ".nii"),
    Case("truncated_gzip", lambda p: truncated(p, compressed=True), ".nii.gz", **both(ERROR, "truncated")),
    Case("truncated_data", lambda p: truncated(p, compressed=False), ".nii", **both(ERROR, "truncated")),
    Case("zero_spacing", with_affine(np.diag([2.0, 0.0, 2.0])), ".nii", **both(ERROR, "zero-length")),
    # Axes flipped about an origin at 0: the volume lies mirrored, beside the plain one, a corner on it.
    Case("negative_spacing", with_affine(np.diag([-2.0, 2.0, -3.0])), ".nii", **both(OK, "reaches only 0.8 %")),
    Case("huge_spacing", with_affine(np.diag([1e6, 1e6, 1e6])), ".nii"),
    Case("tiny_spacing", with_affine(np.diag([1e-6, 1e-6, 1e-6])), ".nii"),
    Case("sheared_affine", with_affine(SHEAR), ".nii", **both(OK, "")),
    Case("singular_affine", with_affine(np.array([[2.0, 2.0, 0], [1.0, 1.0, 0], [0, 0, 2.0]])), ".nii",
         **both(ERROR, "singular")),
    Case("nan_affine", with_affine(np.diag([2.0, np.nan, 2.0])), ".nii", **both(ERROR, "non-finite")),
    Case("int16", with_array(lambda: (1000 * blob(_SHAPE) - 1000).astype(np.int16)), **both(OK, "")),
    Case("uint8", with_array(lambda: (255 * blob(_SHAPE)).astype(np.uint8)), **both(OK, "")),
    Case("int32_large", with_array(lambda: (2e9 * blob(_SHAPE)).astype(np.int32)), **both(OK, "")),
    Case("uint16", with_array(lambda: (60000 * blob(_SHAPE)).astype(np.uint16)), **both(OK, "")),
    Case("float64", with_array(lambda: blob(_SHAPE)), **both(OK, "")),
    Case("bool_dt_binary", bool_nifti, ".nii", **both(ERROR, "NIfTI")),
    Case("complex64", with_array(complex_volume), **both(OK, "magnitude")),
    Case("complex128", with_array(lambda: complex_volume().astype(np.complex128)), **both(OK, "magnitude")),
    Case("inf_voxels", with_array(inf_voxels), **both(OK, "+inf voxels set to the maximum")),
    Case("all_nan", with_array(lambda: np.full(_SHAPE, np.nan, np.float32)), **both(ERROR, "NaN")),
    Case("all_zero", with_array(lambda: np.zeros(_SHAPE, np.float32)), **both(OK, "constant")),
    # As moving images these are a corner of 1 mm voxels, 0.5 and 0.1 % of the plain volume.
    Case("tiny_2x2x2", with_array(lambda: np.ones((2, 2, 2), np.float32)),
         as_reference=(ERROR, "at least 5 voxels"), as_moving=(OK, "reaches only 0.5 %")),
    Case("thin_32x32x2", with_array(lambda: blob((32, 32, 2)).astype(np.float32)),
         as_reference=(ERROR, "at least 5 voxels"), as_moving=(OK, "")),
    Case("needle_4x4x200", with_array(lambda: blob((4, 4, 200)).astype(np.float32)),
         as_reference=(ERROR, "at least 5 voxels"), as_moving=(OK, "")),
    Case("one_voxel", with_array(lambda: np.ones((1, 1, 1), np.float32)),
         as_reference=(ERROR, "at least 5 voxels"), as_moving=(OK, "reaches only 0.1 %")),
    # With the 3D checkpoint given explicitly, a one-slice reference is refused (the default
    # checkpoints route it to 2D: test_one_slice_volumes_fuse_as_2d_with_the_default_checkpoint).
    Case("one_slice_64x64x1", with_array(lambda: blob((64, 64, 1)).astype(np.float32)),
         as_reference=(ERROR, "2D checkpoint"), as_moving=(ERROR, "single slice")),
    Case("vector_5d", with_array(lambda: np.ones((*_SHAPE, 1, 3), np.float32)), **both(ERROR, "vectors")),
    Case("series_4d", with_array(lambda: np.ones((*_SHAPE, 2), np.float32)), **both(ERROR, "frame")),
    Case("not_nifti_at_all", lambda p: p.write_bytes(b"this is not an image\n" * 20) and p, ".nii.gz",
         **both(ERROR, "NIfTI")),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    torch.manual_seed(0)
    # No MI refinement: the same pipeline, a few times faster on these tiny volumes.
    config = UniFuseConfig.from_dict({**UniFuseConfig.small(spatial_dims=3).to_dict(),
                                      "matching_mutual_information": False})
    checkpoint = save_checkpoint(UniFuse(config), root / "tiny-3d.safetensors", {"note": "random weights"})
    plain = save(root / "plain.nii.gz", (100 * blob(_SHAPE)).astype(np.float32))
    return root, checkpoint, plain


@pytest.mark.parametrize("role", ["reference", "moving"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_file_ends_in_outputs_or_one_clear_line(setup, case, role, tmp_path, capsys):
    root, checkpoint, plain = setup
    odd = case.build(tmp_path / f"{case.name}{case.suffix}")
    reference, moving = (odd, plain) if role == "reference" else (plain, odd)
    out = tmp_path / "out"

    code = main(["fuse", "--reference", str(reference), "--moving", str(moving), "--out", str(out),
                 "--checkpoint", str(checkpoint), "--device", "cpu"])

    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if code == 0:
        assert is_complete(out / moving.name.split(".")[0]), err
        assert all(line.startswith(f"[1/1] {moving.name.split('.')[0]}: warning: ") for line in lines), err
    else:
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("unifuse fuse: error: "), err
        assert str(odd) in lines[0] or str(checkpoint) in lines[0], err  # names the file at fault
        assert not out.exists() or not any(out.rglob("provenance.json"))
    expected = case.as_reference if role == "reference" else case.as_moving
    if expected is not None:
        outcome, text = expected
        assert code == (0 if outcome == OK else 2), err
        assert text in err, err


def test_one_slice_volumes_fuse_as_2d_with_the_default_checkpoint(tmp_path, capsys):
    import json

    import SimpleITK as sitk

    affine = np.array([[-0.9, 0, 0, 30.0], [0, 0.9, 0, -20.0], [0, 0, 5.0, 42.0], [0, 0, 0, 1]])
    reference = save(tmp_path / "slice.nii.gz", (1000 * blob((48, 40, 1))).astype(np.float32), affine)
    moving = save(tmp_path / "other.nii.gz", (np.roll(blob((48, 40, 1)), 3, axis=0) * 300).astype(np.int16), affine)

    code = main(["fuse", "--reference", str(reference), "--moving", str(moving), "--out", str(tmp_path / "out"),
                 "--device", "cpu"])

    assert code == 0, capsys.readouterr().err
    case = tmp_path / "out" / "other"
    fused = nib.load(case / "fused.nii.gz")
    assert fused.shape == (48, 40, 1)
    np.testing.assert_allclose(fused.affine, affine, atol=1e-4)
    assert sitk.ReadImage(str(case / "displacement.nii.gz")).GetNumberOfComponentsPerPixel() == 3
    provenance = json.loads((case / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["checkpoint"]["name"] == "unifuse-2d-harvard"
    assert provenance["single_slice"]["axis"] == 0  # nibabel's z is the array's first axis
