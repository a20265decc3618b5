"""`unifuse fuse --method NAME` for every method on a PNG pair, and what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from napari_unifuse.cli import main
from napari_unifuse.engine.methods import available_methods, split_name
from napari_unifuse.model.checkpoint import save_checkpoint
from napari_unifuse.model.networks import NETWORKS, build_network

# ANTs SyN and the dense MIND optimisation take seconds per pair; their registrations have their own tests.
METHODS = [name for name in available_methods() if not name.startswith(("ants+", "dense+"))]
METHODS.insert(METHODS.index("mmif-amin") + 1, "mmif-amin:sitk")


def blob(shape, shift=0.0):
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.exp(-3 * sum((g - shift) ** 2 for g in grids))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse-methods")
    torch.manual_seed(0)
    checkpoints = {name: save_checkpoint(build_network(name, "small", 2), root / f"{name}.safetensors")
                   for name in NETWORKS if name in available_methods()}
    Image.fromarray((255 * blob((40, 36))).astype(np.uint8)).save(root / "mri.png")
    colour = np.zeros((40, 36, 3), np.uint8)
    colour[..., 0] = (255 * blob((40, 36), 0.1)).astype(np.uint8)
    colour[..., 1] = colour[..., 0] // 3
    Image.fromarray(colour).save(root / "pet.png")
    return {"root": root, "checkpoints": checkpoints}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_fuses_a_png_pair(name, data, tmp_path, capsys):
    root = data["root"]
    checkpoint = data["checkpoints"].get(split_name(name)[0])
    extra = ["--checkpoint", checkpoint] if checkpoint is not None else []
    code = main(["fuse", "--reference", str(root / "mri.png"), "--moving", str(root / "pet.png"), "--out",
                 str(tmp_path), "--method", name, "--device", "cpu", *map(str, extra)])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "pet"
    fused = np.asarray(Image.open(out / "fused.png"))
    assert fused.shape == (40, 36, 3)  # the PET's colour is carried
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["method"]["name"] == name
    degradation = json.loads((out / "degradation.json").read_text())
    assert (degradation["predicted"] == "unknown") == (split_name(name)[0] != "unifuse")


def test_the_checkpoint_names_the_method_when_none_is_given(data, tmp_path):
    root = data["root"]
    assert main(["fuse", "--reference", str(root / "mri.png"), "--moving", str(root / "pet.png"), "--out",
                 str(tmp_path), "--checkpoint", str(data["checkpoints"]["mmif-amin"]), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "pet" / "provenance.json").read_text())["method"]["name"] == "mmif-amin"


def test_a_checkpoint_of_another_method_is_refused(data, tmp_path, capsys):
    root = data["root"]
    code = main(["fuse", "--reference", str(root / "mri.png"), "--moving", str(root / "pet.png"), "--out",
                 str(tmp_path / "out"), "--method", "unifuse", "--checkpoint", str(data["checkpoints"]["mmif-amin"])])
    assert code == 2
    assert "holds mmif-amin weights, not unifuse ones" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_3d_pair_given_to_a_2d_method_is_refused(data, tmp_path, capsys):
    import nibabel as nib

    volume = nib.Nifti1Image(blob((12, 16, 16)).astype(np.float32), np.eye(4))
    nib.save(volume, tmp_path / "a.nii.gz")
    nib.save(volume, tmp_path / "b.nii.gz")
    code = main(["fuse", "--reference", str(tmp_path / "a.nii.gz"), "--moving", str(tmp_path / "b.nii.gz"),
                 "--out", str(tmp_path / "out"), "--method", "mmif-amin"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mmif-amin fuses 2D images only" in err and "unifuse" in err
    assert not (tmp_path / "out").exists()


def test_fuse_says_in_one_line_when_the_chosen_registration_fails(tmp_path, capsys):
    grids = np.meshgrid(*(np.linspace(-1, 1, 40),) * 2, indexing="ij")
    Image.fromarray((255 * np.exp(-3 * sum(g**2 for g in grids))).astype(np.uint8)).save(tmp_path / "mri.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "flat.png")
    code = main(["fuse", "--reference", str(tmp_path / "mri.png"), "--moving", str(tmp_path / "flat.png"),
                 "--out", str(tmp_path / "out"), "--method", "sitk+max", "--device", "cpu"])
    error = capsys.readouterr().err
    assert code != 0 and "Traceback" not in error
    assert "SimpleITK registration failed on this pair" in error and "structural matching" in error
