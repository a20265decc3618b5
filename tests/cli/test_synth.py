"""`unifuse synth`: outputs on disk that SimpleITK alone can check (field + resample = label)."""

import errno
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from napari_unifuse.cli import main
from napari_unifuse.cli import synth as synth_module
from napari_unifuse.data.metal import HU_MAX
from napari_unifuse.data.misalign import RandomMisalignment, regime_misalignment
from napari_unifuse.data.pairs import make_pair
from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms
from napari_unifuse.engine.outputs import STAGING_PREFIX
from napari_unifuse.io import normalize_intensity, read_displacement, read_image
from napari_unifuse.io.normalize import CT_WINDOW_HU

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



def test_a_sheared_reference_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    """A gantry-tilted reference was written as NIfTI, whose qform (what ITK reads) holds no shear:
    SimpleITK placed the pair and its field millimetres off; now the NIfTI writer refuses it."""
    volume = make_brain_phantoms((8, 20, 20), modalities=("t1",))["t1"].array.astype(np.float32)
    tilt = np.radians(15.0)
    paths = []
    for name in ("reference", "moving"):
        image = sitk.GetImageFromArray(volume)
        image.SetDirection((1, 0, 0, 0, 1, np.sin(tilt), 0, 0, np.cos(tilt)))  # slices step off their normal
        paths.append(tmp_path / f"{name}.mha")
        sitk.WriteImage(image, str(paths[-1]))
    out = tmp_path / "out"

    assert synth(*paths, out) == 2

    error = capsys.readouterr().err
    assert f"{paths[0]}: its grid is sheared (e.g. a gantry-tilted CT)" in error and "resample it" in error
    assert error.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())

def test_a_reference_with_a_sheared_sform_beside_a_qform_gives_outputs_placed_as_it_is(nifti_pair, tmp_path):
    """A resliced NIfTI header (its sform shears, its qform the nearest rigid form) was refused like a
    gantry-tilted CT, though NIfTI holds it as the reference holds it: every output now keeps the
    reference's forms and codes (the moving file's too, though it lay on another grid), so SimpleITK
    shows them where it shows the reference, and resamples the moving image onto the label through
    the field."""
    sheared = np.array([[-1.2, 0.0, 0.3, 40.0], [0.0, 1.0, 0.0, -20.0], [0.0, 0.0, 2.5, -30.0], [0, 0, 0, 1]])
    paths = []
    for path, affine in zip(nifti_pair, (sheared, nib.load(nifti_pair[1]).affine + np.diag([0, 0, 0.1, 0]))):
        image = nib.load(path)
        image.set_qform(affine, code=1)  # nibabel keeps the sheared sform's nearest rigid form
        image.set_sform(affine, code=2)
        paths.append(tmp_path / path.name)
        nib.save(image, paths[-1])
    assert read_image(paths[0]).geometry.is_sheared
    out = tmp_path / "out"

    assert synth(*paths, out, "--degradation", "none", "--seed", "3") == 0

    original = nib.load(paths[0]).header
    on_reference = sitk.ReadImage(str(paths[0]))
    for name in (*(f"{role}.nii.gz" for role in OUTPUT_NAMES), "displacement.nii.gz"):
        header = nib.load(out / name).header
        for form in ("qform", "sform"):
            np.testing.assert_allclose(getattr(header, f"get_{form}")(), getattr(original, f"get_{form}")(),
                                       atol=1e-5, err_msg=name)
            assert int(header[f"{form}_code"]) == int(original[f"{form}_code"]), name
        placed = sitk.ReadImage(str(out / name))
        for placement in ("GetOrigin", "GetDirection", "GetSpacing"):
            np.testing.assert_allclose(getattr(placed, placement)(), getattr(on_reference, placement)(),
                                       atol=1e-5, err_msg=name)
    restored, label, misaligned = restore_with_sitk(out, "nii.gz")
    assert ncc(interior(misaligned), interior(label)) < 0.9
    assert ncc(interior(restored), interior(label)) > 0.98


def test_the_field_of_a_reference_without_orientation_maps_moving_onto_label_in_simpleitk(nifti_pair, tmp_path):
    """The field got nibabel's guessed orientation (codes 1) while the images kept codes 0: ITK
    placed it flipped and shifted against them, and the resample through it missed the label."""
    unoriented = []
    for path in nifti_pair:
        image = nib.load(path)
        image.set_qform(None, code=0)
        image.set_sform(None, code=0)
        unoriented.append(tmp_path / path.name)
        nib.save(image, unoriented[-1])
    out = tmp_path / "out"
    assert synth(*unoriented, out, "--degradation", "none", "--seed", "3") == 0
    header = nib.load(out / "displacement.nii.gz").header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 0)
    restored, label, _ = restore_with_sitk(out, "nii.gz")
    assert ncc(interior(restored), interior(label)) > 0.98


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


@pytest.mark.parametrize("role", ["reference", "moving"])
def test_pairs_with_one_single_pair_option_is_refused_as_fuse_refuses_it(png_pair, tmp_path, capsys, role):
    """--pairs with --reference alone made the CSV's pairs, ignoring --reference without a word."""
    reference, moving = png_pair
    csv_path = write_csv(tmp_path / "pairs.csv", f"reference,moving\n{reference},{moving}\n")
    code = main(["synth", "--pairs", str(csv_path), f"--{role}", str(png_pair[0]), "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"--pairs cannot be combined with --{role}; give --reference and --moving" in error
    assert error.count("\n") == 1
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("given", [[], ["--reference"], ["--moving"]])
def test_neither_a_pair_nor_a_csv_is_refused_in_fuses_words(png_pair, tmp_path, capsys, given):
    """synth said "--pairs: give either --reference and --moving, or --pairs CSV", fuse otherwise."""
    options = {"--reference": str(png_pair[0]), "--moving": str(png_pair[1])}
    code = main(["synth", *[part for option in given for part in (option, options[option])],
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err == (
        "unifuse synth: error: give --reference and --moving for one pair, or --pairs CSV for many\n")
    assert not (tmp_path / "out").exists()

def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


@pytest.mark.parametrize("rows, message", [
    ("{r},{m}\n{r}\n", "line 3 of the CSV: no moving cell (the row has fewer cells than the header)"),
    ("{r},{m}\n,{m}\n", "line 3 of the CSV: the reference cell is empty"),  # "," alone is a blank row
    ("{r},{m}\n{r},missing.png\n", "line 3 of the CSV: the moving file"),
])
def test_every_csv_row_is_checked_before_anything_is_written(png_pair, tmp_path, capsys, rows, message):
    reference, moving = png_pair
    csv_path = write_csv(tmp_path / "pairs.csv", "reference,moving\n" + rows.format(r=reference, m=moving))
    assert main(["synth", "--pairs", str(csv_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_every_rows_images_are_read_before_anything_is_written_each_bad_row_named_by_its_line(
        png_pair, nifti_pair, tmp_path, capsys):
    """A 2-D reference beside a 3-D moving image, or a truncated PNG, stopped the batch when its turn
    came, after the rows before it were written (which a rerun then refused without --overwrite), and
    the error named no CSV line."""
    reference, moving = png_pair
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(reference.read_bytes()[:300])
    csv_path = write_csv(tmp_path / "pairs.csv", f"reference,moving\n{reference},{moving}\n{reference},{nifti_pair[1]}\n"
                                                 f"{reference},{moving}\n{truncated},{moving}\n")
    assert main(["synth", "--pairs", str(csv_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"unifuse synth: error: {csv_path}: 2 rows cannot be made into pairs, so nothing was "
                            f"written: line 3 of the CSV: {nifti_pair[1]}: the moving image is 3D but the reference "
                            f"is 2D; line 5 of the CSV: {truncated}: cannot be read")
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_negative_seeds_are_refused_in_one_line(png_pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth(*png_pair, tmp_path / "out", "--seed", "-1")
    assert exit_info.value.code == 2
    assert "argument --seed: must be at least 0, got -1" in capsys.readouterr().err
    reference, moving = png_pair
    csv_path = write_csv(tmp_path / "pairs.csv", f"reference,moving,seed\n{reference},{moving},3\n"
                                                 f"{reference},{moving},-5\n")
    assert main(["synth", "--pairs", str(csv_path), "--out", str(tmp_path / "out")]) == 2
    assert "line 3 of the CSV: the seed '-5': must be at least 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_spreadsheet_csv_with_a_byte_order_mark_is_read_and_a_header_alone_refused(png_pair, tmp_path, capsys):
    reference, moving = png_pair
    excel = write_csv(tmp_path / "excel.csv", f"reference,moving\n{reference},{moving}\n", encoding="utf-8-sig")
    assert main(["synth", "--pairs", str(excel), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "0000" / "meta.json").is_file()
    header_only = write_csv(tmp_path / "header.csv", "reference,moving\n")
    assert main(["synth", "--pairs", str(header_only), "--out", str(tmp_path / "other")]) == 2
    assert "the CSV has no pairs, only its header line" in capsys.readouterr().err


def test_a_moving_image_outside_the_reference_is_refused_and_a_partial_one_warned_about(png_pair, nifti_pair,
                                                                                       tmp_path, capsys):
    reference, moving = nifti_pair
    far = tmp_path / "far.nii.gz"
    image = nib.load(moving)
    shifted = image.affine.copy()
    shifted[:3, 3] += 1000.0  # a metre away
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), shifted), far)
    assert synth(reference, far, tmp_path / "far") == 2
    assert "does not overlap the reference" in capsys.readouterr().err
    assert not (tmp_path / "far").exists()

    # A quarter of the reference's pixels: PNGs share the origin and unit spacing.
    quarter = tmp_path / "quarter.png"
    Image.open(png_pair[1]).crop((0, 0, 48, 48)).save(quarter)
    assert synth(png_pair[0], quarter, tmp_path / "quarter") == 0
    assert "warning: the moving image covers only 25 % of the reference grid" in capsys.readouterr().err


def test_a_volume_label_is_the_clean_input_unclipped_and_moving_keeps_the_hottest_voxels(nifti_pair, tmp_path):
    reference, moving = nifti_pair
    assert synth(reference, moving, tmp_path, "--degradation", "lowdose", "--seed", "2") == 0
    original = nib.load(moving).get_fdata()
    label = nib.load(tmp_path / "label.nii.gz").get_fdata()
    np.testing.assert_array_equal(label, original)
    window_top = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))["intensity_mapping"]["upper"]
    assert original.max() > window_top + 50  # the percentile window clips the brightest voxels...
    assert nib.load(tmp_path / "moving.nii.gz").get_fdata().max() > window_top + 50  # ...but not in the output


def test_a_ct_in_hu_gets_its_metal_in_hu_above_the_window_and_its_tissue_as_the_model_sees_it(tmp_path):
    """Metal came out at the window's top (2000 HU) instead of the 3071 HU the metal model gives."""
    volumes = make_brain_phantoms((16, 48, 40), modalities=("t1", "ct"))
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    for modality in ("t1", "ct"):
        nib.save(nib.Nifti1Image(volumes[modality].array.astype(np.float32).transpose(), affine),
                 tmp_path / f"{modality}.nii.gz")
    out = tmp_path / "out"
    assert synth(tmp_path / "t1.nii.gz", tmp_path / "ct.nii.gz", out, "--degradation", "metal",
                 "--misalignment", "none", "--seed", "1") == 0
    written = read_image(out / "moving.nii.gz").array
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    for metal_object in meta["params"]["degradation"]["objects"]:
        assert written[tuple(metal_object["centre_voxel"])] == pytest.approx(HU_MAX, abs=0.5)

    # The model's input for the same draw, in HU, is the written image inside the window (the zero
    # field's spline leaves ~1e-20 where the window clipped, hence the margin).
    normalized, mapping = normalize_intensity(read_image(tmp_path / "ct.nii.gz"), "ct")
    model_input = make_pair(read_image(tmp_path / "t1.nii.gz"), normalized, "metal", rng=1,
                            misalignment=regime_misalignment("none")).moving.array
    tissue = (model_input > 1e-6) & (model_input < 1.0 - 1e-6)
    np.testing.assert_allclose(written[tissue], mapping.inverse(model_input)[tissue], atol=0.01)
    assert written.max() == pytest.approx(HU_MAX, abs=0.5) and (written > mapping.upper + 1).sum() > 0


def test_motion_at_severity_zero_is_refused_before_anything_is_written(png_pair, tmp_path, capsys):
    """It wrote a pair labelled motion whose moving image was the clean one."""
    assert synth(*png_pair, tmp_path / "out", "--degradation", "motion", "--severity", "0") == 2
    error = capsys.readouterr().err
    assert "--severity 0 draws no movement for motion" in error and "degradation none" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    reference, moving = png_pair
    csv_path = write_csv(tmp_path / "pairs.csv", f"reference,moving,degradation\n{reference},{moving},lowdose\n"
                                                 f"{reference},{moving},motion\n")
    assert main(["synth", "--pairs", str(csv_path), "--severity", "0", "--out", str(tmp_path / "csv")]) == 2
    assert "no movement for motion" in capsys.readouterr().err and not (tmp_path / "csv").exists()
    # The other degradations still act at 0 (low dose at a quarter of the dose).
    assert synth(*png_pair, tmp_path / "lowdose", "--degradation", "lowdose", "--severity", "0") == 0


def test_meta_json_states_its_axis_order_which_nifti_reads_reversed(nifti_pair, tmp_path):
    reference, moving = nifti_pair
    assert synth(reference, moving, tmp_path, "--misalignment", "large") == 0
    meta = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    assert meta["axis_order"].startswith("array order (z, y, x), the reverse of the files' (i, j, k)")
    pixdim = nib.load(tmp_path / "moving.nii.gz").header.get_zooms()[:3]
    assert meta["params"]["misalignment"]["spacing_mm"] == pytest.approx(pixdim[::-1])


def test_an_8_bit_ct_png_records_the_hu_window_its_metal_was_simulated_in(tmp_path):
    """The physics maps a normalised CT to Hounsfield units through a window: for a PNG, with no
    window of its own, io's default, which meta.json did not say."""
    slices = make_brain_phantom_slices((64, 64), modalities=("t1", "ct"))
    low, high = CT_WINDOW_HU
    ct_8bit = np.round(255 * np.clip((slices["ct"].array - low) / (high - low), 0, 1)).astype(np.uint8)
    Image.fromarray(ct_8bit).save(tmp_path / "ct.png")
    Image.fromarray(np.round(255 * slices["t1"].array / slices["t1"].array.max()).astype(np.uint8)).save(
        tmp_path / "t1.png")
    out = tmp_path / "out"
    assert synth(tmp_path / "t1.png", tmp_path / "ct.png", out, "--degradation", "metal", "--misalignment", "none",
                 "--seed", "2") == 0
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    degradation = meta["params"]["degradation"]
    assert degradation["hu_window"] == list(CT_WINDOW_HU)
    assert meta["axis_order"].startswith("array order (y, x)")
    moving = np.asarray(Image.open(out / "moving.png"))
    for metal_object in degradation["objects"]:
        assert moving[tuple(metal_object["centre_voxel"])] == 255  # metal, above the window's top


def test_no_row_may_overwrite_another_rows_input(png_pair, tmp_path, capsys):
    """Row 0's moving output would replace row 1's moving input, which must stay the clean image."""
    reference, moving = png_pair
    earlier = tmp_path / "out" / "0000" / "moving.png"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(moving.read_bytes())
    csv_path = write_csv(tmp_path / "pairs.csv", f"reference,moving\n{reference},{moving}\n"
                                                 f"{reference},out/0000/moving.png\n")
    assert main(["synth", "--pairs", str(csv_path), "--out", str(tmp_path / "out")]) == 2
    assert "would overwrite this input" in capsys.readouterr().err
    assert earlier.read_bytes() == moving.read_bytes()
    assert sorted(path.name for path in (tmp_path / "out").rglob("*")) == ["0000", "moving.png"]


def test_out_must_be_a_folder_and_earlier_outputs_need_overwrite(png_pair, nifti_pair, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert synth(*png_pair, a_file) == 2
    assert "--out must be a folder, but this is a file" in capsys.readouterr().err

    out = tmp_path / "out"
    assert synth(*png_pair, out) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert synth(*nifti_pair, out) == 2
    assert "holds an earlier synth output" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    # --overwrite replaces every earlier output, the PNGs of another extension included.
    (out / "notes.txt").write_text("mine")
    assert synth(*nifti_pair, out, "--overwrite") == 0
    assert {path.name for path in out.iterdir()} == {
        *(f"{name}.nii.gz" for name in OUTPUT_NAMES), "displacement.nii.gz", "meta.json", "notes.txt"}


def test_reader_warnings_are_printed_and_meta_records_absolute_inputs(nifti_pair, tmp_path, monkeypatch, capsys):
    reference, moving = nifti_pair
    image = nib.load(moving)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), tmp_path / "nan.nii.gz")
    monkeypatch.chdir(tmp_path)
    assert synth(reference, Path("nan.nii.gz"), Path("out")) == 0
    assert "warning: nan.nii.gz: non-finite values: 1 NaN voxels set to 0" in capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8"))
    assert meta["inputs"] == {"reference": str(reference.resolve()), "moving": str(tmp_path / "nan.nii.gz")}


def test_a_one_slice_volume_is_refused_saying_what_it_is_in_the_files_axis_order(tmp_path, capsys):
    """The shape was given in array order, (1, 32, 32) for what nibabel and ITK call 32 x 32 x 1."""
    for name in ("reference", "moving"):
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 1), dtype=np.float32), np.eye(4)),
                 tmp_path / f"{name}_slice.nii.gz")
    assert synth(tmp_path / "reference_slice.nii.gz", tmp_path / "moving_slice.nii.gz", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "a one-slice volume of 32 x 32 x 1 voxels (i x j x k, as nibabel and ITK give its shape)" in error
    assert "synth needs a 2D image" in error


def test_a_one_row_png_is_refused_as_too_small_not_as_a_slice_to_save_in_2d(tmp_path, capsys):
    """A 16 x 1 PNG was told to be saved "as a 2D image (PNG ...)", which it already is."""
    for name in ("reference", "moving"):
        Image.fromarray(np.arange(16, dtype=np.uint8)[None, :] * 10).save(tmp_path / f"{name}.png")
    assert synth(tmp_path / "reference.png", tmp_path / "moving.png", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "an image of 16 x 1 pixels (width x height); synth needs at least 2 pixels along each side" in error
    assert "save the slice" not in error and not (tmp_path / "out").exists()


@pytest.mark.parametrize("modality, fitting", [("mr", "motion"), ("t2", "motion"), ("pet", "lowdose"),
                                               ("nm", "lowdose")])
def test_metal_on_a_moving_image_named_not_ct_is_refused_naming_the_degradation_that_fits(
        png_pair, tmp_path, capsys, monkeypatch, modality, fitting):
    """Metal was simulated on an MR image given as one, its intensities read as Hounsfield units."""
    monkeypatch.setattr(synth_module, "read_image", lambda path: pytest.fail(f"{path} was read"))
    assert synth(*png_pair, tmp_path / "out", "--degradation", "metal", "--modality", modality) == 2
    error = capsys.readouterr().err
    assert f"--modality {modality}" in error and f"--degradation {fitting}" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    reference, moving = png_pair
    csv_path = write_csv(tmp_path / "pairs.csv", f"reference,moving,degradation\n{reference},{moving},{fitting}\n"
                                                 f"{reference},{moving},metal\n")
    assert main(["synth", "--pairs", str(csv_path), "--modality", modality, "--out", str(tmp_path / "csv")]) == 2
    assert f"--degradation {fitting}" in capsys.readouterr().err and not (tmp_path / "csv").exists()


def test_metal_on_a_moving_volume_read_as_mr_is_warned_about_once_and_recorded(tmp_path, capsys):
    volumes = make_brain_phantoms((16, 48, 40), modalities=("t1", "t2"))
    for modality in ("t1", "t2"):
        nib.save(nib.Nifti1Image(np.round(1000 * volumes[modality].array).astype(np.int16).transpose(),
                                 np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / f"{modality}.nii.gz")
    out = tmp_path / "out"
    assert synth(tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz", out, "--degradation", "metal",
                 "--misalignment", "none") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "reads as MR" in warnings[0] and "--modality ct" in warnings[0] and "--degradation motion" in warnings[0]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["degradation_warning"] in warnings[0]
    # A CT, as detected or named, draws metal without a word, and meta.json says there was none.
    ct_out = tmp_path / "ct"
    assert synth(*(tmp_path / f"{name}.nii.gz" for name in ("t1", "t2")), ct_out, "--degradation", "metal",
                 "--modality", "ct", "--misalignment", "none") == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((ct_out / "meta.json").read_text(encoding="utf-8"))["degradation_warning"] == ""


@pytest.mark.parametrize("degradation, severity", [("motion", "1.5"), ("none", "7"), ("lowdose", "-0.1"),
                                                   ("metal", "nan"), ("lowdose", "inf")])
def test_a_severity_outside_0_to_1_is_refused_by_its_option_before_any_image_is_read(
        png_pair, tmp_path, capsys, monkeypatch, degradation, severity):
    """The refusal named an internal class (MotionArtifact) and came after the images were read."""
    monkeypatch.setattr(synth_module, "read_image", lambda path: pytest.fail(f"{path} was read"))
    assert synth(*png_pair, tmp_path / "out", "--degradation", degradation, "--severity", severity) == 2
    error = capsys.readouterr().err
    assert f"--severity must be a number from 0 to 1, got {severity}" in error
    assert "Artifact" not in error and "Degradation" not in error and not (tmp_path / "out").exists()


def test_metal_on_a_volume_too_small_for_it_names_the_moving_file_and_what_to_do(tmp_path, capsys):
    """It said "CT image: no tissue region deep enough ..." with no way out, of an image given as MR too."""
    for name in ("reference", "moving"):
        nib.save(nib.Nifti1Image(np.full((3, 3, 3), 40.0, np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    assert synth(tmp_path / "reference.nii.gz", tmp_path / "moving.nii.gz", tmp_path / "out", "--degradation",
                 "metal", "--modality", "ct", "--misalignment", "none") == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'moving.nii.gz'}: no tissue region deep enough" in error
    assert "a larger image" in error and "another degradation" in error and "CT image" not in error


def mean_displacement_mm(out: Path) -> float:
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64))
    return float(np.linalg.norm(field, axis=-1).mean())


def test_misalignment_regimes(png_pair, tmp_path):
    sizes = {}
    for regime in ("large", "mild", "none"):
        assert synth(*png_pair, tmp_path / regime, "--misalignment", regime, "--seed", "4") == 0
        meta = json.loads((tmp_path / regime / "meta.json").read_text(encoding="utf-8"))
        assert meta["misalignment"] == regime
        sizes[regime] = mean_displacement_mm(tmp_path / regime)
    assert sizes["large"] > 2 * sizes["mild"] > 0 and sizes["none"] == 0
    assert (tmp_path / "none" / "moving.png").read_bytes() == (tmp_path / "none" / "label.png").read_bytes()

    reference, moving = png_pair
    csv_path = write_csv(tmp_path / "pairs.csv", f"reference,moving,misalignment\n{reference},{moving},none\n"
                                                 f"{reference},{moving},\n")
    assert main(["synth", "--pairs", str(csv_path), "--misalignment", "mild", "--out", str(tmp_path / "csv")]) == 0
    regimes = [json.loads((tmp_path / "csv" / folder / "meta.json").read_text(encoding="utf-8"))["misalignment"]
               for folder in ("0000", "0001")]
    assert regimes == ["none", "mild"]


def test_the_default_misalignment_is_the_large_regime_as_before(png_pair, tmp_path):
    """Outputs of earlier versions stay reproducible: without --misalignment the field is
    RandomMisalignment()'s first draw from the seed, as it always was (no degradation draws)."""
    assert synth(*png_pair, tmp_path, "--degradation", "none", "--seed", "9") == 0
    reference = read_image(png_pair[0])
    expected = RandomMisalignment().sample(reference.spatial_shape, np.random.default_rng(9),
                                           spacing=tuple(reference.geometry.spacing))
    written = read_displacement(tmp_path / "displacement.nii.gz", reference.geometry)
    np.testing.assert_allclose(written, expected, atol=1e-5)


# ---- writing: a full disk, an interruption, a folder it cannot write to ----------------------------
def folder_contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden staging folders included) by relative path."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_full_disk_is_one_line_and_leaves_the_earlier_pair_whole(png_pair, nifti_pair, tmp_path, monkeypatch,
                                                                   capsys):
    """--overwrite used to remove the earlier pair first, then crash with a traceback, leaving a
    0-byte label and no meta.json; now the new files are staged and only then moved in."""
    out = tmp_path / "out"
    assert synth(*png_pair, out) == 0
    earlier = folder_contents(out)
    real_write_image = synth_module.write_image

    def disk_fills_up(volume, path):
        if Path(path).name.startswith("label."):
            Path(path).write_bytes(b"")  # what PIL/nibabel leave behind when the write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_image(volume, path)

    monkeypatch.setattr(synth_module, "write_image", disk_fills_up)
    capsys.readouterr()
    assert synth(*nifti_pair, out, "--overwrite") == 2
    error = capsys.readouterr().err
    assert error == (f"unifuse synth: error: {out / 'label.nii.gz'}: cannot be written (No space left on device); "
                     "the folder's earlier files are as they were\n")
    assert folder_contents(out) == earlier  # the PNG pair, whole; no staging folder left

    monkeypatch.setattr(synth_module, "write_image", real_write_image)
    assert synth(*nifti_pair, out, "--overwrite") == 0
    assert {path.name for path in out.iterdir()} == {
        *(f"{name}.nii.gz" for name in OUTPUT_NAMES), "displacement.nii.gz", "meta.json"}


def test_meta_json_moves_in_last_and_an_interrupted_pair_leaves_nothing_a_rerun_refuses(png_pair, tmp_path,
                                                                                       monkeypatch, capsys):
    """meta.json marks a finished pair. Ctrl-C while writing used to leave truncated files, and a
    rerun was then refused as 'holds an earlier synth output'."""
    out = tmp_path / "out"
    real_write_displacement = synth_module.write_displacement

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth_module, "write_displacement", interrupted)
    assert synth(*png_pair, out) == 130
    assert not out.exists() or folder_contents(out) == {}

    # A run killed outright (SIGTERM, SIGKILL: no `finally`) leaves its staging folder: the next run
    # removes it and does not take it for an earlier output.
    leftover = out / f"{STAGING_PREFIX}killed" / "reference.png"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"\x89PNG truncated")
    monkeypatch.setattr(synth_module, "write_displacement", real_write_displacement)
    moved = []
    real_replace = os.replace

    def recorded(source, destination):
        moved.append(Path(destination).name)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recorded)
    assert synth(*png_pair, out) == 0, capsys.readouterr().err
    assert moved[-1] == "meta.json" and len(moved) == 5
    assert sorted(folder_contents(out)) == sorted(
        [*(f"{name}.png" for name in OUTPUT_NAMES), "displacement.nii.gz", "meta.json"])


@pytest.fixture
def nothing_synthesised(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pair was made before the refusal")

    monkeypatch.setattr(synth_module, "make_pair", refuse)


def test_an_out_it_cannot_write_to_is_refused_before_any_pair_is_made(png_pair, tmp_path, capsys, nothing_synthesised,
                                                                      deny_writes_in, deny_creating):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    deny_writes_in(read_only)
    assert synth(*png_pair, read_only) == 2
    assert capsys.readouterr().err == f"unifuse synth: error: {read_only}: cannot write there (Permission denied)\n"
    assert list(read_only.iterdir()) == []

    inside_read_only = tmp_path / "parent" / "out"
    deny_creating(inside_read_only)
    assert synth(*png_pair, inside_read_only) == 2
    assert capsys.readouterr().err == (f"unifuse synth: error: {inside_read_only}: cannot create the --out folder "
                                       "(Permission denied)\n")
    assert not (tmp_path / "parent").exists()


# ---- the CSV's header ------------------------------------------------------------------------------
@pytest.mark.parametrize("header, message", [
    ("reference,moving,degradaton", "unknown column 'degradaton' (did you mean 'degradation'?); the columns are "
                                    "reference, moving and optionally degradation, misalignment, seed"),
    ("Reference,moving,degradation", "unknown column 'Reference' (did you mean 'reference'?)"),
    ("reference,moving,degradation,degradation", "the header names the column degradation more than once"),
])
def test_a_column_synth_does_not_read_is_refused_by_name_not_ignored(png_pair, tmp_path, capsys, header, message,
                                                                     nothing_synthesised):
    """`degradaton=metal` used to give a clean pair, recorded as degradation none."""
    reference, moving = png_pair
    cells = ",".join(["metal"] * (header.count(",") - 1))
    csv_path = write_csv(tmp_path / "pairs.csv", f"{header}\n{reference},{moving},{cells}\n")
    assert main(["synth", "--pairs", str(csv_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"unifuse synth: error: {csv_path}: {message}") and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_cell_under_no_column_is_refused_and_an_empty_trailing_one_harmless(png_pair, tmp_path, capsys):
    reference, moving = png_pair
    stray = write_csv(tmp_path / "stray.csv", f"reference,moving\n{reference},{moving},metal\n")
    assert main(["synth", "--pairs", str(stray), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"unifuse synth: error: {stray}: line 2 of the CSV: the cell 'metal' is "
                                       "under no column of the header; name its column or remove it\n")
    spreadsheet = write_csv(tmp_path / "spreadsheet.csv", f"reference,moving,\n{reference},{moving},\n")
    assert main(["synth", "--pairs", str(spreadsheet), "--out", str(tmp_path / "out")]) == 0


def test_a_folder_given_as_the_csv_is_called_a_folder(tmp_path, capsys):
    assert main(["synth", "--pairs", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"unifuse synth: error: {tmp_path}: is a folder, not a CSV file; --pairs "
                                       "takes a CSV file of pairs\n")
