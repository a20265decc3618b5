"""MNI152-based phantoms: tissue contrasts per modality, geometry, determinism, any shape."""

import numpy as np
import pytest
from nilearn import datasets

from napari_unifuse.data import phantoms
from napari_unifuse.data.phantoms import (
    MODALITIES,
    brain_tissue_fractions,
    make_brain_phantom_slices,
    make_brain_phantoms,
)
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume

SHAPE = (64, 64, 64)


@pytest.fixture(scope="module")
def fractions() -> dict[str, np.ndarray]:
    return {tissue: volume.array for tissue, volume in brain_tissue_fractions(SHAPE).items()}


@pytest.fixture(scope="module")
def images() -> dict[str, ImageVolume]:
    return make_brain_phantoms(SHAPE, modalities=MODALITIES)


def mean_in(image: ImageVolume, fraction: np.ndarray, threshold: float = 0.9) -> float:
    """Mean intensity over voxels made of (almost) one tissue."""
    mask = fraction > threshold
    assert mask.sum() > 20, "too few pure voxels to measure a tissue"
    return float(image.array[mask].mean())


def test_fractions_are_a_partition(fractions):
    total = sum(fractions.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert min(f.min() for f in fractions.values()) > -1e-5


def test_mr_contrasts_order_tissues(images, fractions):
    t1 = {t: mean_in(images["t1"], fractions[t]) for t in ("wm", "gm", "csf")}
    t2 = {t: mean_in(images["t2"], fractions[t]) for t in ("wm", "gm", "csf")}
    pd = {t: mean_in(images["pd"], fractions[t]) for t in ("wm", "gm", "csf")}
    assert t1["wm"] > t1["gm"] > t1["csf"]
    assert t2["csf"] > t2["gm"] > t2["wm"]
    assert pd["csf"] > pd["wm"] and pd["gm"] > pd["wm"]
    # Cortical bone gives no spin-echo signal: the skull is dark in every MR contrast.
    assert all(mean_in(images[m], fractions["bone"]) < 0.1 * t1["wm"] for m in ("t1", "t2", "pd"))


def test_ct_in_hounsfield_units(images, fractions):
    ct = {t: mean_in(images["ct"], fractions[t]) for t in ("bone", "gm", "wm", "csf", "air")}
    assert ct["bone"] > 800 > 100 > ct["gm"] > ct["wm"] > ct["csf"] > -50
    assert ct["air"] < -950


def test_pet_uptake_ratio_and_resolution(fractions):
    sharp = make_brain_phantoms(SHAPE, modalities=("pet",), psf_fwhm_mm=0)["pet"].array
    blurred = make_brain_phantoms(SHAPE, modalities=("pet",))["pet"].array
    # Without the PSF every brain voxel mixes GM, WM and CSF uptake by its tissue fractions:
    # a least-squares fit recovers the uptakes whatever the partial volume.
    brain = (fractions["gm"] + fractions["wm"] + fractions["csf"]) > 0.99
    design = np.stack([fractions[t][brain] for t in ("gm", "wm", "csf")], axis=1)
    (gm, wm, csf), *_ = np.linalg.lstsq(design, sharp[brain], rcond=None)
    assert gm / wm == pytest.approx(4.0, rel=0.05)
    assert abs(csf) < 0.05 * gm
    # The 5 mm PSF spreads uptake: GM/WM contrast in pure voxels drops but stays clearly > 1,
    # and the image is smoother.
    ratio_sharp = sharp[fractions["gm"] > 0.9].mean() / sharp[fractions["wm"] > 0.9].mean()
    ratio_blurred = blurred[fractions["gm"] > 0.9].mean() / blurred[fractions["wm"] > 0.9].mean()
    assert 1.8 < ratio_blurred < ratio_sharp
    assert np.abs(np.diff(blurred, axis=2)).mean() < 0.8 * np.abs(np.diff(sharp, axis=2)).mean()


def test_geometry_is_physical_across_shapes(images):
    other = make_brain_phantoms((40, 56, 48), modalities=("t1",))["t1"]
    assert other.array.shape == (40, 56, 48)
    for volume in (images["t1"], other):
        geometry = volume.geometry
        assert np.allclose(geometry.spacing, geometry.spacing[0]), "voxels are isotropic"
        assert np.allclose(geometry.direction, np.eye(3))
        assert volume.metadata["modality"] == "t1"

    # The white-matter centroid in world (LPS mm, array order) must match nilearn's own WM map,
    # whatever the grid: index_to_world and the RAS -> LPS flip are right.
    wm_image = datasets.load_mni152_wm_template(resolution=1)
    wm = wm_image.get_fdata()
    ras = wm_image.affine @ np.append(np.argwhere(wm > 0).T @ wm[wm > 0] / wm.sum(), 1.0)
    expected = np.array([ras[2], -ras[1], -ras[0]])  # (z, y, x) in LPS
    for shape in (SHAPE, (40, 56, 48)):
        fraction = brain_tissue_fractions(shape)["wm"]
        centroid = np.argwhere(fraction.array >= 0).T @ fraction.array.ravel() / fraction.array.sum()
        world = (fraction.geometry.index_to_world @ np.append(centroid, 1.0))[:3]
        assert np.abs(world - expected).max() < 1.0


def test_head_fits_inside_the_field_of_view():
    air = brain_tissue_fractions((40, 56, 48))["air"].array
    # The neck leaves through the bottom (z = 0) face; every other face is air.
    for face in (air[-1], air[:, 0], air[:, -1], air[:, :, 0], air[:, :, -1]):
        assert face.min() > 0.95


def test_deterministic():
    first = make_brain_phantoms((32, 32, 32), modalities=("t2", "pet"))
    phantoms._fractions_on_grid.cache_clear()
    again = make_brain_phantoms((32, 32, 32), modalities=("t2", "pet"))
    for modality in ("t2", "pet"):
        np.testing.assert_array_equal(first[modality].array, again[modality].array)
        assert first[modality].geometry.allclose(again[modality].geometry)
    # Callers get their own arrays: editing one does not change the next phantom.
    first["t2"].array[:] = 0
    assert make_brain_phantoms((32, 32, 32), modalities=("t2",))["t2"].array.max() > 0


def test_axial_slices():
    slices = make_brain_phantom_slices((96, 112), modalities=("t1", "ct"))
    t1 = slices["t1"]
    assert t1.array.shape == (96, 112) and t1.ndim == 2
    assert t1.geometry.spacing[0] == t1.geometry.spacing[1]
    fractions = brain_tissue_fractions((96, 112))
    assert t1.geometry.allclose(fractions["wm"].geometry)
    assert mean_in(t1, fractions["wm"].array) > mean_in(t1, fractions["gm"].array, 0.8)
    assert slices["ct"].array.max() > 800


def test_bad_requests_raise():
    with pytest.raises(InputError, match="modalit"):
        make_brain_phantoms((32, 32, 32), modalities=("xray",))
    with pytest.raises(InputError, match="3D phantom"):
        make_brain_phantoms((32, 32))
