"""Classical registration baselines (SimpleITK, ANTsPy) and fusion rules, on small 2D images.

The fields must follow the project convention: sampling moving at x + u(x) aligns it. A pure
translation of the moving image has an exactly known field, which pins down sign and axis order.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from napari_unifuse.data.misalign import RandomMisalignment, warp_array
from napari_unifuse.engine import classical
from napari_unifuse.errors import Cancelled, InputError, RegistrationError, UniFuseError
from napari_unifuse.io.image import Geometry
from napari_unifuse.metrics import registration_metrics

SHAPE = (64, 64)
# Different, asymmetric shifts per axis: a swapped axis or flipped sign cannot pass.
SHIFT_VOXELS = np.array([3.0, -5.0])
INTERIOR = (slice(None), slice(16, 48), slice(16, 48))


def head_like(shape=SHAPE, contrast=1.0):
    """A bright ellipse with two off-centre inner blobs: asymmetric, so a translation is unique."""
    y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = ((y / 0.8) ** 2 + (x / 0.6) ** 2 < 1).astype(np.float32) * 0.6
    blob_a = np.exp(-((y - 0.3) ** 2 + (x + 0.2) ** 2) / 0.02)
    blob_b = np.exp(-((y + 0.35) ** 2 + (x - 0.25) ** 2) / 0.04)
    image = head + contrast * 0.4 * (blob_a - 0.5 * blob_b)
    return np.clip(image, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def translated_pair():
    reference = head_like()
    label = head_like(contrast=-1.0)  # another "modality": the blobs have the opposite contrast
    u_true = np.broadcast_to(SHIFT_VOXELS[:, None, None], (2, *SHAPE)).astype(np.float32)
    moving = warp_array(label, -u_true)  # moving(x) = label(x - t), so moving(x + t) = label(x)
    return reference, label, moving, u_true


# Structural matching finds offsets on a grid of 2 voxels and smooths them: no sub-voxel accuracy.
@pytest.mark.parametrize(("method", "tolerance"), [("sitk", 0.3), ("ants", 0.3), ("matching", 1.0)])
def test_translation_recovered_with_sign_and_axis_order(method, tolerance, translated_pair):
    reference, label, moving, _ = translated_pair
    result = classical.register(method, reference, moving)
    recovered = result.displacement[INTERIOR].reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(recovered, SHIFT_VOXELS, atol=tolerance)
    assert result.displacement.shape == (2, *SHAPE)
    assert registration_metrics(result.aligned, label)["ncc"] > 0.95


def test_sitk_samples_the_metric_inside_the_reference_mask_only(translated_pair):
    reference, label, moving, _ = translated_pair
    geometry = Geometry.identity(2)
    head = reference > 0.05
    masked = classical.register_sitk(reference, moving, geometry, reference_mask=head)
    np.testing.assert_allclose(masked[INTERIOR].reshape(2, -1).mean(axis=1), SHIFT_VOXELS, atol=0.3)
    # Samples outside the head are dropped, so the optimiser sees other samples than without a mask.
    assert np.abs(masked - classical.register_sitk(reference, moving, geometry)).max() > 1e-4
    with pytest.raises(InputError, match="mask shape"):
        classical.register_sitk(reference, moving, geometry, reference_mask=head[:-1])


def test_field_is_in_voxels_on_anisotropic_grid(translated_pair):
    # 1.5 mm × 0.8 mm pixels: a field left in mm would read (4.5, -4.0), not the voxel shift.
    reference, _, moving, _ = translated_pair
    geometry = Geometry(np.array([1.5, 0.8]), np.array([10.0, -4.0]), np.eye(2))
    result = classical.register("sitk", reference, moving, geometry)
    np.testing.assert_allclose(result.displacement[INTERIOR].reshape(2, -1).mean(axis=1), SHIFT_VOXELS, atol=0.3)


def _rigid_and_bspline(geometry: Geometry, shape: tuple[int, ...], seed: int, domain_scale: float = 1.0,
                       oblique_domain: bool = False):
    """An image grid and a random rigid + cubic B-spline pair of SimpleITK transforms on it."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    ndim = len(shape)
    fixed = geometry.to_sitk(sitk.GetImageFromArray(np.zeros(shape, np.float32)))
    bspline = sitk.BSplineTransformInitializer(fixed, [4] * ndim)
    if domain_scale != 1.0:
        bspline.SetTransformDomainPhysicalDimensions(
            tuple(np.array(bspline.GetTransformDomainPhysicalDimensions()) * domain_scale))
    if oblique_domain:
        bspline.SetTransformDomainDirection(tuple(np.linalg.qr(rng.normal(size=(ndim, ndim)))[0].ravel()))
    bspline.SetParameters(tuple(rng.normal(size=len(bspline.GetParameters())) * 3))
    rigid = sitk.Euler3DTransform() if ndim == 3 else sitk.Euler2DTransform()
    rigid.SetCenter(tuple(rng.normal(size=ndim) * 5))
    if ndim == 3:
        rigid.SetRotation(0.1, -0.05, 0.08)
    else:
        rigid.SetAngle(0.1)
    rigid.SetTranslation(tuple(rng.normal(size=ndim) * 4))
    return fixed, rigid, bspline


def _oblique_geometry(ndim: int, seed: int) -> Geometry:
    rng = np.random.default_rng(seed)
    return Geometry(rng.uniform(0.5, 3, ndim), rng.normal(size=ndim) * 10, np.linalg.qr(rng.normal(size=(ndim, ndim)))[0])


@pytest.mark.parametrize(("geometry", "shape", "domain_scale", "oblique_domain"), [
    (_oblique_geometry(3, 1), (23, 19, 17), 1.0, False),  # the initializer permutes and flips the axes
    (_oblique_geometry(2, 2), (31, 26), 1.0, False),
    (Geometry([1.0, 0.8, 1.2], [3.0, -2.0, 5.0], np.eye(3)), (20, 24, 18), 0.5, False),  # most points unmoved
    (_oblique_geometry(3, 3), (12, 10, 11), 1.0, True),  # control grid oblique to the image: ITK's path
])
def test_rigid_bspline_field_is_itks_point_by_point_evaluation(geometry, shape, domain_scale, oblique_domain):
    import SimpleITK as sitk

    fixed, rigid, bspline = _rigid_and_bspline(geometry, shape, seed=len(shape), domain_scale=domain_scale,
                                               oblique_domain=oblique_domain)
    expected = classical.sitk_transform_to_displacement(sitk.CompositeTransform([rigid, bspline]), fixed, geometry)
    field = classical.rigid_bspline_displacement(rigid, bspline, fixed, geometry)
    assert field.shape == (len(shape), *shape) and field.dtype == np.float32
    np.testing.assert_allclose(field, expected, atol=1e-4)
    if domain_scale < 1:  # outside the B-spline's domain only the rigid part moves a point
        bspline_only = classical.rigid_bspline_displacement(type(rigid)(), bspline, fixed, geometry)
        assert 0.5 < (bspline_only == 0).all(axis=0).mean() < 1


def test_sitk_bspline_improves_over_identity_on_a_known_nonrigid_field():
    reference, label = head_like(), head_like(contrast=-1.0)
    draw = RandomMisalignment().draw(SHAPE, np.random.default_rng(3))
    moving = draw.apply(label)
    u_true = draw.displacement()
    identity = classical.register("identity", reference, moving)
    sitk_result = classical.register("sitk", reference, moving)
    assert not identity.displacement.any()
    ncc_identity = registration_metrics(identity.aligned, label)["ncc"]
    ncc_sitk = registration_metrics(sitk_result.aligned, label)["ncc"]
    assert ncc_sitk > ncc_identity + 0.05
    error_identity = np.abs(u_true)[INTERIOR].mean()
    error_sitk = np.abs(sitk_result.displacement - u_true)[INTERIOR].mean()
    assert error_sitk < 0.5 * error_identity


def head_like_3d(shape=(40, 40, 40), contrast=1.0):
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = ((z / 0.8) ** 2 + (y / 0.7) ** 2 + (x / 0.6) ** 2 < 1).astype(np.float32) * 0.6
    blob_a = np.exp(-((z - 0.2) ** 2 + (y - 0.3) ** 2 + (x + 0.2) ** 2) / 0.03)
    blob_b = np.exp(-((z + 0.3) ** 2 + (y + 0.35) ** 2 + (x - 0.25) ** 2) / 0.05)
    return np.clip(head + contrast * 0.4 * (blob_a - 0.5 * blob_b), 0, 1).astype(np.float32)


def test_sitk_gives_the_same_field_on_every_run_and_leaves_itks_threads_as_they_were():
    # Both causes of run-to-run differences bite at this size: a seed of 0 (SimpleITK's wall
    # clock) and ITK's threads summing the metric in no fixed order.
    import SimpleITK as sitk

    reference, label = head_like_3d(), head_like_3d(contrast=-1.0)
    moving = RandomMisalignment().draw(reference.shape, np.random.default_rng(5)).apply(label)
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    try:
        fields = [classical.register("sitk", reference, moving).displacement for _ in range(3)]
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    assert np.abs(fields[0]).max() > 0.5  # it did move the image
    for field in fields[1:]:
        np.testing.assert_array_equal(field, fields[0])


def test_sitk_stops_when_asked_and_an_unused_stop_changes_nothing(translated_pair):
    reference, _, moving, _ = translated_pair
    geometry = Geometry(np.ones(2), np.zeros(2), np.eye(2))
    stop = threading.Event()
    np.testing.assert_array_equal(classical.register_sitk(reference, moving, geometry, stop=stop),
                                  classical.register_sitk(reference, moving, geometry))
    stop.set()
    with pytest.raises(Cancelled, match="SimpleITK registration was stopped"):
        classical.register_sitk(reference, moving, geometry, stop=stop)


def test_ants_gives_the_same_field_on_every_run_and_leaves_global_state_as_it_was(monkeypatch):
    # Unseeded and multi-threaded, ANTs gives fields up to 2.7 px apart on such a pair. antspy's own
    # switch would also reseed NumPy's global generator: the registration must leave it alone.
    import os

    import ants

    reference, label = head_like_3d()[20], head_like_3d(contrast=-1.0)[20]
    moving = RandomMisalignment().draw(reference.shape, np.random.default_rng(5)).apply(label)
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    np.random.seed(11)
    expected_draw = np.random.random()
    np.random.seed(11)
    fields = [classical.register("ants", reference, moving).displacement for _ in range(3)]
    assert np.random.random() == expected_draw
    assert "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS" not in os.environ
    assert ants.config._random_seed is None
    assert np.abs(fields[0]).max() > 0.5  # it did move the image
    for field in fields[1:]:
        np.testing.assert_array_equal(field, fields[0])


def test_ants_reported_unavailable_without_antspyx(monkeypatch, translated_pair):
    monkeypatch.setitem(sys.modules, "ants", None)  # makes `import ants` raise ImportError
    assert not classical.ants_available()
    assert "ants" not in classical.available_registration_methods()
    reference, _, moving, _ = translated_pair
    with pytest.raises(UniFuseError, match="antspyx"):
        classical.register("ants", reference, moving)


def test_ants_failure_on_a_blank_image_is_a_registration_error_like_simpleitks():
    # ANTs cannot centre a zero image (ITK's moments calculator aborts) and raises a bare
    # RuntimeError; the CLI and the workbench show a RegistrationError in one line, as for SimpleITK.
    reference = head_like((32, 32))
    blank = np.zeros_like(reference)
    with pytest.raises(RegistrationError, match=r"the ANTs registration failed on this pair \(.*error code") as ants:
        classical.register("ants", reference, blank)
    with pytest.raises(RegistrationError) as sitk:
        classical.register("sitk", reference, blank)
    assert str(ants.value).split(")", 1)[1] == str(sitk.value).split(")", 1)[1]


def test_register_rejects_mismatched_grids_and_unknown_methods():
    with pytest.raises(InputError, match="one grid"):
        classical.register("identity", np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(InputError, match="unknown registration"):
        classical.register("demons", np.zeros((8, 8)), np.zeros((8, 8)))


@pytest.mark.parametrize("shape", [(33, 40), (9, 12, 17)])
def test_wavelet_fusion_of_an_image_with_itself_returns_it(shape):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    np.testing.assert_allclose(classical.fuse_classical("wavelet", image, image), image, atol=1e-5)


def test_wavelet_fusion_keeps_the_stronger_detail_and_averages_the_background():
    # A sharp edge in one source, a flat image of the same mean in the other: max-abs keeps the
    # edge's detail coefficients, only the coarsest approximation is averaged, so the fused step
    # is well above the half height that averaging the images gives.
    edge = np.zeros((64, 64), np.float32)
    edge[:, 32:] = 1.0
    flat = np.full_like(edge, edge.mean())
    fused = classical.fuse_classical("wavelet", edge, flat)
    step = fused[:, 33:40].mean() - fused[:, 24:31].mean()
    averaged = classical.fuse_classical("average", edge, flat)
    average_step = averaged[:, 33:40].mean() - averaged[:, 24:31].mean()
    assert average_step == pytest.approx(0.5)
    assert step > average_step + 0.1
    assert fused.mean() == pytest.approx(edge.mean(), abs=0.02)


def test_pixelwise_rules():
    a = np.array([[0.1, 0.9], [0.4, 0.2]], np.float32)
    b = np.array([[0.5, 0.3], [0.4, 1.0]], np.float32)
    np.testing.assert_allclose(classical.fuse_classical("max", a, b), [[0.5, 0.9], [0.4, 1.0]])
    np.testing.assert_allclose(classical.fuse_classical("average", a, b), [[0.3, 0.6], [0.4, 0.6]])
    with pytest.raises(InputError, match="unknown fusion rule"):
        classical.fuse_classical("pca", a, b)


def test_dense_registration_refines_the_matching_on_a_small_smooth_warp():
    from napari_unifuse.data.misalign import MildMisalignment
    from napari_unifuse.data.phantoms import make_brain_phantom_slices

    slices = make_brain_phantom_slices((96, 96), ("t1", "t2"))
    reference, label = (np.clip(slices[name].array / slices[name].array.max(), 0, 1).astype(np.float32)
                        for name in ("t1", "t2"))
    draw = MildMisalignment().draw(reference.shape, np.random.default_rng(0))
    moving = np.clip(draw.apply(label, order=3), 0, 1).astype(np.float32)
    head = reference > 0.05
    errors = {method: float(np.linalg.norm(classical.register(method, reference, moving).displacement
                                           - draw.displacement(), axis=0)[head].mean())
              for method in ("identity", "dense")}
    assert errors["dense"] < 0.7 * errors["identity"]
