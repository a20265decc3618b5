"""napari sample data: three layers per sample, placed in world mm, carrying the ground truth."""

import importlib
from pathlib import Path

import napari
import numpy as np
import pytest
import yaml

from napari_unifuse.data import samples
from napari_unifuse.data.misalign import warp_array

MANIFEST = Path(__file__).resolve().parents[2] / "napari.yaml"


def manifest_sample_functions():
    manifest = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    commands = {c["id"]: c["python_name"] for c in manifest["contributions"]["commands"]}
    return [commands[s["command"]] for s in manifest["contributions"]["sample_data"]]


@pytest.mark.parametrize("python_name", manifest_sample_functions())
def test_sample_layers(python_name):
    module, function = python_name.split(":")
    layers = getattr(importlib.import_module(module), function)()

    roles = [kwargs["metadata"]["unifuse"]["role"] for _, kwargs, _ in layers]
    assert roles == ["reference", "moving", "label"]
    assert all(layer_type == "image" for _, _, layer_type in layers)
    (reference, ref_kwargs, _), (moving, moving_kwargs, _), (label, label_kwargs, _) = layers
    assert label_kwargs["visible"] is False
    info = moving_kwargs["metadata"]["unifuse"]
    assert info["degradation"] in python_name and info["class_index"] > 0
    u = info["displacement"]
    assert reference.shape == moving.shape == label.shape
    assert u.shape == (reference.ndim, *reference.shape)
    expected = samples.SAMPLE_SHAPE_3D if reference.ndim == 3 else samples.SAMPLE_SHAPE_2D
    assert reference.shape == expected

    # The ground truth is clean and aligned: the true field maps the moving image onto it far
    # better than leaving it where it is (degradation keeps the match below perfect).
    def error(a):
        return np.abs(a - label).mean()

    assert error(warp_array(moving, u, order=3)) < 0.6 * error(moving)

    # napari builds the layers, and voxel (0, ..) sits at the geometry's world origin.
    for data, kwargs, layer_type in layers:
        layer = napari.layers.Layer.create(data, kwargs, layer_type)
        origin = np.asarray(kwargs["metadata"]["unifuse"]["geometry"]["origin"])
        np.testing.assert_allclose(layer.data_to_world(np.zeros(data.ndim)), origin, atol=1e-6)


def test_samples_are_cached_but_layers_own_their_data():
    first = samples.t1_t2_motion_3d()
    first[1][0][:] = 0
    again = samples.t1_t2_motion_3d()
    assert again[1][0].max() > 0


def test_the_bundled_3d_samples_are_the_1mm_phantoms_at_full_size():
    """What napari opens (the tests shrink it): the whole head on a 1 mm grid."""
    from napari_unifuse.data.phantoms import brain_tissue_fractions

    spacing = brain_tissue_fractions(samples.FULL_SIZE_SHAPE_3D)["air"].geometry.spacing
    np.testing.assert_allclose(spacing, 1.0, atol=0.01)


@pytest.mark.parametrize("python_name", manifest_sample_functions())
def test_each_sample_layer_hands_its_modality_to_the_engine(python_name):
    """The workbench reads a layer through layer_to_volume: without the sample's modality in the
    volume's metadata, normalisation guessed it (the PET read as MR) and the class call was caveated."""
    from napari_unifuse._napari_io import layer_to_volume
    from napari_unifuse.io.normalize import intensity_mapping

    module, function = python_name.split(":")
    for data, kwargs, layer_type in getattr(importlib.import_module(module), function)():
        volume = layer_to_volume(napari.layers.Layer.create(data, kwargs, layer_type))
        assert volume.metadata["modality"] == kwargs["metadata"]["unifuse"]["modality"]
        assert intensity_mapping(volume).reason == "modality recorded in the image metadata"
