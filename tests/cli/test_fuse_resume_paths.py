"""`unifuse fuse` resuming and naming pair folders by odd paths: inputs that are symlinks pointed
elsewhere since their run (git-annex/DataLad), inputs replaced while their pair ran, folder names
too long for the file system, and moving files named only by an extension."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_unifuse.cli import fuse as fuse_module
from napari_unifuse.cli import main
from napari_unifuse.engine import provenance

CHEAP = ("--method", "identity+average", "--no-quality", "--device", "cpu")
NAME_MAX = 255  # bytes of one file name on the usual Linux file systems (ext4, XFS, btrfs)


def picture(path: Path, shift: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in (32, 28)), indexing="ij")
    Image.fromarray((255 * np.exp(-3 * sum((g - shift) ** 2 for g in grids))).astype(np.uint8)).save(path, format="PNG")
    return path


def fuse(*argv):
    return main(["fuse", *map(str, argv)])


def fuse_pair(reference: Path, moving: Path, out: Path, *flags):
    return fuse("--reference", reference, "--moving", moving, "--out", out, *CHEAP, *flags)


def point(link: Path, target: str) -> None:
    """``link`` made to point to ``target`` in one step, as ``ln -sfn`` and git-annex do."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    os.replace(new, link)


def annexed_pair(root: Path) -> tuple[Path, Path]:
    """A reference and moving symlink into a store of blobs, with two other moving blobs put there
    before the run: another image, and a copy of the moving image."""
    picture(root / "store" / "blob-ref")
    picture(root / "store" / "blob-a", 0.1)
    picture(root / "store" / "blob-b", 0.3)
    shutil.copy2(root / "store" / "blob-a", root / "store" / "blob-a-copy")
    (root / "s1").mkdir()
    (root / "s1" / "ct.png").symlink_to("../store/blob-ref")
    (root / "s1" / "mr.png").symlink_to("../store/blob-a")
    return root / "s1" / "ct.png", root / "s1" / "mr.png"


@pytest.mark.parametrize(("target", "code", "said"), [
    ("../store/blob-b", 2, "a different moving image; pass --overwrite"),  # another file: fused again
    ("../store/blob-a-copy", 0, "skipped, already done"),  # a copy of its content: still done
])
def test_a_moving_symlink_pointed_elsewhere_since_its_run_is_done_only_when_the_content_is_the_same(
        tmp_path, capsys, target, code, said):
    """Only the times of the file a link pointed to were read: a blob older than the run passed."""
    reference, moving = annexed_pair(tmp_path)
    assert fuse_pair(reference, moving, tmp_path / "out") == 0, capsys.readouterr().err
    capsys.readouterr()

    point(moving, target)

    assert fuse_pair(reference, moving, tmp_path / "out") == code
    output = capsys.readouterr()
    assert said in output.out + output.err


def test_inputs_under_a_folder_link_pointed_at_another_version_are_not_taken_as_done(tmp_path, capsys):
    for version, shift in (("v1", 0.1), ("v2", 0.3)):
        picture(tmp_path / version / "ref.png")
        picture(tmp_path / version / "mov.png", shift)
    (tmp_path / "current").symlink_to("v1")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\ncurrent/ref.png,current/mov.png\n", encoding="utf-8")
    assert fuse("--pairs", pairs, "--out", tmp_path / "out", *CHEAP) == 0, capsys.readouterr().err
    capsys.readouterr()

    point(tmp_path / "current", "v2")

    assert fuse("--pairs", pairs, "--out", tmp_path / "out", *CHEAP) == 2
    assert "a different moving image; pass --overwrite" in capsys.readouterr().err


def test_an_input_replaced_while_its_pair_ran_is_not_taken_as_done(tmp_path, capsys, monkeypatch):
    """Its change times were compared with the end of the run, not with when it was read."""
    from napari_unifuse.engine.inference import FusionEngine

    reference, moving = picture(tmp_path / "in" / "ref.png"), picture(tmp_path / "in" / "mov.png", 0.1)
    replacement = picture(tmp_path / "mov-new.png", 0.3)
    run_fusion = FusionEngine.run_fusion

    def moving_replaced_meanwhile(self, *args, **kwargs):
        result = run_fusion(self, *args, **kwargs)
        os.replace(replacement, moving)  # an export job rewriting the file while the pair is fused
        return result

    monkeypatch.setattr(FusionEngine, "run_fusion", moving_replaced_meanwhile)
    assert fuse_pair(reference, moving, tmp_path / "out") == 0, capsys.readouterr().err
    monkeypatch.setattr(FusionEngine, "run_fusion", run_fusion)
    capsys.readouterr()

    assert fuse_pair(reference, moving, tmp_path / "out") == 2
    assert "a different moving image; pass --overwrite" in capsys.readouterr().err


def test_a_label_replaced_while_its_pair_ran_is_not_taken_as_done(tmp_path, capsys, monkeypatch):
    from napari_unifuse.engine.inference import FusionEngine

    reference, moving = picture(tmp_path / "in" / "ref.png"), picture(tmp_path / "in" / "mov.png", 0.1)
    label = picture(tmp_path / "in" / "label.png", 0.05)
    replacement = picture(tmp_path / "label-new.png", 0.3)
    run_fusion = FusionEngine.run_fusion

    def label_replaced_meanwhile(self, *args, **kwargs):
        result = run_fusion(self, *args, **kwargs)
        os.replace(replacement, label)
        return result

    monkeypatch.setattr(FusionEngine, "run_fusion", label_replaced_meanwhile)
    assert fuse_pair(reference, moving, tmp_path / "out", "--label", label) == 0, capsys.readouterr().err
    monkeypatch.setattr(FusionEngine, "run_fusion", run_fusion)
    capsys.readouterr()

    assert fuse_pair(reference, moving, tmp_path / "out", "--label", label) == 2
    assert "a different label; pass --overwrite" in capsys.readouterr().err


def test_resuming_reads_no_unchanged_input_again(tmp_path, capsys, monkeypatch):
    """A cohort's rerun must not hash every finished pair's images."""
    reference, moving = picture(tmp_path / "ref.png"), picture(tmp_path / "mov.png", 0.1)
    assert fuse_pair(reference, moving, tmp_path / "out") == 0, capsys.readouterr().err
    hashed = []
    for module in (fuse_module, provenance):
        monkeypatch.setattr(module, "sha256_of_path", lambda source: hashed.append(source))

    assert fuse_pair(reference, moving, tmp_path / "out") == 0
    assert "skipped, already done" in capsys.readouterr().out
    assert hashed == []


def long_named_batch(root: Path) -> Path:
    """Three pairs, two of whose moving files ``mov.png`` are told apart only three folders up, so
    that the folder name joining those folders' names is longer than a file name may be."""
    first, second = "L" * 127, "M" * 127
    for subject in ("a", "b"):
        picture(root / subject / first / second / "ref.png")
        picture(root / subject / first / second / "mov.png", 0.1)
    picture(root / "c" / "ref.png")
    picture(root / "c" / "other.png", 0.2)
    pairs = root / "pairs.csv"
    pairs.write_text(f"reference,moving\nc/ref.png,c/other.png\na/{first}/{second}/ref.png,a/{first}/{second}/mov.png\n"
                     f"b/{first}/{second}/ref.png,b/{first}/{second}/mov.png\n", encoding="utf-8")
    return pairs


def test_folder_names_too_long_for_a_file_name_are_shortened_and_the_batch_goes_on(tmp_path, capsys):
    """The folder `a_LLL..._MMM..._mov` (262 bytes) stopped the whole batch: no later pair, no summary."""
    pairs, out = long_named_batch(tmp_path / "in"), tmp_path / "out"
    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [outcome["status"] for outcome in summary["outcomes"]] == ["done"] * 3
    names = [outcome["name"] for outcome in summary["outcomes"]]
    assert names[0] == "other"
    assert len(set(names)) == 3
    assert all(len(os.fsencode(name)) <= NAME_MAX for name in names)
    assert names[1].startswith("a_LLL") and names[2].startswith("b_LLL")
    capsys.readouterr()

    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 0  # the same names again: found as done
    assert capsys.readouterr().out.count("skipped, already done") == 3


def test_names_within_the_file_name_limit_are_kept_and_longer_ones_cut_at_a_whole_character():
    kept = "é" * 127  # 254 bytes
    assert fuse_module.output_folder_names([Path(f"/d/{kept}.png")]) == [kept]
    longer = "é" * 120 + "/" + "é" * 120
    cut = fuse_module.output_folder_names([Path(f"/x/{longer}/mov.png"), Path(f"/y/{longer}/mov.png")])
    assert all(len(os.fsencode(name)) <= NAME_MAX for name in cut)
    assert cut[0] != cut[1] and all(name.startswith("x_é" if i == 0 else "y_é") for i, name in enumerate(cut))


def test_a_file_system_error_on_one_pairs_folder_fails_only_that_pair(tmp_path, capsys, monkeypatch):
    picture(tmp_path / "in" / "ref.png")
    for name in ("m1", "m2", "m3"):
        picture(tmp_path / "in" / f"{name}.png", 0.1)
    pairs = tmp_path / "in" / "pairs.csv"
    pairs.write_text("reference,moving\nref.png,m1.png\nref.png,m2.png\nref.png,m3.png\n", encoding="utf-8")
    out, lock = tmp_path / "out", fuse_module.output_folder_lock

    def refused_for_m2(folder):
        if Path(folder).name == "m2":
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(folder))
        return lock(folder)

    monkeypatch.setattr(fuse_module, "output_folder_lock", refused_for_m2)

    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 2
    err = capsys.readouterr().err
    assert f"[2/3] m2: error: {out / 'm2'}: File name too long" in err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [(outcome["name"], outcome["status"]) for outcome in summary["outcomes"]] == [
        ("m1", "done"), ("m2", "failed"), ("m3", "done")]


def test_moving_files_named_only_by_an_extension_get_folders_inside_out(tmp_path, capsys):
    """`.nii.gz` was named "" (the outputs went into --out itself) and `...png` "..", its parent."""
    assert [fuse_module.case_name(Path(name)) for name in (".nii.gz", "...png", "..png", ".png", "ct.png")] == [
        "_nii_gz", "___png", "__png", "_png", "ct"]
    reference, moving = picture(tmp_path / "in" / "ref.png"), picture(tmp_path / "in" / "...png", 0.1)
    out = tmp_path / "runs" / "out"

    assert fuse_pair(reference, moving, out) == 0, capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["out"]
    assert [path.name for path in out.iterdir()] == ["___png"]
    assert (out / "___png" / "provenance.json").is_file()


def test_a_run_of_an_older_version_without_the_inputs_times_still_resumes(tmp_path, capsys):
    """Its provenance has no ``inputs_last_changed_ns``: the end of its run stands in for them."""
    reference, moving = picture(tmp_path / "ref.png"), picture(tmp_path / "mov.png", 0.1)
    out = tmp_path / "out"
    assert fuse_pair(reference, moving, out) == 0, capsys.readouterr().err
    provenance_file = out / "mov" / "provenance.json"
    provenance = json.loads(provenance_file.read_text(encoding="utf-8"))
    del provenance[fuse_module.INPUT_CHANGE_TIMES]
    provenance_file.write_text(json.dumps(provenance), encoding="utf-8")
    capsys.readouterr()

    assert fuse_pair(reference, moving, out) == 0
    assert "skipped, already done" in capsys.readouterr().out

    os.replace(picture(tmp_path / "new.png", 0.3), moving)
    assert fuse_pair(reference, moving, out) == 2
    assert "a different moving image; pass --overwrite" in capsys.readouterr().err


def project(root: Path) -> Path:
    """A project folder: two pairs in ``data/`` and ``pairs.csv`` naming them relative to itself."""
    for number, shift in ((1, 0.1), (2, 0.2)):
        picture(root / "data" / f"ref{number}.png")
        picture(root / "data" / f"mov{number}.png", shift)
    pairs = root / "pairs.csv"
    pairs.write_text("reference,moving\ndata/ref1.png,data/mov1.png\ndata/ref2.png,data/mov2.png\n", encoding="utf-8")
    return pairs


def pair_folders(out: Path) -> list[str]:
    return sorted(path.name for path in out.iterdir() if path.is_dir())


@pytest.mark.parametrize("link_first", [True, False])
def test_a_batch_rerun_through_a_folder_link_skips_its_finished_pairs(tmp_path, capsys, link_first):
    """Run through a symlinked folder (a linked home or scratch in a job script), then by the real
    path: every pair was fused again, into folders named after the real path's parents."""
    pairs = project(tmp_path / "proj")
    (tmp_path / "link").symlink_to("proj")
    linked, out = tmp_path / "link" / "pairs.csv", tmp_path / "out"
    first, second = (linked, pairs) if link_first else (pairs, linked)
    assert fuse("--pairs", first, "--out", out, *CHEAP) == 0, capsys.readouterr().err
    capsys.readouterr()

    assert fuse("--pairs", second, "--out", out, *CHEAP) == 0

    assert capsys.readouterr().out.count("skipped, already done") == 2
    assert pair_folders(out) == ["mov1", "mov2"]


def test_a_new_release_given_by_its_real_path_is_not_taken_for_the_run_made_through_a_link_now_pointing_at_it(
        tmp_path, capsys):
    """A batch through ``current -> v1``, then ``current`` pointed at v2 and v2's pair given by its real
    path: the v1 run's recorded path resolves there today, but it read v1; the pair gets a folder of
    its own, v1's results stay."""
    for version, shift in (("v1", 0.1), ("v2", 0.3)):
        picture(tmp_path / version / "s1" / "ref.png")
        picture(tmp_path / version / "s1" / "mov.png", shift)
    (tmp_path / "current").symlink_to("v1")
    out = tmp_path / "out"
    assert fuse_pair(tmp_path / "current" / "s1" / "ref.png", tmp_path / "current" / "s1" / "mov.png", out) == 0
    point(tmp_path / "current", "v2")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\nv2/s1/ref.png,v2/s1/mov.png\n", encoding="utf-8")
    capsys.readouterr()

    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 0, capsys.readouterr().err

    assert pair_folders(out) == ["mov", "v2_s1_mov"]
    recorded = json.loads((out / "mov" / "provenance.json").read_text(encoding="utf-8"))["inputs"]["moving"]["path"]
    assert recorded == str(tmp_path / "current" / "s1" / "mov.png")


def test_finding_a_moved_projects_runs_hashes_each_input_once(tmp_path, capsys, monkeypatch):
    """Every subject's moving file has one name (ct.png): each pair was matched against every moved
    run of that name, and a skipped pair's inputs were hashed again to confirm them."""
    root = tmp_path / "proj"
    rows = []
    for subject in range(6):
        picture(root / "data" / f"s{subject}" / "mr.png")
        picture(root / "data" / f"s{subject}" / "ct.png", 0.02 * subject)
        rows.append(f"data/s{subject}/mr.png,data/s{subject}/ct.png")
    (root / "pairs.csv").write_text("reference,moving\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert fuse("--pairs", root / "pairs.csv", "--out", root / "results", *CHEAP) == 0, capsys.readouterr().err
    (tmp_path / "proj").rename(tmp_path / "moved")
    capsys.readouterr()
    hashed = []
    hash_of_path = fuse_module.sha256_of_path
    for module in (fuse_module, provenance):
        monkeypatch.setattr(module, "sha256_of_path", lambda path: hashed.append(str(path)) or hash_of_path(path))

    assert fuse("--pairs", tmp_path / "moved" / "pairs.csv", "--out", tmp_path / "moved" / "results", *CHEAP) == 0

    assert capsys.readouterr().out.count("skipped, already done") == 6
    assert len(hashed) == len(set(hashed)) == 12  # each subject's two inputs, once


def test_a_batch_rerun_after_its_project_folder_moved_skips_its_finished_pairs(tmp_path, capsys):
    """data/, pairs.csv and results/ moved as a whole: the runs recorded the old paths, and every
    pair was fused again beside them."""
    project(tmp_path / "proj")
    assert fuse("--pairs", tmp_path / "proj" / "pairs.csv", "--out", tmp_path / "proj" / "results", *CHEAP) == 0
    (tmp_path / "proj").rename(tmp_path / "moved")
    capsys.readouterr()

    assert fuse("--pairs", tmp_path / "moved" / "pairs.csv", "--out", tmp_path / "moved" / "results", *CHEAP) == 0

    assert capsys.readouterr().out.count("skipped, already done") == 2
    assert pair_folders(tmp_path / "moved" / "results") == ["mov1", "mov2"]


def test_a_copy_of_a_fused_project_is_fused_as_its_own_pairs(tmp_path, capsys):
    """The same content is the same pair only where its run's inputs are gone (moved): a copy beside
    the original is another dataset."""
    project(tmp_path / "proj")
    shutil.copytree(tmp_path / "proj", tmp_path / "copy")
    out = tmp_path / "out"
    assert fuse("--pairs", tmp_path / "proj" / "pairs.csv", "--out", out, *CHEAP) == 0
    capsys.readouterr()

    assert fuse("--pairs", tmp_path / "copy" / "pairs.csv", "--out", out, *CHEAP) == 0

    assert capsys.readouterr().out.count(": done ->") == 2
    assert pair_folders(out) == ["copy_data_mov1", "copy_data_mov2", "mov1", "mov2"]


def test_a_moved_project_of_links_to_one_file_finds_each_subjects_own_folder(tmp_path, capsys):
    """Two subjects' links to one blob (git-annex) are two pairs of one content: after the move each
    finds the folder of its own subject, not the other's nor one shared."""
    root = tmp_path / "proj"
    picture(root / "store" / "blob-ref")
    picture(root / "store" / "blob-mov", 0.1)
    for subject in ("s1", "s2"):
        (root / subject).mkdir()
        (root / subject / "ct.png").symlink_to("../store/blob-ref")
        (root / subject / "mr.png").symlink_to("../store/blob-mov")
    pairs = root / "pairs.csv"
    pairs.write_text("reference,moving\ns1/ct.png,s1/mr.png\ns2/ct.png,s2/mr.png\n", encoding="utf-8")
    assert fuse("--pairs", pairs, "--out", root / "results", *CHEAP) == 0, capsys.readouterr().err
    root.rename(tmp_path / "moved")
    capsys.readouterr()

    assert fuse("--pairs", tmp_path / "moved" / "pairs.csv", "--out", tmp_path / "moved" / "results", *CHEAP) == 0

    out = capsys.readouterr().out
    assert "[1/2] s1_mr: skipped, already done" in out and "[2/2] s2_mr: skipped, already done" in out
    assert pair_folders(tmp_path / "moved" / "results") == ["s1_mr", "s2_mr"]
