"""`unifuse evaluate`'s copy pipelines: what gain_min is 0 for, and the † check against every fusion rule."""

from __future__ import annotations

from scipy import ndimage

from napari_unifuse.cli import evaluate as evaluate_module
from napari_unifuse.cli.evaluate import (
    METRIC_COLUMNS,
    EvaluationPair,
    copies_outscoring_fusion,
    evaluate_pair,
    fooled_markdown,
    summarise,
)
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.io import ImageVolume
from napari_unifuse.io.image import Geometry


def unit(image):
    return ((image - image.min()) / (image.max() - image.min())).astype("float32")


def test_copy_moving_of_a_blurred_moving_image_scores_above_zero_on_gain_min():
    """gain_min is 0 for a copy of the reference or of the label; copy-moving copies the aligned,
    still degraded moving image, which a blur brings closer to a CT reference than the label is."""
    phantoms = make_brain_phantom_slices((48, 48), modalities=("ct", "t1"))
    reference, label = unit(phantoms["ct"].array), unit(phantoms["t1"].array)
    blurred = unit(ndimage.gaussian_filter(label, 2.0))
    geometry = Geometry.identity(2)
    pair = EvaluationPair("p", "CT-MRI", ImageVolume(reference, geometry), ImageVolume(blurred, geometry), label)
    rows = dict(evaluate_pair(pair, None, ["identity"], ["average"]))
    assert rows["identity + copy-reference"]["gain_min"] == 0.0
    assert rows["identity + copy-moving"]["gain_min"] > 0.05
    helped = " ".join(evaluate_module.__doc__.split())
    assert "0 for a copy of the reference or of the label; ``copy-moving`` copies the aligned, still degraded" in helped


def summary_of(means: dict[str, dict[str, float]], task: str = "CT-MRI") -> list[dict]:
    records = [{"task": task, "method": method, "pair": "p",
                **{column: columns.get(column, float("nan")) for column in METRIC_COLUMNS}}
               for method, columns in means.items()]
    return summarise(records)


def test_a_copy_beating_any_fusion_rule_of_its_registration_is_marked_not_only_the_average():
    """copy-moving outscored matching + max and + wavelet on gain_min (3D CT phantoms) unmarked,
    since the copies were compared with `<reg> + average` alone."""
    summary = summary_of({
        "matching + max": {"gain_min": 0.02, "Q_mse": 0.02},
        "matching + average": {"gain_min": 0.06, "Q_mse": 0.03},
        "matching + wavelet": {"gain_min": 0.01, "Q_mse": 0.05},
        "matching + copy-reference": {"gain_min": 0.0, "Q_mse": 0.06},
        "matching + copy-moving": {"gain_min": 0.04, "Q_mse": 0.04},
        "sitk + max": {"gain_min": 0.5, "Q_mse": 0.001},  # another registration: not the copies' comparator
    })
    fooled = copies_outscoring_fusion(summary, "matching")
    assert fooled == {"Q_mse": ["CT-MRI: copy-moving beats wavelet"],
                      "gain_min": ["CT-MRI: copy-moving beats max/wavelet"]}
    sentence = fooled_markdown(fooled, summary, "matching", ["matching", "sitk"], ["max", "average", "wavelet"])
    assert "`matching + max` or `matching + average` or `matching + wavelet`" in sentence
    assert "gain_min (CT-MRI: copy-moving beats max/wavelet)" in sentence


def test_the_copy_check_runs_with_any_fusion_rule_and_is_skipped_without_one():
    only_max = summary_of({"matching + max": {"Q_ssim": 1.4}, "matching + copy-reference": {"Q_ssim": 1.5}})
    fooled = copies_outscoring_fusion(only_max, "matching")
    assert fooled == {"Q_ssim": ["CT-MRI: copy-reference beats max"]}
    no_fusion = summary_of({"matching + copy-reference": {"Q_ssim": 1.5}})
    assert copies_outscoring_fusion(no_fusion, "matching") == {}
    skipped = fooled_markdown({}, no_fusion, "matching", ["matching"], [])
    assert skipped.startswith("Copy check skipped") and "give --fusion-rules any of max, average, wavelet" in skipped


def test_a_copy_check_skipped_for_want_of_the_copies_registration_says_to_add_it_to_the_baselines():
    """With `--baselines ants --fusion-rules average` the copies sit on identity, computed for them
    alone: the check was skipped saying to give --fusion-rules, although average had been given."""
    summary = summary_of({"ants + average": {"Q_ssim": 1.4}, "identity + copy-reference": {"Q_ssim": 1.5},
                          "identity + copy-moving": {"Q_ssim": 1.3}})
    assert copies_outscoring_fusion(summary, "identity") == {}
    skipped = fooled_markdown({}, summary, "identity", ["ants"], ["average"])
    assert skipped.startswith("Copy check skipped") and "add `matching` or `identity` to --baselines" in skipped
    assert "--fusion-rules" not in skipped
    neither = fooled_markdown({}, summary_of({"identity + copy-reference": {"Q_ssim": 1.5}}), "identity", ["ants"], [])
    assert "add `matching` or `identity` to --baselines and give --fusion-rules any of max, average, wavelet" in neither


def test_the_help_says_what_the_copy_check_needs():
    helped = " ".join(evaluate_module.__doc__.split())
    assert "The check needs that registration among ``--baselines`` and a ``--fusion-rules`` rule" in helped


def test_a_copy_check_with_its_registration_and_rules_given_but_no_fusion_scored_says_so():
    """Every pair of the regime failed: nothing is missing from the command, so none is named."""
    summary = summary_of({"matching + copy-reference": {"Q_ssim": 1.5}})
    skipped = fooled_markdown({}, summary, "matching", ["matching", "identity"], ["max"])
    assert skipped.startswith("Copy check skipped") and "no pair of this regime was scored" in skipped
    assert "to run it" not in skipped
