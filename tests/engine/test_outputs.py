"""A run folder holds one run's outputs: earlier outputs go, other files stay, inputs are never touched."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_unifuse.engine import outputs as outputs_module
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.engine.outputs import (
    METRICS_FILE,
    PROVENANCE_FILE,
    QUALITY_FILE,
    QUALITY_MAP_FILES,
    REPORT_FILE,
    STAGING_PREFIX,
    FolderBusyError,
    check_writable_folder,
    is_complete,
    known_output_names,
    missing_outputs,
    output_file_names,
    output_folder_lock,
    quality_file_names,
    refuse_overwriting_inputs,
    review_map_extension,
    write_fusion_outputs,
    write_text_atomically,
)
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume, placement_metadata, read_displacement, read_image


def save_png(array, path):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def pair(tmp_path):
    yy, xx = np.indices((48, 48))
    head = 200.0 * ((yy - 24) ** 2 + (xx - 24) ** 2 < 16**2)
    reference = save_png(head, tmp_path / "reference.png")
    moving = save_png(np.roll(head, 2, axis=1) * 0.7, tmp_path / "moving.png")
    return read_image(reference), read_image(moving)


def fused(pair, quality):
    engine = FusionEngine(load_method("identity+average", spatial_dims=2), device="cpu")
    return engine.run_fusion(*pair, quality=quality, uncertainty_passes=0)


def test_a_rewrite_removes_every_earlier_output_and_keeps_other_files(pair, tmp_path):
    run = tmp_path / "run"
    write_fusion_outputs(fused(pair, quality=True), run, metrics={"ncc": 0.5})
    (run / REPORT_FILE).write_text("old page", encoding="utf-8")
    (run / "fused.nii.gz").write_bytes(b"from a NIfTI run")  # the other image extension's output
    (run / "alignment_error.mha").write_bytes(b"saved by the workbench")  # its review maps
    (run / "notes.txt").write_text("a reviewer's notes", encoding="utf-8")
    assert {QUALITY_FILE, *QUALITY_MAP_FILES.values()} & {path.name for path in run.iterdir()}

    written = write_fusion_outputs(fused(pair, quality=False), run, remove_report=True)

    assert set(written) == set(output_file_names("png"))
    assert {path.name for path in run.iterdir()} == {*output_file_names("png"), "notes.txt"}
    assert (run / "notes.txt").read_text(encoding="utf-8") == "a reviewer's notes"


def test_a_run_whose_outputs_were_deleted_since_is_not_complete_and_says_what_it_lacks(pair, tmp_path):
    """Its provenance.json alone made a folder whose fused and aligned images were deleted "done"."""
    run = tmp_path / "run"
    write_fusion_outputs(fused(pair, quality=False), run)
    assert is_complete(run) and missing_outputs(run) == []
    (run / "fused.png").unlink()
    assert not is_complete(run)
    assert missing_outputs(run) == ["fused.png"]  # the extension of the aligned image still there
    (run / "aligned.png").unlink()
    (run / "degradation.json").unlink()
    # No image left to tell the extension by:
    assert missing_outputs(run) == ["fused.*", "aligned.*", "degradation.json"]
    (run / PROVENANCE_FILE).unlink()
    assert missing_outputs(run)[-1] == PROVENANCE_FILE


def test_the_staging_folder_of_a_write_killed_midway_goes_with_the_next_write(pair, tmp_path):
    """SIGKILL (or torchrun's SIGTERM) skips the `finally` that removes it."""
    run = tmp_path / "run"
    leftover = run / f"{STAGING_PREFIX}k1ll3d"
    leftover.mkdir(parents=True)
    (leftover / "fused.png").write_bytes(b"half an image")
    write_fusion_outputs(fused(pair, quality=False), run)
    assert {path.name for path in run.iterdir()} == set(output_file_names("png"))


def test_a_page_written_before_saving_is_kept_unless_asked(pair, tmp_path):
    result = fused(pair, quality=False)
    (tmp_path / REPORT_FILE).write_text("this result's page", encoding="utf-8")
    write_fusion_outputs(result, tmp_path, metrics={"ncc": 0.5})
    assert (tmp_path / REPORT_FILE).is_file() and (tmp_path / METRICS_FILE).is_file()

    write_fusion_outputs(result, tmp_path)  # no metrics this time: the earlier ones described another run
    assert (tmp_path / REPORT_FILE).is_file() and not (tmp_path / METRICS_FILE).exists()


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link"])
def test_an_input_at_an_output_name_is_refused_before_anything_is_written(pair, tmp_path, link):
    run = tmp_path / "run"
    run.mkdir()
    reference = run / "aligned.png"
    if link == "same path":
        reference.write_bytes((tmp_path / "reference.png").read_bytes())
    elif link == "symlink":
        reference = tmp_path / "reference-link.png"
        os.symlink(run / "aligned.png", reference)
        (run / "aligned.png").write_bytes((tmp_path / "reference.png").read_bytes())
    else:
        os.link(tmp_path / "reference.png", run / "aligned.png")
        reference = tmp_path / "reference.png"
    before = reference.read_bytes()
    result = FusionEngine(load_method("identity+average", spatial_dims=2), device="cpu").run_fusion(
        read_image(reference), pair[1], quality=False)

    with pytest.raises(InputError, match="aligned.png output goes and would be replaced"):
        write_fusion_outputs(result, run)
    assert reference.read_bytes() == before
    assert [path.name for path in run.iterdir()] == ["aligned.png"]


def test_an_input_elsewhere_or_absent_is_not_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "moving.png").write_bytes(b"an input named after nothing the run writes")
    refuse_overwriting_inputs(run, [run / "moving.png", tmp_path / "fused.png", None])


def test_undefined_metrics_are_written_as_standard_json_null(pair, tmp_path):
    """NaN is not JSON: a strict reader (jq, JavaScript; here Python with NaN refused) must read the files."""
    metrics = {"ssim": float("nan"), "ncc": np.float32(0.5), "per_slice": np.array([1.0, np.inf])}
    write_fusion_outputs(fused(pair, quality=False), tmp_path / "run", metrics=metrics)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    written = json.loads((tmp_path / "run" / METRICS_FILE).read_text(), parse_constant=refuse)
    assert written == {"ssim": None, "ncc": 0.5, "per_slice": [1.0, None]}


def test_a_write_into_a_folder_another_run_holds_is_refused_and_its_staging_left_alone(pair, tmp_path):
    """Two runs into one folder (one pair, or moving files of one name) once mixed their outputs, and
    each write removed every staging folder there, the other run's live one included."""
    run = tmp_path / "run"
    with output_folder_lock(run) as lock:  # another run, between its "already done?" check and its write
        assert lock.held
        live = run / f"{STAGING_PREFIX}live"
        live.mkdir()
        (live / "fused.png").write_bytes(b"being written")
        with pytest.raises(FolderBusyError, match="another unifuse run is writing into this folder"):
            write_fusion_outputs(fused(pair, quality=False), run)
        assert (live / "fused.png").read_bytes() == b"being written"
        assert not (run / PROVENANCE_FILE).exists()
        with pytest.raises(FolderBusyError), output_folder_lock(run):
            pass
    assert {path.name for path in run.iterdir()} == {live.name}  # the lock leaves nothing behind

    write_fusion_outputs(fused(pair, quality=False), run)  # free now: the leftover is no one's any more
    assert {path.name for path in run.iterdir()} == set(output_file_names("png"))


def test_a_lock_that_created_its_folder_removes_it_when_nothing_was_written(tmp_path):
    with output_folder_lock(tmp_path / "out" / "case") as lock:
        assert (tmp_path / "out" / "case").is_dir() and lock.held
    assert list(tmp_path.iterdir()) == []


def test_without_locks_only_staging_folders_untouched_for_long_are_removed(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(outputs_module, "fcntl", None)  # as on Windows
    run = tmp_path / "run"
    live, stale = run / f"{STAGING_PREFIX}live", run / f"{STAGING_PREFIX}stale"
    for staging in (live, stale):
        staging.mkdir(parents=True)
    old = time.time() - 2 * outputs_module.STALE_STAGING_SECONDS
    os.utime(stale, (old, old))

    write_fusion_outputs(fused(pair, quality=False), run)

    assert live.is_dir() and not stale.exists()
    assert (run / PROVENANCE_FILE).is_file()


def test_the_page_moves_in_with_the_outputs_before_the_marker(pair, tmp_path):
    run = tmp_path / "run"
    written = write_fusion_outputs(fused(pair, quality=False), run, report=lambda: "this run's page")
    assert list(written)[-2:] == [REPORT_FILE, PROVENANCE_FILE]
    assert (run / REPORT_FILE).read_text(encoding="utf-8") == "this run's page"


def test_a_page_that_cannot_be_written_leaves_the_earlier_complete_run_as_it_was(pair, tmp_path, monkeypatch):
    """A full disk while writing report.html once left a folder that looked done with half a page."""
    run = tmp_path / "run"
    write_fusion_outputs(fused(pair, quality=False), run, report=lambda: "the earlier run's page")
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    original = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        if self.name == REPORT_FILE:
            original(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(InputError, match=r"report.html: cannot be written \(No space left on device\); the "
                                         "folder's earlier files are as they were"):
        write_fusion_outputs(fused(pair, quality=False), run, remove_report=True, report=lambda: "a new page " * 50)
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


def test_every_nifti_output_keeps_the_reference_header_forms_and_the_field_reads_in_simpleitk(tmp_path):
    """A one-slice coronal reference whose qform (code 1) sits 10/8/6 mm from its sform (code 4):
    the outputs were written with codes 1/1 and qform = sform (10 mm off the reference in ITK
    tools), and SimpleITK could not open displacement.nii.gz (its 2-D direction singular)."""
    import nibabel as nib
    import SimpleITK as sitk

    yy, xx = np.indices((48, 48))
    head = 200.0 * ((yy - 24) ** 2 + (xx - 24) ** 2 < 16**2)
    sform = np.array([[1.5, 0, 0, -40], [0, 0, 2.0, 12], [0, 1.5, 0, -30], [0, 0, 0, 1]], float)  # j -> S
    qform = sform.copy()
    qform[:3, 3] += (10.0, 8.0, 6.0)
    paths = []
    for name, array in (("reference", head), ("moving", np.roll(head, 2, axis=1) * 0.7)):
        image = nib.Nifti1Image(array.astype(np.float32)[:, :, None], sform)
        image.set_qform(qform, code=1)
        image.set_sform(sform, code=4)
        paths.append(tmp_path / f"{name}.nii.gz")
        image.to_filename(paths[-1])
    result = fused((read_image(paths[0]), read_image(paths[1])), quality=True)

    written = write_fusion_outputs(result, tmp_path / "out")
    reference = nib.load(paths[0]).header
    niftis = [path for name, path in written.items() if name.endswith(".nii.gz")]
    assert len(niftis) >= 5  # fused, aligned, displacement and the quality maps
    for path in niftis:
        header = nib.load(path).header
        columns = [0, 2, 1, 3]  # written in world axis order, as the workbench saves it: (i, k, j) of the file
        assert (header["qform_code"], header["sform_code"]) == (1, 4), path.name
        np.testing.assert_allclose(header.get_qform()[:, columns], reference.get_qform(), atol=1e-4, err_msg=path.name)
        np.testing.assert_allclose(header.get_sform()[:, columns], reference.get_sform(), atol=1e-4, err_msg=path.name)
    field = sitk.ReadImage(str(written["displacement.nii.gz"]))
    assert field.GetDimension() == 3 and field.GetNumberOfComponentsPerPixel() == 3
    assert any("disagree" in warning for warning in result.warnings)


def test_a_text_file_that_cannot_be_written_is_named_not_its_hidden_staging_file(tmp_path, monkeypatch):
    """A read-only run folder made the QC report's error name '.report.html.<hash>.part'."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(PermissionError) as caught:
        write_text_atomically(tmp_path / "report.html", "<html></html>")
    assert caught.value.filename == str(tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_on_a_read_only_file_system_the_text_file_is_named_not_its_hidden_staging_file(tmp_path, monkeypatch):
    """There even removing the staging file that was never made fails (EROFS), and that error, naming
    '.cohort.csv.<hash>.part', escaped instead of the one naming the file."""
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as caught:
        write_text_atomically(tmp_path / "cohort.csv", "a,b\r\n")
    assert (caught.value.errno, caught.value.filename) == (errno.EROFS, str(tmp_path / "cohort.csv"))


def test_every_float_output_of_a_sheared_run_is_metaimage_where_simpleitk_places_the_reference(tmp_path):
    """On a sheared grid (a gantry-tilted CT) only fused/aligned went to .mha: the field, the quality
    maps and the review maps were NIfTI, whose qform (what ITK reads) cannot hold a shear, so
    SimpleITK placed them millimetres off the reference and read_displacement refused the field."""
    import SimpleITK as sitk

    yy, xx = np.indices((20, 20))
    head = 200.0 * ((yy - 10) ** 2 + (xx - 10) ** 2 < 7**2)
    tilt = np.radians(15.0)
    paths = []
    for name, array in (("reference", head), ("moving", np.roll(head, 1, axis=1) * 0.7)):
        image = sitk.GetImageFromArray(np.repeat(array[None], 8, axis=0).astype(np.float32))
        image.SetSpacing((1.2, 1.2, 2.5))
        image.SetOrigin((-19.0, -25.0, -24.0))
        image.SetDirection((1, 0, 0, 0, 1, np.sin(tilt), 0, 0, np.cos(tilt)))  # slices step off their normal
        paths.append(tmp_path / f"{name}.mha")
        sitk.WriteImage(image, str(paths[-1]))
    reference = read_image(paths[0])
    engine = FusionEngine(load_method("identity+average", spatial_dims=3), device="cpu")
    result = engine.run_fusion(reference, read_image(paths[1]), quality=True, uncertainty_passes=0)
    assert result.output_extension == "mha" and review_map_extension(result) == "mha"
    review_map = ImageVolume(np.ones(reference.array.shape, np.float32), reference.geometry, {"role": "folding"})

    written = write_fusion_outputs(result, tmp_path / "out", extra_images={"folding.mha": review_map})
    assert set(written) == {*output_file_names("mha", "mha"), *quality_file_names(result.quality, "mha"),
                            "folding.mha"} <= known_output_names()
    on_reference = sitk.ReadImage(str(paths[0]))
    for name, path in written.items():
        if name.endswith(".mha"):
            placed = sitk.ReadImage(str(path))
            np.testing.assert_allclose(placed.GetOrigin(), on_reference.GetOrigin(), atol=1e-4, err_msg=name)
            np.testing.assert_allclose(placed.GetDirection(), on_reference.GetDirection(), atol=1e-6, err_msg=name)
            np.testing.assert_allclose(placed.GetSpacing(), on_reference.GetSpacing(), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(read_displacement(written["displacement.mha"], reference.geometry),
                               result.displacement, atol=1e-4)


def test_the_outputs_of_a_sheared_sform_reference_keep_its_nifti_header_and_simpleitk_applies_the_field(tmp_path):
    """A NIfTI reference whose sform is sheared (an affine-resliced header; its qform the nearest
    rigid form) had every output written as MetaImage placed by the shear, while SimpleITK, ANTs and
    Slicer show the reference by its qform: the outputs sat millimetres off it there. As NIfTI with
    the reference's forms and codes, SimpleITK shows them where it shows the reference and its
    resample of the moving image through the field is the aligned image."""
    import nibabel as nib
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    shape = (10, 12, 14)  # array order (z, y, x)
    sheared = np.array([[1.2, 0.0, 0.3, -8.0], [0.0, 1.0, 0.0, -6.0], [0.0, 0.0, 1.5, -7.0], [0.0, 0.0, 0.0, 1.0]])
    rigid = np.array([[1.2, 0.0, 0.0, -7.5], [0.0, 1.0, 0.0, -6.5], [0.0, 0.0, 1.5, -7.0], [0.0, 0.0, 0.0, 1.0]])
    paths = {}
    for name, affine in (("reference", sheared), ("moving", rigid)):
        smooth = gaussian_filter(rng.normal(size=shape), sigma=2.0)
        image = nib.Nifti1Image((100.0 * smooth / np.abs(smooth).max() + 200.0).astype(np.float32).transpose(), affine)
        image.set_qform(affine, code=1)  # nibabel keeps the sheared sform's nearest rigid form
        image.set_sform(affine, code=1)
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(image, paths[name])
    reference, moving = read_image(paths["reference"]), read_image(paths["moving"])
    assert reference.geometry.is_sheared
    engine = FusionEngine(load_method("identity+average", spatial_dims=3), device="cpu")
    result = engine.run_fusion(reference, moving, quality=True, uncertainty_passes=0)
    assert result.output_extension == "nii.gz" and review_map_extension(result) == "nii.gz"
    review_map = ImageVolume(np.ones(shape, np.float32), reference.geometry,
                             {"role": "folding", **placement_metadata(reference.metadata)})

    written = write_fusion_outputs(result, tmp_path / "out", extra_images={"folding.nii.gz": review_map})
    assert set(written) == {*output_file_names("nii.gz", "nii.gz"), *quality_file_names(result.quality, "nii.gz"),
                            "folding.nii.gz"}
    original = nib.load(paths["reference"]).header
    on_reference = sitk.ReadImage(str(paths["reference"]))
    for name, path in written.items():
        if name.endswith(".nii.gz"):
            header = nib.load(path).header
            for form in ("qform", "sform"):
                np.testing.assert_allclose(getattr(header, f"get_{form}")(), getattr(original, f"get_{form}")(),
                                           atol=1e-5, err_msg=name)
                assert int(header[f"{form}_code"]) == int(original[f"{form}_code"]), name
            placed = sitk.ReadImage(str(path))
            for placement in ("GetOrigin", "GetDirection", "GetSpacing"):
                np.testing.assert_allclose(getattr(placed, placement)(), getattr(on_reference, placement)(),
                                           atol=1e-5, err_msg=name)

    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(written["displacement.nii.gz"]), sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(paths["moving"])), on_reference, field,
                                                  sitk.sitkLinear, 0.0))
    aligned = sitk.GetArrayFromImage(sitk.ReadImage(str(written["aligned.nii.gz"])))
    # Where the package sampled the moving image within its voxels (beyond, the two fill differently).
    grid = np.indices(shape, dtype=np.float64) + result.displacement
    to_moving = np.linalg.inv(moving.geometry.index_to_world) @ reference.geometry.index_to_world
    sampled_at = np.einsum("ij,j...->i...", to_moving, np.concatenate([grid, np.ones((1, *shape))]))[:3]
    inside = np.all([(sampled_at[axis] >= 0) & (sampled_at[axis] <= shape[axis] - 1) for axis in range(3)], axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(theirs[inside], aligned[inside], atol=0.05)


def test_an_out_that_is_a_symbolic_link_to_nothing_names_the_missing_target(tmp_path):
    """It said "cannot create the --out folder (File exists)", and the user found nothing there."""
    link, target = tmp_path / "dangling", tmp_path / "elsewhere" / "missing"
    link.symlink_to(target)
    expected = f"is a symbolic link to {target}, which does not exist: create {target} or choose another --out"
    for out in (link, link / "run"):
        with pytest.raises(InputError) as refused:
            check_writable_folder(out, keep=False)
        assert str(refused.value) == f"{link}: {expected}"
    assert link.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_a_relative_symbolic_link_to_nothing_names_its_target_from_the_link_s_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    Path("runs/latest").symlink_to("missing")
    with pytest.raises(InputError, match=f"is a symbolic link to {tmp_path / 'runs' / 'missing'}, which does not"):
        check_writable_folder(Path("runs/latest"))
