"""How a run's inputs are recorded: the path a user gave, and where a symlink leads."""

from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import torch
from PIL import Image

from napari_unifuse.cli import main
from napari_unifuse.engine import provenance
from napari_unifuse.engine.provenance import absolute_as_given, describe_input, describe_source
from napari_unifuse.io import Geometry, ImageVolume


def test_a_symlinked_input_is_recorded_by_the_path_given_and_the_file_it_resolves_to(tmp_path, monkeypatch):
    """git-annex/DataLad: ``s1/ct.png`` links to a store blob; only the blob used to be recorded."""
    blob = tmp_path / "store" / "SHA256E-s1--abc.png"
    blob.parent.mkdir()
    blob.write_bytes(b"pixels")
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "ct.png").symlink_to("../store/SHA256E-s1--abc.png")
    monkeypatch.chdir(tmp_path / "s1")

    assert describe_source("./ct.png") == {"path": str(tmp_path / "s1" / "ct.png"), "resolved_path": str(blob),
                                           "sha256": hashlib.sha256(b"pixels").hexdigest()}
    assert describe_source(str(blob)) == {"path": str(blob), "sha256": hashlib.sha256(b"pixels").hexdigest()}


def test_dot_dot_is_folded_only_where_it_names_the_same_file(tmp_path):
    (tmp_path / "data" / "deep").mkdir(parents=True)
    (tmp_path / "linked").symlink_to(tmp_path / "data" / "deep")

    assert absolute_as_given(tmp_path / "data" / "deep" / ".." / "t1.png") == tmp_path / "data" / "t1.png"
    # After a symlinked folder ".." is the target's parent (data/), not tmp_path: kept as given.
    assert absolute_as_given(tmp_path / "linked" / ".." / "t1.png") == tmp_path / "linked" / ".." / "t1.png"


def test_a_dicom_input_is_recorded_with_its_series_uid_description_and_modality():
    """A series' path names only its folder or one slice; the series is named by its tags. The
    metadata is read_image's for a DICOM series (a napari layer keeps it), so no file is needed."""
    header = {"Modality": "CT", "SeriesDescription": "AX CT", "SeriesInstanceUID": "1.2.3.10", "Manufacturer": "X"}
    volume = ImageVolume(np.zeros((2, 3, 4), np.float32), Geometry.identity(3),
                         {"header": header, "dicom_series": "/data/ct#1.2.3.10"})

    described = describe_input(volume)

    assert described["dicom"] == {"SeriesInstanceUID": "1.2.3.10", "SeriesDescription": "AX CT", "Modality": "CT"}
    assert "dicom" not in describe_input(ImageVolume(np.zeros((3, 4), np.float32), Geometry.identity(2), {}))


def git(folder, *arguments):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *arguments], cwd=folder,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_source_revision_is_the_checkouts_commit_and_whether_the_folder_differs_from_it(tmp_path, monkeypatch):
    """An editable install changes behaviour commit to commit under one version number."""
    package, ignored = tmp_path / "package", tmp_path / "venv" / "package"
    package.mkdir()
    ignored.mkdir(parents=True)
    (package / "code.py").write_text("A = 1\n", encoding="utf-8")
    (ignored / "code.py").write_text("A = 1\n", encoding="utf-8")
    (tmp_path / ".gitignore").write_text("venv/\n", encoding="utf-8")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    commit = git(tmp_path, "rev-parse", "HEAD")
    provenance.source_revision.cache_clear()

    assert provenance.source_revision(package) == {"commit": commit, "dirty": False}
    (tmp_path / "notes.txt").write_text("outside the package", encoding="utf-8")
    provenance.source_revision.cache_clear()
    assert provenance.source_revision(package) == {"commit": commit, "dirty": False}
    (package / "code.py").write_text("A = 2\n", encoding="utf-8")
    assert provenance.source_revision(package)["dirty"] is False  # asked once per process
    provenance.source_revision.cache_clear()
    assert provenance.source_revision(package) == {"commit": commit, "dirty": True}
    assert provenance.source_revision(ignored) is None  # a package installed in an ignored virtual environment
    outside = tmp_path.parent / f"{tmp_path.name}-not-a-checkout"
    outside.mkdir()
    assert provenance.source_revision(outside) is None
    monkeypatch.setenv("PATH", "")  # no git at all
    provenance.source_revision.cache_clear()
    assert provenance.source_revision(package) is None
    provenance.source_revision.cache_clear()


def test_the_versions_record_torchs_thread_counts(monkeypatch):
    """One command with OMP_NUM_THREADS=1 and 2 gave outputs differing in the last bits."""
    monkeypatch.setattr(provenance, "source_revision", lambda folder: {"commit": "abc", "dirty": False})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3 - min(threads, 2))
        versions = provenance.software_versions()
    finally:
        torch.set_num_threads(threads)
    assert versions["torch_threads"] == 3 - min(threads, 2)
    assert versions["torch_interop_threads"] == torch.get_num_interop_threads()
    assert versions["napari_unifuse_revision"] == {"commit": "abc", "dirty": False}


def test_a_rerun_on_another_commit_and_thread_count_is_still_skipped(tmp_path, monkeypatch, capsys):
    """Neither is a setting the user asked for: the same request is done already."""
    image = (np.arange(24 * 24).reshape(24, 24) % 251).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "reference.png")
    Image.fromarray(np.roll(image, 1, axis=0)).save(tmp_path / "moving.png")
    out = tmp_path / "out"
    argv = ["fuse", "--reference", str(tmp_path / "reference.png"), "--moving", str(tmp_path / "moving.png"),
            "--method", "identity+average", "--out", str(out), "--no-quality", "--device", "cpu"]
    threads = torch.get_num_threads()
    try:
        for revision, thread_count in (("first", 1), ("second", 2)):
            monkeypatch.setattr(provenance, "source_revision", lambda folder: {"commit": revision, "dirty": False})
            torch.set_num_threads(thread_count)
            assert main(argv) == 0
            if revision == "first":
                versions = json.loads((out / "moving" / "provenance.json").read_text(encoding="utf-8"))["versions"]
                assert versions["napari_unifuse_revision"]["commit"] == "first" and versions["torch_threads"] == 1
    finally:
        torch.set_num_threads(threads)
    assert "skipped, already done" in capsys.readouterr().out
