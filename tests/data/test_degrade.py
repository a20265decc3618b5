"""Degradation models: each one measurably produces its artifact, reproducibly, in 2D and 3D."""

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, map_coordinates

from napari_unifuse.data import metal as ct
from napari_unifuse.data.degrade import (
    DEGRADATION_CLASSES,
    LowDose,
    MetalArtifact,
    MotionArtifact,
    NoDegradation,
    make_degradation,
)
from napari_unifuse.errors import InputError


def head_regions(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Masks of an ellipsoidal head: skull shell, brain, ventricles (the rest is air)."""
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    semi_axes = (0.8, 0.9, 0.75)[-len(shape) :]
    radius = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, semi_axes)))
    return {"skull": (radius < 1) & (radius >= 0.88), "brain": radius < 0.88, "ventricles": radius < 0.3}


def head_mr(shape) -> np.ndarray:
    regions = head_regions(shape)
    image = 0.2 * regions["skull"] + 0.6 * regions["brain"]
    image[regions["ventricles"]] = 1.0
    return image.astype(np.float32)


def head_ct(shape) -> np.ndarray:
    regions = head_regions(shape)
    hu = np.full(shape, -1000.0)
    hu[regions["skull"]] = 1200.0
    hu[regions["brain"]] = 40.0
    hu[regions["ventricles"]] = 10.0
    return hu


# Small inputs per (degradation, ndim); CT in HU with a physical pixel size (a ~19 cm head).
CASES = {
    ("none", 2): (lambda: head_mr((48, 40)), {}),
    ("none", 3): (lambda: head_mr((12, 24, 20)), {}),
    ("motion", 2): (lambda: head_mr((48, 40)), {}),
    ("motion", 3): (lambda: head_mr((12, 24, 20)), {}),
    ("metal", 2): (lambda: head_ct((48, 48)), {"voxel_size_mm": 4.0}),
    ("metal", 3): (lambda: head_ct((8, 32, 32)), {"voxel_size_mm": (4.0, 5.0, 5.0)}),
    ("lowdose", 2): (lambda: head_mr((48, 40)), {}),
    ("lowdose", 3): (lambda: head_mr((12, 24, 20)), {}),
}


def test_factory_follows_the_class_order():
    for index, name in enumerate(DEGRADATION_CLASSES):
        degradation = make_degradation(name, 0.3)
        assert degradation.name == name and degradation.class_index == index
        assert degradation.severity == 0.3
    with pytest.raises(InputError, match="unknown degradation"):
        make_degradation("blur")


@pytest.mark.parametrize(("name", "ndim"), sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_dtype_and_seed_reproducibility(name, ndim, dtype):
    make_image, options = CASES[name, ndim]
    image = make_image().astype(dtype)
    degradation = make_degradation(name, 0.7, **options)
    first = degradation(image, np.random.default_rng(7))
    params = degradation.last_params
    again = degradation(image, np.random.default_rng(7))
    assert degradation.last_params == params and params["name"] == name and params["severity"] == 0.7
    other = degradation(image, np.random.default_rng(8))
    assert first.shape == image.shape and first.dtype == image.dtype
    np.testing.assert_array_equal(first, again)
    if name == "none":
        np.testing.assert_array_equal(first, image)
    else:
        assert not np.array_equal(first, other)
        assert not np.array_equal(first, image)


def background_energy(image: np.ndarray, clean: np.ndarray) -> float:
    # Air more than 2 voxels away from the head: anything there is ghosting.
    air = ~binary_dilation(clean > 0, iterations=2)
    return float(np.sum(image[air].astype(np.float64) ** 2))


def test_motion_ghosts_grow_with_severity():
    clean = head_mr((64, 64))
    energy = {
        severity: np.mean(
            [background_energy(MotionArtifact(severity)(clean, np.random.default_rng(seed)), clean) for seed in range(3)]
        )
        for severity in (0.2, 1.0)
    }
    assert background_energy(clean, clean) == 0.0
    assert 0.0 < energy[0.2] < energy[1.0]
    assert energy[1.0] > 2 * energy[0.2]


def test_motion_at_severity_zero_moves_nothing():
    """What its docstring says, and why `unifuse synth` refuses it: a motion pair with no motion."""
    clean = head_mr((32, 32))
    motion = MotionArtifact(0.0)
    np.testing.assert_allclose(motion(clean, np.random.default_rng(1)), clean, atol=1e-6)
    assert not np.any(motion.last_params["rotation_deg"]) and not np.any(motion.last_params["translation_mm"])


def test_motion_records_in_plane_movements_in_2d_and_ghosts_in_3d():
    motion = MotionArtifact(0.5)
    motion(head_mr((32, 32)), np.random.default_rng(1))
    rotation = np.array(motion.last_params["rotation_deg"])
    translation = np.array(motion.last_params["translation_mm"])
    n_movements = len(motion.last_params["times"])
    assert rotation.shape == translation.shape == (n_movements, 3)
    # 2D: rotation only about the singleton axis, translation only in the image plane.
    assert np.all(rotation[:, 1:] == 0) and np.all(translation[:, 0] == 0)
    assert np.all(np.abs(rotation[:, 0]) <= 0.5 * MotionArtifact.MAX_ROTATION_DEG)
    assert np.all(np.abs(rotation[:, 0]) >= 0.25 * MotionArtifact.MAX_ROTATION_DEG)
    clean = head_mr((16, 32, 32))
    assert background_energy(motion(clean, np.random.default_rng(2)), clean) > 0.0


def head_centre(image: np.ndarray) -> np.ndarray:
    return np.argwhere(image > 0.3 * image.max()).mean(axis=0)


def test_motion_leaves_the_image_where_its_unmoved_pose_is():
    """The k-space centre is acquired in the unmoved pose, so the image may ghost but not move:
    the pair's ground truth (the unmoved pose) stays right. Without the centre band, a movement
    drawn next to t = 0.5 split the central lines between poses and moved whole heads."""
    clean = head_mr((64, 64))
    shifts, times = [], []
    for seed in range(60):
        motion = MotionArtifact(1.0)
        degraded = motion(clean, np.random.default_rng(seed))
        times += motion.last_params["times"]
        shifts.append(np.linalg.norm(head_centre(degraded) - head_centre(clean)))
    assert max(shifts) < 1.0, max(shifts)  # 7.7-15 px on 5 of these 60 draws without the band
    assert min(abs(t - 0.5) for t in times) >= MotionArtifact.CENTRE_BAND - 1e-12


def line_samples(image: np.ndarray, start: np.ndarray, end: np.ndarray, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    points = start[:, None] + np.linspace(0, 1, n)[None] * (end - start)[:, None]
    return map_coordinates(image, points, order=1), points


def test_metal_is_bright_and_streaks_along_the_line_between_objects():
    clean = head_ct((96, 96))
    metal = MetalArtifact(1.0, voxel_size_mm=2.0, n_objects=2)
    # A seed whose two objects are well apart, so that "between them" is tissue.
    for seed in range(20):
        degraded = metal(clean, np.random.default_rng(seed))
        centres = [np.array(o["centre_voxel"], float) for o in metal.last_params["objects"]]
        if np.linalg.norm(centres[0] - centres[1]) > 25:
            break
    assert metal.last_params["photons_per_ray"] == pytest.approx(1e6)
    for centre in centres:
        assert degraded[tuple(centre.astype(int))] >= 3000.0  # metal saturates the HU scale

    # The artifact is what the metal adds to a metal-free scan with the same settings (the scan of
    # this pixel-sharp phantom has its own edge ringing, which is no metal artifact).
    params = metal.last_params
    metal_free = ct.simulate_ct_scan(
        clean[None], np.zeros((1, 96, 96), bool), params["metal"], params["photons_per_ray"],
        params["scatter_to_primary"], 2.0, params["n_views"], np.random.default_rng(0),
    )[0]
    error = degraded - metal_free
    midpoint, direction = (centres[0] + centres[1]) / 2, centres[1] - centres[0]
    half = np.linalg.norm(direction) / 2
    along = direction / np.linalg.norm(direction)
    across = np.array([-along[1], along[0]])
    clean_brain = np.abs(clean - 40.0) < 1.0
    errors = {}
    for name, axis in (("along", along), ("across", across)):
        values, points = line_samples(error, midpoint - half * axis, midpoint + half * axis)
        distance_to_metal = np.min([np.linalg.norm(points - c[:, None], axis=0) for c in centres], axis=0)
        keep = (distance_to_metal > 6) & map_coordinates(clean_brain.astype(float), points, order=0).astype(bool)
        assert keep.sum() > 20
        errors[name] = np.mean(np.abs(values[keep]))
    assert errors["along"] > 2.5 * errors["across"]


def test_metal_on_normalised_ct_stays_normalised():
    window = (-1024.0, 3071.0)
    hu = head_ct((48, 48))
    normalised = ((hu - window[0]) / (window[1] - window[0])).astype(np.float32)
    metal = MetalArtifact(0.5, voxel_size_mm=4.0, hu_window=window, n_objects=1)
    degraded = metal(normalised, np.random.default_rng(3))
    assert degraded.min() >= 0.0 and degraded.max() <= 1.0
    assert metal.last_params["hu_window"] == list(window)  # what a reader needs to map it back to HU
    skull = (1200.0 - window[0]) / (window[1] - window[0])
    assert degraded[tuple(metal.last_params["objects"][0]["centre_voxel"])] > skull


@pytest.mark.parametrize("metal_slices_only", [False, True])
def test_metal_rescans_all_slices_or_only_those_through_metal(metal_slices_only):
    clean = head_ct((16, 32, 32))
    metal = MetalArtifact(0.5, voxel_size_mm=(3.0, 6.0, 6.0), n_objects=1, metal_slices_only=metal_slices_only)
    degraded = metal(clean, np.random.default_rng(4))
    centre = metal.last_params["objects"][0]["centre_voxel"]
    radius_slices = metal.last_params["objects"][0]["radius_mm"] / 3.0
    changed = np.any(degraded != clean.astype(np.float64), axis=(1, 2))
    far_from_metal = np.abs(np.arange(16) - centre[0]) > radius_slices + 1
    assert changed[centre[0]] and changed[far_from_metal].all() != metal_slices_only
    assert changed.sum() < 16 if metal_slices_only else changed.all()


@pytest.mark.parametrize("storage_axes, slice_axis", [((1, 0, 2), 1), ((1, 2, 0), 2)], ids=["coronal", "slices-last"])
def test_metal_scans_a_volume_in_the_planes_across_its_slice_axis(storage_axes, slice_axis):
    """A CT stored with its axial planes along another array axis was re-scanned along axis 0: its
    streaks lay in coronal planes. Stored any way, the same head gets the axial volume's scan."""
    axial = head_ct((8, 32, 32))
    voxel_size = np.array([4.0, 5.0, 5.0])
    scanned_axial = MetalArtifact(0.6, voxel_size_mm=tuple(voxel_size))
    expected = scanned_axial(axial, np.random.default_rng(3))
    stored = MetalArtifact(0.6, voxel_size_mm=tuple(voxel_size[list(storage_axes)]), slice_axis=slice_axis)
    degraded = stored(axial.transpose(storage_axes), np.random.default_rng(3))
    np.testing.assert_array_equal(degraded, expected.transpose(storage_axes))
    for mine, axial_object in zip(stored.last_params["objects"], scanned_axial.last_params["objects"]):
        assert mine["centre_voxel"] == [axial_object["centre_voxel"][axis] for axis in storage_axes]
    assert stored.last_params["slice_axis"] == slice_axis and scanned_axial.last_params["slice_axis"] == 0


def test_water_reads_zero_hu_after_beam_hardening_correction():
    # A 19 cm water cylinder: without the correction, beam hardening cups its centre by tens of HU.
    water = np.where(head_regions((64, 64))["brain"] | head_regions((64, 64))["skull"], 0.0, -1000.0)
    scanned = ct.simulate_ct_scan(
        water[None], np.zeros((1, 64, 64), bool), "iron", 2e9, 0.0, 3.0, 180, np.random.default_rng(0)
    )[0]
    centre = head_regions((64, 64))["ventricles"]
    assert abs(np.mean(scanned[centre])) < 10.0


def test_projector_matches_the_analytic_radon_transform_of_a_disc():
    projector = ct.get_projector((80, 80), 120)
    rows, cols = np.mgrid[:80, :80]
    x, y = cols - 39.5, 39.5 - rows
    centre, radius = (9.0, -6.0), 17.0
    disc = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2).astype(np.float32)
    t = np.arange(projector.n_detectors) - (projector.n_detectors - 1) / 2
    offset = centre[0] * np.cos(projector.angles) + centre[1] * np.sin(projector.angles)
    analytic = 2 * np.sqrt(np.clip(radius**2 - (t[None] - offset[:, None]) ** 2, 0, None))

    projected = projector.project(disc[None], pixel_size_cm=1.0)[0]
    assert np.abs(projected - analytic).mean() < 0.02 * analytic.mean()
    reconstructed = projector.filtered_back_projection(analytic[None], pixel_size_cm=1.0)[0]
    distance = np.hypot(x - centre[0], y - centre[1])
    np.testing.assert_allclose(reconstructed[distance < radius - 2], 1.0, atol=0.01)
    # Outside, the sharp edge rings (sampling an infinitely sharp profile) by up to ~0.1 locally.
    assert np.abs(reconstructed[distance > radius + 2]).mean() < 0.02


def test_low_dose_variance_follows_poisson():
    flat = np.full((128, 128), 0.25)
    counts = 500.0
    reductions = np.array([2.0, 4.0, 8.0, 16.0])
    for fwhm in (0.0, 1.5):
        variances = []
        for reduction in reductions:
            low_dose = LowDose(dose_reduction_factor=reduction, full_dose_counts=counts, psf_fwhm_voxels=fwhm)
            noisy = low_dose(flat, np.random.default_rng(int(reduction)))
            assert noisy.mean() == pytest.approx(0.25, rel=0.02)
            variances.append(noisy.var())
        slope = np.polyfit(np.log(reductions), np.log(variances), 1)[0]
        assert slope == pytest.approx(1.0, abs=0.1)
        if fwhm == 0.0:  # Poisson: var(y) = x * DRF / c
            np.testing.assert_allclose(variances, 0.25 * reductions / counts, rtol=0.1)
        else:  # the PSF correlates the noise, lowering its per-voxel variance
            assert variances[0] < 0.5 * 0.25 * reductions[0] / counts


def test_low_dose_severity_maps_to_dose_reduction():
    assert LowDose(0.0)(np.zeros((8, 8)), np.random.default_rng(0)).shape == (8, 8)
    reductions = []
    for severity in (0.0, 0.5, 1.0):
        low_dose = LowDose(severity)
        low_dose(np.zeros((8, 8)), np.random.default_rng(0))
        reductions.append(low_dose.last_params["dose_reduction_factor"])
    assert reductions[0] == pytest.approx(4.0) and reductions[-1] == pytest.approx(20.0)
    assert reductions[0] < reductions[1] < reductions[2]


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((4, 4, 4, 4)), "2D .* or 3D"),
        (np.zeros((8, 8), np.int16), "float"),
        (np.full((8, 8), np.nan), "NaN"),
    ],
)
def test_bad_arrays_raise_input_error(array, problem):
    with pytest.raises(InputError, match=problem):
        NoDegradation()(array, np.random.default_rng(0))


def test_bad_parameters_raise_input_error():
    with pytest.raises(InputError, match="severity"):
        MotionArtifact(1.5)
    with pytest.raises(InputError, match="square in-plane"):
        MetalArtifact(voxel_size_mm=(1.0, 2.0))(head_ct((32, 32)), np.random.default_rng(0))
    with pytest.raises(InputError, match="square in-plane"):  # the planes across the slice axis
        MetalArtifact(voxel_size_mm=(2.0, 2.0, 3.0), slice_axis=1)(head_ct((8, 8, 8)), np.random.default_rng(0))
    with pytest.raises(InputError, match="slice_axis"):
        MetalArtifact(slice_axis=3)
    with pytest.raises(InputError, match="deep enough"):
        MetalArtifact(voxel_size_mm=1.0)(np.full((16, 16), -1000.0), np.random.default_rng(0))
