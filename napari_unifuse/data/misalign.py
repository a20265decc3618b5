"""Random rigid + smooth non-rigid misalignment with its exact ground-truth displacement field.

Convention (docs/architecture.md): the displacement ``u`` has shape ``(ndim, *shape)``, voxel
units, array-axis order, and sampling the misaligned ``moving`` image at ``x + u(x)`` gives the
``label`` aligned to the reference: ``label(x) = moving(phi(x))`` with ``phi(x) = x + u(x)``.

How the pair is made. ``phi = A o E``: a smooth elastic map ``E(x) = x + e(x)`` followed by a
rigid motion ``A`` (rotation about the image centre, then translation). ``e`` is a cubic B-spline
(random coefficients on a coarse control grid, like ITK's BSplineTransform and TorchIO's elastic
deformation), so it can be evaluated anywhere, and ``|e|`` never exceeds its largest coefficient.
``u = A o E - id`` has a closed form. To *create* ``moving`` we need ``phi^-1 = E^-1 o
A^-1``: ``A^-1`` is analytic, and ``E^-1(z) = z + g(z)`` is the fixed point of ``g = -e(z + g)``
(the scheme of ITK's InvertDisplacementField), which converges fast because the elastic gradient is
small (|grad e| < 1 is also what keeps the field free of folds). Both fields are smooth, so they are
computed on a coarse grid (8 samples per control interval) and brought to every voxel with
separable cubic-spline interpolation, which reproduces the rigid part exactly (the elastic part to
~1e-3 voxel): both fields take ~1.5 s (2 CPU cores) for a 160^3 volume instead of minutes of
per-voxel interpolation.

TorchIO's RandomAffine/RandomElasticDeformation would give us SimpleITK transforms, but we would
still need the inverse and a conversion from LPS millimetres; numpy/scipy stays in our convention.

The rotation is rigid in *physical* space: pass the voxel ``spacing`` so anisotropic volumes are
rotated like a real head, not sheared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.interpolate import make_interp_spline
from scipy.spatial.transform import Rotation

from napari_unifuse.errors import InputError

# Fixed-point iteration for the elastic inverse: the error shrinks by about |grad e| (< 0.4) per
# step, so it stops within ~15 steps, far below interpolation error.
_INVERSE_TOLERANCE_VOXELS = 1e-5
_INVERSE_MAX_ITERATIONS = 100
# Coarse samples per control-point interval for the fields (see module docstring).
_SAMPLES_PER_CONTROL_INTERVAL = 8
# Control coefficients beyond each image edge: the rotated grid pokes out by up to ~0.5 of the
# image, and the B-spline must stay defined (and smooth) there.
_CONTROL_PADDING = 3


def _identity_grid(shape: tuple[int, ...]) -> np.ndarray:
    return np.indices(shape, dtype=np.float64)


def _check_field(u: np.ndarray, spatial_shape: tuple[int, ...], what: str) -> None:
    if u.shape != (len(spatial_shape), *spatial_shape):
        raise InputError(
            f"displacement of shape {u.shape} does not fit an image of spatial shape "
            f"{spatial_shape}: expected {(len(spatial_shape), *spatial_shape)}",
            what,
        )


def warp_array(array: np.ndarray, u: np.ndarray, order: int = 1, mode: str = "nearest") -> np.ndarray:
    """Sample ``array`` at ``x + u(x)`` (scipy ``map_coordinates``).

    ``array`` is ``(*spatial)`` or channels-last ``(*spatial, C)`` (RGB ``(y, x, 3)``); ``u`` is
    ``(ndim, *spatial)`` in voxels. ``mode="nearest"`` repeats the edge voxel outside the image,
    which is torch ``grid_sample(padding_mode="border", align_corners=True)``; the model's warp
    follows the same convention. Returns float32 (float64 input stays float64).
    """
    array = np.asarray(array)
    ndim = u.shape[0]
    if array.ndim not in (ndim, ndim + 1):
        raise InputError(f"cannot warp an array of shape {array.shape} with a {ndim}-D displacement", "warp")
    _check_field(u, array.shape[:ndim], "warp")
    coordinates = _identity_grid(array.shape[:ndim]) + u
    out_dtype = np.float64 if array.dtype == np.float64 else np.float32
    if array.ndim == ndim:
        return ndimage.map_coordinates(array, coordinates, order=order, mode=mode, output=out_dtype)
    channels = [
        ndimage.map_coordinates(array[..., c], coordinates, order=order, mode=mode, output=out_dtype)
        for c in range(array.shape[-1])
    ]
    return np.stack(channels, axis=-1)


@dataclass(frozen=True)
class Misalignment:
    """One drawn misalignment ``phi(x) = centre + M (x + e(x) - centre) + t`` (voxel units)."""

    shape: tuple[int, ...]
    matrix: np.ndarray  # (ndim, ndim) voxel-space linear part of the rigid motion
    translation: np.ndarray  # (ndim,) voxels
    elastic_coefficients: np.ndarray  # (ndim, *control grid) cubic B-spline coefficients, voxels
    params: dict = field(default_factory=dict)  # JSON-ready description for meta.json

    @property
    def centre(self) -> np.ndarray:
        return (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0

    @property
    def control_spacing(self) -> np.ndarray:
        intervals = np.asarray(self.elastic_coefficients.shape[1:]) - 1 - 2 * _CONTROL_PADDING
        return (np.asarray(self.shape, dtype=np.float64) - 1.0) / intervals

    def elastic(self, points: np.ndarray) -> np.ndarray:
        """e at (ndim, ...) voxel coordinates: exact B-spline evaluation (no prefilter)."""
        expand = (-1,) + (1,) * (points.ndim - 1)
        knots = points / self.control_spacing.reshape(expand) + _CONTROL_PADDING
        return np.stack(
            [
                ndimage.map_coordinates(c, knots, order=3, prefilter=False, mode="nearest")
                for c in self.elastic_coefficients
            ]
        )

    def _affine(self, points: np.ndarray, matrix: np.ndarray, translation: np.ndarray) -> np.ndarray:
        """``centre + matrix (points - centre) + translation`` for (ndim, ...) coordinates."""
        expand = (-1,) + (1,) * (points.ndim - 1)
        moved = np.tensordot(matrix, points - self.centre.reshape(expand), axes=1)
        return moved + (self.centre + translation).reshape(expand)

    def _coarse_grid(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Coarse sample points (ndim, *coarse) and per-axis dense-from-coarse interpolation matrices."""
        per_axis_points, matrices = [], []
        for n, h in zip(self.shape, self.control_spacing):
            m = min(n, int(np.ceil((n - 1) / h)) * _SAMPLES_PER_CONTROL_INTERVAL + 1)
            coarse = np.linspace(0.0, n - 1.0, m)
            per_axis_points.append(coarse)
            # Row i: weights of the coarse samples in the not-a-knot cubic spline at voxel i.
            matrices.append(make_interp_spline(coarse, np.eye(m), k=min(3, m - 1))(np.arange(n)))
        return np.stack(np.meshgrid(*per_axis_points, indexing="ij")), matrices

    @staticmethod
    def _to_dense(coarse_field: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
        dense = coarse_field
        for axis, matrix in enumerate(matrices, start=1):
            dense = np.moveaxis(np.tensordot(matrix, dense, axes=([1], [axis])), 0, axis)
        return dense

    def displacement(self) -> np.ndarray:
        """Ground-truth ``u`` (ndim, *shape), float32: ``moving(x + u(x)) = label(x)``."""
        points, matrices = self._coarse_grid()
        phi = self._affine(points + self.elastic(points), self.matrix, self.translation)
        return self._to_dense(phi - points, matrices).astype(np.float32)

    def inverse_displacement(self) -> np.ndarray:
        """``v`` (ndim, *shape), float64, with ``phi^-1(y) = y + v(y)``: ``moving = warp(label, v)``."""
        points, matrices = self._coarse_grid()
        inverse_matrix = np.linalg.inv(self.matrix)
        z = self._affine(points, inverse_matrix, -inverse_matrix @ self.translation)  # A^-1(y)
        correction = np.zeros_like(z)
        for _ in range(_INVERSE_MAX_ITERATIONS):
            updated = -self.elastic(z + correction)
            change = np.abs(updated - correction).max()
            correction = updated
            if change < _INVERSE_TOLERANCE_VOXELS:
                break
        return self._to_dense(z + correction - points, matrices)

    def apply(self, label: np.ndarray, order: int = 1) -> np.ndarray:
        """The misaligned image: ``label`` resampled through ``phi^-1`` (channels-last allowed)."""
        return warp_array(label, self.inverse_displacement(), order=order)


@dataclass(frozen=True)
class RandomMisalignment:
    """Random rigid + elastic misalignment, as the paper's "rigid and non-rigid transformations".

    * rotation: each Euler angle (one in 2D, three in 3D) uniform in ``±max_rotation_deg``, about
      the image centre, in physical space;
    * translation: per axis uniform in ``±max_translation_fraction`` of that axis' length;
    * elastic: cubic B-spline with ``control_points`` control points across each axis (plus a
      margin outside), coefficients of component ``i`` uniform in ``±max_elastic_fraction`` of axis
      ``i``'s length; B-spline weights are a partition of unity, so ``|e_i|`` stays below that.

    The defaults (15 deg, 8 %, 5 % with 5 control points) keep every entry of the elastic
    gradient below 2 x 5 % x 4 intervals = 0.4 (typically far less), so the fields do not fold
    (the tests check det J > 0 with SimpleITK).
    """

    max_rotation_deg: float = 15.0
    max_translation_fraction: float = 0.08
    max_elastic_fraction: float = 0.05
    control_points: int = 5

    def __post_init__(self) -> None:
        if self.max_rotation_deg < 0 or self.max_translation_fraction < 0 or self.max_elastic_fraction < 0:
            raise InputError("misalignment maxima must be non-negative", "RandomMisalignment")
        if self.control_points < 2:
            raise InputError("the elastic grid needs at least 2 control points per axis", "RandomMisalignment")

    def draw(
        self,
        shape: tuple[int, ...],
        rng: np.random.Generator,
        spacing: tuple[float, ...] | None = None,
    ) -> Misalignment:
        """Draw one misalignment for an image of spatial ``shape`` (2D or 3D)."""
        shape = tuple(int(n) for n in shape)
        ndim = len(shape)
        if ndim not in (2, 3) or min(shape) < 2:
            raise InputError(f"expected a 2D or 3D spatial shape, got {shape}", "RandomMisalignment")
        spacing_mm = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
        if spacing_mm.shape != (ndim,) or np.any(spacing_mm <= 0):
            raise InputError(f"spacing {spacing} does not fit shape {shape}", "RandomMisalignment")
        lengths = np.asarray(shape, dtype=np.float64)

        n_angles = 1 if ndim == 2 else 3
        angles = rng.uniform(-self.max_rotation_deg, self.max_rotation_deg, size=n_angles)
        rotation = _rotation_matrix(angles)
        # Rigid in millimetres: voxel-space matrix = S^-1 R S with S = diag(spacing).
        matrix = (rotation * spacing_mm[None, :]) / spacing_mm[:, None]
        translation = rng.uniform(-1.0, 1.0, size=ndim) * self.max_translation_fraction * lengths
        limits = self.max_elastic_fraction * lengths
        control_shape = (self.control_points + 2 * _CONTROL_PADDING,) * ndim
        coefficients = rng.uniform(-1.0, 1.0, size=(ndim, *control_shape)) * limits.reshape((ndim,) + (1,) * ndim)

        params = {
            "rotation_deg": angles.tolist(),
            "rotation_axes": "in-plane (y, x)" if ndim == 2 else "extrinsic Euler about the (z, y, x) array axes",
            "translation_voxels": translation.tolist(),
            "spacing_mm": spacing_mm.tolist(),
            "max_rotation_deg": self.max_rotation_deg,
            "max_translation_fraction": self.max_translation_fraction,
            "max_elastic_fraction": self.max_elastic_fraction,
            "control_points": self.control_points,
        }
        return Misalignment(
            shape=shape, matrix=matrix, translation=translation, elastic_coefficients=coefficients, params=params
        )

    def sample(
        self,
        shape: tuple[int, ...],
        rng: np.random.Generator,
        spacing: tuple[float, ...] | None = None,
    ) -> np.ndarray:
        """Only the ground-truth displacement ``u`` (ndim, *shape) of a fresh draw."""
        return self.draw(shape, rng, spacing).displacement()


def _rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation matrix acting on array-axis-ordered vectors ((y, x) in 2D, (z, y, x) in 3D)."""
    if angles_deg.size == 1:
        theta = np.deg2rad(angles_deg[0])
        return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()


# ---- misalignment regimes ------------------------------------------------------------------------
# "large": RandomMisalignment (gross misalignment between scanners); "mild": the residual non-rigid
# misalignment left after a scanner-console or rigid registration; "none": co-registered data (a
# hybrid PET/CT). Training draws from a mixture so that the model learns when to leave an image
# alone, and `unifuse evaluate --misalignment` reports each regime on its own.
MISALIGNMENT_REGIMES = ("large", "mild", "none")
DEFAULT_REGIME_WEIGHTS = {"large": 0.5, "mild": 0.3, "none": 0.2}
# Below this mean magnitude (voxels) a mild field's elastic part is spent: its rigid part shrinks instead.
_SPENT_ELASTIC_VOXELS = 0.05


@dataclass(frozen=True)
class MildMisalignment:
    """Residual non-rigid misalignment in absolute voxels, whatever the image size.

    The elastic part is scaled so that its mean magnitude is uniform in ``elastic_mean_range``
    voxels; a rigid part of at most ``max_rotation_deg`` and ``max_translation`` voxels per axis is
    added (small: 1° already moves the rim of a 256² image by 2 px, so the field stays mostly
    non-affine); the elastic part then shrinks until the whole field has a mean magnitude of at
    most ``max_mean`` and a 95th percentile of at most ``max_p95`` voxels, and the rigid part too
    where it alone exceeds them (1° moves the rim of a 1024² image by 9 px). ``control_points``
    across each axis sets the smoothness (5: bumps of about a fifth of the field of view).

    Every entry of the elastic gradient stays below ``max_elastic_gradient``: on a small grid, whose
    control points are a few voxels apart (a 32³ training crop), 2-4 voxels of bumps folded the
    field (steepest entries 0.8-1.2) and its ground-truth inverse missed by up to 6 voxels (1.7 at
    0.9 on 40³); at 0.6 no draw folds and the inverse is within 0.05 voxels (measured on 32³-64³).
    There the field can be smaller than 2 voxels; 64³ and larger grids rarely reach the bound.

    The B-spline bumps carry some rotation and translation of their own: the field's best rigid
    fit can exceed the drawn rigid part (measured up to about 3 px and 3° on 64³ and 256² grids).
    """

    elastic_mean_range: tuple[float, float] = (2.2, 3.5)
    max_mean: float = 4.0
    max_p95: float = 7.0
    max_rotation_deg: float = 1.0
    max_translation: float = 1.5
    control_points: int = 5
    max_elastic_gradient: float = 0.6

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator,
             spacing: tuple[float, ...] | None = None) -> Misalignment:
        longest = float(max(shape))
        rigid = RandomMisalignment(
            max_rotation_deg=self.max_rotation_deg,
            max_translation_fraction=self.max_translation / longest,
            max_elastic_fraction=1.0 / longest,  # unit scale, rescaled below
            control_points=self.control_points,
        ).draw(shape, rng, spacing)
        angles = np.asarray(rigid.params["rotation_deg"], dtype=np.float64)
        spacing_mm = np.asarray(rigid.params["spacing_mm"], dtype=np.float64)

        def with_scales(elastic: float, motion: float) -> Misalignment:
            matrix = rigid.matrix
            if motion != 1.0:  # rigid in millimetres, as RandomMisalignment draws it
                matrix = (_rotation_matrix(angles * motion) * spacing_mm[None, :]) / spacing_mm[:, None]
            return Misalignment(shape=rigid.shape, matrix=matrix, translation=rigid.translation * motion,
                                elastic_coefficients=rigid.elastic_coefficients * elastic)

        elastic = Misalignment(shape=rigid.shape, matrix=np.eye(len(shape)), translation=np.zeros(len(shape)),
                               elastic_coefficients=rigid.elastic_coefficients).displacement()
        unit_mean = max(float(np.linalg.norm(elastic, axis=0).mean()), 1e-6)
        # The elastic part is linear in its scale: its steepest gradient entry at unit scale bounds the scale.
        steepest = max(max(float(np.abs(np.gradient(component, axis=axis)).max())
                           for component in elastic for axis in range(len(shape))), 1e-12)
        del elastic
        scale = min(rng.uniform(*self.elastic_mean_range) / unit_mean, self.max_elastic_gradient / steepest)
        motion = 1.0
        magnitude = np.linalg.norm(with_scales(scale, motion).displacement(), axis=0)
        while magnitude.mean() > self.max_mean or np.percentile(magnitude, 95) > self.max_p95:
            if scale * unit_mean > _SPENT_ELASTIC_VOXELS:
                scale *= 0.85
            else:
                motion *= 0.85
            magnitude = np.linalg.norm(with_scales(scale, motion).displacement(), axis=0)
        # The maxima the drawn field was scaled to, in RandomMisalignment's terms (the unit-scale
        # draw's own maxima describe no field that was applied).
        params = dict(rigid.params, regime="mild", rotation_deg=(angles * motion).tolist(),
                      translation_voxels=(rigid.translation * motion).tolist(),
                      max_rotation_deg=self.max_rotation_deg * motion,
                      max_translation_fraction=self.max_translation * motion / longest,
                      max_elastic_fraction=scale / longest,
                      mean_voxels=float(magnitude.mean()), p95_voxels=float(np.percentile(magnitude, 95)))
        drawn = with_scales(scale, motion)
        return Misalignment(shape=drawn.shape, matrix=drawn.matrix, translation=drawn.translation,
                            elastic_coefficients=drawn.elastic_coefficients, params=params)


@dataclass(frozen=True)
class NoMisalignment:
    """The zero field: the pair is already co-registered."""

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator,
             spacing: tuple[float, ...] | None = None) -> Misalignment:
        ndim = len(shape)
        coefficients = np.zeros((ndim, *(2 + 2 * _CONTROL_PADDING,) * ndim))
        return Misalignment(shape=tuple(int(n) for n in shape), matrix=np.eye(ndim), translation=np.zeros(ndim),
                            elastic_coefficients=coefficients, params={"regime": "none"})


@dataclass(frozen=True)
class RegimeMixture:
    """Draws a regime by ``weights`` ({regime: weight}), then a misalignment of that regime.

    ``large`` is ``RandomMisalignment(**large_options)``, so the size-relative maxima of a config
    still apply to it.
    """

    weights: dict[str, float]
    large_options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(MISALIGNMENT_REGIMES)
        if unknown or not self.weights or not all(np.isfinite(w) and w >= 0 for w in self.weights.values()) \
                or sum(self.weights.values()) <= 0:
            raise InputError(f"misalignment regimes must be finite, non-negative weights over "
                             f"{', '.join(MISALIGNMENT_REGIMES)}, not all zero, got {self.weights}", "misalignment")

    def regime(self, name: str) -> RandomMisalignment | MildMisalignment | NoMisalignment:
        return regime_misalignment(name, self.large_options)

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator,
             spacing: tuple[float, ...] | None = None) -> Misalignment:
        names = list(self.weights)
        probabilities = np.asarray([self.weights[n] for n in names], dtype=np.float64)
        name = names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]
        drawn = self.regime(name).draw(shape, rng, spacing)
        return Misalignment(shape=drawn.shape, matrix=drawn.matrix, translation=drawn.translation,
                            elastic_coefficients=drawn.elastic_coefficients,
                            params={**drawn.params, "regime": name})


def regime_misalignment(name: str, large_options: dict | None = None
                        ) -> RandomMisalignment | MildMisalignment | NoMisalignment:
    """The misalignment of one regime of ``MISALIGNMENT_REGIMES``; ``large`` is
    ``RandomMisalignment(**large_options)``. Drawing from it takes nothing more from the generator
    than the regime itself does (a ``RegimeMixture`` first draws which regime)."""
    if name not in MISALIGNMENT_REGIMES:
        raise InputError(f"unknown misalignment regime {name!r}; use one of {', '.join(MISALIGNMENT_REGIMES)}",
                         "misalignment")
    if name == "large":
        return RandomMisalignment(**(large_options or {}))
    return MildMisalignment() if name == "mild" else NoMisalignment()


def misalignment_from_options(options: dict | None) -> RegimeMixture:
    """A config's ``misalignment`` section: RandomMisalignment's keyword arguments for ``large``,
    plus either ``regime: NAME`` (one regime) or ``regimes: {NAME: weight}`` (a mixture).
    Without either, the regimes are drawn by ``DEFAULT_REGIME_WEIGHTS``.

    Refused (InputError, one line): a key that is neither, and a ``large`` option in a section that
    never draws the large regime (``regime: none``, or ``regimes`` without a positive ``large``
    weight), which would otherwise be accepted and silently unused."""
    if options is not None and not isinstance(options, dict):
        raise InputError(f"must be a mapping of {', '.join(MISALIGNMENT_KEYS)}, got {options!r}", "misalignment")
    options = dict(options or {})
    unknown = sorted(set(options) - set(MISALIGNMENT_KEYS), key=str)
    if unknown:
        raise InputError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}; "
                         f"accepted: {', '.join(MISALIGNMENT_KEYS)}", "misalignment")
    regime, weights = options.pop("regime", None), options.pop("regimes", None)
    if regime is not None and weights is not None:
        raise InputError("give misalignment.regime or misalignment.regimes, not both", "misalignment")
    if regime is not None:
        weights = {str(regime): 1.0}
    if weights is not None and not isinstance(weights, dict):
        raise InputError(f"misalignment.regimes must map regimes to weights, got {weights!r}", "misalignment")
    weights = {str(k): _weight(v) for k, v in (DEFAULT_REGIME_WEIGHTS if weights is None else weights).items()}
    mixture = RegimeMixture(weights, options)  # checks the regimes and weights
    if options and not weights.get("large", 0.0) > 0:
        drawn = ", ".join(name for name, weight in weights.items() if weight > 0)
        raise InputError(f"{', '.join(sorted(options))} only shape{'s' if len(options) == 1 else ''} the large "
                         f"regime, which this section never draws (regimes drawn: {drawn}): remove "
                         f"{'it' if len(options) == 1 else 'them'} or give the large regime a weight", "misalignment")
    try:
        RandomMisalignment(**options)  # fails here on a bad value, not in a data-loader worker
    except TypeError as error:  # a value of the wrong type, e.g. a list for a maximum
        raise InputError(f"invalid large-regime options {options}: {error}", "misalignment") from None
    return mixture


def _weight(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"a misalignment regime weight must be a number, got {value!r}", "misalignment") from None


# The keys of a config's misalignment section: how the regimes are chosen, then what shapes the
# large regime (RandomMisalignment's fields; the mild and none regimes take no options).
LARGE_REGIME_OPTIONS = tuple(option.name for option in dataclasses.fields(RandomMisalignment))
MISALIGNMENT_KEYS = ("regime", "regimes", *LARGE_REGIME_OPTIONS)
