"""`unifuse evaluate`: the guard options reach every UniFuse row, one set of weights is scored once,
the help gives the classical defaults, and a picture's end-point errors are not called mm."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from napari_unifuse.cli import build_parser, main
from napari_unifuse.cli import evaluate as evaluate_module
from napari_unifuse.engine.classical import FUSION_RULES, REGISTRATION_METHODS
from napari_unifuse.io import ImageVolume, write_image
from napari_unifuse.io.fields import write_displacement
from napari_unifuse.io.image import Geometry
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import save_checkpoint

SIDE = 48  # the fusion metrics' windows need at least 41 pixels; a multiple of the model's 4
SHIFT = 1.5  # pixels, along the rows: the true field of every pair here
QUICK = ["--baselines", "identity", "--fusion-rules", "max", "--device", "cpu"]


def blob(shift: float = 0.0) -> np.ndarray:
    rows, columns = np.meshgrid(*(np.linspace(-1, 1, SIDE),) * 2, indexing="ij")
    rows = rows - 2 * shift / (SIDE - 1)
    return np.exp(-4 * (rows**2 + 2 * columns**2)).astype(np.float32)


def write_pairs_csv(folder, rows):
    path = folder / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path):
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture
def picture_and_scanner_pairs(tmp_path):
    """One misaligned pair as PNG pictures and as NIfTI slices of 2 mm pixels, each with its true field."""
    field = np.zeros((2, SIDE, SIDE), np.float32)
    field[0] = SHIFT
    images = {"reference": blob(), "moving": blob(SHIFT), "label": blob()}
    for name, image in images.items():
        Image.fromarray(np.round(255 * image).astype(np.uint8)).save(tmp_path / f"{name}.png")
    write_displacement(field, Geometry.identity(2), tmp_path / "picture_field.nii.gz")
    two_mm = Geometry(np.array([2.0, 2.0]), np.zeros(2), np.eye(2))
    for name, image in images.items():
        write_image(ImageVolume(image, two_mm), tmp_path / f"{name}.nii.gz")
    write_displacement(field, two_mm, tmp_path / "scanner_field.nii.gz")
    return write_pairs_csv(tmp_path, [
        {"reference": "reference.png", "moving": "moving.png", "label": "label.png",
         "displacement": "picture_field.nii.gz"},
        {"reference": "reference.nii.gz", "moving": "moving.nii.gz", "label": "label.nii.gz",
         "displacement": "scanner_field.nii.gz"}])


def test_end_point_errors_in_mm_are_nan_for_a_picture_reference_and_in_mm_for_a_scanner_one(
        picture_and_scanner_pairs, tmp_path):
    """A PNG has no pixel size: its "mm" were its pixels, beside the atlas pairs' true millimetres."""
    out = tmp_path / "out"
    assert main(["evaluate", "--pairs", str(picture_and_scanner_pairs), "--out", str(out),
                 "--methods", "identity+max", *QUICK]) == 0
    rows = {row["pair"]: row for row in read_rows(out / "per_pair.csv") if row["method"] == "identity+max"}
    picture, scanner = rows["moving.png"], rows["moving.nii.gz"]
    assert float(picture["epe"]) == pytest.approx(SHIFT, rel=1e-3)
    assert math.isnan(float(picture["epe_mm"])) and math.isnan(float(picture["epe_tissue_mm"]))
    assert float(scanner["epe_mm"]) == pytest.approx(2 * float(scanner["epe"]), rel=1e-5)
    assert float(scanner["epe_tissue_mm"]) == pytest.approx(2 * float(scanner["epe_tissue"]), rel=1e-5)
    assert "NaN where the reference is a picture" in (out / "evaluation.md").read_text(encoding="utf-8")


@pytest.fixture
def grey_pairs_csv(tmp_path):
    for name, image in (("reference", blob()), ("moving", blob(SHIFT))):
        Image.fromarray(np.round(255 * image).astype(np.uint8)).save(tmp_path / f"{name}.png")
    return write_pairs_csv(tmp_path, [{"reference": "reference.png", "moving": "moving.png", "label": "reference.png"}])


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Random UniFuse weights whose validation, its sidecar says, never kept its own field."""
    torch.manual_seed(0)
    return save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=2)), tmp_path / "tiny-2d.safetensors",
                           {"alignment_guard": {"weigh_network_field": False}})


def test_the_guard_options_reach_a_unifuse_given_to_methods_and_the_report_says_so(
        grey_pairs_csv, tiny_checkpoint, built_engines, tmp_path):
    out = tmp_path / "out"
    assert main(["evaluate", "--pairs", str(grey_pairs_csv), "--out", str(out), *QUICK,
                 "--methods", f"unifuse={tiny_checkpoint}", "identity+max",
                 "--weigh-network-field", "--weigh-dense-refinement"]) == 0
    weighed = {engine.method.name: (engine.weigh_network_field, engine.weigh_dense_refinement)
               for engine in built_engines}
    assert weighed == {"unifuse": (True, True), "identity+max": (False, False)}
    header = (out / "evaluation.md").read_text(encoding="utf-8").split("\n\n")[1]
    assert "`--weigh-network-field` and `--weigh-dense-refinement` given: applied to `unifuse (tiny-2d)`." in header


def test_guard_options_with_no_method_that_refines_its_alignment_are_said_to_change_nothing(
        grey_pairs_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", "--pairs", str(grey_pairs_csv), "--out", str(out), *QUICK,
                 "--methods", "identity+max", "--weigh-dense-refinement"]) == 0
    note = "`--weigh-dense-refinement` given, but no method evaluated refines its alignment"
    assert f"note: {note}" in capsys.readouterr().out
    assert note in (out / "evaluation.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("same_weights", ["the same file", "a copy of the file"])
def test_the_checkpoints_weights_given_again_to_methods_are_refused_as_named_twice(
        same_weights, grey_pairs_csv, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Their rows would be identical, and the pair-by-pair table compare the method with itself."""
    again = (tiny_checkpoint if same_weights == "the same file"
             else shutil.copy(tiny_checkpoint, tmp_path / "copy.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("a pair was computed before the refusal")

    monkeypatch.setattr(evaluate_module, "evaluate_pair", refuse)
    code = main(["evaluate", "--pairs", str(grey_pairs_csv), "--out", str(tmp_path / "out"), *QUICK,
                 "--checkpoint", str(tiny_checkpoint), "--methods", f"unifuse={again}"])
    assert code == 2
    error = capsys.readouterr().err
    assert "--methods" in error and "has the weights of --checkpoint" in error and "named twice" in error
    assert not (tmp_path / "out" / "per_pair.csv").exists()


def test_other_weights_of_unifuse_beside_the_checkpoint_are_scored(grey_pairs_csv, tiny_checkpoint, tmp_path):
    torch.manual_seed(1)
    other = save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=2)), tmp_path / "other-2d.safetensors")
    out = tmp_path / "out"
    assert main(["evaluate", "--pairs", str(grey_pairs_csv), "--out", str(out), *QUICK,
                 "--checkpoint", str(tiny_checkpoint), "--methods", f"unifuse={other}"]) == 0
    assert {"UniFuse (tiny-2d)", "unifuse (other-2d)"} <= {row["method"] for row in read_rows(out / "per_pair.csv")}


def test_the_help_gives_the_default_baselines_and_fusion_rules(capsys):
    """They are all of them, which on a large cohort means ANTs and dense on every pair."""
    args = build_parser().parse_args(["evaluate", "--harvard", "aanlib", "--out", "out"])
    assert args.baselines.split(",") == list(REGISTRATION_METHODS)
    assert args.fusion_rules.split(",") == list(FUSION_RULES)
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # as wrapped to any terminal's width
    baselines = f"({', '.join(REGISTRATION_METHODS)}; default: all of them, so ANTs and dense run on every pair)"
    assert baselines in help_text
    assert f"({', '.join(FUSION_RULES)}; default: all of them)" in help_text
