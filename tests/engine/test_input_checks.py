"""Shapes and values real scanners produce, through FusionEngine with small untrained models:
the size limit read off the config, one-slice volumes as 2D, unusual dtypes and non-finite
values, and a property-based sweep (hypothesis) that only results or InputErrors come out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.input_checks import minimum_input_side, minimum_padded_side, model_dimensions
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.costs import minimum_size


def small(spatial_dims: int, **changes) -> UniFuseConfig:
    # No MI refinement: these tests are about shapes and values, and it is the slow part.
    return UniFuseConfig.from_dict({**UniFuseConfig.small(spatial_dims=spatial_dims).to_dict(),
                                    "matching_mutual_information": False, **changes})


@pytest.fixture(scope="module")
def engines() -> dict[int, FusionEngine]:
    torch.manual_seed(0)
    return {dims: FusionEngine(UniFuse(small(dims)), device="cpu") for dims in (2, 3)}


def blob(shape: tuple[int, ...], shift: float = 0.0) -> np.ndarray:
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.exp(-3 * sum((g - shift) ** 2 for g in grids)).astype(np.float32)


def volume(array: np.ndarray, spacing=None, origin=None, source="image") -> ImageVolume:
    ndim = array.ndim
    spacing = np.ones(ndim) if spacing is None else np.asarray(spacing, float)
    origin = np.zeros(ndim) if origin is None else np.asarray(origin, float)
    return ImageVolume(array, Geometry(spacing, origin, np.eye(ndim)), source=source)


@pytest.mark.parametrize("changes", [{}, {"correlation_levels": 3}, {"patch_size": 8, "slab_size": 8, "num_regblocks": 3, "regblock_channels": (16, 8, 8)}],
                         ids=["small", "three-levels", "patch-8"])
def test_the_minimum_side_is_where_the_network_starts_to_work(changes):
    """Probes the real network at the limit the config gives: one voxel less fails inside the
    model; at the limit a forward pass through the engine works."""
    torch.manual_seed(0)
    config = small(3, **changes)
    engine = FusionEngine(UniFuse(config), device="cpu")
    smallest = minimum_input_side(config)
    assert smallest > 1
    side = smallest + 8
    fits = volume(blob((smallest, side, side)))
    result = engine.run_fusion(fits, fits)
    assert result.fused.array.shape == (smallest, side, side)

    thin = volume(blob((smallest - 1, side, side)), source="thin.nii.gz")
    with pytest.raises(InputError, match=rf"thin.nii.gz: .*along z \({smallest - 1}\).* at least {smallest} voxels"):
        engine.run_fusion(thin, fits)
    # Without the check the network itself cannot take it: the limit is the model's, not ours.
    padded = minimum_padded_side(config) - config.size_multiple
    with pytest.raises(RuntimeError):
        engine.method.network(torch.zeros(1, 1, padded, 32, 32), torch.zeros(1, 1, padded, 32, 32))


def test_a_2d_image_as_narrow_as_the_2d_network_takes_fuses(engines):
    """The engine's limit is the network's (model.costs.minimum_size, which unifuse info prints):
    2-D pooling pads a short grid, so a strip one size multiple wide runs."""
    config = engines[2].config
    narrow = volume(blob((minimum_size(config), 24)))
    result = engines[2].run_fusion(narrow, narrow)
    assert result.fused.array.shape == narrow.array.shape


def test_tiles_below_the_minimum_are_refused_before_any_work(engines):
    config = engines[3].config
    engine = FusionEngine(engines[3].method, device="cpu", tile_size=minimum_padded_side(config) - 1)
    image = volume(blob((12, 12, 12)))
    with pytest.raises(InputError, match=rf"^tile size: .*at least {minimum_padded_side(config)}") as error:
        engine.run_fusion(image, image)
    assert "--tile-size" not in str(error.value)  # raised from the API as from the CLI


def test_a_moving_image_of_any_size_is_resampled_onto_a_large_enough_reference(engines):
    reference = volume(blob((10, 12, 12)))
    for shape in [(2, 2, 2), (1, 1, 1), (200, 4, 4)]:
        # Voxels as large as it takes to span the reference's 10 x 12 x 12 mm, centred on it.
        spacing = np.array([10.0, 12.0, 12.0]) / shape
        moving = volume(blob(shape), spacing=spacing, origin=(spacing - 1) / 2)
        result = engines[3].run_fusion(reference, moving)
        assert result.fused.array.shape == reference.array.shape
        assert not any("covers only" in warning for warning in result.warnings)


def test_a_moving_image_elsewhere_in_space_is_refused_and_a_partial_one_named(engines):
    reference = volume(blob((10, 12, 12)), source="reference.nii.gz")
    far = volume(blob((10, 12, 12)), origin=(0.0, 0.0, 400.0), source="far.nii.gz")
    with pytest.raises(InputError, match=r"far.nii.gz: the moving image does not overlap the reference "
                                         r"\(reference.nii.gz\) in space \(their headers put their centres 400 mm apart\)"):
        engines[3].run_fusion(reference, far)
    corner = volume(blob((2, 2, 2)), source="corner.nii.gz")  # 8 of the reference's 1440 voxels
    warnings = engines[3].run_fusion(reference, corner).warnings
    assert any(w.startswith("the moving image reaches only 0.6 % of the reference (reference.nii.gz)'s grid")
               and "check the two files' origins" in w for w in warnings), warnings
    half = volume(blob((10, 12, 12)), origin=(0.0, 0.0, 8.0))  # its first 4 of 12 columns on the reference's last 4
    result = engines[3].run_fusion(reference, half)
    assert any("covers only 33 % of the reference grid" in warning for warning in result.warnings)
    # A PNG has no scanner position: paired with a NIfTI, the message says so.
    png = volume(blob((12, 12)), source="slice.png")
    nifti = volume(blob((12, 12)), origin=(-90.0, 120.0), source="slice.nii.gz")
    with pytest.raises(InputError, match=r"a picture \(a PNG or JPG, or a DICOM image without position\) has no position in the scanner"):
        engines[2].run_fusion(nifti, png)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_one_slice_volume_is_fused_as_2d_on_its_own_grid(engines, axis):
    # A moving volume of 7 slices, each its own brightness; the reference is one slice, placed in
    # the world where the moving volume's slice 4 lies: that slice is the one fused.
    moving_array = np.moveaxis(blob((20, 18))[None] * np.arange(1, 8)[:, None, None], 0, axis)
    spacing = np.ones(3)
    spacing[axis] = 5.0
    moving = volume(moving_array.astype(np.float32), spacing, source="moving.nii.gz")
    slice_shape = list(moving_array.shape)
    slice_shape[axis] = 1
    origin = np.zeros(3)
    origin[axis] = 4 * 5.0
    reference = volume(np.take(moving_array, [4], axis=axis) / 5.0, spacing, origin, source="slice.nii.gz")
    assert reference.single_slice_axis == axis and model_dimensions(reference) == 2

    result = engines[2].run_fusion(reference, moving)

    assert result.fused.array.shape == tuple(slice_shape) and result.aligned.array.shape == tuple(slice_shape)
    assert result.fused.geometry.allclose(reference.geometry)
    assert result.displacement.shape == (3, *slice_shape)
    assert not result.displacement[axis].any()
    assert result.slice_class_probs.shape == (slice_shape[0], 4)
    # The moving image's fifth slice (brightness 5) is the one that came through.
    assert result.aligned.array.max() == pytest.approx(moving_array.take(4, axis=axis).max(), rel=0.05)
    assert result.provenance["single_slice"]["axis"] == axis
    assert result.provenance["inputs"]["reference"]["shape"] == list(reference.array.shape)


def test_a_3d_model_refuses_a_one_slice_reference_and_a_slice_onto_a_volume(engines):
    one_slice, block = volume(blob((1, 16, 16))), volume(blob((8, 16, 16)))
    with pytest.raises(InputError, match="single slice stored as a 3D volume.*use a 2D checkpoint"):
        engines[3].run_fusion(one_slice, one_slice)
    with pytest.raises(InputError, match="moving image is a single slice .* but the reference a volume"):
        engines[3].run_fusion(block, one_slice)


@pytest.mark.parametrize("make", [
    lambda a: a > 0.5,
    lambda a: (a * 30000).astype(np.int16),
    lambda a: (a * 255).astype(np.uint8),
    lambda a: (a * 2e9).astype(np.int64),
    lambda a: a.astype(np.float16),
], ids=["bool", "int16", "uint8", "int64", "float16"])
def test_integer_boolean_and_half_precision_images_fuse(engines, make):
    reference = volume(blob((24, 20)))
    moving = volume(make(blob((24, 20), 0.1)))
    result = engines[2].run_fusion(reference, moving)
    assert np.isfinite(result.fused.array).all() and 0 <= result.fused.array.min() <= result.fused.array.max() <= 1
    assert result.aligned.array.shape == (24, 20)


def test_complex_and_infinite_values_fuse_with_warnings_in_the_provenance(engines):
    reference = blob((24, 20)).astype(np.complex64) * np.exp(0.7j)
    moving = blob((24, 20), 0.1)
    moving[0, :4] = np.inf
    moving[-1, :2] = np.nan
    result = engines[2].run_fusion(volume(reference, source="complex.nii"), volume(moving, source="inf.nii"))
    assert np.isfinite(result.fused.array).all()
    warnings = result.provenance["warnings"]
    assert any(w.startswith("complex.nii: complex-valued data") and "magnitude" in w for w in warnings)
    assert any(w.startswith("inf.nii: non-finite values: 2 NaN voxels set to 0, 4 +inf voxels") for w in warnings)
    assert result.warnings == warnings


# ---- property-based: whatever the shape, dtype and geometry, a result or an InputError --------
DTYPES = [np.bool_, np.uint8, np.int16, np.int32, np.float32, np.float64, np.complex64]
# One draw in five is odd: a side too thin for the network, a spacing no grid can have.
odd = st.integers(0, 4).map(lambda k: k == 0)
sides = odd.flatmap(lambda thin: st.integers(1, 4) if thin else st.integers(5, 14))
spacings = odd.flatmap(lambda bad: st.sampled_from([0.0, -1.0, 1e9, np.nan, np.inf]) if bad else st.floats(0.05, 5.0))


@st.composite
def images(draw, spatial_dims: int):
    shape = tuple(draw(st.lists(sides, min_size=spatial_dims, max_size=spatial_dims)))
    dtype = draw(st.sampled_from(DTYPES))
    values = draw(st.sampled_from(["blob", "constant", "noise", "with-nan", "with-inf", "all-nan"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    array = {"blob": lambda: 100 * blob(shape), "constant": lambda: np.full(shape, 7.0),
             "noise": lambda: rng.normal(50, 20, shape)}.get(values, lambda: 100 * blob(shape))()
    if values in ("with-nan", "with-inf", "all-nan") and np.issubdtype(dtype, np.inexact):
        holes = rng.random(shape) < (1.0 if values == "all-nan" else 0.2)
        array = np.where(holes, np.nan if values != "with-inf" else -np.inf, array)
    array = array.astype(dtype) if dtype != np.bool_ else array > 50
    spacing = [draw(spacings) for _ in range(spatial_dims)]
    shear = draw(st.floats(-0.9, 0.9))
    direction = np.eye(spatial_dims)
    direction[0, -1] = shear
    matrix = np.eye(spatial_dims + 1)
    with np.errstate(invalid="ignore"):  # inf spacing times a zero of the direction: NaN, refused later
        matrix[:spatial_dims, :spatial_dims] = direction * np.asarray(spacing)
    return array, matrix


@pytest.mark.parametrize("spatial_dims", [2, 3])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_pair_gives_a_result_or_an_input_error(engines, spatial_dims, data):
    pair = []
    for role in ("reference", "moving"):
        array, matrix = data.draw(images(spatial_dims), label=role)
        try:
            pair.append(ImageVolume(array, Geometry.from_index_to_world(matrix), source=role))
        except InputError:
            event("geometry refused")
            return  # a geometry no image can have is refused where it is built
    reference, moving = pair
    engine = engines[model_dimensions(reference)]
    try:
        result = engine.run_fusion(reference, moving)
    except InputError as error:
        event("input error")
        assert str(error).strip() and "\n" not in str(error)
        return
    event("fused")
    assert result.fused.array.shape[: reference.ndim] == reference.spatial_shape
    assert np.isfinite(result.fused.array).all() and np.isfinite(result.displacement).all()
