"""`unifuse synth`: outputs on disk that SimpleITK alone can check (field + resample = label)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from napari_unifuse.cli import main
from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms

OUTPUT_NAMES = ("reference", "moving", "label")


@pytest.fixture(scope="module")
def png_pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("png")
    slices = make_brain_phantom_slices((96, 96), modalities=("t1", "t2"))
    paths = []
    for modality in ("t1", "t2"):
        array = slices[modality].array
        path = folder / f"{modality}.png"
        Image.fromarray(np.round(255 * array / array.max()).astype(np.uint8)).save(path)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def nifti_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Anisotropic voxels (x 1.2, y 1.0, z 2.5 mm), a flipped x axis and an offset origin."""
    folder = tmp_path_factory.mktemp("nifti")
    volumes = make_brain_phantoms((24, 40, 32), modalities=("t1", "t2"))
    affine = np.array([[-1.2, 0, 0, 40.0], [0, 1.0, 0, -20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    paths = []
    for modality in ("t1", "t2"):
        path = folder / f"{modality}.nii.gz"
        # Integer intensities like a scanner's, in nibabel's (x, y, z) order.
        data = np.round(1000 * volumes[modality].array).astype(np.int16).transpose()
        nib.save(nib.Nifti1Image(data, affine), path)
        paths.append(path)
    return paths[0], paths[1]


def synth(reference: Path, moving: Path, out: Path, *extra: str) -> int:
    return main(["synth", "--reference", str(reference), "--moving", str(moving), "--out", str(out), *extra])


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def restore_with_sitk(out: Path, ext: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """moving resampled through the written displacement field, by SimpleITK alone."""
    moving = sitk.ReadImage(str(out / f"moving.{ext}"), sitk.sitkFloat64)
    label = sitk.ReadImage(str(out / f"label.{ext}"), sitk.sitkFloat64)
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    restored = sitk.Resample(moving, label, transform, sitk.sitkLinear, 0.0)
    return (sitk.GetArrayFromImage(a) for a in (restored, label, moving))


def interior(array: np.ndarray) -> np.ndarray:
    return array[tuple(slice(n // 6, n - n // 6) for n in array.shape)]


@pytest.mark.parametrize("kind", ["png", "nifti"])
def test_field_on_disk_maps_moving_onto_label(kind, png_pair, nifti_pair, tmp_path):
    reference, moving = png_pair if kind == "png" else nifti_pair
    ext = "png" if kind == "png" else "nii.gz"
    assert synth(reference, moving, tmp_path, "--degradation", "none", "--seed", "3") == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        *(f"{name}.{ext}" for name in OUTPUT_NAMES), "displacement.nii.gz", "meta.json"
    }

    restored, label, misaligned = restore_with_sitk(tmp_path, ext)
    assert ncc(interior(misaligned), interior(label)) < 0.9, "the moving image should be misaligned"
    assert ncc(interior(restored), interior(label)) > 0.98

    # The label is the clean moving input on the reference grid (same geometry as the reference).
    written_label = sitk.ReadImage(str(tmp_path / f"label.{ext}"))
    original = sitk.ReadImage(str(moving))
    for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(written_label, getter)(), getattr(original, getter)(), atol=1e-4)
    label_values, input_values = (sitk.GetArrayFromImage(i).astype(float) for i in (written_label, original))
    # Equal up to the percentile clipping of intensity normalisation (volumes) or exactly (8-bit PNG).
    assert np.median(np.abs(label_values - input_values)) <= 1e-3 * input_values.max()

    meta = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    assert meta["degradation"] == "none" and meta["class_index"] == 0 and meta["seed"] == 3
    assert meta["files"]["moving"] == f"moving.{ext}"
    assert len(meta["params"]["misalignment"]["rotation_deg"]) == (1 if kind == "png" else 3)
    assert meta["intensity_mapping"]["method"] == ("scale8bit" if kind == "png" else "percentile")


def test_same_seed_same_files(png_pair, tmp_path):
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((first, "7"), (again, "7"), (other, "8")):
        assert synth(*png_pair, out, "--degradation", "lowdose", "--seed", seed) == 0
    for path in first.iterdir():
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name
    assert (first / "moving.png").read_bytes() != (other / "moving.png").read_bytes()
    meta = json.loads((first / "meta.json").read_text(encoding="utf-8"))
    assert meta["class_index"] == 3 and meta["params"]["degradation"]["dose_reduction_factor"] > 1


def test_pairs_csv(png_pair, tmp_path):
    reference, moving = png_pair
    csv_path = reference.parent / "pairs.csv"
    csv_path.write_text(f"reference,moving,degradation,seed\n{reference.name},{moving.name},,\n"
                        f"{reference.name},{moving.name},lowdose,5\n")
    assert main(["synth", "--pairs", str(csv_path), "--seed", "10", "--out", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "0000" / "meta.json").read_text(encoding="utf-8"))
    second = json.loads((tmp_path / "0001" / "meta.json").read_text(encoding="utf-8"))
    assert (first["degradation"], first["seed"]) == ("none", 10)
    assert (second["degradation"], second["seed"]) == ("lowdose", 5)


def test_help_and_errors_name_the_pairs_as_the_outputs_and_the_csv_do(png_pair, tmp_path, capsys):
    """Folders are numbered from 0 (0000, 0001, ...) as the help says; an error names the CSV's line."""
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "OUT/0000/" in capsys.readouterr().out
    reference, moving = png_pair
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f"reference,moving,degradation\n{reference},{moving},motion\n{reference},{moving},blur\n")
    assert main(["synth", "--pairs", str(csv_path), "--out", str(tmp_path / "out")]) == 2
    assert "line 3 of the CSV: unknown degradation 'blur'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_never_overwrites_inputs(png_pair, tmp_path, capsys):
    reference = tmp_path / "reference.png"
    reference.write_bytes(png_pair[0].read_bytes())
    before = reference.read_bytes()
    assert synth(reference, png_pair[1], tmp_path) == 2
    assert "overwrite" in capsys.readouterr().err
    assert reference.read_bytes() == before
    assert not (tmp_path / "meta.json").exists()


def test_bad_arguments(png_pair, tmp_path, capsys):
    assert main(["synth", "--reference", str(png_pair[0]), "--out", str(tmp_path)]) == 2
    assert "--pairs" in capsys.readouterr().err
    assert synth(png_pair[0], tmp_path / "missing.png", tmp_path / "out") == 2
    assert "not found" in capsys.readouterr().err
