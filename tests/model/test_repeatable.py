"""The structural matching gives the same field whatever the caller's torch thread count.

On this 256² cross-modal pair the matching without ``model.repeatable``'s pin lands 2.1 px apart
on one thread and on two (measured; 128² tensors are too small for torch to split their sums)."""

import threading

import numpy as np
import pytest
import torch

from napari_unifuse.data.misalign import RandomMisalignment
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.model.matching import structural_matching
from napari_unifuse.model.repeatable import one_thread


@pytest.fixture(scope="module")
def misaligned_ct_pair() -> tuple[torch.Tensor, torch.Tensor]:
    slices = make_brain_phantom_slices((256, 256), ("t1", "ct"))
    reference, label = slices["t1"].array, slices["ct"].array
    label = (label - label.min()) / (label.max() - label.min())
    draw = RandomMisalignment(max_translation_fraction=0.125, max_elastic_fraction=0.03).draw(
        reference.shape, np.random.default_rng(0))
    return (torch.from_numpy(draw.apply(label))[None, None].float(),
            torch.from_numpy(reference)[None, None].float())


def test_the_matching_does_not_depend_on_the_thread_count(misaligned_ct_pair, two_threads):
    moving, reference = misaligned_ct_pair
    on_two = structural_matching(moving, reference, step=4, search_range=32)
    assert torch.get_num_threads() == 2  # the caller's setting is given back
    torch.set_num_threads(1)
    on_one = structural_matching(moving, reference, step=4, search_range=32)
    assert torch.equal(on_one, on_two)
    assert on_one.abs().max() > 1.0  # a real motion, not a field that is zero either way


def test_a_worker_thread_gets_the_same_field(misaligned_ct_pair, two_threads):
    """The workbench runs the engine on a worker thread, whose OpenMP pool is its own."""
    moving, reference = misaligned_ct_pair
    fields = []
    worker = threading.Thread(target=lambda: fields.append(
        structural_matching(moving, reference, step=4, search_range=32)))
    worker.start()
    worker.join()
    torch.set_num_threads(1)
    assert torch.equal(fields[0], structural_matching(moving, reference, step=4, search_range=32))


def test_one_thread_restores_the_setting_after_an_error(two_threads):
    with pytest.raises(ValueError), one_thread():
        assert torch.get_num_threads() == 1
        raise ValueError
    assert torch.get_num_threads() == 2
