"""`unifuse fuse --label` and `unifuse evaluate`'s label column: a label is checked as the moving image is,
and what its checks find is said and recorded, not scored without a word."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from napari_unifuse.cli import main

# 0.9 mm pixels, the plane at z = 42 mm: a 2-D NIfTI slice as nibabel stores it, (x, y).
AFFINE = np.array([[-0.9, 0, 0, 30.0], [0, -0.9, 0, -20.0], [0, 0, 5.0, 42.0], [0, 0, 0, 1]])
SHAPE_XY = (48, 44)  # the fusion metrics' windows need at least 41 pixels
CHEAP = ("--method", "identity+average", "--no-quality", "--device", "cpu")
CHEAP_METHODS = ("--methods", "identity+average", "--baselines", "identity", "--fusion-rules", "average",
                 "--device", "cpu")


def blob(shift: float) -> np.ndarray:
    """A bright blob off centre on a dim disc, (x, y)."""
    x, y = np.meshgrid(np.linspace(-1, 1, SHAPE_XY[0]), np.linspace(-1, 1, SHAPE_XY[1]), indexing="ij")
    disc = (x**2 + y**2 < 0.8).astype(np.float32)
    return (300 * disc + 700 * np.exp(-8 * ((x - shift) ** 2 + (y + 0.2) ** 2))).astype(np.float32)


def nifti_pair(folder: Path) -> dict[str, Path]:
    """A 2-D reference and moving slice, their clean label, the label with NaN voxels (as a resampling
    outside the field of view leaves them) and the label stored as a one-slice volume (x, y, 1)."""
    folder.mkdir()
    label = blob(0.05)
    with_nan = label.copy()
    with_nan[:, :5] = np.nan
    arrays = {"reference": blob(0.1), "moving": blob(-0.1), "label": label, "label_nan": with_nan,
              "label_1slice": label[:, :, None]}
    paths = {}
    for role, values in arrays.items():
        paths[role] = folder / f"{role}.nii.gz"
        nib.save(nib.Nifti1Image(values, AFFINE), paths[role])
    return paths


def fuse(reference: Path, moving: Path, label: Path, out: Path) -> int:
    return main(["fuse", "--reference", str(reference), "--moving", str(moving), "--label", str(label),
                 "--out", str(out), *CHEAP])


def test_a_label_with_nan_voxels_is_said_and_recorded_by_fuse(tmp_path, capsys):
    """The reader set its NaN voxels to 0 and the label was scored without a word."""
    paths = nifti_pair(tmp_path / "in")
    assert fuse(paths["reference"], paths["moving"], paths["label_nan"], tmp_path / "out") == 0
    warning = f"{paths['label_nan']} (the label): non-finite values: {5 * SHAPE_XY[0]} NaN voxels set to 0"
    assert f"moving: warning: {warning}" in capsys.readouterr().err
    provenance = json.loads((tmp_path / "out" / "moving" / "provenance.json").read_text(encoding="utf-8"))
    assert warning in provenance["warnings"]


def test_a_one_slice_label_beside_a_2d_reference_scores_as_the_label_stored_2d(tmp_path, capsys):
    """Refused: "the label is 3D but the reference is 2D", though a one-slice moving image is fused."""
    paths = nifti_pair(tmp_path / "in")
    metrics = {}
    for label in ("label", "label_1slice"):
        assert fuse(paths["reference"], paths["moving"], paths[label], tmp_path / label) == 0, capsys.readouterr().err
        metrics[label] = json.loads((tmp_path / label / "moving" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["label_1slice"] == pytest.approx(metrics["label"], abs=1e-6)
    assert "warning" not in capsys.readouterr().err


def test_a_16_bit_label_beside_8_bit_pictures_is_said_to_be_clipped_by_the_moving_images_window(tmp_path, capsys):
    """Clipped to a mask by the 8-bit window, and scored without a word."""
    pictures = {role: (255 * blob(shift).T / 1000).astype(np.uint8)
                for role, shift in (("reference", 0.1), ("moving", -0.1), ("label", 0.05))}
    for role, pixels in pictures.items():
        Image.fromarray(pixels).save(tmp_path / f"{role}.png")
    Image.fromarray(257 * pictures["label"].astype(np.uint16)).save(tmp_path / "label16.png")  # the same, 16-bit
    assert fuse(tmp_path / "reference.png", tmp_path / "moving.png", tmp_path / "label.png", tmp_path / "8bit") == 0
    assert "warning" not in capsys.readouterr().err
    assert fuse(tmp_path / "reference.png", tmp_path / "moving.png", tmp_path / "label16.png", tmp_path / "16bit") == 0
    assert (f"moving: warning: {tmp_path / 'label16.png'} (the label): 100 % of the label's voxels above its "
            "background lie outside the moving image's intensity window [0, 255]") in capsys.readouterr().err


def evaluate(paths: dict[str, Path], label: str, out: Path) -> int:
    pairs = paths["reference"].parent / f"pairs_{label}.csv"
    pairs.write_text(f"reference,moving,label\nreference.nii.gz,moving.nii.gz,{paths[label].name}\n", encoding="utf-8")
    return main(["evaluate", "--pairs", str(pairs), "--out", str(out), *CHEAP_METHODS])


def test_evaluate_says_what_its_reader_did_to_a_label_and_scores_a_one_slice_label_beside_2d_slices(tmp_path, capsys):
    paths = nifti_pair(tmp_path / "in")
    assert evaluate(paths, "label_nan", tmp_path / "nan") == 0
    assert (f"warning: pair moving.nii.gz: {paths['label_nan']} (the label): non-finite values: {5 * SHAPE_XY[0]} NaN "
            "voxels set to 0") in capsys.readouterr().err
    # A one-slice label beside a 2-D reference and moving image was refused as 3D beside 2D.
    assert evaluate(paths, "label_1slice", tmp_path / "one-slice") == 0, capsys.readouterr().err
