"""Validation scores: the class accuracy split into clean and degraded samples."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.training import datasets
from napari_unifuse.training.validation import validate


def _loader(none_fraction: float) -> list[dict[str, torch.Tensor]]:
    pairs = datasets.PhantomPairs(seed=3, stream=datasets.VALIDATION_STREAM, none_fraction=none_fraction, length=8,
                                  spatial_dims=2, shapes=[(24, 48, 48)], crop=(32, 32))
    samples = [pairs[index] for index in range(len(pairs))]
    return [{key: torch.stack([sample[key] for sample in samples[start:start + 4]]) for key in samples[0]}
            for start in (0, 4)]


class _SaysNone(torch.nn.Module):
    """The tiny network with a head that names every sample "none": right on exactly the clean ones."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, moving: torch.Tensor, reference: torch.Tensor):
        output = self.network(moving, reference)
        logits = torch.zeros_like(output.class_logits)
        logits[:, DEGRADATION_CLASSES.index("none")] = 1.0
        return dataclasses.replace(output, class_logits=logits)


def test_class_accuracy_is_split_into_clean_and_degraded_samples(smallest_unifuse):
    loader = _loader(none_fraction=0.5)
    truth = torch.cat([batch["class_index"] for batch in loader])
    clean_fraction = float((truth == DEGRADATION_CLASSES.index("none")).float().mean())
    assert 0 < clean_fraction < 1, "the test needs clean and degraded samples"
    scores = validate(_SaysNone(smallest_unifuse(2)), loader, torch.device("cpu"))
    assert scores["class_accuracy"] == pytest.approx(clean_fraction)
    assert scores["class_accuracy_clean"] == 1.0
    assert scores["class_accuracy_degraded"] == 0.0


def test_a_split_without_clean_samples_has_no_clean_accuracy(smallest_unifuse):
    scores = validate(smallest_unifuse(2), _loader(none_fraction=0.0), torch.device("cpu"))
    assert math.isnan(scores["class_accuracy_clean"])
    assert 0.0 <= scores["class_accuracy_degraded"] <= 1.0


def test_records_hold_each_sample_with_its_prediction_and_visibility(smallest_unifuse):
    loader = _loader(none_fraction=0.5)
    records: list[dict] = []
    scores = validate(_SaysNone(smallest_unifuse(2)), loader, torch.device("cpu"), records=records)
    truth = torch.cat([batch["class_index"] for batch in loader]).tolist()
    assert [record["class_index"] for record in records] == truth
    assert {record["predicted_class"] for record in records} == {DEGRADATION_CLASSES.index("none")}
    assert all(sum(record["probabilities"]) == pytest.approx(1.0) for record in records)
    right = [record["class_index"] == record["predicted_class"] for record in records]
    assert sum(right) / len(right) == pytest.approx(scores["class_accuracy"])
    # The input's SSIM to its label: below 1 for a degraded input, 1 for one that is its label.
    clean = DEGRADATION_CLASSES.index("none")
    assert all(record["ssim_input"] < 0.99 for record in records if record["class_index"] != clean)
    same = [{**batch, "moving": batch["label"]} for batch in loader]
    records.clear()
    validate(smallest_unifuse(2), same, torch.device("cpu"), records=records)
    assert [record["ssim_input"] for record in records] == pytest.approx([1.0] * len(truth), abs=1e-5)
