"""`unifuse evaluate`'s classical rows on a moving image that covers part of the reference grid: their
registrations see the reference as the engine's alignment estimates see it (blanked outside the
moving image's field of view), not the whole reference, whose uncovered tissue the matching slid the
covered slab into (a half-coverage phantom moved 2.6 voxels through-plane, tissue invented in the
uncovered slices, and scored above the engine's own ``matching+max``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_unifuse.cli import evaluate as evaluate_module
from napari_unifuse.cli.evaluate import evaluate_pair, pairs_from_csv, unit_intensities
from napari_unifuse.data.phantoms import make_brain_phantoms
from napari_unifuse.engine import classical
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.io import ImageVolume, write_image
from napari_unifuse.io.image import Geometry

SIDE = 24
SPACING_MM = 4.0
FIRST_COVERED_SLICE = SIDE // 2  # the moving image holds the upper half of the reference's slices
SHIFT_VOXELS = 2.0  # in-plane, along the last axis


def grid(first_slice: int = 0) -> Geometry:
    return Geometry(np.full(3, SPACING_MM), np.array([SPACING_MM * first_slice, 0.0, 0.0]), np.eye(3))


@pytest.fixture(scope="module")
def phantoms() -> dict[str, np.ndarray]:
    volumes = make_brain_phantoms((SIDE,) * 3, ("t1", "t2"))
    return {name: volume.array for name, volume in volumes.items()}


def pairs_csv(folder: Path, phantoms: dict[str, np.ndarray], first_slice: int) -> Path:
    """A T1 reference, a T2 moving image shifted in-plane holding the slices from ``first_slice`` on,
    and the unshifted T2 as the label, as `unifuse evaluate --pairs` reads them."""
    folder.mkdir()
    shifted = ndimage.shift(phantoms["t2"], (0, 0, SHIFT_VOXELS), order=1)
    write_image(ImageVolume(phantoms["t1"], grid()), folder / "reference.nii.gz")
    write_image(ImageVolume(np.ascontiguousarray(shifted[first_slice:]), grid(first_slice)), folder / "moving.nii.gz")
    write_image(ImageVolume(phantoms["t2"], grid()), folder / "label.nii.gz")
    path = folder / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows([("reference", "moving", "label"),
                                      ("reference.nii.gz", "moving.nii.gz", "label.nii.gz")])
    return path


def recording_registrations(monkeypatch) -> list[tuple[np.ndarray, classical.Registration]]:
    """Every classical registration evaluate runs: (the reference it was handed, its result)."""
    calls = []
    real_register = classical.register

    def register(method, reference, moving, geometry=None):
        registration = real_register(method, reference, moving, geometry)
        calls.append((reference, registration))
        return registration

    monkeypatch.setattr(classical, "register", register)
    return calls


def test_classical_matching_on_a_partial_moving_image_aligns_as_the_engine_does(tmp_path, phantoms, monkeypatch):
    pair, = pairs_from_csv(pairs_csv(tmp_path / "half", phantoms, FIRST_COVERED_SLICE))
    calls = recording_registrations(monkeypatch)
    engine = FusionEngine(load_method("matching+max", spatial_dims=3), device="cpu")
    rows = dict(evaluate_pair(pair, None, ["matching"], ["max"], {"matching+max": engine}))

    # The last: the engine's method registers first, and the copies reuse the row's registration.
    reference_seen, registration = calls[-1]
    reference, _ = unit_intensities(pair.reference)
    assert np.array_equal(reference_seen[FIRST_COVERED_SLICE:], reference[FIRST_COVERED_SLICE:])
    assert not reference_seen[:FIRST_COVERED_SLICE].any()
    # No slide of the covered slab through-plane, on the tissue it covers.
    covered_tissue = reference[FIRST_COVERED_SLICE:] > 0.05
    through_plane = np.abs(registration.displacement[0][FIRST_COVERED_SLICE:][covered_tissue]).mean()
    assert through_plane < 1.0
    # The classical row scores what the engine's row of the same registration and rule scores.
    for column in ("ncc", "ssim"):
        assert rows["matching + max"][column] == pytest.approx(rows["matching+max"][column], abs=0.02)
    for copy in ("matching + copy-reference", "matching + copy-moving"):
        assert rows[copy]["ncc"] == rows["matching + max"]["ncc"]
    helped = " ".join(evaluate_module.__doc__.split())
    assert "their registrations (the copy pipelines' too) see the reference as the engine's alignment" in helped


def test_classical_registrations_of_a_full_moving_image_see_the_whole_reference(tmp_path, phantoms, monkeypatch):
    pair, = pairs_from_csv(pairs_csv(tmp_path / "full", phantoms, 0))
    calls = recording_registrations(monkeypatch)
    rows = dict(evaluate_pair(pair, None, ["identity", "matching"], ["max"]))

    reference, _ = unit_intensities(pair.reference)
    assert [registration.method for _, registration in calls] == ["identity", "matching"]
    for reference_seen, _ in calls:
        assert np.array_equal(reference_seen, reference)
    assert rows["matching + max"]["ncc"] > rows["identity + max"]["ncc"]
