"""`unifuse evaluate --pairs`: a CSV line's unreadable file or unknown degradation is named by its line,
and its label is scored as `unifuse fuse --label` scores it: a CT label beyond its reach as air, a grey
label beside a colour moving image as that image's luma."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_unifuse.cli.evaluate import pairs_from_csv
from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, write_image
from napari_unifuse.io.normalize import CT_WINDOW_HU

GRID = Geometry(np.ones(2), np.zeros(2), np.eye(2))
HEADER = ("reference", "moving", "label", "degradation")


def write_csv(folder: Path, *rows: tuple[str, ...]) -> Path:
    path = folder / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows([HEADER, *rows])
    return path


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """An 8-bit reference and a pseudo-coloured RGB moving picture (twice), with the moving picture's
    grey (luma) as the label, in ``tmp_path/pair``."""
    folder = tmp_path / "pair"
    folder.mkdir()
    yy, xx = np.indices((48, 44))
    heat = np.clip(1.2 - np.hypot(yy - 24, xx - 22) / 14, 0, 1)
    colour = np.stack([255 * heat, 255 * heat**2, 60 * heat**4], axis=-1).round().astype(np.uint8)
    Image.fromarray((200 * heat).astype(np.uint8)).save(folder / "reference.png")
    Image.fromarray(colour).save(folder / "moving.png")
    Image.fromarray(colour).save(folder / "moving_again.png")  # another pair, for a second line
    Image.fromarray(colour).convert("L").save(folder / "label.png")
    return folder


@pytest.mark.parametrize(("row", "problem"), [
    (("pair/reference.png", "pair/nope.png", "pair/label.png", ""), "line 3 of the CSV, moving "),
    (("pair\\reference.png", "pair\\moving.png", "pair\\label.png", ""), "line 3 of the CSV, reference "),
    (("pair/reference.png", "pair/moving.png", "pair/label.png", "Motion"), "line 3 of the CSV: unknown degradation "),
], ids=["missing", "backslashes", "degradation-case"])
def test_a_csv_lines_problem_is_named_by_its_line(pictures, row, problem):
    good = ("pair/reference.png", "pair/moving_again.png", "pair/label.png", "lowdose")
    with pytest.raises(InputError) as refused:
        pairs_from_csv(write_csv(pictures.parent, good, row))
    assert refused.value.problem.startswith(problem)


def test_a_backslash_path_is_said_not_to_separate_folders_here(pictures):
    row = ("pair\\reference.png", "pair/moving.png", "pair/label.png", "")
    with pytest.raises(InputError) as refused:
        pairs_from_csv(write_csv(pictures.parent, row))
    assert "'\\' is not a folder separator here" in refused.value.problem
    assert "pair/reference.png" in refused.value.problem


def test_a_degradation_in_capitals_is_pointed_to_its_name(pictures):
    row = ("pair/reference.png", "pair/moving.png", "pair/label.png", "Motion")
    with pytest.raises(InputError) as refused:
        pairs_from_csv(write_csv(pictures.parent, row))
    assert "'motion'" in refused.value.problem


def test_a_grey_label_beside_a_colour_moving_image_is_scored_as_its_luma(pictures, capsys):
    [pair] = pairs_from_csv(write_csv(pictures.parent, ("pair/reference.png", "pair/moving.png", "pair/label.png", "")))
    luma = rgb_to_ycbcr(np.asarray(Image.open(pictures / "moving.png")))[..., 0]
    np.testing.assert_allclose(pair.label, luma, atol=0.5 / 255)
    assert "warning" not in capsys.readouterr().err


def test_a_ct_label_on_a_smaller_grid_is_air_where_it_does_not_reach(tmp_path):
    """The label's uncovered rows read as 0 HU (water, 1/3 in the CT window), the moving image's as air."""
    yy, xx = np.indices((48, 44))
    radius = np.hypot(yy - 24, xx - 22)
    ct = np.select([radius < 12, radius < 16], [40.0, 1000.0], -1000.0).astype(np.float32)
    write_image(ImageVolume(ct, GRID), tmp_path / "reference.nii.gz")
    write_image(ImageVolume(ct, GRID), tmp_path / "moving.nii.gz")
    write_image(ImageVolume(np.ascontiguousarray(ct[:36]), GRID), tmp_path / "label.nii.gz")
    [pair] = pairs_from_csv(write_csv(tmp_path, ("reference.nii.gz", "moving.nii.gz", "label.nii.gz", "")))
    np.testing.assert_array_equal(pair.label[36:], 0.0)
    lower, upper = CT_WINDOW_HU
    np.testing.assert_allclose(pair.label[:36], (ct[:36] - lower) / (upper - lower), atol=1e-6)
