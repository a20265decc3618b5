"""`unifuse evaluate --pairs` with a slice stored as a one-slice NIfTI volume (x, y, 1) beside a slice
stored as (x, y): scored as the 2-D pair `unifuse fuse` fuses it as, not refused as 2D beside 3D."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_unifuse.cli import main
from napari_unifuse.io import read_image
from napari_unifuse.io.fields import write_displacement

# 0.9 mm pixels, x and y flipped, the plane at z = 42 mm and off the origin in x and y.
AFFINE = np.array([[-0.9, 0, 0, 30.0], [0, -0.9, 0, -20.0], [0, 0, 5.0, 42.0], [0, 0, 0, 1]])
SHAPE_XY = (48, 44)  # the fusion metrics' windows need at least 41 pixels
CHEAP_METHODS = ["--methods", "identity+average", "--baselines", "identity", "--fusion-rules", "average",
                 "--device", "cpu"]
SCORED = ("ncc", "mse", "ssim", "epe", "Q_abf", "gain_min", "VIF_F")


def blob(shift: float) -> np.ndarray:
    """A (x, y) slice as nibabel stores it: a bright blob off centre on a dim disc."""
    x, y = np.meshgrid(np.linspace(-1, 1, SHAPE_XY[0]), np.linspace(-1, 1, SHAPE_XY[1]), indexing="ij")
    disc = (x**2 + y**2 < 0.8).astype(np.float32)
    return (300 * disc + 700 * np.exp(-8 * ((x - shift) ** 2 + (y + 0.2) ** 2))).astype(np.float32)


def write_pair(folder: Path, one_slice: set[str], displacement: bool = True) -> Path:
    """A pairs CSV of one reference / moving / label, the roles in ``one_slice`` stored (x, y, 1), the
    others (x, y); with a ground-truth field of one pixel along x on the reference's grid as read."""
    folder.mkdir()
    slices = {"reference": blob(0.1), "moving": blob(-0.1), "label": blob(0.05)}
    for role, values in slices.items():
        nib.save(nib.Nifti1Image(values[:, :, None] if role in one_slice else values, AFFINE),
                 folder / f"{role}.nii.gz")
    columns = {role: f"{role}.nii.gz" for role in slices}
    if displacement:
        reference = read_image(folder / "reference.nii.gz")
        field = np.zeros((reference.ndim, *reference.spatial_shape), np.float32)
        field[-1] = 1.0
        write_displacement(field, reference.geometry, folder / "field.nii.gz")
        columns["displacement"] = "field.nii.gz"
    path = folder / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns))
        writer.writeheader()
        writer.writerow(columns)
    return path


def scores(pairs: Path) -> dict[str, dict[str, str]]:
    """Each row's per-pair scores of an evaluation of ``pairs`` (a refusal is on the captured stderr)."""
    out = pairs.parent / "out"
    assert main(["evaluate", "--pairs", str(pairs), "--out", str(out), *CHEAP_METHODS]) == 0
    with (out / "per_pair.csv").open(newline="", encoding="utf-8") as stream:
        return {row["method"]: row for row in csv.DictReader(stream)}


@pytest.fixture(scope="module")
def all_2d_scores(tmp_path_factory) -> dict[str, dict[str, str]]:
    return scores(write_pair(tmp_path_factory.mktemp("pairs") / "all-2d", set()))


@pytest.mark.parametrize("one_slice", [{"moving", "label"}, {"reference"}, {"reference", "label"}],
                         ids=["moving-and-label", "reference", "reference-and-label"])
def test_a_one_slice_volume_beside_a_2d_image_scores_as_the_pair_stored_2d(tmp_path, all_2d_scores, one_slice):
    """Refused before: "the reference is 2D ... but the moving image is 3D (shape (1, 44, 48))"."""
    result = scores(write_pair(tmp_path / "mixed", one_slice))
    assert result.keys() == all_2d_scores.keys() and "identity+average" in result
    for method, row in all_2d_scores.items():
        for column in SCORED:
            assert float(result[method][column]) == pytest.approx(float(row[column]), abs=1e-6, nan_ok=True)
    assert float(result["identity+average"]["epe"]) == pytest.approx(1.0)


def test_a_one_slice_moving_image_outside_the_axial_plane_is_refused_with_its_csv_line(tmp_path, capsys):
    pairs = write_pair(tmp_path / "coronal", set(), displacement=False)
    # The same pixels as one coronal slice: (x, 1, z), its one-voxel axis along world y.
    coronal_affine = np.array([[-0.9, 0, 0, 30.0], [0, 5.0, 0, -20.0], [0, 0, 0.9, 42.0], [0, 0, 0, 1]])
    coronal = nib.Nifti1Image(blob(-0.1)[:, None, :], coronal_affine)
    nib.save(coronal, pairs.parent / "moving.nii.gz")
    assert main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), *CHEAP_METHODS]) == 2
    printed = capsys.readouterr().err
    moving = pairs.parent / "moving.nii.gz"
    assert printed.startswith(f"unifuse evaluate: error: {pairs}: line 2 of the CSV, moving {moving}: the moving image"
                              " is a one-slice volume in a coronal, sagittal or oblique plane")
    assert printed.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_one_slice_label_outside_the_axial_plane_is_named_the_label(tmp_path, capsys):
    pairs = write_pair(tmp_path / "coronal-label", {"reference"}, displacement=False)
    coronal_affine = np.array([[-0.9, 0, 0, 30.0], [0, 5.0, 0, -20.0], [0, 0, 0.9, 42.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(blob(0.0)[:, None, :], coronal_affine), pairs.parent / "label.nii.gz")
    assert main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), *CHEAP_METHODS]) == 2
    printed = capsys.readouterr().err
    label = pairs.parent / "label.nii.gz"
    assert f"line 2 of the CSV, label {label}: the label is a one-slice volume in a coronal" in printed
    assert "moving image" not in printed
