"""The QC report page of a run and the cohort index sorted by suspicion."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms
from napari_unifuse.engine.annotations import Annotation, AnnotationStore
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.engine.outputs import write_fusion_outputs
from napari_unifuse.engine.overlays import display_grey
from napari_unifuse.engine.provenance import sha256_of_array
from napari_unifuse.engine.quality import INVENTED, UNCERTAINTY, QualityMaps, quality_maps
from napari_unifuse.engine.report import (
    BATCH_SUMMARY_FILE,
    EARLIER_FAILURES,
    INDEX_FILE,
    OVERLAY_COLOURS,
    REPORT_FILE,
    SECTIONS,
    write_index,
    write_report,
)
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume

SLICES = 6


def constructed_result(blob_radius: float, defect_slice: int = 2, *, slices: int = SLICES,
                       uncertainty: np.ndarray | None = None,
                       spacing: tuple[float, float, float] = (2.0, 1.0, 1.0)) -> FusionResult:
    """A 3D result of ``slices`` 40 × 40 slices whose fused image has a blob of ``blob_radius``
    pasted into one slice (none at radius 0), with its quality maps (``uncertainty``: the map in mm,
    0.5 mm everywhere by default, under the 1 mm threshold); no model involved."""
    yy, xx = np.indices((40, 40))
    head = ndimage.gaussian_filter(((yy - 20) ** 2 + (xx - 20) ** 2 < 15**2).astype(np.float32), 1.0)
    reference, moving = np.stack([0.6 * head] * slices), np.stack([0.4 * head] * slices)
    fused = 0.5 * (reference + moving)
    if blob_radius:
        blob = ((yy - 18) ** 2 + (xx - 23) ** 2 < blob_radius**2).astype(np.float32)
        fused[defect_slice] += 0.4 * ndimage.gaussian_filter(blob, 1.0)
    if uncertainty is None:
        uncertainty = np.full(reference.shape, 0.5, np.float32)
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), np.eye(3))
    probabilities = np.tile([0.7, 0.1, 0.1, 0.1], (slices, 1))
    return FusionResult(
        fused=ImageVolume(fused.astype(np.float32), geometry),
        aligned=ImageVolume(moving, geometry),
        displacement=np.zeros((3, *reference.shape), np.float32),
        class_names=DEGRADATION_CLASSES,
        class_probs=dict(zip(DEGRADATION_CLASSES, probabilities[0].tolist())),
        slice_class_probs=probabilities,
        output_extension="nii.gz",
        provenance={"created": "2026-12-02T08:00:00+00:00", "checkpoint": {"name": "constructed"},
                    "inputs": {"reference": {"path": "/data/t1.nii.gz"}, "moving": {"path": "/data/t2.nii.gz"}}},
        quality=quality_maps(reference, moving, moving, fused, uncertainty_mm=uncertainty,
                             uncertainty_threshold_mm=1.0, uncertainty_definition="test spread"),
    )


def test_the_report_names_the_run_and_holds_every_section(tmp_path):
    run = tmp_path / "patient-007"
    result = constructed_result(blob_radius=4)
    reference = ImageVolume(np.stack([np.eye(40, dtype=np.float32)] * SLICES), result.fused.geometry, source="t1.nii")
    AnnotationStore(run).add(Annotation("hallucinated structure", "dr-a", note="bright spot", slice_index=2))
    path = write_report(result, run, reference=reference, moving=result.aligned, metrics={"Q_ssim": 0.8125})

    page = path.read_text(encoding="utf-8")
    assert path == run / REPORT_FILE
    assert re.search(r"<title>[^<]*patient-007", page)
    assert "<title>UniFuse QC report: t1.nii + t2.nii.gz (patient-007)</title>" in page  # the pair, not only its folder
    for key, title in SECTIONS.items():
        assert f'<section id="{key}"><h2>{title}</h2>' in page
    assert "1 of 6 slices flagged" in page and "2 (hallucinated structure)" in page
    assert "<h3>Slice 2: flagged for hallucinated structure (by invented structure" in page  # flagged first
    assert "bright spot" in page and "dr-a" in page  # the saved annotation
    assert "Q_ssim" in page and "0.8125" in page
    assert "0.50 mm" in page  # the uncertainty summary's median
    assert '"constructed"' in page  # provenance
    assert page.count("data:image/png;base64,") >= 5  # inputs, 3 key slices, degradation, uncertainty
    assert "<script" not in page and "http" not in page  # self-contained


def uncertainty_over_much_of_every_slice(slices: int) -> np.ndarray:
    """2 mm (over the 1 mm threshold) on 40-45 % of every slice, as over the air of a volume: the
    largest score of each slice, yet no slice stands out from the others."""
    uncertainty = np.full((slices, 40, 40), 0.5, np.float32)
    for index in range(slices):
        uncertainty[index, : 16 + index % 3, :] = 2.0
    return uncertainty


def test_a_slice_flagged_by_one_map_is_named_and_drawn_first_for_that_map(tmp_path):
    """On a metal run the invented-structure map flagged slices where the uncertainty scored higher
    but as high as everywhere: the page called them "misalignment" and drew only the air slices."""
    slices = 10
    result = constructed_result(blob_radius=4, defect_slice=6, slices=slices,
                                uncertainty=uncertainty_over_much_of_every_slice(slices))
    assert result.quality.suspicious_slices() == [6]
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")

    verdict = page[page.index("<h1>"):page.index("<section")]
    assert "1 of 10 slices flagged</span>: 6 (hallucinated structure)." in verdict
    assert "misalignment" not in verdict
    headings = re.findall(r"<h3>(.*?)</h3>", section(page, "key-slices"))
    assert headings[0].startswith("Slice 6: flagged for hallucinated structure (by invented structure ")
    assert len(headings) == 3 and all(": not flagged, " in heading and "alignment uncertainty" in heading
                                      for heading in headings[1:])


def test_a_one_slice_volume_is_the_image_throughout(tmp_path):
    result = constructed_result(blob_radius=4, defect_slice=0, slices=1)
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")
    assert "<span class=flag>The image is flagged</span> (hallucinated structure)." in page
    assert "<h3>The image: flagged for hallucinated structure" in page
    assert "Slice 0" not in page and "1 of 1" not in page


def one_slice_result(slice_axis: int) -> FusionResult:
    """``constructed_result``'s one-slice volume with its slice along ``slice_axis`` (2: a sagittal
    slice stored as x = 1 voxel), spacing 1 × 1 mm in plane and 2 mm across; its class rows repeat
    per slice along axis 0, as the engine puts a one-slice result back on its grid."""
    flat = constructed_result(blob_radius=4, defect_slice=0, slices=1)

    def along(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(array, 0, slice_axis))

    spacing = np.insert([1.0, 1.0], slice_axis, 2.0)
    geometry = Geometry(tuple(spacing), (0.0, 0.0, 0.0), np.eye(3))
    quality = flat.quality
    shape = along(flat.fused.array).shape
    return FusionResult(
        fused=ImageVolume(along(flat.fused.array), geometry),
        aligned=ImageVolume(along(flat.aligned.array), geometry),
        displacement=np.zeros((3, *shape), np.float32), class_names=flat.class_names, class_probs=flat.class_probs,
        slice_class_probs=np.repeat(flat.slice_class_probs[:1], shape[0], axis=0), output_extension="nii.gz",
        provenance=flat.provenance,
        quality=QualityMaps.from_maps({name: along(array) for name, array in quality.maps().items()},
                                      quality.thresholds, definitions=quality.definitions))


@pytest.mark.parametrize("slice_axis", [0, 2], ids=["axial", "sagittal"])
def test_a_one_slice_volume_is_the_image_whichever_axis_holds_the_slice(tmp_path, drawn_images, slice_axis):
    """A sagittal slice (x = 1 voxel) was reported as 40 "slices", each a 40 × 1 line, none flagged,
    where the same slice stored axially was "The image is flagged"."""
    result = one_slice_result(slice_axis)
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")
    assert "<span class=flag>The image is flagged</span> (hallucinated structure)." in page
    assert "<h3>The image: flagged for hallucinated structure" in page
    assert "Slice 0" not in page and "of 40" not in page and "slice (z)" not in page
    assert "Degradation class probabilities of the image." in page  # one estimate, not 40 repeated rows
    planes = [image for _, image, _ in drawn_images if image.ndim >= 2]
    assert planes and all(image.shape[:2] == (40, 40) for image in planes)  # the image, never a 1-voxel line
    assert all(kwargs.get("aspect") == pytest.approx(1.0) for _, _, kwargs in drawn_images if "aspect" in kwargs)


def test_every_figure_says_what_it_shows_and_how_overlapping_maps_show(tmp_path):
    result = constructed_result(blob_radius=4)
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")
    alts = re.findall(r'<img alt="([^"]*)"', page)
    assert len(alts) == page.count("<img") == 6  # inputs, 3 key slices, degradation, uncertainty
    assert alts[0] == ("The inputs and results side by side: reference at slice 3, moving (input) at slice 3, "
                       "aligned + restored at slice 3, fused at slice 3.")
    assert alts[1] == ("Slice 2 of the fused image: plain; with invented structure, lost structure, restoration change "
                       "overlaid where above threshold; with alignment uncertainty overlaid where above threshold.")
    assert alts[4] == "Degradation class probabilities per slice with the suspicion of each slice as grey bars."
    assert alts[5].startswith("Histogram of the alignment uncertainty with its threshold, and its map at slice ")
    assert "where maps overlap their colours blend" in section(page, "key-slices")


@pytest.fixture
def drawn_images(monkeypatch) -> list[tuple[object, np.ndarray, dict]]:
    """Every ``imshow`` the page's figures make: (axes, image, keyword arguments)."""
    from matplotlib.axes import Axes

    calls: list[tuple[object, np.ndarray, dict]] = []
    original = Axes.imshow

    def recording(axes, image, *args, **kwargs):
        calls.append((axes, np.asarray(image), kwargs))
        return original(axes, image, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", recording)
    return calls


def test_figures_are_drawn_in_mm_and_colour_inputs_in_colour(tmp_path, drawn_images):
    """Pixels of 1 mm (rows) by 2 mm (columns) were drawn square, and an RGB input as its grey luma,
    which turns a PET scale's hot red darker than its cooler yellow."""
    result = constructed_result(blob_radius=4, spacing=(2.0, 1.0, 2.0))
    colour = np.zeros((40, 40, 3), np.uint8)  # a colour PNG: RGB is 2-D only
    colour[:, :20, 0] = 255  # red (hot) on the left, yellow on the right
    colour[:, 20:, :2] = 255
    reference = ImageVolume(colour, Geometry((1.0, 2.0), (0.0, 0.0), np.eye(2)), is_rgb=True)
    write_report(result, tmp_path, reference=reference, moving=result.aligned)

    slices_drawn = [(image, kwargs) for _, image, kwargs in drawn_images if image.shape[:2] == (40, 40)]
    assert slices_drawn and all(kwargs.get("aspect") == pytest.approx(0.5) for _, kwargs in slices_drawn)
    in_colour = [image for image, _ in slices_drawn if image.ndim == 3]
    assert len(in_colour) == 1
    assert in_colour[0][5, 5] == pytest.approx([1.0, 0.0, 0.0]) and in_colour[0][5, 30] == pytest.approx([1, 1, 0])


def test_the_uncertainty_overlay_does_not_cover_the_other_maps(tmp_path, drawn_images):
    result = constructed_result(blob_radius=4, uncertainty=uncertainty_over_much_of_every_slice(SLICES))
    write_report(result, tmp_path, reference=result.fused, moving=result.aligned)
    colours_per_axes: dict[int, set[str]] = {}
    for axes, _, kwargs in drawn_images:
        cmap = kwargs.get("cmap")
        if hasattr(cmap, "colors"):  # the overlays: one flat colour per map
            colours_per_axes.setdefault(id(axes), set()).update(map(str, cmap.colors))
    uncertainty, invented = OVERLAY_COLOURS[UNCERTAINTY], OVERLAY_COLOURS[INVENTED]
    assert any(uncertainty in colours for colours in colours_per_axes.values())
    assert not any({uncertainty, invented} <= colours for colours in colours_per_axes.values())


@pytest.mark.parametrize("kept", ["identity", "simpleitk"])
def test_the_alignment_guards_decision_is_stated_under_the_verdict(tmp_path, kept):
    result = constructed_result(blob_radius=4)
    message = ("kept identity: no reliable improvement (no estimate gained more than 4× its noise)" if kept == "identity"
               else "kept simpleitk: mutual information +0.485 nats over identity, 7.7× its noise")
    result.provenance["alignment_guard"] = {"kept": kept, "message": message}
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")
    top = page[page.index("<h1>"):page.index("<section")]
    assert message in top
    assert ("<p class=flag>Not registered" in top) == (kept == "identity")


def test_the_annotation_table_names_the_method_or_the_inputs_and_the_slice_axis(tmp_path):
    result = constructed_result(blob_radius=4)
    store = AnnotationStore(tmp_path)
    store.add(Annotation("lost structure", "dr-a", slice_index=23, slice_axis=2, method="bsafusion"))
    store.add(Annotation("other", "dr-b", slice_index=4, slice_axis=0, subject="inputs", method=None))
    with store.path.open("a", encoding="utf-8") as handle:  # a record torn by a crash
        handle.write('{"action": "add", "cat')
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")
    annotations = page[page.index('<section id="annotations">'):page.index('<section id="provenance">')]
    assert "<th>about</th>" in annotations and "<td>bsafusion</td>" in annotations
    assert "<td>inputs</td>" in annotations  # a flag made on the pair before any run
    assert "<td>slice x = 23</td>" in annotations
    assert "line 3 is unreadable" in annotations


def test_flags_made_on_other_inputs_are_set_apart_from_this_runs(tmp_path):
    """A folder overwritten by a run of a replaced moving image keeps the old run's flags: they must
    not read as about the new result."""
    result = constructed_result(blob_radius=4)
    reference, moving = result.fused, result.aligned
    store = AnnotationStore(tmp_path)
    store.add(Annotation("lost structure", "dr-a", note="flag on the current pair", slice_index=1,
                         reference_sha256=sha256_of_array(reference.array), moving_sha256=sha256_of_array(moving.array)))
    store.add(Annotation("hallucinated structure", "dr-b", note="flag on the old pair", slice_index=2,
                         reference_sha256=sha256_of_array(reference.array), moving_sha256="0" * 64))
    store.add(Annotation("other", "dr-c", note="no hashes recorded", slice_index=3))

    page = write_report(result, tmp_path, reference=reference, moving=moving).read_text(encoding="utf-8")

    current, _, apart = section(page, "annotations").partition("made on other input images than this run's")
    assert "flag on the current pair" in current and "no hashes recorded" in current
    assert "flag on the old pair" not in current and "flag on the old pair" in apart
    assert "<p class=flag>1 annotation was" in current


def test_the_uncertainty_map_is_called_alignment_uncertainty_throughout(tmp_path):
    result = constructed_result(blob_radius=4)
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")
    assert "<td>alignment uncertainty</td>" in page  # the quality-map table
    assert "misalignment" not in page


def test_a_run_without_quality_maps_still_gets_a_report(tmp_path):
    result = constructed_result(blob_radius=0)
    result.quality = None
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")
    assert "No quality maps were computed" in page
    assert all(f'<section id="{key}">' in page for key in SECTIONS)


def section(page: str, key: str) -> str:
    return re.search(rf'<section id="{key}">(.*?)</section>', page, re.DOTALL).group(1)


@pytest.mark.parametrize("quality", [True, False], ids=["quality", "no-quality"])
@pytest.mark.parametrize("shape", [(48, 48), (16, 32, 32)], ids=["2d", "3d"])
def test_a_method_that_estimates_no_degradation_gets_a_report_that_says_so(tmp_path, shape, quality):
    make_phantoms = make_brain_phantom_slices if len(shape) == 2 else make_brain_phantoms
    phantoms = make_phantoms(shape, ("t1", "t2"))
    engine = FusionEngine(load_method("identity+average", spatial_dims=len(shape)), device="cpu")
    result = engine.run_fusion(phantoms["t1"], phantoms["t2"], quality=quality)
    assert not result.class_probs and result.alignment_guard is None  # a classical pipeline: neither

    page = write_report(result, tmp_path, reference=phantoms["t1"], moving=phantoms["t2"]).read_text(encoding="utf-8")
    assert all(f'<section id="{key}">' in page for key in SECTIONS)
    degradation = section(page, "degradation")
    assert "The method identity+average estimates no degradation" in degradation
    assert "data:image/png" not in degradation  # no empty plot
    assert ("No quality maps were computed" in section(page, "key-slices")) == (not quality)


def test_the_index_lists_runs_most_suspicious_first_and_links_their_reports(tmp_path):
    for name, radius in (("small-defect", 2.5), ("clean", 0), ("large-defect", 6)):
        result = constructed_result(blob_radius=radius)
        write_fusion_outputs(result, tmp_path / "cohort" / name)
        write_report(result, tmp_path / "cohort" / name, reference=result.fused, moving=result.aligned)
    unranked = constructed_result(blob_radius=0)
    unranked.quality = None
    write_fusion_outputs(unranked, tmp_path / "cohort" / "aaa-no-maps")

    page = write_index(tmp_path / "cohort").read_text(encoding="utf-8")
    order = re.findall(r"<tr><td>(?:<a href=\"[^\"]+\">)?([\w-]+)", page)
    assert order == ["large-defect", "small-defect", "clean", "aaa-no-maps"]
    assert '<a href="large-defect/report.html">' in page
    # The run is done: fuse skips it unless told to overwrite, so the hint must say so.
    assert "aaa-no-maps <span class=note>(no report: run <code>unifuse fuse --report --overwrite</code>)" in page


def test_inputs_of_the_same_file_name_are_told_apart_by_their_folders(tmp_path):
    """A Harvard pair is MRI/16003.png onto CT/16003.png: the title and the index read
    "16003.png + 16003.png", which input was which modality nowhere to be seen."""
    result = constructed_result(blob_radius=0)
    result.provenance["inputs"] = {"reference": {"path": "/harvard/CT-MRI/MRI/16003.png"},
                                   "moving": {"path": "/harvard/CT-MRI/CT/16003.png"}}
    run = tmp_path / "cohort" / "16003"
    write_fusion_outputs(result, run)
    page = write_report(result, run, reference=result.fused, moving=result.aligned).read_text(encoding="utf-8")
    assert "<title>UniFuse QC report: MRI/16003.png + CT/16003.png (16003)</title>" in page

    index = write_index(tmp_path / "cohort").read_text(encoding="utf-8")
    assert "<td>MRI/16003.png + CT/16003.png</td>" in index


def test_the_index_counts_a_batchs_pairs_and_lists_failed_and_unfinished_ones_apart(tmp_path):
    """A batch of 3 pairs, 2 done and 1 failed, looked like 2 runs; a killed pair not at all."""
    from napari_unifuse.cli.fuse import SUMMARY_FILE

    assert BATCH_SUMMARY_FILE == SUMMARY_FILE
    batch = tmp_path / "cohort" / "batch"
    for name in ("pt1", "pt3"):
        write_fusion_outputs(constructed_result(blob_radius=4), batch / name)
    (batch / "pt3" / "provenance.json").unlink()  # its outputs written, the run killed before the marker
    (batch / "killed" / "moving").mkdir(parents=True)  # killed before its first write
    error = "in/broken.png: cannot be read as an image (PNG/JPG)"
    (batch / SUMMARY_FILE).write_text(json.dumps({
        "created": "2026-12-06T16:00:29+00:00", "pairs": 3, "done": 2, "skipped": 0, "failed": 1,
        "outcomes": [{"name": "pt1", "status": "done"}, {"name": "pt2", "status": "failed", "error": error},
                     {"name": "pt3", "status": "done"}]}), encoding="utf-8")

    page = write_index(tmp_path / "cohort").read_text(encoding="utf-8")

    finished, _, rest = page.partition("</table>")
    assert "1 finished run," in finished and "batch/pt1" in finished
    assert "pt2" not in finished and "batch/pt3" not in finished and "killed" not in finished
    assert "batch: 3 pairs, 2 done, 0 skipped, 1 failed" in rest
    failed = rest[rest.index("Failed pairs"):rest.index("Unfinished run folders")]
    assert "<td>batch</td><td>pt2</td><td>in/broken.png: cannot be read as an image (PNG/JPG)</td>" in failed
    unfinished = rest[rest.index("Unfinished run folders"):]
    assert "<li>batch/killed/moving</li>" in unfinished and "<li>batch/pt3</li>" in unfinished
    assert "<li>batch/killed</li>" not in unfinished


def test_the_index_does_not_list_a_synth_pair_folder_as_an_unfinished_run(tmp_path):
    """A `unifuse synth` pair beside the runs holds displacement.nii.gz (its ground truth) but no
    provenance.json: it was listed as an unfinished run that rerunning the batch would redo."""
    from PIL import Image

    from napari_unifuse.cli.synth import META_FILE, SynthJob, synthesize
    from napari_unifuse.engine.report import SYNTH_META_FILE

    assert SYNTH_META_FILE == META_FILE
    study = tmp_path / "study"
    yy, xx = np.indices((32, 32))
    for name, level in (("mri", 200), ("ct", 120)):
        disc = ((yy - 16) ** 2 + (xx - 15) ** 2 < 10**2) * level + ((yy - 12) ** 2 + (xx - 18) ** 2 < 3**2) * 50
        Image.fromarray(disc.astype(np.uint8)).save(tmp_path / f"{name}.png")
    synthesize(SynthJob(tmp_path / "mri.png", tmp_path / "ct.png", "lowdose", seed=1, out=study / "synth_pair"))
    write_fusion_outputs(constructed_result(blob_radius=0), study / "runs" / "pt1")
    (study / "runs" / "pt1" / "provenance.json").unlink()  # a run killed before its marker: still listed

    page = write_index(study).read_text(encoding="utf-8")

    unfinished = page[page.index("Unfinished run folders"):]
    assert "<li>runs/pt1</li>" in unfinished
    assert "synth_pair" not in page


def test_a_pair_that_failed_on_resume_keeps_its_earlier_run_marked_as_such(tmp_path):
    """Its input replaced, a resumed batch fails the pair: the old run stayed listed as a finished run
    and the pair under "Failed pairs (no outputs)", though its folder holds outputs."""
    batch = tmp_path / "cohort"
    for name in ("stale", "rerun"):
        write_fusion_outputs(constructed_result(blob_radius=4), batch / name)  # created 2026-12-02T08:00
    rerun = json.loads((batch / "rerun" / "provenance.json").read_text(encoding="utf-8"))
    rerun["created"] = "2026-12-03T09:00:00+00:00"  # a single run into the folder after the batch
    (batch / "rerun" / "provenance.json").write_text(json.dumps(rerun), encoding="utf-8")
    (batch / BATCH_SUMMARY_FILE).write_text(json.dumps({
        "created": "2026-12-02T10:00:00+00:00", "pairs": 3, "done": 0, "skipped": 0, "failed": 3,
        "outcomes": [{"name": name, "status": "failed", "error": f"{name}: different moving image"}
                     for name in ("stale", "rerun", "unread")]}), encoding="utf-8")

    page = write_index(batch).read_text(encoding="utf-8")

    rows = {re.match(r"<td>(\w+)", row).group(1): row for row in page.split("<tr>")[2:4]}
    assert "failed in the batch of summary.json: these are an earlier run's outputs" in rows["stale"]
    assert "failed" not in rows["rerun"]
    assert "no outputs" not in page
    failed = page[page.index("Failed pairs"):]
    assert "<td>stale</td><td>stale: different moving image</td><td>an earlier run's (stale, listed above)" in failed
    assert "<td>rerun</td><td>rerun: different moving image</td><td>a later run's (rerun, listed above)" in failed
    assert "<td>unread</td><td>unread: different moving image</td><td>none</td>" in failed


def test_the_index_names_damaged_or_odd_files_instead_of_failing(tmp_path):
    """Valid JSON of another shape (a list, a null suspicion) is as damaged as cut-short JSON."""
    cohort = tmp_path / "cohort"
    for name in ("ranked", "list-quality", "null-suspicion", "list-provenance"):
        write_fusion_outputs(constructed_result(blob_radius=4), cohort / name)
    (cohort / "list-quality" / "quality.json").write_text("[]", encoding="utf-8")
    (cohort / "null-suspicion" / "quality.json").write_text('{"max_suspicion": null}', encoding="utf-8")
    (cohort / "list-provenance" / "provenance.json").write_text("[{}]", encoding="utf-8")

    page = write_index(cohort).read_text(encoding="utf-8")

    rows = {re.match(r"<td>([\w-]+)", row).group(1): row for row in page.split("<tr>")[2:]}
    assert list(rows) == ["list-provenance", "ranked", "list-quality", "null-suspicion"]  # equal suspicion: by name
    assert "quality.json unreadable" in rows["list-quality"]
    assert "quality.json incomplete" in rows["null-suspicion"] and "n/a" in rows["null-suspicion"]
    assert "provenance.json unreadable" in rows["list-provenance"]


def test_the_index_links_odd_folder_names_and_linked_runs(tmp_path):
    """``fuse`` names a run folder after its moving file: ``pt#12`` must not link to ``pt``, a
    Latin-1 name must not stop the page, and a cohort of links to runs is still a cohort."""
    cohort, elsewhere = tmp_path / "cohort", tmp_path / "elsewhere"
    latin1 = os.fsdecode(b"caf\xe9")
    for run in (cohort / "pt#12", cohort / latin1, elsewhere / "linked"):
        result = constructed_result(blob_radius=4)
        write_fusion_outputs(result, run)
        write_report(result, run, reference=result.fused, moving=result.aligned)
    (cohort / "linked").symlink_to(elsewhere / "linked")
    (cohort / "loop").symlink_to(cohort)

    page = write_index(cohort).read_text(encoding="utf-8")

    assert '<a href="pt%2312/report.html">pt#12</a>' in page
    assert '<a href="caf%E9/report.html">caf\ufffd</a>' in page
    assert '<a href="linked/report.html">linked</a>' in page
    assert "3 finished runs" in page


def fail_writing(monkeypatch, name: str) -> None:
    """Writing a file whose name holds ``name`` stops halfway on a full disk."""
    original = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        if name in self.name:
            original(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)


def test_a_full_disk_leaves_the_earlier_page_and_index_whole(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "case1"
    result = constructed_result(4.0)
    write_fusion_outputs(result, run)
    page = write_report(result, run, reference=result.aligned, moving=result.aligned).read_text(encoding="utf-8")
    index = write_index(tmp_path / "runs").read_text(encoding="utf-8")

    fail_writing(monkeypatch, REPORT_FILE)
    with pytest.raises(InputError, match=f"^{re.escape(str(run))}: cannot write there \\(No space left on device\\)$"):
        write_report(result, run, reference=result.aligned, moving=result.aligned)
    fail_writing(monkeypatch, INDEX_FILE)
    with pytest.raises(OSError, match="No space left"):
        write_index(tmp_path / "runs")

    assert (run / REPORT_FILE).read_text(encoding="utf-8") == page
    assert (tmp_path / "runs" / INDEX_FILE).read_text(encoding="utf-8") == index
    assert sorted(path.name for path in run.parent.parent.rglob("*.part")) == []  # no half-written page left


def test_a_runs_folder_that_cannot_hold_the_report_is_named_in_one_line(tmp_path):
    """A runs folder that is a file (or on a read-only disk) is the user's to fix, like a Save there."""
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    result = constructed_result(4.0)
    with pytest.raises(InputError) as caught:
        write_report(result, runs / "case1", reference=result.aligned, moving=result.aligned)
    assert str(caught.value) == f"{runs / 'case1'}: cannot write there (Not a directory)"


def test_a_run_folder_that_cannot_be_read_is_named_not_silently_left_out(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for name in ("readable", "locked"):
        write_fusion_outputs(constructed_result(4.0), runs / name)
    original = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return original(path)

    monkeypatch.setattr(os, "scandir", scandir)
    told = []
    page = write_index(runs, on_unreadable=lambda folder, error: told.append((folder, error.strerror)))

    assert told == [(runs / "locked", "Permission denied")]
    text = page.read_text(encoding="utf-8")
    assert "readable" in text and "could not be read" in text and str(runs / "locked") in text


def test_a_metric_that_could_not_be_computed_reads_n_a(tmp_path):
    """A volume too thin for the SSIM window gets NaN, which metrics.json stores as null: the page
    showed "nan" or "None"."""
    result = constructed_result(blob_radius=0)
    page = write_report(result, tmp_path, reference=result.fused, moving=result.aligned,
                        metrics={"ssim": float("nan"), "mse": None, "ncc": 0.5}).read_text(encoding="utf-8")
    metrics = section(page, "metrics")
    assert "<td>ssim</td><td>n/a</td>" in metrics and "<td>mse</td><td>n/a</td>" in metrics
    assert "<td>ncc</td><td>0.5</td>" in metrics and "nan" not in metrics and "None" not in metrics


def test_the_index_counts_one_run_and_one_pair_in_the_singular(tmp_path):
    batch = tmp_path / "cohort" / "batch"
    write_fusion_outputs(constructed_result(blob_radius=4), batch / "pt1")
    (batch / BATCH_SUMMARY_FILE).write_text(json.dumps({
        "created": "2026-12-06T16:00:29+00:00", "pairs": 1, "done": 1, "skipped": 0, "failed": 0,
        "outcomes": [{"name": "pt1", "status": "done"}]}), encoding="utf-8")

    page = write_index(tmp_path / "cohort").read_text(encoding="utf-8")

    assert "<p>1 finished run, most suspicious first" in page
    assert "batch: 1 pair, 1 done, 0 skipped, 0 failed" in page


def test_a_run_whose_outputs_were_deleted_is_listed_unfinished_naming_what_it_lacks(tmp_path):
    """Its fused and aligned images deleted, a run stayed listed as an ordinary finished run."""
    cohort = tmp_path / "cohort"
    for name in ("whole", "emptied"):
        write_fusion_outputs(constructed_result(blob_radius=4), cohort / name)
    for image in ("fused.nii.gz", "aligned.nii.gz"):
        (cohort / "emptied" / image).unlink()

    page = write_index(cohort).read_text(encoding="utf-8")

    finished, _, rest = page.partition("</table>")
    assert "1 finished run," in finished and "emptied" not in finished
    unfinished = rest[rest.index("Unfinished run folders"):]
    assert ("<li>emptied <span class=flag>(incomplete: provenance.json is there but fused.*, aligned.* are "
            "missing)</span></li>") in unfinished


def test_a_missing_quality_json_of_a_run_that_made_maps_is_named_and_ranked_first(tmp_path):
    """Deleted, it read "no quality maps" and ranked last, like a run that never made them."""
    cohort = tmp_path / "cohort"
    for name, made_maps in (("ranked", True), ("lost-maps", True), ("no-maps", False)):
        result = constructed_result(blob_radius=4)
        result.provenance["requested_settings"] = {"quality": made_maps}
        if not made_maps:
            result.quality = None
        write_fusion_outputs(result, cohort / name)
    (cohort / "lost-maps" / "quality.json").unlink()

    page = write_index(cohort).read_text(encoding="utf-8")

    rows = {re.match(r"<td>([\w-]+)", row).group(1): row for row in page.split("<tr>")[2:]}
    assert list(rows) == ["lost-maps", "ranked", "no-maps"]
    assert "<td>quality.json missing</td>" in rows["lost-maps"]
    assert "<td>no quality maps</td>" in rows["no-maps"]


def test_a_failure_carried_from_an_earlier_batch_still_marks_the_pairs_stale_outputs(tmp_path):
    """A second batch into the same folder replaced summary.json: the earlier batch's failed pair
    and its warning vanished, its stale outputs listed as an ordinary run."""
    cohort = tmp_path / "cohort"
    for name in ("a", "b"):
        write_fusion_outputs(constructed_result(blob_radius=4), cohort / name)  # created 2026-12-02T08:00
    (cohort / BATCH_SUMMARY_FILE).write_text(json.dumps({
        "created": "2026-12-04T10:00:00+00:00", "pairs": 1, "done": 1, "skipped": 0, "failed": 0,
        "outcomes": [{"name": "b", "status": "done"}],
        EARLIER_FAILURES: [{"name": "a", "status": "failed", "error": "a: different moving image",
                            "batch_created": "2026-12-03T10:00:00+00:00"}]}), encoding="utf-8")

    page = write_index(cohort).read_text(encoding="utf-8")

    rows = {re.match(r"<td>(?:<a href=\"[^\"]+\">)?(\w+)", row).group(1): row.partition("</tr>")[0]
            for row in page.split("<tr>")[2:4]}
    assert ("failed in the batch of summary.json (an earlier batch, of 2026-12-03T10:00:00+00:00): these are an "
            "earlier run's outputs") in rows["a"]
    assert "failed" not in rows["b"]
    assert ": 1 pair, 1 done, 0 skipped, 0 failed; 1 failed in earlier batches into this folder" in page
    failed = page[page.index("Failed pairs"):]
    assert ("<td>. (earlier batch, of 2026-12-03T10:00:00+00:00)</td><td>a</td><td>a: different moving image</td>"
            "<td>an earlier run's (a, listed above)") in failed


def head_with_marker_on_the_patients_left_front() -> ImageVolume:
    """A 6 × 40 × 40 head stored as a RAS NIfTI (voxel i towards the patient's right, j towards the
    front) with a bright marker (1.0, the head 0.5) in the patient's left and front quarter."""
    yy, xx = np.indices((40, 40))
    head = np.stack([((yy - 20) ** 2 + (xx - 20) ** 2 < 15**2).astype(np.float32) * 0.5] * SLICES)
    marker = (slice(None), slice(26, 32), slice(8, 14))  # high j: front; low i: patient's left in RAS
    head[marker] = 1.0
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    return ImageVolume(head, Geometry.from_ras_affine(ras), source="t1.nii.gz")


def stored_otherwise(volume: ImageVolume, storage: str) -> ImageVolume:
    """The same voxels at the same world positions, stored as another file would store them: left
    to right (LAS, x flipped), or sagittally (array axis 0 across x) and flipped front to back."""
    if storage == "LAS":
        flipped = volume.geometry.index_to_world @ np.diag([1.0, 1.0, -1.0, 1.0])
        flipped[:3, 3] += volume.geometry.index_to_world[:3, :3] @ [0, 0, volume.array.shape[2] - 1]
        return ImageVolume(volume.array[:, :, ::-1], Geometry.from_index_to_world(flipped), source="t2.nii.gz")
    axes = (2, 0, 1)
    sagittal = volume.geometry.transposed(axes)
    back_to_front = sagittal.index_to_world @ np.diag([1.0, 1.0, -1.0, 1.0])
    back_to_front[:3, 3] += sagittal.index_to_world[:3, :3] @ [0, 0, volume.array.shape[1] - 1]
    return ImageVolume(volume.array.transpose(axes)[:, :, ::-1], Geometry.from_index_to_world(back_to_front),
                       source="t2.nii.gz")


@pytest.mark.parametrize("storage", ["LAS", "sagittal"])
def test_every_input_panel_shows_the_patient_as_napari_does_whatever_order_the_file_stores(
        tmp_path, drawn_images, storage):
    """A RAS reference was drawn in storage order: the patient's left on the screen's left and the
    front at the bottom, mirrored against napari; an LAS moving image of the same head beside it was
    mirrored the other way, and a sagittally stored one was drawn as a sagittal slice."""
    reference = head_with_marker_on_the_patients_left_front()
    moving = stored_otherwise(reference, storage)
    moving_marker = np.argwhere(moving.array == 1.0).mean(axis=0)
    reference_marker = np.argwhere(reference.array == 1.0).mean(axis=0)
    assert np.allclose(moving.geometry.index_to_world[:3] @ [*moving_marker, 1.0],
                       reference.geometry.index_to_world[:3] @ [*reference_marker, 1.0])  # the same head
    result = constructed_result(blob_radius=0)
    result = dataclasses.replace(result, fused=ImageVolume(result.fused.array, reference.geometry),
                                 aligned=ImageVolume(result.aligned.array, reference.geometry))
    page = write_report(result, tmp_path, reference=reference, moving=moving).read_text(encoding="utf-8")

    (reference_axes, reference_drawn, _), (moving_axes, moving_drawn, _) = drawn_images[:2]
    np.testing.assert_array_equal(moving_drawn, reference_drawn)
    rows, columns = np.argwhere(reference_drawn == 1.0).mean(axis=0)
    assert rows < 20 and columns > 20  # the front at the top, the patient's left on the screen's right
    for axes in (reference_axes, moving_axes):
        assert [text.get_text() for text in axes.texts] == ["A", "P", "R", "L"]
    moving_title = "moving (input) at slice 3" + (" along array axis 1" if storage == "sagittal" else "")
    assert moving_title in re.findall(r'<img alt="([^"]*)"', page)[0]


@pytest.mark.parametrize(("stored", "edges"), [
    ((0, 1, 2), ["A", "P", "R", "L"]),  # axial: slices along z, the front at the top
    ((1, 0, 2), ["S", "I", "R", "L"]),  # coronal: array axis 0 along y, axis 1 along z
    ((2, 0, 1), ["S", "I", "A", "P"]),  # sagittal: array axis 0 along x, the front on the left
], ids=["axial", "coronal", "sagittal"])
def test_the_slices_are_labelled_with_the_patients_sides_and_superior_is_up(tmp_path, drawn_images, stored, edges):
    result = constructed_result(blob_radius=4)
    direction = np.eye(3)[:, stored]  # array axis k runs along world axis stored[k] (LPS: z, y, x)
    geometry = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)
    result = dataclasses.replace(result, fused=ImageVolume(result.fused.array, geometry),
                                 aligned=ImageVolume(result.aligned.array, geometry))
    write_report(result, tmp_path, reference=result.fused, moving=result.aligned)

    panels = list({id(axes): axes for axes, _, _ in drawn_images}.values())  # overlays share their panel's axes
    assert len(panels) == 4 + 3 * 3 + 1  # the inputs, 3 key slices of 3 panels, the uncertainty map
    assert all([text.get_text() for text in axes.texts] == edges for axes in panels)
    if stored != (0, 1, 2):  # superior (+z, up the array's axis 1) is drawn at the top: the rows flipped
        np.testing.assert_array_equal(drawn_images[3][1], display_grey(result.fused)[SLICES // 2][::-1])


def test_a_pictures_panels_are_not_labelled_with_a_patients_sides(tmp_path, drawn_images):
    result = constructed_result(blob_radius=4, defect_slice=0, slices=1)
    picture = ImageVolume(result.fused.array[0], Geometry.identity(2), source="photo.png")
    write_report(result, tmp_path, reference=picture, moving=picture)
    assert drawn_images and not any(axes.texts for axes, _, _ in drawn_images)


@pytest.mark.parametrize(("slices", "axis", "slice_axis"), [(SLICES, "z", 0), (1, None, None)])
def test_degradation_json_names_a_slice_axis_exactly_where_quality_json_does(slices, axis, slice_axis):
    """degradation.json said "z" for a one-slice volume, which quality.json scores as one image."""
    result = constructed_result(blob_radius=0, defect_slice=0, slices=slices)
    assert result.quality.to_dict()["slice_axis"] == slice_axis
    assert result.degradation_report()["per_slice"]["axis"] == axis
