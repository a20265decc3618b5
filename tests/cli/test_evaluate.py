"""`unifuse evaluate` on a few tiny generated pairs with a random-weight small checkpoint."""

from __future__ import annotations

import csv
import errno
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from napari_unifuse.cli import build_parser, main
from napari_unifuse.cli import evaluate as evaluate_module
from napari_unifuse.cli.evaluate import (
    CONSTANT_LABEL_NAN_COLUMNS,
    COPY_RULES,
    METRIC_COLUMNS,
    UNIFUSE_METHOD,
    EvaluationPair,
    checkpoint_split,
    copies_outscoring_fusion,
    evaluate_pair,
    markdown_table,
    paired_comparison,
    paired_markdown,
    pairs_from_csv,
    pairs_from_harvard,
    row_name,
    score,
    summarise,
    unit_intensities,
    with_harvard_defaults,
)
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.data.misalign import warp_array
from napari_unifuse.data.pairs import make_pair
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.engine.alignment_guard import tissue_mask
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.input_checks import model_dimensions
from napari_unifuse.engine.labels import checked_label
from napari_unifuse.engine.methods import load_method
from napari_unifuse.engine.outputs import STAGING_PREFIX
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume, normalize_intensity, read_image, write_image
from napari_unifuse.io.fields import write_displacement
from napari_unifuse.io.image import Geometry
from napari_unifuse.metrics import fusion_metrics, registration_metrics, ssim_gains
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import read_metadata, save_checkpoint
from napari_unifuse.model.networks import build_network
from napari_unifuse.training.datasets import DEFAULT_VAL_FRACTION
from napari_unifuse.training.harvard import case_of, index_harvard, split_cases

REPO = Path(__file__).resolve().parents[2]
SIDE = 48  # the fusion metrics' windows need at least 41 pixels; a multiple of the model's 4
CLASSICAL = [f"{method} + {rule}" for method in ("identity", "sitk", "ants", "matching", "dense")
             for rule in ("max", "average", "wavelet")]
# The copy pipelines sit on the matching registration when it is evaluated (it is by default).
COPIES = ["matching + copy-reference", "matching + copy-moving"]



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny-2d.safetensors"
    return save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=2)), path, {"note": "random weights"})


def pseudo_colour(grey):
    """A PET-like RGB rendering (red-yellow ramp) of a [0, 1] image."""
    return np.stack([grey, grey**2, 0.2 * grey], axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    """Two T1/T2 NIfTI pairs with their true fields and one RGB MRI/PET PNG pair without."""
    root = tmp_path_factory.mktemp("pairs")
    slices = make_brain_phantom_slices((SIDE, SIDE), ("t1", "t2", "pet"))
    geometry = slices["t1"].geometry
    rows, true_fields = [], {}
    for seed in (1, 2):
        pair = make_pair(slices["t1"], slices["t2"], "t1-t2-motion", seed)
        names = {role: f"t2_{seed}_{role}.nii.gz" for role in ("reference", "moving", "label")}
        for role in names:
            write_image(getattr(pair, role), root / names[role])
        write_displacement(pair.displacement, geometry, root / f"t2_{seed}_field.nii.gz")
        rows.append({**names, "displacement": f"t2_{seed}_field.nii.gz", "task": "t1-t2",
                     "degradation": DEGRADATION_CLASSES[pair.class_index]})
        true_fields[names["moving"]] = pair.displacement

    identity = Geometry.identity(2)
    pet = slices["pet"].array / slices["pet"].array.max()
    colour_pair = make_pair(ImageVolume(slices["t1"].array / slices["t1"].array.max(), identity),
                            ImageVolume(pseudo_colour(pet), identity, is_rgb=True), "mri-pet-lowdose", 3)
    for role, array in (("reference", colour_pair.reference.array), ("moving", colour_pair.moving.array),
                        ("label", colour_pair.label.array)):
        Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(root / f"pet_{role}.png")
    rows.append({"reference": "pet_reference.png", "moving": "pet_moving.png", "label": "pet_label.png",
                 "displacement": "", "task": "mri-pet", "degradation": ""})
    path = root / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, true_fields


def read_csv(path):
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def evaluation(checkpoint, pairs_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--pairs", str(pairs_csv[0]), "--out", str(out),
                 "--device", "cpu"])
    return code, out


def test_writes_every_method_task_and_metric(evaluation):
    code, out = evaluation
    assert code == 0
    summary = read_csv(out / "evaluation.csv")
    methods = {row["method"] for row in summary}
    assert methods == {"UniFuse (tiny-2d)", *CLASSICAL, *COPIES}
    assert {row["regime"] for row in summary} == {"given"}  # CSV pairs: no synthesised regime
    assert {(row["method"], row["task"]) for row in summary} == {
        (method, task) for method in methods for task in ("t1-t2", "mri-pet", "all")}
    for column in METRIC_COLUMNS:
        assert f"{column}_mean" in summary[0] and f"{column}_std" in summary[0]
    counts = {(row["method"], row["task"]): int(row["n"]) for row in summary}
    assert counts["sitk + wavelet", "t1-t2"] == 2 and counts["sitk + wavelet", "all"] == 3

    markdown = (out / "evaluation.md").read_text(encoding="utf-8")
    for method in methods:
        assert f"| {method} | mri-pet | 1 |" in markdown
    header = markdown.splitlines()[4]  # the table's header line
    for column in ("ncc", "epe", "folding_pct", "restored_ssim", "warped_input_ssim", "Q_abf", "Q_vif", "MI",
                   "gain_ref", "gain_mov", "gain_min", "Q_CB", "VIF_F", "seconds"):
        assert re.search(rf" {column}( †)? \|", header), column
    assert " bone_retention" not in header  # no CT among these pairs: the column is all NaN
    # An engine pipeline and the classical row of one field differ near the edge: the header says why.
    assert "engine rows (UniFuse and `--methods`, `matching+average` included) read 0 there" in markdown
    assert "gain_min the smaller (0 for a copy of the reference or of the label; copy-moving" in markdown
    # Whether a metric is fooled depends on these random-weight pairs; the sentence says which.
    marked = set(re.findall(r" (\w+) †", header))
    fooled_line = next(line for line in markdown.splitlines()
                       if line.startswith(("† fooled by a copy", "No metric scores a copy")))
    assert marked == {column for column in re.findall(r"(\w+) \(", fooled_line)}
    # gain_min can be marked: a copy scores 0 (copy-moving, of a degraded image, even above 0), which
    # beats a fusion rule with a negative gain (test_evaluate_copies.py).
    assert len(read_csv(out / "per_pair.csv")) == 3 * len(methods)
    paired = read_csv(out / "paired.csv")
    assert {(row["task"], row["versus"]) for row in paired} == {
        (task, method) for method in CLASSICAL + COPIES for task in ("t1-t2", "mri-pet")}
    for column in ("ncc", "epe", "epe_tissue", "Q_abf", "Q_ssim", "gain_min", "Q_CB", "VIF_F"):
        assert f"{column}_p" in paired[0]
    assert "UniFuse (tiny-2d) against each pipeline, pair by pair" in markdown


def test_values_are_consistent_with_the_pairs(evaluation, pairs_csv):
    _, out = evaluation
    rows = read_csv(out / "per_pair.csv")
    by_key = {(row["pair"], row["method"]): row for row in rows}
    for moving_name, true_field in pairs_csv[1].items():
        identity = by_key[moving_name, "identity + max"]
        # The identity field is zero: its error is the true field's mean length, and it never folds.
        expected_epe = np.linalg.norm(true_field, axis=0).mean()
        assert float(identity["epe"]) == pytest.approx(expected_epe, rel=1e-4)
        # ... and over the tissue, the true field's mean length where the reference shows tissue.
        reference = unit_intensities(read_image(pairs_csv[0].parent / moving_name.replace("moving", "reference")))[0]
        expected_tissue_epe = np.linalg.norm(true_field, axis=0)[tissue_mask(reference)].mean()
        assert float(identity["epe_tissue"]) == pytest.approx(expected_tissue_epe, rel=1e-4)
        assert float(by_key[moving_name, "sitk + max"]["epe_tissue"]) < expected_tissue_epe
        assert float(identity["folding_pct"]) == 0.0
        # Registration must help on these synthetic misalignments.
        assert float(by_key[moving_name, "sitk + max"]["ncc"]) > float(identity["ncc"]) + 0.05
        assert float(by_key[moving_name, "sitk + max"]["epe"]) < expected_epe
        # One registration feeds all rules: alignment scores agree, fusion scores differ.
        assert by_key[moving_name, "sitk + max"]["ncc"] == by_key[moving_name, "sitk + wavelet"]["ncc"]
        assert by_key[moving_name, "sitk + max"]["Q_abf"] != by_key[moving_name, "sitk + wavelet"]["Q_abf"]
    colour = by_key["pet_moving.png", "UniFuse (tiny-2d)"]
    assert colour["epe"] == colour["epe_tissue"] == "nan"  # no ground-truth field for this pair
    assert colour["class_accuracy"] == "nan"  # nor a known degradation
    assert float(colour["seconds"]) > 0 and np.isfinite(float(colour["Q_abf"]))
    for pair in {row["pair"] for row in rows}:
        copy_reference = by_key[pair, "matching + copy-reference"]
        # A copy of the reference adds nothing for the label: a gain of exactly 0, so gain_min is 0.
        assert float(copy_reference["gain_mov"]) == 0.0 and float(copy_reference["gain_min"]) == 0.0
        assert float(copy_reference["gain_ref"]) > 0
        # The copies sit on the matching registration: its alignment scores, and its aligned image.
        assert copy_reference["ncc"] == by_key[pair, "matching + average"]["ncc"]
        copy_moving = by_key[pair, "matching + copy-moving"]
        # Fused = the aligned moving image: its gain for the label is its alignment SSIM to the label
        # minus the reference's SSIM to the label (1 − the copy of the reference's gain_ref).
        assert float(copy_moving["gain_mov"]) == pytest.approx(
            float(copy_moving["ssim"]) - (1 - float(copy_reference["gain_ref"])), abs=1e-5)
        assert copy_moving["restored_ssim"] == "nan" and copy_moving["warped_input_ssim"] == "nan"


def test_class_accuracy_scores_the_engines_prediction_against_the_true_class(evaluation, pairs_csv, checkpoint):
    _, out = evaluation
    rows = read_csv(out / "per_pair.csv")
    engine = FusionEngine(checkpoint, device="cpu")
    root = pairs_csv[0].parent
    for moving_name in pairs_csv[1]:
        result = engine.run_fusion(read_image(root / moving_name.replace("moving", "reference")),
                                   read_image(root / moving_name))
        predicted = max(result.class_probs, key=result.class_probs.get)
        by_method = {row["method"]: row for row in rows if row["pair"] == moving_name}
        assert float(by_method["UniFuse (tiny-2d)"]["class_accuracy"]) == float(predicted == "motion")
        assert all(by_method[method]["class_accuracy"] == "nan" for method in CLASSICAL)


def test_restoration_columns_compare_the_restored_output_with_the_input_warped_by_the_same_field(
        evaluation, pairs_csv, checkpoint):
    """The engine's result is recorded as evaluate_pair uses it, rather than recomputed: the MI
    refinement's Adam steps amplify rounding, so a second run in another state of the process need
    not give the same field to the last bit."""
    _, out = evaluation
    rows = read_csv(out / "per_pair.csv")
    assert all(row["restored_ssim"] == "nan" for row in rows if not row["method"].startswith("UniFuse"))
    assert all(row["restored_ssim"] == row["ssim"] for row in rows if row["method"].startswith("UniFuse"))

    engine = FusionEngine(checkpoint, device="cpu")
    results = []
    run_fusion = engine.run_fusion
    engine.run_fusion = lambda *args, **kwargs: results.append(run_fusion(*args, **kwargs)) or results[-1]
    for pair in pairs_from_csv(pairs_csv[0]):
        method, values = next(evaluate_pair(pair, engine, ["identity"], ["average"]))
        assert method == UNIFUSE_METHOD
        warped = warp_array(unit_intensities(pair.moving)[0], results[-1].displacement)
        assert values["warped_input_ssim"] == pytest.approx(registration_metrics(warped, pair.label)["ssim"], rel=1e-6)
        assert values["restored_ssim"] == values["ssim"]


def test_score_maps_gains_to_reference_and_moving_and_keeps_bone_retention_to_ct():
    rng = np.random.default_rng(0)
    reference = rng.random((SIDE, SIDE)).astype(np.float32)
    label = (0.4 * reference + 0.4 * rng.random((SIDE, SIDE))).astype(np.float32)  # below 0.8
    label[:8] = 0.9  # bone: above the 0.8 threshold
    fused = (0.7 * reference + 0.3 * label).astype(np.float32)
    zero_field = np.zeros((2, SIDE, SIDE), dtype=np.float32)
    geometry = Geometry.identity(2)

    def pair(modality):
        return EvaluationPair("p", "t", ImageVolume(reference, geometry), ImageVolume(label, geometry), label,
                              moving_modality=modality)

    values = score(label, zero_field, fused, reference, pair("ct"), seconds=1.5)
    assert list(values) == list(METRIC_COLUMNS) and list(values)[-1] == "seconds"
    gains = ssim_gains(fused, reference, label)
    assert (values["gain_ref"], values["gain_mov"], values["gain_min"]) == (gains.a, gains.b, gains.minimum)
    assert values["gain_ref"] > values["gain_mov"]  # F leans towards the reference
    assert values["bone_retention"] == pytest.approx(fused[:8].mean())
    assert math.isnan(score(label, zero_field, fused, reference, pair("pet"), seconds=1.5)["bone_retention"])
    assert math.isnan(values["restored_ssim"]) and math.isnan(values["warped_input_ssim"])


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_constant_label_warning_names_every_column_the_constant_label_makes_nan(ndim):
    """It named the NCC alone; Q_cc, Q_scd and Q_CB against the label were NaN too."""
    rng = np.random.default_rng(2)
    shape = (4,) * (ndim - 2) + (SIDE, SIDE)
    reference = rng.random(shape).astype(np.float32)
    geometry = Geometry.identity(ndim)
    field = np.zeros((ndim, *shape), np.float32)

    def nan_columns(label: np.ndarray) -> set[str]:
        aligned = (0.5 + 0.1 * rng.random(shape)).astype(np.float32)
        fused = (0.5 * reference + 0.5 * aligned).astype(np.float32)
        pair = EvaluationPair("p", "t", ImageVolume(reference, geometry), ImageVolume(aligned, geometry), label)
        return {column for column, value in score(aligned, field, fused, reference, pair, 1.0).items()
                if math.isnan(value)}

    constant = np.full(shape, 0.5, np.float32)
    assert nan_columns(constant) - nan_columns(rng.random(shape).astype(np.float32)) == set(
        CONSTANT_LABEL_NAN_COLUMNS)
    _, [warning] = checked_label(ImageVolume(constant, geometry, source="flat.nii.gz"),
                                 ImageVolume(reference, geometry), CONSTANT_LABEL_NAN_COLUMNS)
    assert "the ncc, Q_cc, Q_scd and Q_CB to a constant image are undefined (NaN)" in warning


def test_a_pair_too_small_for_some_windows_is_scored_on_the_metrics_that_fit():
    """A 32³ pair stopped the whole evaluation on Q_vif's 41×41 minimum, with no results written."""
    rng = np.random.default_rng(1)
    reference = rng.random((32, 32)).astype(np.float32)
    label = (0.5 * reference + 0.4 * rng.random((32, 32))).astype(np.float32)
    fused = (0.5 * reference + 0.5 * label).astype(np.float32)
    geometry = Geometry.identity(2)
    pair = EvaluationPair("p", "t", ImageVolume(reference, geometry), ImageVolume(label, geometry), label)
    values = score(label, np.zeros((2, 32, 32), np.float32), fused, reference, pair, seconds=1.0)
    assert math.isnan(values["Q_vif"]) and math.isnan(values["VIF_F"])
    assert np.isfinite(values["Q_abf"]) and np.isfinite(values["gain_min"]) and np.isfinite(values["Q_CB"])


def summary_of(means: dict[str, dict[str, float]], task: str = "CT-MRI") -> list[dict]:
    """``summarise`` of one record per method with the given columns (the others NaN)."""
    records = [{"task": task, "method": method, "pair": "p",
                **{column: columns.get(column, float("nan")) for column in METRIC_COLUMNS}}
               for method, columns in means.items()]
    return summarise(records)


def test_a_metric_is_marked_fooled_when_a_copy_beats_the_average_of_the_same_pair():
    summary = summary_of({
        "matching + average": {"Q_ssim": 1.40, "gain_min": 0.20, "Q_mse": 0.03, "ncc": 0.5},
        "matching + copy-reference": {"Q_ssim": 1.45, "gain_min": 0.0, "Q_mse": 0.06, "ncc": 0.9},
        "matching + copy-moving": {"Q_ssim": 1.30, "gain_min": 0.0, "Q_mse": 0.01, "ncc": 0.5},
        "sitk + average": {"Q_ssim": 1.60},  # another registration: not the copies' comparator
    })
    fooled = copies_outscoring_fusion(summary, "matching")
    # Higher Q_ssim and lower (better) Q_mse for a copy; alignment columns are not fusion metrics.
    assert fooled == {"Q_mse": ["CT-MRI: copy-moving beats average"], "Q_ssim": ["CT-MRI: copy-reference beats average"]}
    header = markdown_table(summary, fooled).splitlines()[0]
    assert " Q_ssim † |" in header and " Q_mse † |" in header and " gain_min |" in header
    assert copies_outscoring_fusion(summary, "identity") == {}  # no identity rows to compare


def test_a_mean_over_fewer_pairs_than_the_row_says_how_many():
    """n counted every pair while bone retention averaged only the pairs with bone."""
    records = [{"task": "CT-MRI", "method": "unifuse", "pair": name,
                **{column: float("nan") for column in METRIC_COLUMNS}, "ncc": 0.5 + index,
                "bone_retention": 0.8 if index < 2 else float("nan")}
               for index, name in enumerate("abcd")]
    (row,) = summarise(records)
    assert row["n"] == 4 and row["ncc_n"] == 4 and row["bone_retention_n"] == 2
    table = markdown_table([row])
    assert "0.8 ± 0 (n=2)" in table and "2 ± 1.1 |" in table  # ncc: every pair, no count


def test_a_black_fused_image_counts_in_the_means_of_q_cc_and_q_psnr():
    """A method that output a black image on one pair of two averaged its good pair alone (n=1)."""
    rng = np.random.default_rng(0)
    reference, label = (np.clip(ndimage.gaussian_filter(rng.random((48, 48)), 2) * 4 - 1.5, 0, 1) for _ in range(2))
    outputs = {"good": [0.5 * (reference + label)] * 2, "broken": [0.5 * (reference + label), np.zeros_like(label)]}
    records = [{"task": "CT-MRI", "method": method, "pair": f"p{index}",
                **dict.fromkeys(METRIC_COLUMNS, float("nan")), **fusion_metrics(fused, reference, label)}
               for method, fused_images in outputs.items() for index, fused in enumerate(fused_images)]
    good, broken = summarise(records)
    for column in ("Q_cc", "Q_psnr"):
        assert broken[f"{column}_n"] == 2
        assert broken[f"{column}_mean"] < good[f"{column}_mean"]


def test_needs_exactly_one_pair_source(checkpoint, pairs_csv, tmp_path, capsys):
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert main([*argv, "--pairs", str(pairs_csv[0]), "--harvard", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "exactly one of --pairs" in error
    assert error.count("unifuse evaluate") == 2  # the command named once in each message
    assert main([*argv, "--pairs", str(pairs_csv[0]), "--misalignment", "mild"]) == 2
    assert "--misalignment applies to --harvard" in capsys.readouterr().err


def test_harvard_split_is_synthesised_like_training(checkpoint, tmp_path):
    # A miniature AANLIB tree: three cases in CT-MRI (grey) and PET-MRI (RGB), one slice each.
    root = tmp_path / "aanlib"
    rng = np.random.default_rng(0)
    slices = make_brain_phantom_slices((SIDE, SIDE), ("t1", "ct", "pet"))
    # 8-bit PNGs as exported from windowed scans (CT through io's standard HU window).
    grey = {name: np.round(255 * normalize_intensity(image, "ct" if name == "ct" else "mr")[0].array).astype(np.uint8)
            for name, image in slices.items()}
    for task, modality, image in (("CT-MRI", "CT", grey["ct"]),
                                  ("PET-MRI", "PET", np.round(255 * pseudo_colour(grey["pet"] / 255)).astype(np.uint8))):
        for folder in ("MRI", modality):
            (root / task / folder).mkdir(parents=True)
        for case in (1, 2, 3):
            name = f"{case}0{rng.integers(10, 99)}.png"
            Image.fromarray(grey["t1"]).save(root / task / "MRI" / name)
            Image.fromarray(image).save(root / task / modality / name)
    out = tmp_path / "out"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--harvard", str(root), "--tasks", "CT,PET",
            "--limit", "1", "--baselines", "identity", "--fusion-rules", "average", "--out", str(out),
            "--device", "cpu"]
    assert main(argv) == 0
    rows = read_csv(out / "per_pair.csv")
    assert {row["task"] for row in rows} == {"CT-MRI", "PET-MRI"}
    # Every regime by default; per regime one pair per task, UniFuse + identity + the two copies on identity.
    methods = ["UniFuse (tiny-2d)", "identity + average", "identity + copy-reference", "identity + copy-moving"]
    assert [(row["regime"], row["method"]) for row in rows] == [
        (regime, method) for regime in ("large", "mild", "none") for _task in range(2) for method in methods]
    assert {row["class_accuracy"] for row in rows if row["method"] == "UniFuse (tiny-2d)"} <= {"0.0", "1.0"}
    identity_epe = {(row["regime"], row["task"]): float(row["epe"]) for row in rows
                    if row["method"] == "identity + average"}
    for task in ("CT-MRI", "PET-MRI"):  # the true field's mean length, capped at 4 voxels when mild
        assert identity_epe["none", task] == 0.0 < identity_epe["mild", task] <= 4.0 + 1e-3
        assert identity_epe["large", task] > 0.0
    report = (out / "evaluation.md").read_text(encoding="utf-8")
    assert f"val_fraction {DEFAULT_VAL_FRACTION}, seed 0, from the dataset defaults" in report
    for regime in ("large", "mild", "none"):
        assert f"## Misalignment: {regime}" in report
    assert {row["regime"] for row in read_csv(out / "paired.csv")} == {"large", "mild", "none"}
    first = (out / "per_pair.csv").read_text(encoding="utf-8")
    assert main([*argv, "--overwrite"]) == 0  # into the same folder: refused without it
    # Seeded synthesis: a second run scores the very same pairs (timings aside).
    strip = lambda text: [row[:-1] for row in csv.reader(text.splitlines())]  # noqa: E731 (seconds is last)
    assert strip((out / "per_pair.csv").read_text(encoding="utf-8")) == strip(first)


# A checkpoint trained on _two_task_atlas: over both tasks this split validates on cases 2 and 5.
TWO_TASK_CHECKPOINT = {"training_config": {"data": {"kind": "harvard", "tasks": ["CT-MRI", "PET-MRI"],
                                                    "val_fraction": 0.25, "split_seed": 1}}}


def _two_task_atlas(root: Path) -> Path:
    """An atlas tree of CT-MRI cases 1-4 and PET-MRI cases 1, 5, 6, 7 (one pair each)."""
    slices = make_brain_phantom_slices((SIDE, SIDE), ("t1", "ct"))
    grey = {name: np.round(255 * normalize_intensity(image, "mr")[0].array).astype(np.uint8)
            for name, image in slices.items()}
    for task, modality, cases in (("CT-MRI", "CT", (1, 2, 3, 4)), ("PET-MRI", "PET", (1, 5, 6, 7))):
        for folder in ("MRI", modality):
            (root / task / folder).mkdir(parents=True)
        for case in cases:
            Image.fromarray(grey["t1"]).save(root / task / "MRI" / f"{case}010.png")
            Image.fromarray(np.repeat(grey["ct"][..., None], 3, axis=-1) if modality == "PET" else grey["ct"]).save(
                root / task / modality / f"{case}010.png")
    return root


def test_a_subset_of_tasks_comes_from_the_checkpoints_split(tmp_path, capsys):
    """The case split balances every task folder it is drawn over. Drawn over CT alone, this tree's
    CT validation case would be 1; the checkpoint split CT and PET together and validated on case 2,
    so ``--tasks CT`` must score case 2 (case 1 it trained on), as the same pair as ``--tasks CT,PET``."""
    root = _two_task_atlas(tmp_path / "aanlib")
    cases = checkpoint_split(TWO_TASK_CHECKPOINT, None, None)
    assert cases.tasks == ("CT-MRI", "PET-MRI")
    ct_alone = split_cases(index_harvard(root, ("CT-MRI",)), cases.val_fraction, cases.seed)[1]
    assert [pair.pair_id for pair in ct_alone] == ["1010"]  # what the split over CT alone would validate on

    def validation(tasks: list[str]) -> list:
        return pairs_from_harvard(root, "val", tasks, None, seed=0, size=None, none_fraction=0.0, cases=cases,
                                  regime="mild")

    subset, whole = validation(["CT"]), validation(["CT", "PET"])
    assert [pair.name for pair in subset] == [pair.name for pair in whole if pair.task == "CT-MRI"] == ["CT-MRI/2010"]
    # By the name the outputs give the task, as well.
    assert [pair.name for pair in validation(["ct-mri"])] == [pair.name for pair in subset]
    with pytest.raises(InputError, match="unknown Harvard task 'MR'; choose from CT, PET, SPECT "):
        validation(["MR"])
    assert np.array_equal(subset[0].moving.array, whole[0].moving.array)
    assert np.array_equal(subset[0].displacement, whole[0].displacement)
    # The PNGs' pixels are 1 mm at their native size, as training takes them: resized to half, 2 mm.
    assert np.array_equal(subset[0].reference.geometry.spacing, [1.0, 1.0])
    (halved,) = pairs_from_harvard(root, "val", ["CT"], None, seed=0, size=SIDE // 2, none_fraction=0.0,
                                   cases=cases, regime="mild")
    assert halved.reference.spatial_shape == (SIDE // 2, SIDE // 2)
    assert np.array_equal(halved.reference.geometry.spacing, [2.0, 2.0])
    # Nothing but that the checkpoint (of an earlier version) records no case split, drawn again here.
    said = capsys.readouterr().out.splitlines()
    assert said and all(line.startswith("warning: the checkpoint records no case split") for line in said)
    # Without the PET folder the split cannot be the checkpoint's, and the run says so.
    for folder in ("MRI", "PET"):
        for path in (root / "PET-MRI" / folder).iterdir():
            path.unlink()
        (root / "PET-MRI" / folder).rmdir()
    validation(["CT"])
    assert "has no PET-MRI" in capsys.readouterr().out


def test_harvard_split_follows_the_checkpoint_unless_overridden(capsys):
    trained = {"training_config": {"data": {"kind": "harvard", "val_fraction": 0.1, "split_seed": 3}}}
    split = checkpoint_split(trained, None, None)
    assert (split.val_fraction, split.seed, split.source) == (0.1, 3, "the checkpoint's training config")
    assert capsys.readouterr().out == ""
    overridden = checkpoint_split(trained, 0.15, None)
    assert (overridden.val_fraction, overridden.seed) == (0.15, 3)
    assert "cases it trained on" in capsys.readouterr().out
    # A checkpoint trained on other data (phantoms, or no record) gets the dataset's default split.
    for metadata in ({"training_config": {"data": {"kind": "phantom"}}}, {}):
        split = checkpoint_split(metadata, None, None)
        assert (split.val_fraction, split.seed, split.source) == (DEFAULT_VAL_FRACTION, 0, "the dataset defaults")
    assert capsys.readouterr().out == ""


def test_paired_comparison_counts_wins_and_matches_the_exact_signed_rank_test():
    base = {"ncc": 0.5, "epe": 10.0, "Q_abf": 0.3, "Q_ssim": 1.0}
    records = []
    for number in range(6):
        gain = 0.01 * (number + 1)  # distinct differences: no ties, so the exact test applies
        pair = f"p{number}"
        records.append({"task": "t", "method": "B", "pair": pair, **base})
        records.append({"task": "t", "method": "A", "pair": pair, "ncc": 0.5 + gain, "Q_abf": 0.3 + gain,
                        "epe": float("nan") if number == 0 else 10.0 - gain, "Q_ssim": 1.0 - gain})
        records.append({"task": "t", "method": "C", "pair": pair, **base})
        records[-1]["ncc"] = records[-2]["ncc"]  # C ties A on NCC everywhere
    columns = tuple(base)  # the records carry only these
    rows = {row["versus"]: row for row in paired_comparison(records, "A", columns)}
    assert set(rows) == {"B", "C"}
    versus_b = rows["B"]
    assert versus_b["ncc_diff"] == pytest.approx(0.035)
    # All six differences positive: two-sided exact p = 2 / 2**6; five finite EPEs: 2 / 2**5.
    assert (versus_b["ncc_wins"], versus_b["ncc_n"], versus_b["ncc_p"]) == (6, 6, pytest.approx(2 / 64))
    assert (versus_b["epe_wins"], versus_b["epe_n"], versus_b["epe_p"]) == (5, 5, pytest.approx(2 / 32))
    assert versus_b["epe_diff"] < 0  # lower error counted as the win above
    assert (versus_b["Q_ssim_wins"], versus_b["Q_ssim_p"]) == (0, pytest.approx(2 / 64))
    assert (rows["C"]["ncc_diff"], rows["C"]["ncc_wins"], rows["C"]["ncc_p"]) == (0.0, 0, 1.0)
    table = paired_markdown(list(rows.values()), columns)
    assert "| t | B | +0.035, 6/6, 0.031 |" in table


def test_differences_within_float_rounding_are_ties_not_wins():
    """mmif-amin:none and identity + max share one identity alignment, yet the shipped tables gave
    one of them 31/31 NCC wins (p 9e-10) on differences of 4e-9, float32 rounding of the same value."""
    records = []
    for number in range(8):
        pair, ncc, epe = f"p{number}", 0.6 + 0.01 * number, 2.0 + 0.1 * number
        records.append({"task": "t", "method": "A", "pair": pair, "ncc": ncc + 4e-9, "epe": epe - 5e-9})
        records.append({"task": "t", "method": "B", "pair": pair, "ncc": ncc, "epe": epe})
        # C differs from A by float32 resolution itself (1.2e-7 of the value) on half the pairs: still a tie.
        records.append({"task": "t", "method": "C", "pair": pair, "ncc": ncc * (1 + 1.2e-7 * (number % 2)),
                        "epe": epe + 0.01 * (number + 1)})
    rows = {row["versus"]: row for row in paired_comparison(records, "A", ("ncc", "epe"))}
    for other in ("B", "C"):
        assert (rows[other]["ncc_diff"], rows[other]["ncc_wins"], rows[other]["ncc_n"], rows[other]["ncc_p"]) == (
            0.0, 0, 8, 1.0)
    assert (rows["B"]["epe_wins"], rows["B"]["epe_p"]) == (0, 1.0)
    # A real difference is still one: C's errors are larger on every pair.
    assert (rows["C"]["epe_wins"], rows["C"]["epe_p"]) == (8, pytest.approx(2 / 2**8))


def test_engine_methods_are_rows_and_each_is_compared_with_every_other(checkpoint, pairs_csv, tmp_path):
    mmif = save_checkpoint(build_network("mmif-amin", "small", 2), tmp_path / "mmif.safetensors")
    out = tmp_path / "out"
    code = main(["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(out), "--device", "cpu",
                 "--methods", f"mmif-amin:none={mmif}", "identity+max", "--baselines", "identity",
                 "--fusion-rules", "max"])
    assert code == 0
    per_pair = read_csv(out / "per_pair.csv")
    rows = {(row["method"], row["pair"]): row for row in per_pair}
    # Weights other than the bundled ones: the row says whose, so it is not read as the bundled method's.
    trained = "mmif-amin:none (mmif)"
    assert {row["method"] for row in per_pair} == {trained, "identity+max", "identity + max", *{
        f"identity + {rule}" for rule in COPY_RULES}}
    for pair in {row["pair"] for row in per_pair}:
        # The engine's identity+max and evaluate's own identity + max fuse the same normalised pair.
        assert float(rows["identity+max", pair]["Q_abf"]) == pytest.approx(float(rows["identity + max", pair]["Q_abf"]),
                                                                            abs=0.02)
        assert float(rows[trained, pair]["seconds"]) > 0
        assert rows[trained, pair]["class_accuracy"] == "nan"  # no degradation estimate
        assert rows[trained, pair]["restored_ssim"] == "nan"  # restores nothing
    paired = read_csv(out / "paired.csv")
    assert {(row["method"], row["versus"]) for row in paired if row["task"] == "t1-t2"} == {
        (trained, "identity+max"), (trained, "identity + max"),
        ("identity+max", trained), ("identity+max", "identity + max"),
        *{(method, f"identity + {rule}") for method in (trained, "identity+max") for rule in COPY_RULES}}
    markdown = (out / "evaluation.md").read_text(encoding="utf-8")
    assert f"{trained} against each pipeline, pair by pair" in markdown
    assert markdown.startswith(f"# Evaluation of {trained}, identity+max\n")
    assert f"`{trained}`: checkpoint {mmif}." in markdown.splitlines()[2]  # the file itself, in the header


def test_evaluate_needs_a_checkpoint_or_methods(pairs_csv, tmp_path, capsys):
    assert main(["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "--methods" in error
    assert error.count("unifuse evaluate") == 1



@pytest.mark.parametrize(("entry", "expected"), [
    ("sitk+max=unifuse-2d-harvard", "error: --methods: sitk+max has no trained weights: give it no checkpoint"),
    ("bsafusion=mmif-amin-2d-harvard", "mmif-amin-2d-harvard.safetensors holds mmif-amin weights, not bsafusion "
                                       "ones; use it with the mmif-amin method or pick a bsafusion checkpoint"),
])
def test_a_methods_checkpoint_refusal_names_evaluates_own_option(pairs_csv, tmp_path, capsys, entry, expected):
    """They said "--checkpoint: ... drop --checkpoint" and "(--method mmif-amin)", fuse's options."""
    assert main(["evaluate", "--pairs", str(pairs_csv[0]), "--methods", entry, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert expected in error and "--checkpoint" not in error and "--method " not in error
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize("option, value, minimum", [
    ("--limit", "0", 1), ("--limit", "-2", 1), ("--size", "0", 1), ("--size", "-2", 1),
    ("--split-seed", "-1", 0),  # was a numpy traceback
    ("--tile-size", "0", 1),  # silently ran with the default tile
])
def test_numbers_below_their_minimum_are_usage_errors_before_anything_runs(option, value, minimum, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--methods", "identity+max", "--harvard", str(tmp_path), option, value,
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be at least {minimum}, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", [["--limit", "1"], ["--size", "64"], ["--seed", "3"], ["--tasks", "XYZ"],
                                   ["--split", "train"], ["--split", "val"], ["--val-fraction", "0.2"],
                                   ["--split-seed", "1"], ["--none-fraction", "0.2"], ["--misalignment", "mild"]])
def test_a_harvard_option_with_pairs_is_refused_not_ignored(given, pairs_csv, tmp_path, capsys, no_pair_computed):
    """--pairs with --limit 1 scored every pair of the CSV; --tasks XYZ passed without a word."""
    code = main(["evaluate", "--pairs", str(pairs_csv[0]), "--methods", "identity+max", *given,
                 "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert error == (f"unifuse evaluate: error: {given[0]} applies to --harvard only: --pairs scores every pair of "
                     f"its CSV, misaligned as it is; leave out {given[0]}\n")
    assert not (tmp_path / "out").exists()


def test_every_harvard_option_given_with_pairs_is_named(pairs_csv, tmp_path, capsys, no_pair_computed):
    code = main(["evaluate", "--pairs", str(pairs_csv[0]), "--methods", "identity+max", "--limit", "1",
                 "--none-fraction", "0", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--limit, --none-fraction apply to --harvard only" in capsys.readouterr().err


def test_harvard_options_left_out_take_their_defaults():
    args = build_parser().parse_args(["evaluate", "--harvard", "aanlib", "--out", "out", "--limit", "2"])
    filled = with_harvard_defaults(args)
    assert (filled.split, filled.tasks, filled.seed, filled.none_fraction, filled.misalignment) == (
        "val", "CT,PET,SPECT", 0, 0.0, "all")
    assert (filled.limit, filled.val_fraction, filled.split_seed, filled.size) == (2, None, None, None)
    assert args.split is None  # the given namespace unchanged


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("value", ["0", "1", "-0.1"])
def test_a_val_fraction_holding_out_no_case_or_every_case_is_refused_by_evaluates_own_option(
        split, value, tmp_path, capsys):
    """--split train --val-fraction 0 was refused by training's check, naming data.val_fraction and
    a best checkpoint that evaluate does not keep."""
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--methods", "identity+max", "--harvard", str(tmp_path), "--split", split,
              "--val-fraction", value, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument --val-fraction: must be above 0 and below 1, got {value}: it is the fraction" in error
    assert "data.val_fraction" not in error and "checkpoint by" not in error
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("value", ["2", "-0.1", "nan"])
def test_a_none_fraction_outside_0_to_1_is_refused_by_evaluates_own_option(value, tmp_path, capsys):
    """It was refused by training's check ("data.none_fraction: ...") after the checkpoint loaded."""
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--methods", "identity+max", "--harvard", str(tmp_path), "--none-fraction", value,
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument --none-fraction: must be from 0 to 1, got {value}: it is the fraction of pairs" in error
    assert "data.none_fraction" not in error
    assert not (tmp_path / "out").exists()

def test_pairs_in_different_folders_with_one_moving_file_name_are_all_compared(tmp_path):
    """``unifuse synth --pairs`` writes OUT/0000/moving.png, OUT/0001/moving.png: two pairs, both
    in every table and in the pair-by-pair statistics."""
    slices = make_brain_phantom_slices((SIDE, SIDE), ("t1", "t2"))
    for name, image in slices.items():
        Image.fromarray(np.round(255 * image.array / image.array.max()).astype(np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "synth.csv").write_text("reference,moving,degradation\nt1.png,t2.png,motion\nt1.png,t2.png,lowdose\n",
                                        encoding="utf-8")
    assert main(["synth", "--pairs", str(tmp_path / "synth.csv"), "--out", str(tmp_path / "out")]) == 0
    folders = ("out/0000", "out/0001")
    (tmp_path / "eval.csv").write_text("reference,moving,label,displacement\n" + "".join(
        f"{folder}/reference.png,{folder}/moving.png,{folder}/label.png,{folder}/displacement.nii.gz\n"
        for folder in folders), encoding="utf-8")
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--pairs", str(tmp_path / "eval.csv"), "--out", str(out), "--device", "cpu",
                 "--methods", "identity+max", "--baselines", "identity", "--fusion-rules", "max"]) == 0

    assert {row["pair"] for row in read_csv(out / "per_pair.csv")} == {f"{folder}/moving.png" for folder in folders}
    assert {int(row["n"]) for row in read_csv(out / "evaluation.csv")} == {len(folders)}
    paired = read_csv(out / "paired.csv")
    assert paired and all(int(row["ncc_n"]) == int(row["epe_n"]) == len(folders) for row in paired)


def test_a_moving_image_on_two_lines_of_the_csv_is_two_pairs_named_by_line(tmp_path):
    brain = np.exp(-3 * sum(g**2 for g in np.meshgrid(*(np.linspace(-1, 1, SIDE),) * 2, indexing="ij")))
    for name in ("mri.png", "blob.png"):
        Image.fromarray((255 * brain).astype(np.uint8)).save(tmp_path / name)
    # A blank line: the names give the CSV's own line numbers, where a reader would look.
    (tmp_path / "pairs.csv").write_text(
        "reference,moving,label\nmri.png,blob.png,blob.png\n\nblob.png,blob.png,blob.png\nblob.png,mri.png,mri.png\n",
        encoding="utf-8")
    names = [pair.name for pair in pairs_from_csv(tmp_path / "pairs.csv")]
    assert names == ["blob.png (line 2)", "blob.png (line 4)", "mri.png"]


def test_a_csv_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path):
    Image.fromarray(np.full((SIDE, SIDE), 128, np.uint8)).save(tmp_path / "mri.png")
    (tmp_path / "pairs.csv").write_text("reference,moving,label\nmri.png,mri.png,mri.png\n", encoding="utf-8-sig")
    assert [pair.name for pair in pairs_from_csv(tmp_path / "pairs.csv")] == ["mri.png"]


def test_the_pair_by_pair_comparison_refuses_two_records_of_one_method_on_one_pair():
    records = [{"task": "t", "method": method, "pair": "moving.png", "ncc": value}
               for method, value in (("A", 0.5), ("B", 0.4), ("A", 0.6))]
    with pytest.raises(ValueError, match="pair names must be unique"):
        paired_comparison(records, "A", ("ncc",))


def test_a_method_named_twice_is_refused_rather_than_one_entry_silently_dropped(pairs_csv, tmp_path, capsys):
    first = save_checkpoint(build_network("mmif-amin", "small", 2), tmp_path / "first.safetensors")
    second = save_checkpoint(build_network("mmif-amin", "small", 2), tmp_path / "second.safetensors")
    code = main(["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--methods", f"mmif-amin:none={first}", f"mmif-amin:none={second}"])
    assert code == 2
    assert "mmif-amin:none is named twice" in capsys.readouterr().err
    assert not (tmp_path / "out" / "per_pair.csv").exists()


def test_a_pair_simpleitk_cannot_register_leaves_nan_rows_and_the_run_goes_on(tmp_path, capsys):
    """A constant moving image gives ITK's optimiser nothing to follow: that pair's SimpleITK rows
    (the engine method and the baseline) are NaN with a line on stderr, every other row is scored."""
    side = 48
    grids = np.meshgrid(*(np.linspace(-1, 1, side),) * 2, indexing="ij")
    brain = np.exp(-3 * sum(g**2 for g in grids))
    for name, image in (("mri.png", brain), ("flat.png", np.zeros_like(brain)), ("blob.png", np.roll(brain, 3, 0))):
        Image.fromarray((255 * image).astype(np.uint8)).save(tmp_path / name)
    (tmp_path / "pairs.csv").write_text("reference,moving,label\nmri.png,flat.png,flat.png\nmri.png,blob.png,blob.png\n",
                                        encoding="utf-8")
    out = tmp_path / "out"
    code = main(["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--out", str(out), "--device", "cpu",
                 "--methods", "sitk+max", "--baselines", "identity,sitk", "--fusion-rules", "max"])
    assert code == 0
    rows = {(row["pair"], row["method"]): row for row in read_csv(out / "per_pair.csv")}
    flat, blob = sorted({pair for pair, _ in rows}, key=lambda pair: "flat" not in pair)
    for method in ("sitk+max", "sitk + max"):
        assert rows[flat, method]["gain_min"] == "nan"
        assert np.isfinite(float(rows[blob, method]["gain_min"]))
    assert np.isfinite(float(rows[flat, "identity + max"]["gain_min"]))
    assert "SimpleITK registration failed on this pair" in capsys.readouterr().err



@pytest.mark.parametrize(("flag", "weighed"), [([], (False, False)), (["--weigh-network-field"], (True, False)),
                                               (["--weigh-dense-refinement"], (False, True))])
def test_the_guards_candidates_are_as_the_checkpoint_says_unless_asked(flag, weighed, pairs_csv, tmp_path,
                                                                      built_engines):
    torch.manual_seed(0)
    path = save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=2)), tmp_path / "fa-never-kept.safetensors",
                           {"alignment_guard": {"weigh_network_field": False}})
    code = main(["evaluate", "--checkpoint", str(path), "--pairs", str(pairs_csv[0]), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--baselines", "identity", "--fusion-rules", "max", *flag])

    assert code == 0
    assert [(engine.weigh_network_field, engine.weigh_dense_refinement) for engine in built_engines] == [weighed]


@pytest.fixture
def no_pair_computed(monkeypatch):
    """For a run that must be refused before its first pair: computing one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pair was computed before the refusal")

    monkeypatch.setattr(evaluate_module, "evaluate_pair", refuse)


def test_a_checkpoint_of_another_method_is_refused_as_unifuses(pairs_csv, tmp_path, capsys, no_pair_computed):
    """Its rows would be labelled UniFuse, and its pair-by-pair tables too."""
    mmif = save_checkpoint(build_network("mmif-amin", "small", 2), tmp_path / "mmif.safetensors")
    code = main(["evaluate", "--checkpoint", str(mmif), "--pairs", str(pairs_csv[0]), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--baselines", "identity", "--fusion-rules", "max"])
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds mmif-amin weights, not UniFuse ones" in error
    assert f"--methods mmif-amin={mmif}" in error
    assert not (tmp_path / "out").exists()


def test_a_registration_or_rule_named_twice_is_evaluated_once(pairs_csv, tmp_path):
    out = tmp_path / "out"
    code = main(["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(out), "--device", "cpu",
                 "--methods", "identity+max", "--baselines", "identity,identity", "--fusion-rules", "max, max"])
    assert code == 0
    per_pair = read_csv(out / "per_pair.csv")
    assert sorted(row["method"] for row in per_pair if row["pair"] == "pet_moving.png") == sorted(
        ["identity+max", "identity + max", *(f"identity + {rule}" for rule in COPY_RULES)])


def test_an_out_that_is_a_file_is_refused_in_one_line(pairs_csv, tmp_path, capsys, no_pair_computed):
    out = tmp_path / "results"
    out.write_text("not a folder", encoding="utf-8")
    code = main(["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(out), "--device", "cpu",
                 "--methods", "identity+max", "--baselines", "identity", "--fusion-rules", "max"])
    assert code == 2
    error = capsys.readouterr().err
    assert error == f"unifuse evaluate: error: {out}: is a file; --out takes a folder for evaluation.csv/.md and " \
                    "per_pair.csv\n"
    assert out.read_text(encoding="utf-8") == "not a folder"


def test_a_missing_harvard_folder_is_named_by_evaluates_own_option(tmp_path, capsys, no_pair_computed):
    missing = tmp_path / "nonexistent"
    code = main(["evaluate", "--harvard", str(missing), "--methods", "identity+max", "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"{missing}: Harvard data folder not found; --harvard takes" in error
    assert "--data-root" not in error  # train's option, not evaluate's


def test_earlier_results_in_out_are_kept_unless_overwrite(pairs_csv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("per_pair.csv", "paired.csv"):
        (out / name).write_text("earlier\n", encoding="utf-8")
    arguments = ["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(out), "--device", "cpu",
                 "--methods", "identity+max", "--baselines", "identity", "--fusion-rules", "max"]
    computed = []

    def one_row_per_pair(pair, *args, **kwargs):
        computed.append(pair.name)
        yield "identity+max", dict.fromkeys(METRIC_COLUMNS, 0.5)

    monkeypatch.setattr(evaluate_module, "evaluate_pair", one_row_per_pair)
    assert main(arguments) == 2
    assert "holds the results of an earlier evaluation (per_pair.csv, paired.csv); pass --overwrite" in (
        capsys.readouterr().err)
    assert not computed and (out / "per_pair.csv").read_text(encoding="utf-8") == "earlier\n"

    assert main([*arguments, "--overwrite"]) == 0
    assert {row["method"] for row in read_csv(out / "per_pair.csv")} == {"identity+max"}
    # One engine method and nothing else to compare it with: no paired.csv, and not the earlier one either.
    assert not (out / "paired.csv").exists()


def test_an_unknown_method_is_named_by_evaluates_own_option(pairs_csv, tmp_path, capsys):
    code = main(["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--methods", "nosuch"])
    assert code == 2
    assert "unifuse evaluate: error: --methods: unknown method 'nosuch'" in capsys.readouterr().err


def test_rows_of_two_training_runs_checkpoints_are_named_by_their_runs():
    """Every training run writes checkpoints/last.safetensors: "unifuse (last)" twice told nothing apart."""
    assert row_name("unifuse", "runs/ct-a/checkpoints/last.safetensors") == "unifuse (ct-a/last)"
    assert row_name("unifuse", "runs/ct-b/checkpoints/last.safetensors") == "unifuse (ct-b/last)"
    assert row_name("unifuse", "weights/tiny-2d.safetensors") == "unifuse (tiny-2d)"
    assert row_name("unifuse", "unifuse-2d-harvard") == "unifuse (unifuse-2d-harvard)"


@pytest.mark.parametrize("method", ["unifuse", "bsafusion"])
def test_a_pair_a_method_cannot_take_is_refused_by_name_before_any_pair_is_computed(
        method, checkpoint, pairs_csv, tmp_path, capsys, no_pair_computed):
    """A 3D pair after 2D ones: the run used to stop there, after the work on the pairs before it."""
    for seed, role in enumerate(("reference", "moving", "label")):  # three images: one given twice is warned of
        volume = np.random.default_rng(seed).random((24, 24, 24)).astype(np.float32)
        write_image(ImageVolume(volume, Geometry.identity(3)), tmp_path / f"{role}_3d.nii.gz")
    rows = read_csv(pairs_csv[0])
    rows.append({"reference": str(tmp_path / "reference_3d.nii.gz"), "moving": str(tmp_path / "moving_3d.nii.gz"),
                 "label": str(tmp_path / "label_3d.nii.gz"), "displacement": "", "task": "volumes",
                 "degradation": ""})
    for row in rows[:-1]:
        row.update({role: str(pairs_csv[0].parent / row[role]) for role in ("reference", "moving", "label")})
        row["displacement"] = str(pairs_csv[0].parent / row["displacement"]) if row["displacement"] else ""
    mixed = tmp_path / "mixed.csv"
    with mixed.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    given = ["--checkpoint", str(checkpoint)] if method == "unifuse" else ["--methods", method]
    code = main(["evaluate", *given, "--pairs", str(mixed), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--baselines", "identity", "--fusion-rules", "max"])
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"pair {tmp_path / 'moving_3d.nii.gz'}" in error and "3D" in error
    assert not (tmp_path / "out").exists()


def test_a_classical_pipeline_scores_a_3d_pair_in_3d(tmp_path, capsys):
    """--methods built every method for 2D images: a classical pipeline, which fuse runs on 3D
    pairs, stopped the evaluation of a 3D pair ("this checkpoint is a 2D model")."""
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.random((12, 16, 16)), 2).astype(np.float32)
    for role, array in (("reference", volume), ("moving", np.roll(volume, 1, axis=2)), ("label", volume)):
        write_image(ImageVolume(array, Geometry.identity(3)), tmp_path / f"{role}.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving,label\nreference.nii.gz,moving.nii.gz,label.nii.gz\n", encoding="utf-8")
    code = main(["evaluate", "--methods", "identity+max", "--pairs", str(pairs), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--baselines", "identity", "--fusion-rules", "max"])
    assert code == 0, capsys.readouterr().err
    rows = {row["method"]: row for row in read_csv(tmp_path / "out" / "per_pair.csv")}
    # The engine's pipeline and the baseline of the same registration and rule agree on the volume.
    assert float(rows["identity+max"]["ncc"]) == pytest.approx(float(rows["identity + max"]["ncc"]))
    assert 0 < float(rows["identity+max"]["ncc"]) < 1


def test_an_out_it_cannot_write_to_is_refused_before_any_pair_is_computed(pairs_csv, tmp_path, capsys, no_pair_computed,
                                                                          deny_writes_in, deny_creating):
    """It used to fail with a traceback once every pair had been computed."""
    arguments = ["evaluate", "--pairs", str(pairs_csv[0]), "--device", "cpu", "--methods", "identity+max",
                 "--baselines", "identity", "--fusion-rules", "max"]
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    deny_writes_in(read_only)
    assert main([*arguments, "--out", str(read_only)]) == 2
    assert capsys.readouterr().err == (f"unifuse evaluate: error: {read_only}: cannot write there "
                                       "(Permission denied)\n")
    assert list(read_only.iterdir()) == []

    inside_read_only = tmp_path / "parent" / "out"
    deny_creating(inside_read_only)
    assert main([*arguments, "--out", str(inside_read_only)]) == 2
    assert capsys.readouterr().err == (f"unifuse evaluate: error: {inside_read_only}: cannot create the --out "
                                       "folder (Permission denied)\n")
    assert not (tmp_path / "parent").exists()


def test_a_full_disk_with_overwrite_is_one_line_and_leaves_the_earlier_results_whole(pairs_csv, tmp_path,
                                                                                    monkeypatch, capsys):
    """--overwrite used to remove the earlier results first, then crash with a traceback, leaving a
    0-byte evaluation.csv that a rerun refused as an earlier evaluation's."""
    out = tmp_path / "out"
    arguments = ["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(out), "--device", "cpu",
                 "--baselines", "identity", "--fusion-rules", "max"]
    methods = ["identity+max", "identity+average"]

    def rows_of_the_methods(pair, *args, **kwargs):
        for number, method in enumerate(methods):
            yield method, dict.fromkeys(METRIC_COLUMNS, 0.5 / (number + 1))

    monkeypatch.setattr(evaluate_module, "evaluate_pair", rows_of_the_methods)
    assert main([*arguments, "--methods", *methods]) == 0
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}
    assert set(earlier) == {"per_pair.csv", "evaluation.csv", "paired.csv", "evaluation.md"}
    real_write_csv = evaluate_module.write_csv

    def disk_fills_up(rows, path):
        if path.name == "evaluation.csv":
            path.write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_csv(rows, path)

    monkeypatch.setattr(evaluate_module, "write_csv", disk_fills_up)
    methods.remove("identity+average")  # this run has no paired.csv: the earlier one must stay all the same
    capsys.readouterr()
    assert main([*arguments, "--methods", "identity+max", "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert error == (f"unifuse evaluate: error: {out / 'evaluation.csv'}: cannot be written (No space left on "
                     "device); the folder's earlier files are as they were\n")
    # Every earlier file whole (paired.csv too, which this run would not have written), no staging folder.
    assert {path.name: path.read_bytes() for path in out.iterdir()} == earlier

    monkeypatch.setattr(evaluate_module, "write_csv", real_write_csv)
    assert main([*arguments, "--methods", "identity+max", "--overwrite"]) == 0
    assert {path.name for path in out.iterdir()} == {"per_pair.csv", "evaluation.csv", "evaluation.md"}
    assert {row["method"] for row in read_csv(out / "per_pair.csv")} == {"identity+max"}


def test_the_pair_by_pair_tests_of_earlier_results_are_rebuilt_from_their_per_pair_rows(pairs_csv, tmp_path,
                                                                                         monkeypatch):
    """bench/summarize_methods_eval.py --retest: results made before rounding ties (shipped in
    docs/results) get the tables a run today writes, from per_pair.csv alone; nothing else changes."""
    numbers: dict[str, int] = {}  # each pair's values the same in both runs

    def rows(pair, *args, **kwargs):
        ncc = 0.5 + 0.01 * numbers.setdefault(pair.name, len(numbers))
        values = dict.fromkeys(METRIC_COLUMNS, 0.5)
        yield "identity+max", {**values, "ncc": ncc + 4e-9}  # the same alignment, scored by another road
        yield "identity + max", {**values, "ncc": ncc}
        yield "identity + average", {**values, "ncc": ncc - 0.1}

    monkeypatch.setattr(evaluate_module, "evaluate_pair", rows)
    arguments = ["evaluate", "--pairs", str(pairs_csv[0]), "--device", "cpu", "--methods", "identity+max",
                 "--baselines", "identity", "--fusion-rules", "max,average"]
    assert main([*arguments, "--out", str(tmp_path / "today")]) == 0
    with monkeypatch.context() as before_ties:
        before_ties.setattr(evaluate_module, "TIE_RTOL", 0.0)
        before_ties.setattr(evaluate_module, "TIE_ATOL", 0.0)
        assert main([*arguments, "--out", str(tmp_path / "earlier")]) == 0
    earlier = (tmp_path / "earlier" / "evaluation.md").read_text(encoding="utf-8")
    assert "| identity + max | +4e-09, 1/1, 1 |" in earlier  # one pair per task: a noise win

    spec = importlib.util.spec_from_file_location("summarize_methods_eval",
                                                  REPO / "bench" / "summarize_methods_eval.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    summarize.retest_folder(tmp_path / "earlier")
    for name in ("evaluation.md", "paired.csv", "per_pair.csv"):
        assert (tmp_path / "earlier" / name).read_text(encoding="utf-8") == (
            tmp_path / "today" / name).read_text(encoding="utf-8"), name
    assert "| identity + max | +0, 0/1, 1 |" in (tmp_path / "earlier" / "evaluation.md").read_text(encoding="utf-8")


def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next(pairs_csv, tmp_path, monkeypatch):
    out = tmp_path / "out"
    leftover = out / f"{STAGING_PREFIX}killed" / "per_pair.csv"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("cut short", encoding="utf-8")
    monkeypatch.setattr(evaluate_module, "evaluate_pair",
                        lambda pair, *args, **kwargs: iter([("identity+max", dict.fromkeys(METRIC_COLUMNS, 0.5))]))
    assert main(["evaluate", "--pairs", str(pairs_csv[0]), "--out", str(out), "--device", "cpu",
                 "--methods", "identity+max", "--baselines", "identity", "--fusion-rules", "max"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["evaluation.csv", "evaluation.md", "per_pair.csv"]


# ---- the --pairs CSV: its header, repeated pairs, and the results' names ------------------------------
def test_a_misspelled_column_is_refused_by_name_not_scored_without_it(pairs_csv, tmp_path, capsys, no_pair_computed):
    """`displacment` used to be ignored: every pair's epe was NaN, without a word."""
    misspelled = tmp_path / "pairs.csv"
    misspelled.write_text(pairs_csv[0].read_text(encoding="utf-8").replace("displacement", "displacment", 1),
                          encoding="utf-8")
    code = main(["evaluate", "--pairs", str(misspelled), "--out", str(tmp_path / "out"), "--methods", "identity+max"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"unifuse evaluate: error: {misspelled}: unknown column 'displacment' (did you mean 'displacement'?); the "
        "columns are reference, moving, label and optionally displacement, task, degradation\n")


def test_a_pair_listed_twice_is_refused_naming_its_lines(pairs_csv, tmp_path, capsys, no_pair_computed):
    """It used to count twice: n = 2 and a Wilcoxon test on one pair."""
    root = pairs_csv[0].parent
    repeated = tmp_path / "repeated.csv"
    # The same files, the second time by another spelling of their paths: still one pair.
    repeated.write_text(f"reference,moving,label\n{root}/pet_reference.png,{root}/pet_moving.png,{root}/pet_label.png\n"
                        f"{root}/t2_1_reference.nii.gz,{root}/t2_1_moving.nii.gz,{root}/t2_1_label.nii.gz\n"
                        f"{root}/./pet_reference.png,{root}//pet_moving.png,{root}/pet_label.png\n",
                        encoding="utf-8")
    code = main(["evaluate", "--pairs", str(repeated), "--out", str(tmp_path / "out"), "--methods", "identity+max"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"unifuse evaluate: error: {repeated}: the same pair (reference, moving and label files) is listed more "
        "than once (lines 2, 4): it would count that many times in the means and the pair-by-pair tests; keep one "
        "row of each\n")


@pytest.mark.parametrize("name", ["evaluation.csv", "per_pair.csv", "paired.csv"])
def test_a_pairs_csv_where_a_result_goes_is_refused_even_with_overwrite(pairs_csv, tmp_path, capsys, name,
                                                                        no_pair_computed):
    """--overwrite used to replace the input CSV with the results; without it, the CSV was called
    the results of an earlier evaluation."""
    out = tmp_path / "out"
    out.mkdir()
    rows = read_csv(pairs_csv[0])
    for row in rows:
        row.update({column: str(pairs_csv[0].parent / row[column]) if row[column] else ""
                    for column in ("reference", "moving", "label", "displacement")})
    given = out / name
    with given.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    original = given.read_bytes()
    for overwrite in ([], ["--overwrite"]):
        code = main(["evaluate", "--pairs", str(given), "--out", str(out), "--methods", "identity+max", *overwrite])
        assert code == 2
        assert capsys.readouterr().err == (f"unifuse evaluate: error: {given}: this input sits where the {name} "
                                           "output goes and would be replaced; write the outputs to another folder\n")
    assert given.read_bytes() == original and [path.name for path in out.iterdir()] == [name]


def test_a_folder_given_as_the_pairs_csv_is_called_a_folder(tmp_path, capsys, no_pair_computed):
    code = main(["evaluate", "--pairs", str(tmp_path), "--out", str(tmp_path / "out"), "--methods", "identity+max"])
    assert code == 2
    assert capsys.readouterr().err == (f"unifuse evaluate: error: {tmp_path}: is a folder, not a CSV file; --pairs "
                                       "takes a CSV file of pairs\n")


def test_a_row_without_its_label_cell_is_one_line_not_a_traceback(pairs_csv, tmp_path, capsys, no_pair_computed):
    short = tmp_path / "short.csv"
    root = pairs_csv[0].parent
    short.write_text(f"reference,moving,label\n{root}/pet_reference.png,{root}/pet_moving.png\n", encoding="utf-8")
    assert main(["evaluate", "--pairs", str(short), "--out", str(tmp_path / "out"), "--methods", "identity+max"]) == 2
    assert capsys.readouterr().err == (f"unifuse evaluate: error: {short}: line 2 of the CSV: no label cell (the row "
                                       "has fewer cells than the header)\n")


def pictures_with_labels(root: Path) -> dict[str, Path]:
    """A 48² picture pair and labels for it: its own, one 500 mm away (a NIfTI with an origin) and
    one covering the left third of its columns."""
    rng = np.random.default_rng(0)
    image = (255 * ndimage.gaussian_filter(rng.random((SIDE, SIDE)), 3)).astype(np.uint8)
    files = {"reference": root / "reference.png", "moving": root / "moving.png", "label": root / "label.png",
             "third": root / "third.png", "far": root / "far.nii.gz"}
    # The moving image shifted: one image given twice is a pair `fuse` and evaluate warn of.
    for role, picture in (("reference", image), ("moving", np.roll(image, 2, axis=1)), ("label", image)):
        Image.fromarray(picture).save(files[role])
    Image.fromarray(image[:, : SIDE // 3]).save(files["third"])
    write_image(ImageVolume(image.astype(np.float32), Geometry(np.ones(2), np.array([500.0, 500.0]), np.eye(2))),
                files["far"])
    return files


def test_a_label_outside_the_reference_refuses_its_row_before_any_pair_is_computed(tmp_path, capsys,
                                                                                  no_pair_computed):
    """It was resampled onto the reference and scored against zeros, without a word."""
    files = pictures_with_labels(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving,label\nreference.png,moving.png,label.png\n"
                     "reference.png,label.png,far.nii.gz\n", encoding="utf-8")
    code = main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--methods", "identity+max"])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"unifuse evaluate: error: {pairs}: line 3 of the CSV, label {files['far']}: the label "
                            f"does not overlap the reference ({files['reference']}) in space")
    assert error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_label_covering_under_half_the_reference_is_a_warning_printed_and_in_the_report(tmp_path, capsys,
                                                                                        monkeypatch):
    files = pictures_with_labels(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving,label\nreference.png,moving.png,third.png\n", encoding="utf-8")
    monkeypatch.setattr(evaluate_module, "evaluate_pair",
                        lambda pair, *args, **kwargs: iter([("identity+max", dict.fromkeys(METRIC_COLUMNS, 0.5))]))
    assert main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--methods", "identity+max",
                 "--baselines", "identity", "--fusion-rules", "max"]) == 0
    warning = f"{files['third']}: the label covers only 33.3 % of the reference grid in space"
    assert f"warning: pair moving.png: {warning}" in capsys.readouterr().err
    report = (tmp_path / "out" / "evaluation.md").read_text(encoding="utf-8")
    assert f"## Warnings\n\n- pair moving.png: {warning}" in report


def test_a_one_slice_volume_is_scored_as_the_2d_image_it_is_fused_as(tmp_path, capsys):
    """A 64×64×1 NIfTI pair stopped the whole evaluation ("displacement: each spatial axis needs at
    least 2 voxels"); it scores as the same pair stored as 2D images, end-point error included."""
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((32, 32)), 2).astype(np.float32)
    shift = np.zeros((2, 32, 32), np.float32)
    shift[1] = 1.0
    results = {}
    for layout, geometry, expand in (("plane", Geometry.identity(2), lambda a: a),
                                     ("one-slice", Geometry.identity(3), lambda a: a[None])):
        folder = tmp_path / layout
        folder.mkdir()
        for role, array in (("reference", image), ("moving", np.roll(image, 1, axis=1)), ("label", image)):
            write_image(ImageVolume(expand(array), geometry), folder / f"{role}.nii.gz")
        field = shift if layout == "plane" else np.insert(shift[:, None], 0, 0.0, axis=0)
        write_displacement(field, geometry, folder / "field.nii.gz")
        pairs = folder / "pairs.csv"
        pairs.write_text("reference,moving,label,displacement\n"
                         "reference.nii.gz,moving.nii.gz,label.nii.gz,field.nii.gz\n", encoding="utf-8")
        code = main(["evaluate", "--methods", "identity+max", "--pairs", str(pairs), "--out", str(folder / "out"),
                     "--device", "cpu", "--baselines", "identity", "--fusion-rules", "max"])
        assert code == 0, capsys.readouterr().err
        results[layout] = {row["method"]: row for row in read_csv(folder / "out" / "per_pair.csv")}
    assert results["one-slice"].keys() == results["plane"].keys()
    for method, row in results["plane"].items():
        for column in ("ncc", "ssim", "epe", "Q_abf", "gain_min"):
            assert float(results["one-slice"][method][column]) == pytest.approx(float(row[column]), nan_ok=True)
    assert float(results["one-slice"]["identity+max"]["epe"]) == pytest.approx(1.0)


def test_the_input_warnings_fuse_gives_are_printed_per_pair_and_in_the_report(tmp_path, capsys, monkeypatch):
    """A half-transparent moving picture and a smaller one were scored without fuse's warnings."""
    files = pictures_with_labels(tmp_path)
    image = np.asarray(Image.open(files["moving"]))
    Image.fromarray(np.dstack([image, image, image, np.full_like(image, 128)])).save(tmp_path / "clear.png")
    Image.fromarray(image[:40, :36]).save(tmp_path / "small.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving,label\nreference.png,clear.png,label.png\nreference.png,small.png,label.png\n",
                     encoding="utf-8")
    monkeypatch.setattr(evaluate_module, "evaluate_pair",
                        lambda pair, *args, **kwargs: iter([("identity+max", dict.fromkeys(METRIC_COLUMNS, 0.5))]))
    assert main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--methods", "identity+max",
                 "--baselines", "identity", "--fusion-rules", "max"]) == 0
    transparency = f"{tmp_path / 'clear.png'}: transparency ignored: 100 % of the pixels are partly or fully transparent"
    sizes = f"the two pictures differ in size ({SIDE}×{SIDE} pixels and 36×40 pixels): they are laid over each other"
    printed = capsys.readouterr().err
    assert printed.count(f"warning: pair clear.png: {transparency}") == 1
    assert printed.count(f"warning: pair small.png: {sizes}") == 1
    report = (tmp_path / "out" / "evaluation.md").read_text(encoding="utf-8")
    assert f"- pair clear.png: {transparency}" in report and f"- pair small.png: {sizes}" in report


def test_a_moving_image_outside_the_reference_refuses_its_row_as_fuse_does(tmp_path, capsys, no_pair_computed):
    files = pictures_with_labels(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving,label\nreference.png,far.nii.gz,label.png\n", encoding="utf-8")
    assert main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--methods", "identity+max"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"unifuse evaluate: error: {pairs}: line 2 of the CSV, moving {files['far']}: the moving "
                            f"image does not overlap the reference ({files['reference']}) in space")
    assert error.count("\n") == 1


@pytest.mark.parametrize("reference_dims", [2, 3])
def test_a_pair_of_a_2d_and_a_3d_image_refuses_its_row_in_fuses_words(reference_dims, tmp_path, capsys,
                                                                       no_pair_computed):
    """A 2-D reference with a 3-D moving image, or the reverse, stopped the run with a ValueError
    traceback (matmul) from the overlap check, where `unifuse fuse` refuses the pair in one line."""
    pictures_with_labels(tmp_path)
    volume = ImageVolume(np.zeros((8, SIDE, SIDE), np.float32), Geometry.identity(3))
    write_image(volume, tmp_path / "volume.nii.gz")
    row = ("reference.png,volume.nii.gz,label.png" if reference_dims == 2
           else "volume.nii.gz,moving.png,volume.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving,label\nreference.png,moving.png,label.png\n{row}\n", encoding="utf-8")
    reference, moving = (read_image(tmp_path / name) for name in row.split(",")[:2])
    with pytest.raises(InputError) as fuse_refusal:
        FusionEngine(load_method("identity+max", spatial_dims=model_dimensions(reference)),
                     device="cpu").validate(reference, moving)
    assert "both must be 2D or both 3D" in fuse_refusal.value.problem

    code = main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--methods", "identity+max"])
    assert code == 2
    error = capsys.readouterr().err
    assert error == (f"unifuse evaluate: error: {pairs}: line 3 of the CSV, moving {moving.source}: "
                     f"{fuse_refusal.value.problem}\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(SIDE, SIDE - 8), (SIDE - 8, SIDE)])
def test_a_true_field_of_another_shape_refuses_its_row_before_any_pair_is_computed(shape, tmp_path, capsys,
                                                                                  no_pair_computed):
    """A field with the reference's spacing, origin and direction but another shape was accepted,
    then stopped the run at its pair ("field shape ... differs") naming neither pair nor file."""
    pictures_with_labels(tmp_path)
    write_displacement(np.zeros((2, SIDE, SIDE), np.float32), Geometry.identity(2), tmp_path / "field.nii.gz")
    write_displacement(np.zeros((2, *shape), np.float32), Geometry.identity(2), tmp_path / "cropped.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving,label,displacement\nreference.png,moving.png,label.png,field.nii.gz\n"
                     "reference.png,label.png,moving.png,cropped.nii.gz\n", encoding="utf-8")
    code = main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--methods", "identity+max"])
    assert code == 2
    error = capsys.readouterr().err
    cropped = tmp_path / "cropped.nii.gz"
    assert error == (f"unifuse evaluate: error: {pairs}: line 3 of the CSV, displacement {cropped}: "
                     f"the field's grid has shape {shape} but the reference's has {(SIDE, SIDE)}; give the field "
                     "computed on the reference grid\n")


@pytest.mark.parametrize("task", ["all", "ALL", "All"])
def test_the_task_named_like_the_summary_over_all_tasks_is_refused(task, tmp_path, capsys, no_pair_computed):
    """Pairs of a task named "all" joined the summary's all-tasks rows: counted twice, or vanishing."""
    pictures_with_labels(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving,label,task\nreference.png,moving.png,label.png,CT\n"
                     f"reference.png,label.png,moving.png,{task}\n", encoding="utf-8")
    code = main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--methods", "identity+max"])
    assert code == 2
    error = capsys.readouterr().err
    assert error == (f"unifuse evaluate: error: {pairs}: line 3 of the CSV: the task '{task}' is the name of the "
                     "summary over all tasks, whose rows it would join; name the task otherwise\n")


def test_a_blank_reference_with_a_true_field_scores_no_tissue_error_and_the_run_goes_on(tmp_path, capsys):
    """Its tissue mask is empty: the run stopped after the first pair ("mask: the mask selects no
    voxels"), writing nothing."""
    pictures_with_labels(tmp_path)
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(tmp_path / "blank.png")
    write_displacement(np.ones((2, SIDE, SIDE), np.float32), Geometry.identity(2), tmp_path / "field.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving,label,displacement\nreference.png,moving.png,label.png,field.nii.gz\n"
                     "blank.png,label.png,moving.png,field.nii.gz\n", encoding="utf-8")
    code = main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--methods", "identity+max",
                 "--baselines", "identity", "--fusion-rules", "max"])
    assert code == 0
    warning = (f"{tmp_path / 'blank.png'}: the reference shows no tissue, so epe_tissue (the end-point error over "
               "its tissue) is NaN for this pair and left out of the means")
    assert f"warning: pair label.png: {warning}" in capsys.readouterr().err
    assert f"- pair label.png: {warning}" in (tmp_path / "out" / "evaluation.md").read_text(encoding="utf-8")
    rows = {row["pair"]: row for row in read_csv(tmp_path / "out" / "per_pair.csv") if row["method"] == "identity+max"}
    assert math.isnan(float(rows["label.png"]["epe_tissue"]))
    assert float(rows["label.png"]["epe"]) == pytest.approx(float(rows["moving.png"]["epe"]))
    assert float(rows["moving.png"]["epe_tissue"]) > 0
    summary = next(row for row in read_csv(tmp_path / "out" / "evaluation.csv") if row["method"] == "identity+max")
    assert (summary["n"], summary["epe_n"], summary["epe_tissue_n"]) == ("2", "2", "1")


def test_harvard_pairs_never_score_a_case_the_checkpoints_run_recorded_for_training(tmp_path, capsys):
    """Another copy of the atlas (a case more or less) moves the split drawn over it; the cases the
    checkpoint's run recorded keep a case it trained on out of the validation pairs, and say which
    held-out cases this copy cannot score."""
    root = _two_task_atlas(tmp_path / "aanlib")

    def validation(recorded: dict) -> list:
        cases = checkpoint_split({**TWO_TASK_CHECKPOINT, "split": recorded}, None, None)
        return pairs_from_harvard(root, "val", ["CT", "PET"], None, seed=0, size=None, none_fraction=0.0, cases=cases,
                                  regime="mild")

    drawn = [pair.name for pair in pairs_from_harvard(root, "val", ["CT", "PET"], None, seed=0, size=None,
                                                      none_fraction=0.0, cases=checkpoint_split(
                                                          TWO_TASK_CHECKPOINT, None, None), regime="mild")]
    assert "warning: the checkpoint records no case split" in capsys.readouterr().out  # drawn again, as it says
    held_out = sorted({case_of(name.rsplit("/", 1)[1]) for name in drawn})
    trained_on = sorted({1, 2, 3, 4, 5, 6, 7} - set(held_out))
    as_recorded = validation({"train": [str(case) for case in trained_on], "validation": [str(case) for case in held_out]})
    assert [pair.name for pair in as_recorded] == drawn
    assert capsys.readouterr().out == ""
    # The run trained on the first held-out case and held out a case this copy draws for training.
    moved = held_out[0]
    swapped = trained_on[0]
    pairs = validation({"train": [str(case) for case in trained_on if case != swapped] + [str(moved)],
                        "validation": [str(case) for case in held_out if case != moved] + [str(swapped)]})
    assert moved not in {case_of(pair.name.rsplit("/", 1)[1]) for pair in pairs}
    assert [pair.name for pair in pairs] == [name for name in drawn if case_of(name.rsplit("/", 1)[1]) != moved]
    out = capsys.readouterr().out
    assert (f"this copy of the atlas's split puts case {moved} into validation, but the checkpoint's run had it for "
            "training: left out") in out
    assert f"case {swapped}, which the checkpoint's run held for validation, this copy of the atlas's split" in out
    # Another split asked for: the warning names the options, not the atlas copy.
    cases = checkpoint_split({**TWO_TASK_CHECKPOINT, "split": {"train": ["1", "3", "4", "6", "7"],
                                                               "validation": ["2", "5"]}}, 0.25, 2)
    with pytest.raises(InputError, match="no pairs in the val split"):  # seed 2 validates on cases 3 and 6 only
        pairs_from_harvard(root, "val", ["CT", "PET"], None, seed=0, size=None, none_fraction=0.0, cases=cases,
                           regime="mild")
    out = capsys.readouterr().out
    assert "the cases it recorded for training are left out of another split's validation pairs" in out
    assert "this copy" not in out and "not scored (leave out --val-fraction/--split-seed" in out


@pytest.mark.parametrize("name", ["unifuse-2d-harvard", "bsafusion-2d-harvard", "mmif-amin-2d-harvard"])
def test_the_bundled_2d_checkpoints_record_the_cases_they_held_out(name):
    recorded = read_metadata(name)["split"]
    # README: "the atlas cases the checkpoint never saw (CT case 34, PET case 30, SPECT case 10)".
    assert sorted(recorded["validation"], key=int) == ["10", "30", "34"]
    assert not set(recorded["train"]) & set(recorded["validation"])
