import csv
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from napari_unifuse.engine.annotations import (
    ANNOTATIONS_FILE,
    FAILURE_CATEGORIES,
    Annotation,
    AnnotationStore,
    InputHashes,
    describe_location,
    describe_subject,
    ellipse_outline,
    export_cohort,
    find_runs,
    flags_perhaps_counted_as_stored,
    slice_of_region,
)
from napari_unifuse.engine.provenance import describe_input, sha256_of_array
from napari_unifuse.errors import InputError, UniFuseError
from napari_unifuse.io import Geometry, ImageVolume, read_image, write_image


def test_annotation_is_on_disk_when_add_returns(tmp_path):
    store = AnnotationStore(tmp_path / "run")
    store.add(Annotation(category="misalignment", reviewer="dr who", note="ventricles", slice_index=12))
    lines = (tmp_path / "run" / "annotations.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["category"] == "misalignment" and record["slice_index"] == 12


def test_reload_and_delete_survive_a_new_store(tmp_path):
    first = AnnotationStore(tmp_path)
    kept = first.add(Annotation(category="other", reviewer="a", slice_index=1))
    dropped = first.add(
        Annotation(
            category="residual artifact",
            reviewer="a",
            region_kind="points",
            region_world=[[[10.0, 20.0, 30.0]]],
        )
    )
    first.delete(dropped.id, reviewer="b")
    reloaded = AnnotationStore(tmp_path).load()
    assert [a.id for a in reloaded] == [kept.id]
    assert reloaded[0] == kept


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"category": "typo", "reviewer": "a", "slice_index": 0}, "unknown category"),
        ({"category": "other", "reviewer": " ", "slice_index": 0}, "reviewer"),
        ({"category": "other", "reviewer": "a"}, "flag a slice or draw a region"),
    ],
)
def test_incomplete_annotations_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        Annotation(**kwargs)


def test_a_torn_last_line_loses_only_itself(tmp_path):
    store = AnnotationStore(tmp_path)
    first = store.add(Annotation(category="other", reviewer="a", slice_index=1))
    second = store.add(Annotation(category="other", reviewer="a", slice_index=2))
    with store.path.open("a", encoding="utf-8") as handle:  # a crash while appending a third record
        handle.write('{"action": "add", "category": "misal')
    intact = store.path.read_bytes()

    assert [a.id for a in store.load()] == [first.id, second.id]
    assert len(store.warnings) == 1 and "line 3" in store.warnings[0]
    third = store.add(Annotation(category="other", reviewer="a", slice_index=3))
    assert store.path.read_bytes().startswith(intact)  # nothing earlier rewritten
    assert [a.id for a in AnnotationStore(tmp_path).load()] == [first.id, second.id, third.id]


UNUSABLE_LINES = {
    "a category of a newer version": b'{"action": "add", "category": "new future category", "reviewer": "x", '
                                     b'"slice_index": 0, "id": "b1", "created": "2025-01-01"}',
    "a field of a newer version": b'{"action": "add", "category": "other", "reviewer": "x", "slice_index": 0, '
                                  b'"id": "b2", "created": "2025-01-01", "input_sha256": "abc"}',
    "a JSON array": b"[1, 2, 3]",
    "a withdrawal without an id": b'{"action": "delete"}',
    "an add without a reviewer": b'{"action": "add", "category": "other", "id": "b3"}',
    "an unknown action": b'{"action": "rename", "id": "b4"}',
    "a slice axis beyond z, y, x": b'{"action": "add", "category": "other", "reviewer": "x", "slice_index": 0, '
                                   b'"slice_axis": 7, "id": "b5", "created": "2025-01-01"}',
    "bytes that are not UTF-8": b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("line", UNUSABLE_LINES.values(), ids=UNUSABLE_LINES.keys())
def test_an_unusable_line_is_skipped_by_number_and_the_file_is_left_as_it_is(tmp_path, line):
    store = AnnotationStore(tmp_path)
    first = store.add(Annotation(category="other", reviewer="a", slice_index=1))
    with store.path.open("ab") as handle:
        handle.write(line + b"\n")
    last = store.add(Annotation(category="misalignment", reviewer="a", slice_index=3))
    on_disk = store.path.read_bytes()

    assert [a.id for a in store.load()] == [first.id, last.id]
    (warning,) = store.warnings
    assert warning.startswith(f"{store.path}: line 2 is unreadable")
    assert store.path.read_bytes() == on_disk  # loading never rewrites the file
    added = store.add(Annotation(category="other", reviewer="b", slice_index=4))
    store.delete(first.id, reviewer="b")
    assert [a.id for a in AnnotationStore(tmp_path).load()] == [last.id, added.id]


def test_an_annotations_file_that_cannot_be_read_is_a_clear_error(tmp_path):
    (tmp_path / "annotations.jsonl").mkdir()  # anything open() refuses
    with pytest.raises(UniFuseError, match=f"cannot read annotations.jsonl in {tmp_path}"):
        AnnotationStore(tmp_path).load()


def test_a_flag_on_the_inputs_names_no_method():
    on_inputs = Annotation(category="misalignment", reviewer="a", slice_index=2, subject="inputs", method=None)
    assert describe_subject(on_inputs) == "inputs"
    assert describe_subject(Annotation(category="other", reviewer="a", slice_index=2, method="bsafusion")) == "bsafusion"
    with pytest.raises(InputError, match="about no method"):
        Annotation(category="other", reviewer="a", slice_index=2, subject="inputs")
    with pytest.raises(InputError, match="name the method"):
        Annotation(category="other", reviewer="a", slice_index=2, method=None)


def test_records_written_before_subjects_and_input_hashes_still_load(tmp_path):
    older = {"action": "add", "category": "other", "reviewer": "a", "note": "", "slice_index": 1, "slice_axis": 0,
             "region_kind": None, "region_world": [], "method": "unifuse", "id": "old", "created": "2024-05-01"}
    (tmp_path / "annotations.jsonl").write_text(json.dumps(older) + "\n", encoding="utf-8")
    store = AnnotationStore(tmp_path)
    (loaded,) = store.load()
    assert store.warnings == []
    assert (loaded.subject, loaded.method, loaded.reference_sha256, loaded.moving_sha256) == (
        "output", "unifuse", None, None)


def test_withdrawing_an_annotation_needs_the_reviewer(tmp_path):
    store = AnnotationStore(tmp_path)
    flagged = store.add(Annotation(category="other", reviewer="a", slice_index=1))
    with pytest.raises(InputError, match="reviewer"):
        store.delete(flagged.id, reviewer=" ")
    assert [a.id for a in store.load()] == [flagged.id]
    assert len(store.path.read_text(encoding="utf-8").splitlines()) == 1


def test_an_unwritable_run_folder_is_a_clear_error(tmp_path, monkeypatch):
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(UniFuseError, match=f"cannot write annotations.jsonl in {tmp_path}: permission denied"):
        AnnotationStore(tmp_path).add(Annotation(category="other", reviewer="a", slice_index=1))


@pytest.mark.parametrize(
    ("annotation", "image_shape", "described"),
    [
        (Annotation(category="other", reviewer="a", slice_index=23, slice_axis=2), (16, 48, 48), "slice x = 23"),
        (Annotation(category="other", reviewer="a", slice_index=5, region_kind="shapes",
                    region_world=[[[5.0, 1.0, 1.0]]]), (16, 48, 48), "region on z = 5"),
        (Annotation(category="other", reviewer="a", slice_index=0), (48, 48), "image"),
    ],
)
def test_the_location_names_the_axis_of_a_volume_slice(annotation, image_shape, described):
    assert describe_location(annotation, image_shape) == described


def test_a_region_lies_on_the_slice_along_which_it_is_flat():
    shape = (16, 48, 48)
    assert slice_of_region([[5, 10, 10], [5, 10, 20], [5.2, 20, 20]], shape, viewed_axis=0) == (0, 5)
    assert slice_of_region([[2, 10, 23], [9, 30, 23]], shape, viewed_axis=0) == (2, 23)  # drawn in a sagittal view
    assert slice_of_region([[4, 10, 10], [4, 10, 20]], shape, viewed_axis=1) == (1, 10)  # a line: the viewed axis
    with pytest.raises(InputError, match="crosses several slices"):
        slice_of_region([[1, 1, 1], [2, 2, 2], [3, 1, 2]], shape)


def test_cohort_export_collects_every_run(tmp_path):
    for run, count in (("case1", 2), ("case2", 1)):
        store = AnnotationStore(tmp_path / run)
        for index in range(count):
            store.add(Annotation(category=FAILURE_CATEGORIES[index], reviewer="r", slice_index=index))
    runs = find_runs(tmp_path)
    assert [run.name for run in runs] == ["case1", "case2"]
    assert export_cohort(runs, tmp_path / "cohort.csv").rows == 3
    with open(tmp_path / "cohort.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["category"] for row in rows} == set(FAILURE_CATEGORIES[:2])
    assert sum(row["run"].endswith("case1") for row in rows) == 2


def test_cohort_export_has_each_column_once_holding_its_own_value(tmp_path):
    flagged = Annotation(category="lost structure", reviewer="dr who", note="left ventricle", slice_index=7,
                         slice_axis=2, method="bsafusion")
    drawn = Annotation(category="other", reviewer="dr no", region_kind="shapes",
                       region_world=[[[1.5, 2.0], [3.0, 4.5]]], method="mmif-amin")
    on_inputs = Annotation(category="misalignment", reviewer="dr no", slice_index=0, method=None, subject="inputs",
                           reference_sha256="ab" * 32, moving_sha256="cd" * 32)
    AnnotationStore(tmp_path / "case1").add(flagged)
    AnnotationStore(tmp_path / "case2").add(drawn)
    AnnotationStore(tmp_path / "case3").add(on_inputs)
    export_cohort(find_runs(tmp_path), tmp_path / "cohort.csv")
    with open(tmp_path / "cohort.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    assert len(header) == len(set(header))
    assert set(header) == {"run", *(field.name for field in fields(Annotation)), "about_other_inputs"}
    by_column = [dict(zip(header, row)) for row in rows]
    assert by_column == [
        {"run": str(tmp_path / "case1"), "subject": "output", "method": "bsafusion", "id": flagged.id,
         "created": flagged.created, "reviewer": "dr who", "category": "lost structure", "note": "left ventricle",
         "slice_index": "7", "slice_axis": "2", "region_kind": "", "region_world": "[]", "reference_sha256": "",
         "moving_sha256": "", "about_other_inputs": "unknown"},
        {"run": str(tmp_path / "case2"), "subject": "output", "method": "mmif-amin", "id": drawn.id,
         "created": drawn.created, "reviewer": "dr no", "category": "other", "note": "", "slice_index": "",
         "slice_axis": "0", "region_kind": "shapes", "region_world": "[[[1.5, 2.0], [3.0, 4.5]]]",
         "reference_sha256": "", "moving_sha256": "", "about_other_inputs": "unknown"},
        {"run": str(tmp_path / "case3"), "subject": "inputs", "method": "", "id": on_inputs.id,
         "created": on_inputs.created, "reviewer": "dr no", "category": "misalignment", "note": "", "slice_index": "0",
         "slice_axis": "0", "region_kind": "", "region_world": "[]", "reference_sha256": "ab" * 32,
         "moving_sha256": "cd" * 32, "about_other_inputs": "unknown"},  # no run in case3 to compare with
    ]


def finished_run(run: Path, reference: ImageVolume, moving: ImageVolume) -> None:
    """A run folder whose provenance.json describes its inputs as a run records them."""
    run.mkdir(parents=True)
    inputs = {"reference": describe_input(reference), "moving": describe_input(moving)}
    (run / "provenance.json").write_text(json.dumps({"inputs": inputs}), encoding="utf-8")


def test_the_export_says_which_flags_were_made_on_other_inputs_than_their_runs(tmp_path):
    """`unifuse fuse --overwrite` after the moving file was replaced keeps the old flags in the folder:
    the export must not present them as about the new run."""
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    reference = ImageVolume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), geometry)  # a layer: no file
    old_moving = ImageVolume(np.ones((2, 3, 4), np.float32), geometry)
    moving_file = tmp_path / "ct.nii.gz"
    write_image(ImageVolume(np.full((2, 3, 4), 7.0, np.float32), geometry), moving_file)
    moving = read_image(moving_file)
    finished_run(tmp_path / "runs" / "ct", reference, moving)
    store = AnnotationStore(tmp_path / "runs" / "ct")
    earlier = store.add(Annotation("misalignment", "dr-a", slice_index=0, reference_sha256=sha256_of_array(
        reference.array), moving_sha256=sha256_of_array(old_moving.array)))
    current = store.add(Annotation("other", "dr-a", slice_index=1, reference_sha256=sha256_of_array(
        reference.array), moving_sha256=sha256_of_array(moving.array)))
    unhashed = store.add(Annotation("other", "dr-b", slice_index=1))

    export = export_cohort(find_runs(tmp_path / "runs"), tmp_path / "cohort.csv")

    assert (export.rows, export.about_other_inputs) == (3, 1)
    with open(tmp_path / "cohort.csv", newline="", encoding="utf-8") as handle:
        answers = {row["id"]: row["about_other_inputs"] for row in csv.DictReader(handle)}
    assert answers == {earlier.id: "yes", current.id: "no", unhashed.id: "unknown"}
    assert store.path.read_text(encoding="utf-8").count('"action": "add"') == 3  # nothing of the user's dropped


def test_a_run_whose_input_file_changed_since_cannot_vouch_for_its_flags(tmp_path):
    geometry = Geometry((1.0, 1.0), (0.0, 0.0), np.eye(2))
    paths = {role: tmp_path / f"{role}.nii.gz" for role in ("reference", "moving")}
    for value, path in enumerate(paths.values()):
        write_image(ImageVolume(np.full((4, 5), value, np.float32), geometry), path)
    volumes = {role: read_image(path) for role, path in paths.items()}
    finished_run(tmp_path / "run", volumes["reference"], volumes["moving"])
    flag = Annotation("other", "dr-a", slice_index=0, reference_sha256="0" * 64,
                      moving_sha256=sha256_of_array(volumes["moving"].array))
    assert InputHashes.of_run(tmp_path / "run").made_on_other_inputs(flag) is True
    write_image(ImageVolume(np.full((4, 5), 9.0, np.float32), geometry), paths["reference"])  # replaced after the run
    assert InputHashes.of_run(tmp_path / "run").reference is None
    assert InputHashes.of_run(tmp_path / "run").made_on_other_inputs(flag) is False  # the moving hash agrees


def test_the_export_names_every_line_it_skipped(tmp_path):
    for run in ("a", "b"):
        AnnotationStore(tmp_path / run).add(Annotation("misalignment", "dr-a", slice_index=0))
    with (tmp_path / "b" / ANNOTATIONS_FILE).open("ab") as handle:
        handle.write(b'{"action": "add", "category": "motion ghost", "reviewer": "x", "slice_index": 0, "id": "x1", '
                     b'"created": "2025-01-01"}\n\xff\xfe not UTF-8\n')
    export = export_cohort(find_runs(tmp_path), tmp_path / "cohort.csv")
    assert export.rows == 2
    assert [(line.path, line.line) for line in export.skipped] == [(tmp_path / "b" / ANNOTATIONS_FILE, 2),
                                                                   (tmp_path / "b" / ANNOTATIONS_FILE, 3)]
    assert "unknown category 'motion ghost'" in export.skipped[0].reason


def test_the_export_finds_linked_runs_as_the_qc_index_does_and_survives_a_loop(tmp_path):
    cohort, elsewhere = tmp_path / "cohort", tmp_path / "store"
    for run in (cohort / "local", elsewhere / "linked"):
        AnnotationStore(run).add(Annotation("misalignment", "dr-a", slice_index=0, note=run.name))
    (cohort / "linked").symlink_to(elsewhere / "linked")
    (cohort / "loop").symlink_to(cohort)
    assert [run.name for run in find_runs(cohort)] == ["linked", "local"]
    assert export_cohort(find_runs(cohort), tmp_path / "cohort.csv").rows == 2


def test_an_ellipse_is_stored_as_points_on_it_not_as_its_bounding_box():
    """A rotated ellipse on slice z = 3, semi-axes 6 and 2 mm, centred at (3, 10, 20): every outline
    point satisfies the ellipse's own equation, and the outline reaches both axes' ends."""
    centre, angle = np.array([10.0, 20.0]), np.deg2rad(30)
    major, minor = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    corners = [centre + sign_major * 6 * major + sign_minor * 2 * minor
               for sign_major, sign_minor in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    outline = np.asarray(ellipse_outline([[3.0, *corner] for corner in corners]))
    assert outline.shape == (36, 3)
    np.testing.assert_allclose(outline[:, 0], 3.0)
    offsets = outline[:, 1:] - centre
    np.testing.assert_allclose((offsets @ major / 6) ** 2 + (offsets @ minor / 2) ** 2, 1.0, atol=1e-9)
    assert np.abs(offsets @ major).max() == pytest.approx(6) and np.abs(offsets @ minor).max() == pytest.approx(2)


def test_an_ellipse_without_four_corners_is_refused():
    with pytest.raises(InputError, match="4 corners"):
        ellipse_outline([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])


def test_an_export_that_the_disk_refuses_leaves_the_earlier_cohort_csv_whole(tmp_path):
    """A full disk is played by the file size limit (RLIMIT_FSIZE): a write past it fails (EFBIG)
    as it would with ENOSPC, and the earlier export must not be left truncated with a torn row."""
    import errno
    import resource
    import signal

    run, target = tmp_path / "run", tmp_path / "cohort.csv"
    AnnotationStore(run).add(Annotation("misalignment", "dr-a", slice_index=0, note="first"))
    export_cohort([run], target)
    earlier = target.read_bytes()
    AnnotationStore(run).add(Annotation("other", "dr-a", slice_index=1, note="long " * 3000))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(OSError) as refused:
            export_cohort([run], target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert target.read_bytes() == earlier
    assert refused.value.errno == errno.EFBIG and refused.value.filename == str(target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cohort.csv", "run"]  # no staged file left


def test_the_cohort_csv_keeps_its_own_row_ends_where_text_files_translate_them(tmp_path, monkeypatch):
    """Where text mode writes "\\n" as "\\r\\n" (Windows), rows came out "\\r\\r\\n": a blank row after each
    and multi-line notes changed. Played here by a text mode that translates as Windows does."""
    import pathlib

    run, target = tmp_path / "run", tmp_path / "cohort.csv"
    AnnotationStore(run).add(Annotation("misalignment", "dr-a", slice_index=0, note="line one\nline two"))
    opened = pathlib.Path.open

    def translating_open(self, mode="r", buffering=-1, encoding=None, errors=None, newline=None):
        if "w" in mode and "b" not in mode and newline is None:
            newline = "\r\n"
        return opened(self, mode, buffering, encoding, errors, newline)

    monkeypatch.setattr(pathlib.Path, "open", translating_open)
    export_cohort([run], target)
    monkeypatch.undo()
    assert b"\r\r\n" not in target.read_bytes()
    with target.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["note"] for row in rows] == ["line one\nline two"]


def test_slice_flags_made_before_slices_were_counted_in_world_order_are_picked_out_on_a_head_to_foot_volume():
    head_to_foot = ImageVolume(np.zeros((6, 4, 4), np.float32),
                               Geometry(np.ones(3), np.zeros(3), np.diag([-1.0, 1.0, 1.0])))
    early = Annotation("other", "dr", slice_index=1, created="2026-12-05T09:00:00+00:00")
    early_region = Annotation("other", "dr", slice_index=2, region_kind="shapes",
                              region_world=[[[2.0, 1.0, 1.0]]], created="2026-12-06T23:00:00+00:00")
    recent = Annotation("other", "dr", slice_index=1, created="2026-12-07T13:00:00+00:00")
    flags = [early, early_region, recent]

    assert flags_perhaps_counted_as_stored(flags, head_to_foot) == [early, early_region]
    # The layer our reader hands napari is in world order, and says how the file stored it.
    assert flags_perhaps_counted_as_stored(flags, head_to_foot.in_world_axis_order()) == [early, early_region]
    foot_to_head = ImageVolume(np.zeros((6, 4, 4), np.float32), Geometry.identity(3))
    assert flags_perhaps_counted_as_stored(flags, foot_to_head) == []
