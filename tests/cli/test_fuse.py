"""`unifuse fuse` end to end with a randomly initialised small UniFuse saved as a real checkpoint."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from napari_unifuse.cli import fuse as fuse_module
from napari_unifuse.cli import main
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.io import read_image
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import save_checkpoint

QUALITY_OUTPUTS = {"invented.nii.gz", "lost.nii.gz", "restoration_change.nii.gz", "uncertainty.nii.gz", "quality.json"}
RESULTS_PNG = {"fused.png", "aligned.png", "displacement.nii.gz", "degradation.json", "provenance.json"}
OUTPUTS_PNG = RESULTS_PNG | QUALITY_OUTPUTS
OUTPUTS_NIFTI = {"fused.nii.gz", "aligned.nii.gz", "displacement.nii.gz", "degradation.json", "provenance.json",
                 *QUALITY_OUTPUTS}


def blob(shape, centre_shift=0.0):
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.exp(-3 * sum((g - centre_shift) ** 2 for g in grids))


def save_nifti(array, affine, path):
    image = nib.Nifti1Image(np.asarray(array), affine)
    # Scanner-anatomical codes on both forms: every reader (nibabel, ITK) agrees on the geometry.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse-data")
    torch.manual_seed(0)
    checkpoints = {
        dims: save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=dims)), root / f"tiny-{dims}d.safetensors",
                              {"seed": 0, "note": "random weights for tests"})
        for dims in (2, 3)
    }
    torch.manual_seed(1)
    save_checkpoint(UniFuse(UniFuseConfig.small(spatial_dims=2)), root / "other-2d.safetensors", {"seed": 1})
    grey = (255 * blob((32, 28))).astype(np.uint8)
    colour = np.zeros((32, 28, 3), np.uint8)
    colour[..., 0] = (255 * blob((32, 28), 0.15)).astype(np.uint8)
    colour[..., 1] = colour[..., 0] // 3
    Image.fromarray(grey).save(root / "mri.png")
    Image.fromarray(colour).save(root / "pet7.png")
    Image.fromarray(colour).save(root / "pet8.png")
    Image.fromarray(np.roll(colour, 2, axis=0)).save(root / "pet8_label.png")

    # nibabel arrays are (x, y, z). Anisotropic, flipped x, non-zero origins; different grids.
    reference_affine = np.array([[-1.2, 0, 0, 20.0], [0, 0.9, 0, -15.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
    moving_affine = np.array([[-1.0, 0, 0, 19.0], [0, 1.1, 0, -14.0], [0, 0, 2.5, 8.0], [0, 0, 0, 1]])
    save_nifti((1000 * blob((14, 16, 12))).astype(np.float32), reference_affine, root / "t1.nii.gz")
    save_nifti((800 * blob((16, 13, 9), 0.1)).astype(np.float32), moving_affine, root / "case7.nii.gz")
    save_nifti((800 * blob((16, 13, 9))).astype(np.float32), moving_affine, root / "case7_label.nii.gz")
    save_nifti(np.zeros((8, 8, 8, 2), np.float32), reference_affine, root / "series4d.nii.gz")
    save_nifti(np.full((8, 8, 8), np.nan, np.float32), reference_affine, root / "nan.nii.gz")
    return {"root": root, "checkpoints": checkpoints}


def fuse(*argv):
    return main(["fuse", *map(str, argv)])


def test_png_pair_gives_rgb_fused_png_and_all_outputs(data, tmp_path, capsys):
    root, checkpoint = data["root"], data["checkpoints"][2]
    code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png",
                "--out", tmp_path, "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0, capsys.readouterr().err

    case = tmp_path / "pet7"
    assert {path.name for path in case.iterdir()} == OUTPUTS_PNG
    with Image.open(case / "fused.png") as fused:
        assert fused.mode == "RGB" and fused.size == (28, 32)
    field = sitk.ReadImage(str(case / "displacement.nii.gz"))
    assert field.GetSize() == (28, 32) and field.GetNumberOfComponentsPerPixel() == 2

    degradation = json.loads((case / "degradation.json").read_text(encoding="utf-8"))
    assert degradation["classes"] == list(DEGRADATION_CLASSES)
    assert sum(degradation["global"].values()) == pytest.approx(1.0, abs=1e-5)
    assert degradation["predicted"] in DEGRADATION_CLASSES
    np.testing.assert_allclose(np.sum(degradation["per_slice"]["probabilities"], axis=1), 1.0, atol=1e-5)

    provenance = json.loads((case / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert provenance["inputs"]["moving"]["sha256"] == hashlib.sha256((root / "pet7.png").read_bytes()).hexdigest()
    assert provenance["device"] == "cpu"
    assert provenance["model_config"]["spatial_dims"] == 2
    assert {"torch", "numpy", "napari_unifuse"} <= set(provenance["versions"])


def test_nifti_pair_outputs_keep_the_reference_geometry(data, tmp_path, capsys):
    root = data["root"]
    code = fuse("--reference", root / "t1.nii.gz", "--moving", root / "case7.nii.gz",
                "--label", root / "case7_label.nii.gz", "--out", tmp_path,
                "--checkpoint", data["checkpoints"][3], "--device", "cpu", "--tile-size", "8")
    assert code == 0, capsys.readouterr().err

    case = tmp_path / "case7"
    assert {path.name for path in case.iterdir()} == OUTPUTS_NIFTI | {"metrics.json"}
    reference = sitk.ReadImage(str(root / "t1.nii.gz"))
    for name in ("fused.nii.gz", "aligned.nii.gz", "displacement.nii.gz"):
        written = sitk.ReadImage(str(case / name))
        assert written.GetSize() == reference.GetSize(), name
        np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(nib.load(case / "fused.nii.gz").affine, nib.load(root / "t1.nii.gz").affine, atol=1e-4)
    assert sitk.ReadImage(str(case / "displacement.nii.gz")).GetNumberOfComponentsPerPixel() == 3

    degradation = json.loads((case / "degradation.json").read_text(encoding="utf-8"))
    assert degradation["per_slice"]["axis"] == "z"
    assert len(degradation["per_slice"]["probabilities"]) == reference.GetSize()[2]
    metrics = json.loads((case / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics) == {"mse", "ncc", "ssim"} and all(np.isfinite(list(metrics.values())))
    assert json.loads((case / "provenance.json").read_text(encoding="utf-8"))["tile_count"] > 1


def test_a_one_slice_volume_gets_the_label_metrics_of_the_2d_image_it_is_fused_as(data, tmp_path, capsys):
    """A 32×28×1 NIfTI is fused as a 2D image: its label metrics were refused after the whole fusion
    (3D SSIM needs 7 slices) and nothing was written."""
    root, affine = tmp_path / "in", np.diag([0.9, 0.9, 3.0, 1.0])
    root.mkdir()
    save_nifti((1000 * blob((32, 28)))[..., None].astype(np.float32), affine, root / "reference.nii.gz")
    save_nifti((800 * blob((32, 28), 0.1))[..., None].astype(np.float32), affine, root / "moving.nii.gz")
    save_nifti((800 * blob((32, 28)))[..., None].astype(np.float32), affine, root / "label.nii.gz")
    code = fuse("--reference", root / "reference.nii.gz", "--moving", root / "moving.nii.gz",
                "--label", root / "label.nii.gz", "--out", tmp_path / "out",
                "--checkpoint", data["checkpoints"][2], "--device", "cpu", "--no-quality")
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "moving" / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics) == {"mse", "ncc", "ssim"} and all(np.isfinite(list(metrics.values())))


def labels_beside(root: Path, reference_shape) -> dict[str, Path]:
    """Labels of a 2D picture pair that its metrics cannot use: one 500 mm away from the picture
    (which lies at the origin), one 3D, one covering a third of its columns."""
    far = sitk.GetImageFromArray((800 * blob(reference_shape)).astype(np.float32))
    far.SetOrigin((500.0, 500.0))
    sitk.WriteImage(far, str(root / "far.nii.gz"))
    save_nifti((800 * blob((*reference_shape, 3))).astype(np.float32), np.eye(4), root / "volume.nii.gz")
    Image.fromarray((255 * blob(reference_shape))[:, : reference_shape[1] // 3].astype(np.uint8)).save(
        root / "third.png")
    return {"far": root / "far.nii.gz", "volume": root / "volume.nii.gz", "third": root / "third.png"}


@pytest.mark.parametrize(("label", "problem"), [
    ("far", "the label does not overlap the reference ({reference}) in space"),
    ("volume", "the label is 3D but the reference ({reference}) is 2D; give a 2D label"),
])
def test_a_label_the_metrics_cannot_use_is_refused_before_the_fusion(data, tmp_path, capsys, monkeypatch, label,
                                                                     problem):
    """A label 500 mm away got metrics.json against zeros without a word; a 3D label for a 2D pair
    failed only after the whole fusion, its message ending in "(None)"."""
    from napari_unifuse.engine.inference import FusionEngine

    def fusion_not_expected(*args, **kwargs):
        raise AssertionError("the pair was fused")

    monkeypatch.setattr(FusionEngine, "run_fusion", fusion_not_expected)
    reference = data["root"] / "mri.png"
    labels = labels_beside(tmp_path, (32, 28))

    code = fuse("--reference", reference, "--moving", data["root"] / "pet7.png", "--label", labels[label],
                "--out", tmp_path / "out", *CHEAP)

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"unifuse fuse: error: {labels[label]}: {problem.format(reference=reference)}")
    assert err.count("\n") == 1 and "None" not in err
    assert not (tmp_path / "out").exists()


def test_a_label_covering_under_half_the_reference_is_said_and_recorded_and_a_batch_goes_on(data, tmp_path, capsys):
    """Labels are checked as moving images are: under half the reference grid is a warning (printed,
    in provenance.json); none of it fails that pair alone."""
    root = data["root"]
    labels = labels_beside(tmp_path, (32, 28))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving,label\n{root / 'mri.png'},{root / 'pet7.png'},{labels['far']}\n"
                     f"{root / 'mri.png'},{root / 'pet8.png'},{labels['third']}\n", encoding="utf-8")

    assert fuse("--pairs", pairs, "--out", tmp_path / "out", *CHEAP) == 2

    err = capsys.readouterr().err
    warning = f"{labels['third']}: the label covers only 32.1 % of the reference grid in space"
    assert f"[2/2] pet8: warning: {warning}" in err
    assert f"[1/2] pet7: error: {labels['far']}: the label does not overlap" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert [outcome["status"] for outcome in summary["outcomes"]] == ["failed", "done"]
    provenance = json.loads((tmp_path / "out" / "pet8" / "provenance.json").read_text(encoding="utf-8"))
    assert any(recorded.startswith(warning) for recorded in provenance["warnings"])
    assert (tmp_path / "out" / "pet8" / "metrics.json").is_file()


def test_a_volume_too_thin_for_the_ssim_window_gets_nan_ssim_and_the_other_label_metrics(data, tmp_path, capsys):
    """Five slices: the 7-voxel 3D SSIM window does not fit, so SSIM is NaN (it was an error after the
    whole fusion, and nothing was written); MSE and NCC still apply."""
    root, affine = tmp_path / "in", np.diag([1.0, 1.0, 2.0, 1.0])
    root.mkdir()
    save_nifti((1000 * blob((16, 14, 5))).astype(np.float32), affine, root / "reference.nii.gz")
    save_nifti((800 * blob((16, 14, 5), 0.1)).astype(np.float32), affine, root / "moving.nii.gz")
    save_nifti((800 * blob((16, 14, 5))).astype(np.float32), affine, root / "label.nii.gz")
    code = fuse("--reference", root / "reference.nii.gz", "--moving", root / "moving.nii.gz",
                "--label", root / "label.nii.gz", "--out", tmp_path / "out",
                "--checkpoint", data["checkpoints"][3], "--device", "cpu", "--no-quality")
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "moving" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["ssim"] is None  # NaN, written as JSON's null
    assert np.isfinite(metrics["mse"]) and np.isfinite(metrics["ncc"])


def test_a_colour_result_on_a_grid_with_geometry_is_written_as_metaimage(data, tmp_path, capsys):
    """An RGB PET as MetaImage onto a 2D NIfTI MRI: PNG would drop the reference's spacing and
    origin, NIfTI holds no colour; MetaImage keeps both."""
    root = data["root"]
    reference = sitk.GetImageFromArray((1000 * blob((32, 28))).astype(np.float32))
    reference.SetSpacing((0.8, 0.9))
    reference.SetOrigin((-50.0, -40.0))
    sitk.WriteImage(reference, str(tmp_path / "mri.nii.gz"))
    with Image.open(root / "pet7.png") as colour:
        moving = sitk.GetImageFromArray(np.asarray(colour), isVector=True)
    moving.CopyInformation(reference)
    sitk.WriteImage(moving, str(tmp_path / "pet.mha"))

    code = fuse("--reference", tmp_path / "mri.nii.gz", "--moving", tmp_path / "pet.mha", "--out", tmp_path / "out",
                "--method", "identity+average", "--no-quality")

    assert code == 0, capsys.readouterr().err
    assert "PNG" not in capsys.readouterr().err
    for name in ("fused.mha", "aligned.mha"):
        written = sitk.ReadImage(str(tmp_path / "out" / "pet" / name))
        assert written.GetNumberOfComponentsPerPixel() == 3, name
        np.testing.assert_allclose(written.GetSpacing(), (0.8, 0.9), atol=1e-6, err_msg=name)
        np.testing.assert_allclose(written.GetOrigin(), (-50.0, -40.0), atol=1e-6, err_msg=name)


def test_the_metrics_of_a_colour_moving_image_against_itself_as_label_are_perfect(data, tmp_path, capsys):
    """The PET label (8-bit RGB) was resampled to 0-255 floats, its luma clipped to a mask: NCC 0.69
    for a clean co-registered pair scored against its own moving image."""
    root = data["root"]
    code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--label", root / "pet7.png",
                "--out", tmp_path / "out", "--method", "identity+max", "--no-quality")
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "pet7" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["ncc"] > 0.999 and metrics["mse"] < 1e-5


def test_a_scanner_image_onto_a_png_is_written_in_its_units_and_the_guessed_overlay_is_said(data, tmp_path, capsys):
    """A CT in HU onto a PNG MRI: its aligned image cannot go to PNG (8-bit), which failed after the
    whole run; and a picture has no position, so the two are overlaid by a guess."""
    root = data["root"]
    with Image.open(root / "mri.png") as picture:
        side = picture.size
    ct = sitk.GetImageFromArray((3000 * blob(side[::-1]) - 1000).astype(np.float32))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))

    code = fuse("--reference", root / "mri.png", "--moving", tmp_path / "ct.nii.gz", "--out", tmp_path / "out",
                "--method", "identity+average", "--no-quality")

    assert code == 0
    assert "mri.png is a picture without position or pixel size" in capsys.readouterr().err
    aligned = read_image(tmp_path / "out" / "ct" / "aligned.mha")
    assert aligned.array.min() < -900 and aligned.array.max() > 1900  # HU kept
    assert (tmp_path / "out" / "ct" / "fused.mha").is_file()


@pytest.mark.parametrize("moving_side", [120, 4])
def test_two_pictures_of_different_sizes_are_said_to_meet_at_their_first_pixel(tmp_path, capsys, moving_side):
    """Pictures have no headers: the warning spoke of headers, affines and centres mm apart, and a
    picture slightly smaller than the other (a crop) was overlaid from its corner without a word."""
    grey = (255 * blob((128, 128))).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "mri.png")
    Image.fromarray(grey[:moving_side, :moving_side]).save(tmp_path / "crop.png")

    code = fuse("--reference", tmp_path / "mri.png", "--moving", tmp_path / "crop.png", "--out", tmp_path / "out",
                "--method", "identity+average", "--no-quality")

    err = capsys.readouterr().err
    assert code == 0, err
    assert f"the two pictures differ in size (128×128 pixels and {moving_side}×{moving_side} pixels)" in err
    assert "header" not in err and "affine" not in err


@pytest.mark.parametrize(("moving", "cwd"), [(".", "series7"), ("..", "series7/work"), ("../series7/", "series7")])
def test_a_series_folder_given_as_a_dot_path_names_its_own_pair_folder(tmp_path, monkeypatch, moving, cwd):
    """``--moving ..`` (a DICOM folder, from a folder inside it) used to put the outputs in ``--out/..``."""
    (tmp_path / "series7" / "work").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / cwd)

    assert fuse_module.Pair(Path("reference.nii.gz"), Path(moving)).name == "series7"


def outputs_touched(out):
    """Modification times of every pair's outputs (the batch summary is rewritten by every run)."""
    return {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.name != "summary.json"}


def test_csv_batch_resolves_relative_paths_and_resumes(data, tmp_path, capsys):
    root = data["root"]
    pairs = root / "pairs.csv"
    with pairs.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["reference", "moving", "label"])
        writer.writerow(["mri.png", "pet7.png", ""])
        writer.writerow(["mri.png", "pet8.png", "pet8_label.png"])
    argv = ("--pairs", pairs, "--out", tmp_path, "--checkpoint", data["checkpoints"][2], "--device", "cpu")

    assert fuse(*argv) == 0, capsys.readouterr().err
    assert {path.name for path in (tmp_path / "pet7").iterdir()} == OUTPUTS_PNG
    assert {path.name for path in (tmp_path / "pet8").iterdir()} == OUTPUTS_PNG | {"metrics.json"}
    first_run = outputs_touched(tmp_path)
    capsys.readouterr()

    assert fuse(*argv) == 0
    out = capsys.readouterr().out
    assert out.count("skipped, already done") == 2
    assert outputs_touched(tmp_path) == first_run
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [outcome["status"] for outcome in summary["outcomes"]] == ["skipped", "skipped"]

    assert fuse(*argv, "--overwrite") == 0
    assert "skipped" not in capsys.readouterr().out
    redone = tmp_path / "pet7" / "provenance.json"
    assert redone.stat().st_mtime_ns > first_run[redone]


def test_a_batch_of_moving_files_of_one_name_gets_a_folder_per_pair(data, tmp_path, capsys):
    """``unifuse synth --pairs`` writes 0000/moving.png, 0001/moving.png, ...: fusing them as a batch
    used to be refused as "several pairs would write to the same output folder"."""
    for case in ("0000", "0001"):
        (tmp_path / "synth" / case).mkdir(parents=True)
        for name in ("mri.png", "pet7.png"):
            (tmp_path / "synth" / case / name.replace("pet7", "moving")).write_bytes((data["root"] / name).read_bytes())
    pairs = tmp_path / "synth" / "pairs.csv"
    pairs.write_text("reference,moving\n0000/mri.png,0000/moving.png\n0001/mri.png,0001/moving.png\n",
                     encoding="utf-8")

    code = fuse("--pairs", pairs, "--out", tmp_path / "out", "--method", "identity+average", "--no-quality")

    assert code == 0, capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "out").iterdir() if path.is_dir()) == ["0000_moving", "0001_moving"]


def test_moving_files_of_one_name_in_one_folder_get_a_folder_each_by_extension(data, tmp_path, capsys):
    """m2.png beside m2.jpg, two different files, was refused as "the same moving file in two rows"."""
    for name in ("mri.png", "pet7.png"):
        (tmp_path / name).write_bytes((data["root"] / name).read_bytes())
    Image.open(tmp_path / "pet7.png").convert("RGB").save(tmp_path / "pet7.jpg")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\nmri.png,pet7.png\nmri.png,pet7.jpg\n", encoding="utf-8")

    code = fuse("--pairs", pairs, "--out", tmp_path / "out", "--method", "identity+average", "--no-quality")

    assert code == 0, capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "out").iterdir() if path.is_dir()) == ["pet7_jpg", "pet7_png"]


def test_output_folder_names_add_an_extension_only_where_one_folder_holds_files_of_one_name():
    names = fuse_module.output_folder_names([
        Path("/d/c/case7.nii.gz"), Path("/d/c/case7.nrrd"), Path("/d/c/case7"),  # the last a DICOM folder
        Path("/d/a/case8.nii.gz"), Path("/d/b/case8.nii.gz"),  # other folders: named by them, as before
        Path("/d/c/case9.png"),
    ])
    assert names == ["case7_nii_gz", "case7_nrrd", "case7", "a_case8", "b_case8", "case9"]


def test_a_moving_file_in_two_rows_is_refused_saying_what_to_do(data, tmp_path, capsys):
    row = f"{data['root'] / 'mri.png'},{data['root'] / 'pet7.png'}\n"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\n" + row * 2, encoding="utf-8")

    code = fuse("--pairs", pairs, "--out", tmp_path / "out", "--method", "identity+average", "--no-quality")

    assert code == 2
    assert capsys.readouterr().err == (f"unifuse fuse: error: {pairs}: lines 2 and 3 of the CSV have the same moving "
                                       f"file {data['root'] / 'pet7.png'}; list each moving file in one row only\n")
    assert not (tmp_path / "out").exists()


def test_a_moving_file_in_two_rows_is_named_as_the_csv_writes_it(data, tmp_path, capsys):
    """The refusal named the folder tmp_..._0001_moving, built from the absolute path nobody typed."""
    for case in ("0000", "0001"):
        (tmp_path / case).mkdir()
        for name in ("mri.png", "pet7.png"):
            (tmp_path / case / name).write_bytes((data["root"] / name).read_bytes())
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\n0000/mri.png,0000/pet7.png\n0001/mri.png,0001/pet7.png\n"
                     "0000/mri.png,0001/pet7.png\n", encoding="utf-8")

    assert fuse("--pairs", pairs, "--out", tmp_path / "out", *CHEAP) == 2
    assert capsys.readouterr().err == (f"unifuse fuse: error: {pairs}: lines 3 and 4 of the CSV have the same moving "
                                       "file 0001/pet7.png; list each moving file in one row only\n")
    assert not (tmp_path / "out").exists()


def copy_inputs(root: Path, folder: Path, names: dict[str, str]) -> dict[Path, bytes]:
    """``names``: where each copy goes under ``folder`` -> which of ``root``'s images it is; returns
    every copy's content, to check that nothing overwrote it."""
    for target, source in names.items():
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        (folder / target).write_bytes((root / source).read_bytes())
    return {folder / target: (folder / target).read_bytes() for target in names}


@pytest.mark.parametrize(("rows", "inputs", "message"), [
    # Row 1's folder OUT/a_x is where row 3's inputs are, named as its outputs.
    ("a/ref.png,a/x.png\nb/ref.png,b/x.png\na_x/fused.png,a_x/aligned.png\n",
     {"a/ref.png": "mri.png", "a/x.png": "pet7.png", "b/ref.png": "mri.png", "b/x.png": "pet8.png",
      "a_x/fused.png": "mri.png", "a_x/aligned.png": "pet8.png"},
     "{out}/a_x/fused.png: the output folder {out}/a_x of line 2 of the CSV holds this input, the reference of "
     "line 4"),
    # Row 2 takes an earlier result of row 1 as its reference, which row 1 would redo (--overwrite).
    ("s1/mr.png,s1/ct.png\nct/fused.png,s2/pet.png\n",
     {"s1/mr.png": "mri.png", "s1/ct.png": "pet7.png", "s2/pet.png": "pet8.png", "ct/fused.png": "mri.png"},
     "{out}/ct/fused.png: the output folder {out}/ct of line 2 of the CSV holds this input, the reference of line 3"),
])
def test_a_batch_whose_pair_folder_holds_another_rows_input_is_refused_before_any_work(data, tmp_path, capsys, rows,
                                                                                        inputs, message):
    """Only each pair's own inputs were checked: row 1 wrote over row 3's inputs, or replaced row 2's
    reference mid-batch, and the batch said every pair was done."""
    written = copy_inputs(data["root"], tmp_path, inputs)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\n" + rows, encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))

    assert fuse("--pairs", pairs, "--out", tmp_path, *CHEAP, "--overwrite") == 2

    assert capsys.readouterr().err == f"unifuse fuse: error: {message.format(out=tmp_path)}; choose another --out\n"
    assert sorted(tmp_path.rglob("*")) == before
    assert {path: path.read_bytes() for path in written} == written


def test_the_cross_row_check_finds_the_one_overlap_of_a_large_batch():
    """Thousands of rows: every pair folder against every row's inputs, by set lookups."""
    pairs = [fuse_module.Pair(Path(f"/d/{n}/ref.png"), Path(f"/d/{n}/m{n}.png"), output_name=f"m{n}", line=n + 2)
             for n in range(1000)]
    fuse_module.refuse_folders_overlapping_inputs(pairs, Path("/results"))
    pairs.append(fuse_module.Pair(Path("/results/m7/fused.png"), Path("/d/x/mx.png"), output_name="mx", line=1002))

    with pytest.raises(fuse_module.InputError, match="folder /results/m7 of line 9 of the CSV holds this input, "
                                                     "the reference of line 1002"):
        fuse_module.refuse_folders_overlapping_inputs(pairs, Path("/results"))


def test_no_pair_folder_takes_the_name_of_a_batch_file():
    """index.html.png and summary.json.png got the folders OUT/index.html and OUT/summary.json, where
    the batch's QC index and summary go: the batch failed after fusing every pair."""
    names = fuse_module.output_folder_names([
        Path("/d/index.html.png"), Path("/d/summary.json.nii.gz"), Path("/d/dcm/index.html"),  # the last a folder
    ])
    assert names == ["index.html_png", "summary.json_nii_gz", "dcm_index.html"]
    assert fuse_module.Pair(Path("/d/r.png"), Path("/d/summary.json.png")).name == "summary.json_png"


def test_a_batch_with_a_moving_file_named_as_a_batch_file_writes_its_summary_and_index(data, tmp_path, capsys):
    copy_inputs(data["root"], tmp_path, {"mri.png": "mri.png", "index.html.png": "pet7.png",
                                         "summary.json.png": "pet8.png"})
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\nmri.png,index.html.png\nmri.png,summary.json.png\n", encoding="utf-8")
    out = tmp_path / "out"

    assert fuse("--pairs", pairs, "--out", out, *CHEAP, "--report") == 0, capsys.readouterr().err

    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["done"] == 2
    index = (out / "index.html").read_text(encoding="utf-8")
    assert 'href="index.html_png/report.html"' in index and 'href="summary.json_png/report.html"' in index


@pytest.mark.parametrize("removed", [("provenance.json",), ("fused.png", "aligned.png")],
                         ids=["killed before its provenance", "outputs deleted since"])
def test_batch_redoes_an_unfinished_pair_and_keeps_the_users_files(data, tmp_path, capsys, removed):
    """A pair killed before its last rename is redone; so is one whose fused and aligned images were
    deleted since, which its provenance.json alone made "already done"."""
    root = data["root"]
    pairs = root / "one_pair.csv"
    pairs.write_text("reference,moving\nmri.png,pet7.png\n")
    argv = ("--pairs", pairs, "--out", tmp_path, "--checkpoint", data["checkpoints"][2], "--device", "cpu")
    assert fuse(*argv) == 0
    for name in removed:
        (tmp_path / "pet7" / name).unlink()
    (tmp_path / "pet7" / "notes.txt").write_text("the reviewer's own file")
    capsys.readouterr()

    assert fuse(*argv) == 0
    assert "skipped" not in capsys.readouterr().out
    assert {path.name for path in (tmp_path / "pet7").iterdir()} == OUTPUTS_PNG | {"notes.txt"}
    assert (tmp_path / "pet7" / "notes.txt").read_text() == "the reviewer's own file"


def test_a_second_batch_into_one_out_keeps_the_failures_of_pairs_it_did_not_run(tmp_path, capsys):
    """Its summary.json replaced, an earlier batch's failed pair vanished from the index, its folder's
    stale outputs listed as an ordinary run; a pair the new batch runs has the newer word."""
    job = type("Job", (), {"world_size": 1, "device": "cpu"})()
    earlier = [{"name": "a", "status": "failed", "error": "a: a different moving image"},
               {"name": "b", "status": "failed", "error": "b: unreadable"},
               {"name": "c", "status": "done"}]
    (tmp_path / "summary.json").write_text(json.dumps({
        "created": "2026-12-03T10:00:00+00:00", "pairs": 3, "outcomes": earlier,
        "earlier_failures": [{"name": "z", "status": "failed", "error": "z: gone",
                              "batch_created": "2026-12-01T10:00:00+00:00"}]}), encoding="utf-8")
    pairs = [fuse_module.Pair(Path("ref.png"), Path(f"{name}.png")) for name in ("b", "d")]
    outcomes = [{"name": "b", "status": "done"}, {"name": "d", "status": "failed", "error": "d: unreadable"}]

    assert fuse_module.write_summary(outcomes, pairs, job, tmp_path, tmp_path / "batch2.csv")["failed"] == 1

    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [(outcome["name"], outcome["status"]) for outcome in summary["outcomes"]] == [("b", "done"),
                                                                                         ("d", "failed")]
    assert summary["earlier_failures"] == [
        {"batch_created": "2026-12-03T10:00:00+00:00", "name": "a", "status": "failed",
         "error": "a: a different moving image"},
        {"batch_created": "2026-12-01T10:00:00+00:00", "name": "z", "status": "failed", "error": "z: gone"}]
    assert summary["failed"] == 1  # this batch's own counts


@pytest.mark.parametrize(
    ("reference", "moving", "dims", "message"),
    [
        ("t1.nii.gz", "series4d.nii.gz", 3, "4D file with 2 frames"),
        ("t1.nii.gz", "nan.nii.gz", 3, "NaN or infinite"),
        ("t1.nii.gz", "missing.nii.gz", 3, "file not found"),
        ("mri.png", "pet7.png", 3, "is a 3D model but the images are 2D"),
    ],
    ids=["4d", "nan-only", "missing-file", "3d-checkpoint-on-2d-pair"],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(data, tmp_path, capsys, reference, moving, dims, message):
    root = data["root"]
    out = tmp_path / "out"
    code = fuse("--reference", root / reference, "--moving", root / moving, "--out", out,
                "--checkpoint", data["checkpoints"][dims], "--device", "cpu")
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cuda_on_a_machine_without_it_is_refused(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root = data["root"]
    code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", tmp_path / "out",
                "--checkpoint", data["checkpoints"][2], "--device", "cuda")
    assert code == 2
    assert "CUDA was requested" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_default_checkpoint_says_how_to_pass_one(data, tmp_path, capsys, monkeypatch):
    # Whatever is bundled today, pretend only another checkpoint is installed.
    monkeypatch.setattr("napari_unifuse.model.checkpoint.list_checkpoints", lambda: ["some-other-model"])
    root = data["root"]
    code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", tmp_path / "out")
    assert code == 2
    err = capsys.readouterr().err
    assert "unifuse-2d-harvard" in err and "some-other-model" in err and "--checkpoint" in err


def test_an_out_folder_named_like_the_default_checkpoint_does_not_shadow_it(data, tmp_path, capsys, monkeypatch):
    """`--out unifuse-2d-harvard` left a folder that made every later run without --checkpoint fail
    with "unifuse-2d-harvard is a folder, not a checkpoint file"."""
    root = data["root"]
    monkeypatch.chdir(tmp_path)
    for out in ("unifuse-2d-harvard", "results"):
        code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", out,
                    "--device", "cpu", "--no-quality")
        assert code == 0, capsys.readouterr().err
        provenance = json.loads((tmp_path / out / "pet7" / "provenance.json").read_text(encoding="utf-8"))
        assert Path(provenance["checkpoint"]["path"]).parent.parts[-2:] == ("resources", "checkpoints")


def test_pairs_and_single_pair_flags_are_exclusive(data, tmp_path, capsys):
    root = data["root"]
    code = fuse("--pairs", root / "pairs.csv", "--moving", root / "pet7.png", "--out", tmp_path)
    assert code == 2
    error = capsys.readouterr().err
    assert "--pairs cannot be combined with --moving; give --reference and --moving for one pair" in error


def test_report_writes_each_pairs_page_and_the_cohort_index(data, tmp_path, capsys):
    root = data["root"]
    pairs = root / "report-pairs.csv"
    pairs.write_text("reference,moving,label\nmri.png,pet7.png,\nmri.png,pet8.png,pet8_label.png\n", encoding="utf-8")
    code = fuse("--pairs", pairs, "--out", tmp_path, "--checkpoint", data["checkpoints"][2], "--device", "cpu",
                "--report")
    assert code == 0, capsys.readouterr().err
    for case in ("pet7", "pet8"):
        page = (tmp_path / case / "report.html").read_text(encoding="utf-8")
        assert f"UniFuse QC report: mri.png + {case}.png ({case})" in page  # the inputs, then the pair folder
    assert "ncc" in (tmp_path / "pet8" / "report.html").read_text(encoding="utf-8")  # the label's metrics
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert 'href="pet7/report.html"' in index and 'href="pet8/report.html"' in index
    assert "QC index:" in capsys.readouterr().out

    (tmp_path / "index.html").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").is_file()


def test_no_quality_writes_only_the_results(data, tmp_path, capsys):
    root = data["root"]
    code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", tmp_path,
                "--checkpoint", data["checkpoints"][2], "--device", "cpu", "--no-quality")
    assert code == 0, capsys.readouterr().err
    assert {path.name for path in (tmp_path / "pet7").iterdir()} == RESULTS_PNG


def test_report_on_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"unifuse report: error: {tmp_path / 'nowhere'}: does not exist\n"


def test_report_on_a_file_says_it_is_not_a_folder(tmp_path, capsys):
    runs = tmp_path / "runs.csv"
    runs.write_text("pairs", encoding="utf-8")
    assert main(["report", str(runs)]) == 2
    assert capsys.readouterr().err == f"unifuse report: error: {runs}: not a folder\n"


def test_out_of_memory_exits_2_naming_the_stage_and_writes_nothing(data, tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory (simulated)")

    monkeypatch.setattr("napari_unifuse.engine.inference.quality_maps", exhausted)
    root = data["root"]
    code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", tmp_path / "out",
                "--checkpoint", data["checkpoints"][2], "--device", "cpu")
    assert code == 2
    err = capsys.readouterr().err
    assert "ran out of memory during the 'quality' stage" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


CHEAP = ("--method", "identity+average", "--no-quality", "--device", "cpu")


def exhausting_the_first_call(monkeypatch, name, error):
    """``fuse_module.<name>`` raises ``error`` (a failed allocation) on its first call only."""
    original, calls = getattr(fuse_module, name), []

    def first_call_fails(*args, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(fuse_module, name, first_call_fails)


OUT_OF_MEMORY_OUTSIDE_THE_FUSION = [
    ("label_metrics", "label metrics", MemoryError("Unable to allocate 2.00 GiB (simulated)")),
    ("report_page", "QC page", torch.OutOfMemoryError("out of memory (simulated)")),
]


@pytest.mark.parametrize(("function", "stage", "error"), OUT_OF_MEMORY_OUTSIDE_THE_FUSION)
def test_out_of_memory_in_the_metrics_or_the_qc_page_fails_only_that_pair_of_a_batch(
        data, tmp_path, capsys, monkeypatch, function, stage, error):
    """It used to stop the whole batch with no summary, the message naming no pair."""
    root, out = data["root"], tmp_path / "out"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving,label\n{root / 'mri.png'},{root / 'pet7.png'},{root / 'pet8_label.png'}\n"
                     f"{root / 'mri.png'},{root / 'pet8.png'},{root / 'pet8_label.png'}\n", encoding="utf-8")
    exhausting_the_first_call(monkeypatch, function, error)

    assert fuse("--pairs", pairs, "--out", out, *CHEAP, "--report") == 2

    err = capsys.readouterr().err
    said = f"the computer ran out of memory during the {stage!r} stage of the pair pet7; close other programs"
    assert f"[1/2] pet7: error: {said}" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("pet7", "failed"), ("pet8", "done")]
    assert summary["outcomes"][0]["error"].startswith(said)
    assert not (out / "pet7").exists()
    assert (out / "index.html").is_file() and (out / "pet8" / "report.html").is_file()


@pytest.mark.parametrize(("function", "stage", "error"), OUT_OF_MEMORY_OUTSIDE_THE_FUSION)
def test_out_of_memory_in_the_metrics_or_the_qc_page_of_one_pair_is_one_line_and_writes_nothing(
        data, tmp_path, capsys, monkeypatch, function, stage, error):
    root, out = data["root"], tmp_path / "out"
    exhausting_the_first_call(monkeypatch, function, error)

    code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--label", root / "pet8_label.png",
                "--out", out, *CHEAP, "--report")

    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"unifuse fuse: error: the computer ran out of memory during the {stage!r} stage of the pair pet7; close "
        "other programs and run again, or fuse a cropped or coarser copy of the images. Nothing of this pair was "
        "written and the inputs are unchanged."]
    assert not out.exists()


@pytest.mark.parametrize("refusal", ["cannot create", "cannot write in"])
def test_an_out_it_cannot_write_to_is_refused_before_any_pair_is_fused(data, tmp_path, capsys, monkeypatch,
                                                                       deny_creating, deny_writes_in, refusal):
    """A read-only --out used to fuse every pair, then fail each one's write and the summary."""
    from napari_unifuse.engine.inference import FusionEngine

    def fusion_not_expected(*args, **kwargs):
        raise AssertionError("a pair was fused")

    monkeypatch.setattr(FusionEngine, "run_fusion", fusion_not_expected)
    root, out = data["root"], tmp_path / "out"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{root / 'mri.png'},{root / 'pet7.png'}\n"
                     f"{root / 'mri.png'},{root / 'pet8.png'}\n", encoding="utf-8")
    if refusal == "cannot create":
        deny_creating(out)
        expected = f"{out}: cannot create the --out folder (Permission denied)"
    else:
        out.mkdir()
        deny_writes_in(out)
        expected = f"{out}: cannot write there (Permission denied)"

    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 2

    assert capsys.readouterr().err.splitlines() == [f"unifuse fuse: error: {expected}"]
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("role", ["reference", "moving", "label"])
def test_an_input_where_an_output_goes_is_refused_and_left_alone(data, tmp_path, capsys, role):
    root = data["root"]
    out = tmp_path / "out"
    inputs = {"reference": root / "mri.png", "moving": root / "pet7.png", "label": root / "pet8_label.png"}
    original = inputs[role].read_bytes()
    # The moving image names the pair folder, so it can only collide as aligned/aligned.png.
    target = out / "aligned" / "aligned.png" if role == "moving" else out / "pet7" / "fused.png"
    target.parent.mkdir(parents=True)
    target.write_bytes(original)
    # A hard link outside: an input given inside its pair folder is refused before (see below).
    inputs[role] = tmp_path / target.name
    os.link(target, inputs[role])

    code = fuse("--reference", inputs["reference"], "--moving", inputs["moving"], "--label", inputs["label"],
                "--out", out, *CHEAP)

    assert code == 2
    err = capsys.readouterr().err
    assert f"{inputs[role]}: this input sits where the {target.name} output goes" in err and "Traceback" not in err
    assert target.read_bytes() == original
    assert [path.name for path in target.parent.iterdir()] == [target.name]


def test_a_batch_fails_only_the_pair_that_would_overwrite_an_input(data, tmp_path, capsys):
    root = data["root"]
    out = tmp_path / "out"
    (out / "pet7").mkdir(parents=True)
    (out / "pet7" / "fused.png").write_bytes((root / "mri.png").read_bytes())
    reference = tmp_path / "fused.png"  # a hard link outside: one inside is refused before
    os.link(out / "pet7" / "fused.png", reference)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{reference},{root / 'pet7.png'}\n{root / 'mri.png'},{root / 'pet8.png'}\n",
                     encoding="utf-8")

    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 2

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("pet7", "failed"), ("pet8", "done")]
    assert "would be replaced" in summary["outcomes"][0]["error"]
    assert reference.read_bytes() == (root / "mri.png").read_bytes()


def two_sites(root, tmp_path):
    """Two CSVs in different folders, each naming a moving file case1.png, with different references."""
    csvs = []
    for site, (reference, moving) in {"siteA": ("mri.png", "pet7.png"), "siteB": ("pet8.png", "mri.png")}.items():
        (tmp_path / site).mkdir()
        (tmp_path / site / "case1.png").write_bytes((root / moving).read_bytes())
        csvs.append(tmp_path / site / "pairs.csv")
        csvs[-1].write_text(f"reference,moving\n{root / reference},case1.png\n", encoding="utf-8")
    return csvs


def test_another_sites_moving_file_of_one_name_is_not_skipped_and_gets_its_own_folder(data, tmp_path, capsys):
    """It once shared case1/ with the first site's pair: refused, and --overwrite deleted that pair's results."""
    site_a, site_b = two_sites(data["root"], tmp_path)
    out = tmp_path / "out"
    assert fuse("--pairs", site_a, "--out", out, *CHEAP) == 0
    first_run = outputs_touched(out)
    capsys.readouterr()

    for flags in ((), ("--overwrite",)):
        assert fuse("--pairs", site_b, "--out", out, *CHEAP, *flags) == 0
        assert "skipped" not in capsys.readouterr().out
        assert {path: touched for path, touched in outputs_touched(out).items() if path in first_run} == first_run
    for site, folder in (("siteA", "case1"), ("siteB", "siteB_case1")):
        provenance = json.loads((out / folder / "provenance.json").read_text(encoding="utf-8"))
        assert provenance["inputs"]["moving"]["path"] == str((tmp_path / site / "case1.png").resolve())


FILE_OPTIONS = ("--reference", "--moving", "--label", "--checkpoint")


def fuse_request(root, out, options, *flags):
    """``unifuse fuse`` of mri.png + pet7.png (identity+average, no quality maps) with ``options``
    added or replaced, and ``flags``; file options name files in ``root``."""
    request = {"--reference": "mri.png", "--moving": "pet7.png", "--method": "identity+average", **options}
    argv = [item for flag, value in request.items() for item in (flag, root / value if flag in FILE_OPTIONS else value)]
    return fuse(*argv, "--out", out, "--no-quality", "--device", "cpu", *flags)


@pytest.mark.parametrize(
    ("first", "then", "named"),
    [
        ({"--method": "mmif-amin"}, {"--method": "mmif-amin:matching"}, None),  # its default alignment, spelt out
        ({}, {"--method": "identity+max"}, "method (identity+average)"),  # named: the one of the results
        ({}, {"--reference": "pet8.png"}, "pair"),  # named: the one of the results
        ({}, {"--label": "pet8_label.png"}, "label"),
        ({"--method": "unifuse", "--checkpoint": "tiny-2d.safetensors"},
         {"--method": "unifuse", "--checkpoint": "other-2d.safetensors"}, "checkpoint"),
        ({}, {"--tile-size": "32"}, "tile size"),
        ({"--moving-modality": "pt"}, {"--moving-modality": "pet"}, None),  # an alias of the same modality
        ({}, {"--moving-modality": "spect"}, "moving modality"),
    ],
    ids=["same-method-spelt-out", "method", "reference", "label", "checkpoint", "tile-size", "modality-alias",
         "modality"],
)
def test_a_rerun_is_skipped_only_when_it_asks_for_the_same(data, tmp_path, capsys, first, then, named):
    root, out = data["root"], tmp_path / "out"
    assert fuse_request(root, out, first) == 0
    assert fuse_request(root, out, first) == 0
    assert "skipped, already done" in capsys.readouterr().out
    first_run = outputs_touched(out)

    code = fuse_request(root, out, then)

    captured = capsys.readouterr()
    if named is None:
        assert code == 0 and "skipped, already done" in captured.out
    elif named == "pair":
        assert code == 2
        assert (f"{out / 'pet7'}: holds the results of another pair (reference {root / 'mri.png'}, moving "
                f"{root / 'pet7.png'}), which --overwrite would delete") in captured.err
    else:
        assert code == 2
        assert f"{out / 'pet7'}: holds the results of a run with a different {named}; pass --overwrite" in captured.err
    assert outputs_touched(out) == first_run


def test_a_run_that_recorded_no_settings_is_not_taken_for_this_one(data, tmp_path, capsys):
    """Provenance written before the settings were recorded: what the run chose is unknown."""
    root, out = data["root"], tmp_path / "out"
    assert fuse_request(root, out, {}) == 0
    provenance_file = out / "pet7" / "provenance.json"
    provenance = json.loads(provenance_file.read_text(encoding="utf-8"))
    del provenance["requested_settings"]
    provenance_file.write_text(json.dumps(provenance), encoding="utf-8")

    assert fuse_request(root, out, {}) == 2
    assert ("holds this pair's results of an earlier version of unifuse, which recorded no settings (whether this "
            "version would make the same is unknown); kept as they are: pass --overwrite") in capsys.readouterr().err


def recorded_input(path: Path) -> dict[str, str]:
    """An input as every earlier version recorded it: its absolute path and content hash."""
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def earlier_version_folder(folder: Path, provenance: dict, *more_outputs: str) -> None:
    """A finished pair folder of an earlier version: its outputs (only their names count) and ``provenance``."""
    folder.mkdir(parents=True)
    for name in ("fused.png", "aligned.png", "displacement.nii.gz", "degradation.json", *more_outputs):
        (folder / name).write_bytes(b"an earlier version's output")
    (folder / "provenance.json").write_text(json.dumps(provenance), encoding="utf-8")


def earlier_batch(root: Path, out: Path, provenance_of) -> Path:
    """pet7 (no label) and pet8 (with its label, metrics.json written) fused into ``out`` by an earlier
    version whose provenance.json of a pair's inputs is ``provenance_of(inputs)``; the batch's CSV."""
    pairs = out.parent / "pairs.csv"
    pairs.write_text(f"reference,moving,label\n{root / 'mri.png'},{root / 'pet7.png'},\n"
                     f"{root / 'mri.png'},{root / 'pet8.png'},{root / 'pet8_label.png'}\n", encoding="utf-8")
    for moving, more_outputs in (("pet7", ()), ("pet8", ("metrics.json",))):
        inputs = {"reference": recorded_input(root / "mri.png"), "moving": recorded_input(root / f"{moving}.png")}
        earlier_version_folder(out / moving, provenance_of(inputs), *more_outputs)
    return pairs


# provenance.json as the version of 2026-12-01 wrote it (the keys that matter): UniFuse, the only method, unnamed.
def provenance_of_2026_12_01(inputs):
    return {"created": "2026-12-07T16:54:16+00:00", "inputs": inputs,
            "checkpoint": {"name": "unifuse-2d-harvard",
                           "sha256": "8dad6e17d93ccb8df7679140324a2a828a3bc1cf93c05eba7b4aa148470e8b20"},
            "model_config": {"spatial_dims": 2}, "outputs": {"fused": "fused.png"}}


# As the versions of 2026-12-03 and 2026-12-05 wrote it: the method, but neither settings nor a label input.
def provenance_of_2026_12_05(inputs):
    return {"created": "2026-12-07T16:58:02+00:00", "inputs": inputs,
            "method": {"name": "identity+average", "registration": "identity", "rule": "average"},
            "checkpoint": {"name": None, "note": "no trained weights"}, "model_config": {"spatial_dims": 2}}


# Each rerun with what that version ran: 2026-12-01's UniFuse with the bundled weights of that name
# (other weights then), 2026-12-05's identity+average.
@pytest.mark.parametrize(("provenance_of", "method", "unrecorded"), [
    (provenance_of_2026_12_01, (),
     ("no method and no settings and shipped other weights as unifuse-2d-harvard",
      "no method, no settings and no label for its metrics.json and shipped other weights as unifuse-2d-harvard")),
    (provenance_of_2026_12_05, ("--method", "identity+average"),
     ("no settings", "no settings and no label for its metrics.json")),
], ids=["2026-12-01", "2026-12-05"])
def test_a_batch_keeps_an_earlier_versions_results_of_its_pairs_saying_so(data, tmp_path, capsys, provenance_of,
                                                                          method, unrecorded):
    """Rerun over an earlier version's --out: its pairs are neither unreadable, of another label, nor failed."""
    root, out = data["root"], tmp_path / "out"
    pairs = earlier_batch(root, out, provenance_of)
    earlier = outputs_touched(out)

    assert fuse("--pairs", pairs, "--out", out, *method, "--no-quality", "--device", "cpu") == 2

    err = capsys.readouterr().err
    for moving, words in zip(("pet7", "pet8"), unrecorded, strict=True):
        assert (f"{moving}: kept: {out / moving}: holds this pair's results of an earlier version of unifuse, which recorded {words} "
                "(whether this version would make the same is unknown); kept as they are: pass --overwrite to redo "
                "the pair with this version, or choose another --out") in err
    assert "cannot be read" not in err and "a different label" not in err and "failed" not in err
    assert ("unifuse fuse: 2 of 2 pairs hold results of an earlier version of unifuse, kept as they are; pass "
            "--overwrite to redo them with this version") in err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["kept"], summary["failed"], summary["done"], summary["skipped"]) == (2, 0, 0, 0)
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("pet7", "kept"), ("pet8", "kept")]
    assert "earlier version of unifuse" in summary["outcomes"][0]["reason"]
    assert outputs_touched(out) == earlier
    # The QC index's counts add up to the batch's pairs, the kept ones said.
    assert main(["report", str(out)]) == 0
    assert "2 pairs, 0 done, 0 skipped, 0 failed, 2 kept (results of an earlier version" in \
        (out / "index.html").read_text(encoding="utf-8")

    assert fuse("--pairs", pairs, "--out", out, *method, "--no-quality", "--device", "cpu", "--overwrite") == 0
    redone = json.loads((out / "pet8" / "provenance.json").read_text(encoding="utf-8"))
    assert redone["requested_settings"] and redone["inputs"]["label"]["path"] == str(root / "pet8_label.png")


@pytest.mark.parametrize(("rerun", "named"), [
    (("--method", "identity+average"), "method (unifuse)"),
    (("--checkpoint", "other-2d.safetensors"), "checkpoint"),
], ids=["method", "checkpoint"])
def test_an_earlier_versions_unifuse_run_rerun_with_another_method_or_weights_is_a_difference(
        data, tmp_path, capsys, rerun, named):
    """2026-12-01 recorded no method, but UniFuse was the only one and its weights were recorded:
    another method, or other weights, is not this pair's result to keep."""
    root, out = data["root"], tmp_path / "out"
    pairs = earlier_batch(root, out, provenance_of_2026_12_01)
    earlier = outputs_touched(out)
    flag, value = rerun
    value = root / value if flag == "--checkpoint" else value

    assert fuse("--pairs", pairs, "--out", out, flag, value, "--no-quality", "--device", "cpu") == 2

    err = capsys.readouterr().err
    assert (f"{out / 'pet7'}: holds the results of a run with a different {named} (by an earlier version of unifuse, "
            "which recorded no method and no settings); pass --overwrite to replace them") in err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["failed"], summary["kept"]) == (2, 0)
    assert outputs_touched(out) == earlier


def test_an_earlier_versions_run_of_other_content_or_without_a_label_is_a_difference_still(data, tmp_path, capsys):
    """What an earlier version did record still counts: a moving image changed since, and a label now
    where its run had none (no metrics.json), fail the pair and say so."""
    root, out = tmp_path, tmp_path / "out"
    for name in ("mri.png", "pet7.png", "pet8.png", "pet8_label.png"):
        (root / name).write_bytes((data["root"] / name).read_bytes())
    pairs = earlier_batch(root, out, provenance_of_2026_12_05)
    (out / "pet8" / "metrics.json").unlink()  # fused without its label
    with Image.open(root / "pet7.png") as image:
        Image.fromarray(np.roll(np.asarray(image), 3, axis=1)).save(root / "pet7.png")

    assert fuse("--pairs", pairs, "--out", out, "--method", "identity+average", "--no-quality", "--device", "cpu") == 2

    err = capsys.readouterr().err
    earlier = "(by an earlier version of unifuse, which recorded no settings); pass --overwrite to replace them"
    assert f"{out / 'pet7'}: holds the results of a run with a different moving image {earlier}" in err
    assert f"{out / 'pet8'}: holds the results of a run with a different label {earlier}" in err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["failed"], summary["kept"]) == (2, 0)


def test_an_earlier_versions_bundled_weights_are_said_and_kept(data, tmp_path, capsys):
    """2026-12-03 shipped other weights as unifuse-2d-harvard: its results are kept, the weights named."""
    root, out = data["root"], tmp_path / "out"
    earlier_version_folder(out / "pet7", {
        "inputs": {"reference": recorded_input(root / "mri.png"), "moving": recorded_input(root / "pet7.png")},
        "method": {"name": "unifuse"}, "model_config": {"spatial_dims": 2},
        "checkpoint": {"name": "unifuse-2d-harvard",
                       "sha256": "b9c9b55a6dcf40a3f792b5573860c3a5d1d598afe01aa0fd7635d03800e0e7dc"}})
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{root / 'mri.png'},{root / 'pet7.png'}\n", encoding="utf-8")

    assert fuse("--pairs", pairs, "--out", out, "--device", "cpu") == 2

    assert ("which recorded no settings and shipped other weights as unifuse-2d-harvard (whether this version would "
            "make the same is unknown); kept as they are") in capsys.readouterr().err


def test_a_moving_file_changed_since_its_run_is_refused(data, tmp_path, capsys):
    root, out = tmp_path, tmp_path / "out"
    for name in ("mri.png", "pet7.png"):
        (root / name).write_bytes((data["root"] / name).read_bytes())
    assert fuse_request(root, out, {}) == 0
    moving = root / "pet7.png"
    with Image.open(moving) as image:
        Image.fromarray(np.roll(np.asarray(image), 3, axis=1)).save(moving)

    assert fuse_request(root, out, {}) == 2
    assert "a different moving image; pass --overwrite" in capsys.readouterr().err


def test_resuming_reads_no_input_untouched_since_its_run(data, tmp_path, capsys, monkeypatch):
    from napari_unifuse.cli import fuse as fuse_module
    from napari_unifuse.engine import provenance

    root, out = tmp_path, tmp_path / "out"
    for name in ("mri.png", "pet7.png"):
        (root / name).write_bytes((data["root"] / name).read_bytes())
    assert fuse_request(root, out, {}) == 0
    hashed = []
    for module in (fuse_module, provenance):
        monkeypatch.setattr(module, "sha256_of_path", lambda source: hashed.append(source))
    assert fuse_request(root, out, {}) == 0
    assert "skipped, already done" in capsys.readouterr().out and hashed == []


@pytest.mark.parametrize("found", [
    "{",  # cut short by a full disk
    '{"tool": "other-pipeline", "inputs": ["a", "b"]}',  # another tool's, in an --out it shares
    '{"inputs": {"reference": "a.nii"}, "method": {"name": "unifuse"}}',
])
def test_results_whose_provenance_cannot_be_read_are_not_taken_as_done(found, data, tmp_path, capsys):
    root, out = data["root"], tmp_path / "out"
    assert fuse_request(root, out, {}) == 0
    (out / "pet7" / "provenance.json").write_text(found, encoding="utf-8")

    assert fuse_request(root, out, {}) == 2
    assert "provenance.json cannot be read" in capsys.readouterr().err
    assert fuse_request(root, out, {}, "--overwrite") == 0
    assert json.loads((out / "pet7" / "provenance.json").read_text(encoding="utf-8"))["inputs"]["moving"]["sha256"]


def test_overwrite_leaves_nothing_of_the_earlier_run(data, tmp_path, capsys):
    root = data["root"]
    pair = ("--reference", root / "mri.png", "--moving", root / "pet8.png", "--out", tmp_path,
            "--method", "identity+average", "--device", "cpu")
    assert fuse(*pair, "--label", root / "pet8_label.png", "--uncertainty-passes", "0", "--report") == 0
    case = tmp_path / "pet8"
    assert {"quality.json", "metrics.json", "report.html"} <= {path.name for path in case.iterdir()}
    (case / "notes.txt").write_text("kept", encoding="utf-8")

    assert fuse(*pair, "--no-quality", "--overwrite") == 0, capsys.readouterr().err

    assert {path.name for path in case.iterdir()} == RESULTS_PNG | {"notes.txt"}
    assert main(["report", str(tmp_path)]) == 0
    assert "no quality maps" in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_report_on_a_pair_already_done_says_how_to_get_it(data, tmp_path, capsys):
    root = data["root"]
    pair = ("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", tmp_path, *CHEAP)
    assert fuse(*pair) == 0
    capsys.readouterr()

    assert fuse(*pair, "--report") == 0
    assert "skipped, already done" in (out := capsys.readouterr().out)
    assert "pass --overwrite to run it again with --report" in out
    assert not (tmp_path / "pet7" / "report.html").exists()

    assert fuse(*pair, "--report", "--overwrite") == 0
    assert (tmp_path / "pet7" / "report.html").is_file()
    assert fuse(*pair, "--report") == 0
    assert "--overwrite" not in capsys.readouterr().out  # the page is there: nothing to say


def test_an_out_that_is_a_file_is_one_line_error(data, tmp_path, capsys):
    root = data["root"]
    not_a_folder = tmp_path / "result.png"
    not_a_folder.write_bytes(b"")
    code = fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", not_a_folder, *CHEAP)
    assert code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"unifuse fuse: error: --out must be a folder (the outputs go into one sub-folder "
                                f"per pair), but {not_a_folder} is a file"]


def test_a_pair_folder_that_cannot_be_written_fails_that_pair_only(data, tmp_path, capsys):
    root = data["root"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "pet7").write_bytes(b"a file where the pair's folder goes")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{root / 'mri.png'},{root / 'pet7.png'}\n"
                     f"{root / 'mri.png'},{root / 'pet8.png'}\n", encoding="utf-8")

    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 2

    err = capsys.readouterr().err
    assert f"{out / 'pet7'}: cannot write there" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("pet7", "failed"), ("pet8", "done")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--out", "x"), "give --reference and --moving for one pair, or --pairs CSV for many"),
        (("--reference", "a.png", "--moving", "b.png", "--out", "x", "--uncertainty-passes", "-1"),
         "--uncertainty-passes must be 0 or more, got -1"),
        (("--reference", "a.png", "--moving", "b.png", "--out", "x", "--tile-size", "0"),
         "--tile-size must be a positive number of voxels, got 0"),
    ],
    ids=["no-pair", "negative-passes", "zero-tile"],
)
def test_usage_errors_name_the_command_once(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert fuse(*argv) == 2
    assert capsys.readouterr().err.splitlines() == [f"unifuse fuse: error: {message}"]


def test_a_csv_with_only_its_header_says_it_has_no_pairs(tmp_path, capsys):
    pairs = tmp_path / "header_only.csv"
    pairs.write_text("reference,moving\n", encoding="utf-8")
    assert fuse("--pairs", pairs, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{pairs}: the CSV has no pairs, only its header line" in err and "missing" not in err


# ---- runs at once, swapped inputs, full disks ------------------------------------------------------
def copied_inputs(data, folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes((data["root"] / name).read_bytes())
    return folder


def test_a_run_into_a_folder_another_run_is_writing_fails_at_once(data, tmp_path, capsys):
    """Two runs into one --out (the same pair, or moving files of one name) once left one pair's
    images under the other's provenance.json, and removed each other's staging folders."""
    from napari_unifuse.engine.outputs import STAGING_PREFIX, output_folder_lock

    root, out = data["root"], tmp_path / "out"
    single = ("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", out, *CHEAP)
    with output_folder_lock(out / "pet7"):  # another run, fusing into out/pet7
        live = out / "pet7" / f"{STAGING_PREFIX}live"
        live.mkdir()
        assert fuse(*single) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"unifuse fuse: error: {out / 'pet7'}: another unifuse run is writing into this folder; wait for it "
            "to finish or write the outputs to another folder"]
        assert {path.name for path in (out / "pet7").iterdir()} == {live.name}

    assert fuse(*single) == 0  # the other run is gone: its leftover goes
    assert {path.name for path in (out / "pet7").iterdir()} == RESULTS_PNG
    capsys.readouterr()

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{root / 'mri.png'},{root / 'pet7.png'}\n"
                     f"{root / 'mri.png'},{root / 'pet8.png'}\n", encoding="utf-8")
    with output_folder_lock(out / "pet7"):  # even a finished pair is not taken as done while it is rewritten
        assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 2
    err = capsys.readouterr().err
    assert f"pet7: busy: another unifuse run is still writing into {out / 'pet7'}" in err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("pet7", "busy"), ("pet8", "done")]


def test_an_input_swapped_for_one_with_an_old_modification_time_is_not_taken_as_done(data, tmp_path, capsys):
    """mv of an older file, cp -p, rsync -a and tar x keep a modification time older than the run."""
    root, out = copied_inputs(data, tmp_path / "in", "mri.png", "pet7.png", "pet8_label.png"), tmp_path / "out"
    assert fuse_request(root, out, {}) == 0
    old = (root / "pet7.png").stat().st_mtime - 3600
    os.utime(root / "pet8_label.png", (old, old))  # another image, older than the run
    os.replace(root / "pet8_label.png", root / "pet7.png")

    assert fuse_request(root, out, {}) == 2
    assert "a different moving image; pass --overwrite" in capsys.readouterr().err


def test_the_label_is_recorded_as_it_was_read_for_the_metrics(data, tmp_path, capsys, monkeypatch):
    from napari_unifuse.engine.inference import FusionEngine

    root = copied_inputs(data, tmp_path / "in", "mri.png", "pet8.png", "pet8_label.png")
    label = root / "pet8_label.png"
    read = hashlib.sha256(label.read_bytes()).hexdigest()
    run_fusion = FusionEngine.run_fusion

    def label_replaced_meanwhile(self, *args, **kwargs):
        result = run_fusion(self, *args, **kwargs)
        replacement = root / "new_label.png"
        replacement.write_bytes((root / "mri.png").read_bytes())
        os.replace(replacement, label)
        return result

    monkeypatch.setattr(FusionEngine, "run_fusion", label_replaced_meanwhile)
    assert fuse("--reference", root / "mri.png", "--moving", root / "pet8.png", "--label", label,
                "--out", tmp_path / "out", *CHEAP) == 0, capsys.readouterr().err
    provenance = json.loads((tmp_path / "out" / "pet8" / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["inputs"]["label"]["sha256"] == read


def fail_writing(monkeypatch, name, error=errno.ENOSPC):
    """Writing a file whose name holds ``name`` stops halfway (a full disk, by default)."""
    original = Path.write_text

    def failing(self, text, *args, **kwargs):
        if name in self.name:
            original(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(error, os.strerror(error))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)


def test_a_report_that_cannot_be_written_leaves_the_pair_unfinished_not_done_without_its_page(
        data, tmp_path, capsys, monkeypatch):
    root, out = data["root"], tmp_path / "out"
    pair = ("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", out, *CHEAP, "--report")
    fail_writing(monkeypatch, "report.html")
    assert fuse(*pair) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"unifuse fuse: error: {out / 'pet7' / 'report.html'}: cannot be written "
                                "(No space left on device); the folder's earlier files are as they were"]
    assert not (out / "pet7" / "provenance.json").exists()  # not done: a rerun fuses it, page and all

    monkeypatch.undo()
    assert fuse(*pair) == 0
    out_text = capsys.readouterr().out
    assert "skipped" not in out_text
    assert (out / "pet7" / "report.html").read_text(encoding="utf-8").endswith("</html>\n")


@pytest.mark.parametrize("problem", ["a folder", "full disk", "read-only"])
def test_a_summary_that_cannot_be_written_is_a_one_line_error_and_the_outputs_stay(
        data, tmp_path, capsys, monkeypatch, problem):
    root, out = data["root"], tmp_path / "out"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{root / 'mri.png'},{root / 'pet7.png'}\n", encoding="utf-8")
    if problem == "a folder":
        (out / "summary.json").mkdir(parents=True)
    else:
        fail_writing(monkeypatch, "summary.json", errno.ENOSPC if problem == "full disk" else errno.EROFS)

    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 2

    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"unifuse fuse: error: {out / 'summary.json'}: cannot write the batch summary (")
    assert {path.name for path in (out / "pet7").iterdir()} == RESULTS_PNG
    assert [path.name for path in out.iterdir() if path.name.endswith(".part")] == []


def test_an_out_that_cannot_be_read_is_a_one_line_error(data, tmp_path, capsys, monkeypatch):
    root, out = data["root"], tmp_path / "out"
    out.mkdir()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{root / 'mri.png'},{root / 'pet7.png'}\n", encoding="utf-8")
    iterdir = Path.iterdir

    def unreadable(self):
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", unreadable)
    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"unifuse fuse: error: {out}: --out cannot be read (Permission denied), so its earlier results cannot be "
        "found; make it readable or choose another --out"]


def test_report_names_a_run_folder_it_cannot_read_and_still_writes_the_index(data, tmp_path, capsys, monkeypatch):
    root, out = data["root"], tmp_path / "out"
    for moving in ("pet7.png", "pet8.png"):
        assert fuse("--reference", root / "mri.png", "--moving", root / moving, "--out", out, *CHEAP) == 0
    capsys.readouterr()
    scandir = os.scandir

    def unreadable(path="."):
        if Path(path) == out / "pet8":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable)
    assert main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"unifuse report: warning: {out / 'pet8'}: cannot be read (Permission "
                                         "denied); its runs are left out of the index"]
    index = (out / "index.html").read_text(encoding="utf-8")
    assert 'href="pet7/report.html"' not in index and "pet7" in index and "could not be read" in index


def annexed_pairs(root, tmp_path, blobs):
    """A git-annex/DataLad layout: ``s1/ct.png``, ``s2/ct.png`` symlinks to the store blob each
    subject names in ``blobs``; returns the CSV pairing each with mri.png."""
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    for subject, blob in blobs.items():
        if not (store / blob).exists():
            (store / blob).write_bytes((root / "pet7.png").read_bytes())
        (tmp_path / subject).mkdir()
        (tmp_path / subject / "ct.png").symlink_to(Path("..") / "store" / blob)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\n" + "".join(f"{root / 'mri.png'},{subject}/ct.png\n" for subject in blobs),
                     encoding="utf-8")
    return pairs


@pytest.mark.parametrize("blobs", [{"s1": "SHA256E-s1--abc.png", "s2": "SHA256E-s2--def.png"},
                                   {"s1": "SHA256E-s1--abc.png", "s2": "SHA256E-s1--abc.png"}],
                         ids=["own-blobs", "one-blob"])
def test_symlinked_inputs_name_their_pair_folders_as_given_and_are_recorded_as_given(data, tmp_path, capsys, blobs):
    """Folders used to be named after the link's target (SHA256E-s1--abc), and two subjects linked
    to one blob were refused as one moving file in two rows."""
    pairs, out = annexed_pairs(data["root"], tmp_path, blobs), tmp_path / "out"

    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 0, capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["s1_ct", "s2_ct"]
    for subject, blob in blobs.items():
        recorded = json.loads((out / f"{subject}_ct" / "provenance.json").read_text(encoding="utf-8"))
        moving = recorded["inputs"]["moving"]
        assert (moving["path"], moving["resolved_path"]) == (str(tmp_path / subject / "ct.png"),
                                                            str(tmp_path / "store" / blob))
    capsys.readouterr()
    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 0
    assert capsys.readouterr().out.count("skipped, already done") == 2


def write_dicom_series(folder, volume):
    """``volume`` (z, y, x) as an MR series of one file per slice, with the tags GDCM orders it by,
    and as ``reference.nii.gz`` beside its folder, a reference it overlaps."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing((1.1, 1.0, 2.5))
    sitk.WriteImage(image, str(folder.parent / "reference.nii.gz"))
    uid = "1.2.826.0.1.3680043.2.1125.77"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))
        for tag, value in {"0008|0060": "MR", "0020|000e": uid, "0020|000d": f"{uid}.1", "0020|0032": position,
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
                           "0008|0018": f"{uid}.{k + 1}", "0018|0050": "2.5"}.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    return folder


@pytest.fixture
def series(tmp_path):
    return write_dicom_series(tmp_path / "dcm" / "t2", 800 * blob((9, 16, 13), 0.1))


@pytest.mark.parametrize(("out", "reference", "where"), [
    ("dcm", "dcm/reference.nii.gz", "is this input folder"),
    ("dcm/t2/results", "dcm/reference.nii.gz", "lies inside this input folder"),
    (".", "t2/reference.nii.gz", "holds this input"),  # its pair folder, t2/, holds the reference
])
def test_a_pair_folder_that_is_in_or_holds_an_input_is_refused_before_any_work(tmp_path, capsys, series, out,
                                                                                reference, where):
    """``--moving dcm/t2 --out dcm`` used to write the outputs into the series folder, after which
    every rerun was refused, --overwrite or not (they changed the series' hash)."""
    (tmp_path / reference).parent.mkdir(exist_ok=True)
    (tmp_path / reference).write_bytes((series.parent / "reference.nii.gz").read_bytes())
    before = sorted(path.name for path in tmp_path.rglob("*"))
    refused = series if reference.startswith("dcm") else tmp_path / reference

    code = fuse("--reference", tmp_path / reference, "--moving", series, "--out", tmp_path / out, *CHEAP)

    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"unifuse fuse: error: {refused}: the pair's output folder {tmp_path / out / 't2'} {where}; "
        "choose another --out"]
    assert sorted(path.name for path in tmp_path.rglob("*")) == before


def fuse_series(data, tmp_path, series):
    return fuse("--reference", series.parent / "reference.nii.gz", "--moving", series, "--out", tmp_path / "out",
                *CHEAP)


def test_a_series_folder_with_another_file_put_beside_its_slices_is_the_same_input(data, tmp_path, capsys, series):
    """Its hash covered every file under the folder: a stray file made every rerun a refusal."""
    assert fuse_series(data, tmp_path, series) == 0, capsys.readouterr().err
    recorded = json.loads((tmp_path / "out" / "t2" / "provenance.json").read_text(encoding="utf-8"))
    assert recorded["inputs"]["moving"]["path"] == str(series)
    capsys.readouterr()

    (series / "notes.txt").write_text("reviewed", encoding="utf-8")

    assert fuse_series(data, tmp_path, series) == 0
    assert "skipped, already done" in capsys.readouterr().out


def test_a_series_given_as_the_label_is_recorded_by_its_series_as_the_moving_image_is(tmp_path, capsys, series):
    """Only the label's folder and hash were recorded: the path of a series names a folder, not a series."""
    assert fuse("--reference", series.parent / "reference.nii.gz", "--moving", series, "--label", series,
                "--out", tmp_path / "out", *CHEAP) == 0, capsys.readouterr().err
    inputs = json.loads((tmp_path / "out" / "t2" / "provenance.json").read_text(encoding="utf-8"))["inputs"]
    assert inputs["label"]["dicom"]["SeriesInstanceUID"] == "1.2.826.0.1.3680043.2.1125.77"
    assert {key: inputs["moving"][key] for key in inputs["label"]} == inputs["label"]


def test_a_series_with_a_slice_rewritten_in_place_is_not_taken_as_done(data, tmp_path, capsys, series):
    """Only the folder's own times were checked, which a slice rewritten in place leaves alone."""
    assert fuse_series(data, tmp_path, series) == 0, capsys.readouterr().err
    capsys.readouterr()

    with (series / "slice004.dcm").open("r+b") as stream:  # the last byte: a pixel value
        stream.seek(-1, os.SEEK_END)
        last = stream.read(1)[0]
        stream.seek(-1, os.SEEK_END)
        stream.write(bytes([last ^ 0x01]))

    assert fuse_series(data, tmp_path, series) == 2
    assert "a different moving image; pass --overwrite" in capsys.readouterr().err


# ---- the --pairs CSV's header, the batch's last words, the QC index ---------------------------------
def test_a_misspelled_label_column_is_refused_by_name_not_fused_without_metrics(data, tmp_path, capsys):
    """`lable` used to be ignored: the batch fused every pair and wrote no metrics.json."""
    root = data["root"]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving,lable\n{root / 'mri.png'},{root / 'pet8.png'},{root / 'pet8_label.png'}\n",
                     encoding="utf-8")
    assert fuse("--pairs", pairs, "--out", tmp_path / "out", *CHEAP) == 2
    assert capsys.readouterr().err == (f"unifuse fuse: error: {pairs}: unknown column 'lable' (did you mean "
                                       "'label'?); the columns are reference, moving and optionally label\n")
    assert not (tmp_path / "out").exists()


def test_a_folder_given_as_the_pairs_csv_is_called_a_folder(tmp_path, capsys):
    assert fuse("--pairs", tmp_path, "--out", tmp_path / "out") == 2
    assert capsys.readouterr().err == (f"unifuse fuse: error: {tmp_path}: is a folder, not a CSV file; --pairs "
                                       "takes a CSV file of pairs\n")


def test_a_summary_that_cannot_be_written_after_every_pair_failed_claims_no_outputs(
        data, tmp_path, capsys, monkeypatch):
    """A read-only --out fails every pair, then the summary: the error used to add "the pairs'
    outputs are in their folders", where there were none."""
    root, out = data["root"], tmp_path / "out"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{root / 'mri.png'},{tmp_path / 'gone1.png'}\n"
                     f"{root / 'mri.png'},{tmp_path / 'gone2.png'}\n", encoding="utf-8")
    fail_writing(monkeypatch, "summary.json", errno.EROFS)
    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (f"unifuse fuse: error: {out / 'summary.json'}: cannot write the batch summary (Read-only file "
                    "system); no pair has outputs: all 2 pairs failed (the errors are above)")


def test_an_index_html_unifuse_did_not_write_is_refused_unless_overwrite_and_its_own_refreshed(
        data, tmp_path, capsys):
    """`unifuse report` (and `fuse --report`) used to replace any RUNS_DIR/index.html without a word."""
    root, out = data["root"], tmp_path / "out"
    assert fuse("--reference", root / "mri.png", "--moving", root / "pet7.png", "--out", out, *CHEAP) == 0
    index = out / "index.html"
    index.write_text("<html>MY OWN PAGE</html>\n", encoding="utf-8")
    capsys.readouterr()

    assert main(["report", str(out)]) == 2
    assert capsys.readouterr().err == (f"unifuse report: error: {index}: is not a QC index unifuse wrote, and "
                                       "index.html is where the index goes; pass --overwrite to replace it, or "
                                       "move it away\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving\n{root / 'mri.png'},{root / 'pet8.png'}\n", encoding="utf-8")
    assert fuse("--pairs", pairs, "--out", out, *CHEAP, "--report") == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"unifuse fuse: error: {index}: is not a QC index unifuse wrote, so it is left as it is and nothing was "
        "fused; unifuse report")
    assert index.read_text(encoding="utf-8") == "<html>MY OWN PAGE</html>\n"
    assert not (out / "pet8").exists()  # refused before any pair

    assert main(["report", str(out), "--overwrite"]) == 0
    assert "MY OWN PAGE" not in index.read_text(encoding="utf-8")
    assert fuse("--pairs", pairs, "--out", out, *CHEAP, "--report") == 0
    assert 'href="pet8/report.html"' in index.read_text(encoding="utf-8")
    # Its own index, from an earlier report: refreshed without --overwrite, by both commands.
    (out / "pet7" / "provenance.json").rename(out / "pet7" / "provenance.json.moved")
    assert main(["report", str(out)]) == 0
    # No longer a finished run: its outputs without provenance.json are listed as unfinished.
    finished, _, unfinished = index.read_text(encoding="utf-8").partition("Unfinished run folders")
    assert "pet7" not in finished and "<li>pet7</li>" in unfinished
    assert fuse("--pairs", pairs, "--out", out, *CHEAP, "--report") == 0
