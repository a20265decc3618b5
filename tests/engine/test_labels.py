"""A run's ground-truth label: refused where it cannot be scored against, its metrics in the model's units."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.classes import DEGRADATION_CLASSES
from napari_unifuse.engine.labels import label_coverage_warnings, label_in_model_units, label_metrics
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, IntensityMapping
from napari_unifuse.metrics import registration_metrics

CT_WINDOW = IntensityMapping("window", "ct", -1000.0, 2000.0)


def picture(shape=(32, 28), origin=(0.0, 0.0), source="label.nii.gz", ndim=2) -> ImageVolume:
    yy, xx = np.indices(shape[-2:])
    array = np.broadcast_to(((yy - 14) ** 2 + (xx - 12) ** 2 < 64).astype(np.float32), shape)
    origin = origin if ndim == 2 else (0.0, *origin)
    return ImageVolume(np.array(array), Geometry(np.ones(ndim), np.array(origin, float), np.eye(ndim)), source=source)


def test_a_label_covering_the_reference_needs_no_word():
    assert label_coverage_warnings(picture(), picture(source="reference.png")) == []


def test_a_label_covering_under_half_the_reference_is_a_warning_naming_it():
    # 21 of the reference's 28 columns lie beyond the label's: a quarter of the grid is covered.
    warnings = label_coverage_warnings(picture(origin=(0.0, 21.0)), picture(source="reference.png"))
    assert warnings == ["label.nii.gz: the label covers only 25 % of the reference grid in space; elsewhere the "
                        "label metrics compare the aligned image with the moving image's background (the bottom of "
                        "its intensity window, 0 in the model's units)"]


@pytest.mark.parametrize(("label", "problem"), [
    (picture(origin=(500.0, 500.0)), "the label does not overlap the reference (reference.png) in space"),
    (picture(shape=(3, 32, 28), ndim=3), "the label is 3D but the reference (reference.png) is 2D; give a 2D label"),
])
def test_a_label_that_cannot_be_scored_against_is_refused_naming_it(label, problem):
    with pytest.raises(InputError) as refused:
        label_coverage_warnings(label, picture(source="reference.png"))
    assert refused.value.source == "label.nii.gz" and refused.value.problem.startswith(problem)


def test_in_memory_images_are_named_by_their_role_not_none():
    warnings = label_coverage_warnings(picture(origin=(0.0, 21.0), source=None), picture(source=None))
    assert len(warnings) == 1 and warnings[0].startswith("label: the label covers only 25 %")
    with pytest.raises(InputError) as refused:
        label_coverage_warnings(picture(origin=(500.0, 500.0), source=None), picture(source=None))
    assert str(refused.value).startswith("the label does not overlap the reference in space")


def ct_result(aligned_hu: np.ndarray, geometry: Geometry) -> FusionResult:
    """A result whose moving image went through the CT window, as the engine records it."""
    return FusionResult(
        fused=ImageVolume(CT_WINDOW.apply(aligned_hu), geometry), aligned=ImageVolume(aligned_hu, geometry),
        displacement=np.zeros((geometry.ndim, *aligned_hu.shape), np.float32), class_names=DEGRADATION_CLASSES,
        class_probs={}, slice_class_probs=np.zeros((1, len(DEGRADATION_CLASSES))), output_extension="nii.gz",
        provenance={"intensity_mappings": dict.fromkeys(("reference", "moving"), CT_WINDOW.to_dict())})


def test_the_label_metrics_compare_both_images_in_the_moving_images_model_units():
    """A CT label with -3024 padding and metal: scored through the CT window, whatever the label's
    own display range."""
    rng = np.random.default_rng(0)
    label_hu = (-1000.0 + 1800.0 * rng.random((32, 28))).astype(np.float32)
    label_hu[:, :4], label_hu[10, 10] = -3024.0, 3071.0
    aligned_hu = np.roll(label_hu, 1, axis=1)
    geometry = Geometry(np.ones(2), np.zeros(2), np.eye(2))
    result = ct_result(aligned_hu, geometry)
    label_units = label_in_model_units(result, ImageVolume(label_hu, geometry))
    np.testing.assert_allclose(label_units, CT_WINDOW.apply(label_hu), atol=1e-6)
    expected = registration_metrics(CT_WINDOW.apply(aligned_hu), CT_WINDOW.apply(label_hu))
    assert label_metrics(result, label_units) == pytest.approx(expected, rel=1e-6)


def test_a_one_slice_volume_is_scored_as_the_2d_image_it_was_fused_as():
    """A 3D SSIM window cannot fit in one slice: the slice is scored as a picture, SSIM included."""
    rng = np.random.default_rng(1)
    label_hu = (-1000.0 + 1800.0 * rng.random((1, 32, 28))).astype(np.float32)
    geometry = Geometry(np.ones(3), np.zeros(3), np.eye(3))
    result = ct_result(np.roll(label_hu, 1, axis=2), geometry)
    metrics = label_metrics(result, label_in_model_units(result, ImageVolume(label_hu, geometry)))
    assert metrics == pytest.approx(registration_metrics(CT_WINDOW.apply(result.aligned.array[0]),
                                                         CT_WINDOW.apply(label_hu[0])), rel=1e-6)
    assert np.isfinite(metrics["ssim"])
