"""`unifuse fuse` end to end with a randomly initialised small UniFuse saved as a real checkpoint."""

from __future__ import annotations

import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from napari_unifuse.cli import main
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
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


def test_batch_redoes_a_pair_interrupted_before_its_provenance(data, tmp_path, capsys):
    root = data["root"]
    pairs = root / "one_pair.csv"
    pairs.write_text("reference,moving\nmri.png,pet7.png\n")
    argv = ("--pairs", pairs, "--out", tmp_path, "--checkpoint", data["checkpoints"][2], "--device", "cpu")
    assert fuse(*argv) == 0
    (tmp_path / "pet7" / "provenance.json").unlink()  # as if killed before the last rename
    capsys.readouterr()

    assert fuse(*argv) == 0
    assert "skipped" not in capsys.readouterr().out
    assert (tmp_path / "pet7" / "provenance.json").is_file()


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


def test_pairs_and_single_pair_flags_are_exclusive(data, tmp_path, capsys):
    root = data["root"]
    code = fuse("--pairs", root / "pairs.csv", "--moving", root / "pet7.png", "--out", tmp_path)
    assert code == 2
    assert "--pairs cannot be combined with --moving" in capsys.readouterr().err


def test_report_writes_each_pairs_page_and_the_cohort_index(data, tmp_path, capsys):
    root = data["root"]
    pairs = root / "report-pairs.csv"
    pairs.write_text("reference,moving,label\nmri.png,pet7.png,\nmri.png,pet8.png,pet8_label.png\n", encoding="utf-8")
    code = fuse("--pairs", pairs, "--out", tmp_path, "--checkpoint", data["checkpoints"][2], "--device", "cpu",
                "--report")
    assert code == 0, capsys.readouterr().err
    for case in ("pet7", "pet8"):
        page = (tmp_path / case / "report.html").read_text(encoding="utf-8")
        assert f"UniFuse QC report: {case}" in page
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


def test_report_on_a_missing_folder_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


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
