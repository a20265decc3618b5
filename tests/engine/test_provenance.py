"""How a run's inputs are recorded: the path a user gave, and where a symlink leads."""

from __future__ import annotations

import hashlib

import numpy as np

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


def test_array_digests_hash_each_array_once_and_a_new_array_anew(monkeypatch):
    """The workbench re-derived its run folder at every keystroke of the form, hashing a
    clinical volume each time (a second for a 512×512×200 CT)."""
    from napari_unifuse.engine import provenance

    hashed = []
    real = provenance.sha256_of_array
    monkeypatch.setattr(provenance, "sha256_of_array", lambda array: hashed.append(array.shape) or real(array))
    digests = provenance.ArrayDigests()
    volume = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    assert digests(volume) == digests(volume) == hashlib.sha256(volume.tobytes()).hexdigest()
    assert len(hashed) == 1
    replaced = volume.astype(np.float32)  # napari gives a layer new data as a new array
    assert digests(replaced) != digests(volume) and len(hashed) == 2
    del replaced
    assert len(digests._digests) == 1  # a freed array's entry goes with it
