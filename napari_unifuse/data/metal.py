"""Physics of the CT metal-artifact simulation behind `degrade.MetalArtifact`.

The recipe is the one of Zhang & Yu (IEEE TMI 37(6):1370, 2018), which ADN and most metal-artifact
reduction papers (and UniFuse's reference [39]) reuse:

1. HU -> linear attenuation at a reference energy (70 keV), split into water-like and bone-like
   density maps (soft threshold on HU), metal objects get their own density map;
2. each density map is forward-projected (parallel beam);
3. a polychromatic 120 kVp spectrum is attenuated by all three materials with their energy-dependent
   mass attenuation, plus a smooth scatter background, and the detector counts are Poisson
   (photon starvation behind metal comes out of this, nothing is hand-painted);
4. -log, the scanner's water beam-hardening correction (which cannot correct bone or metal: that
   residue is the dark streaks between metal objects), filtered back-projection, back to HU.

Projection uses a sparse system matrix of exact pixel strip integrals (one per slice shape, cached)
instead of scikit-image's `radon`, which rotates the whole image once per view: the matrix projects
all slices of a volume in one sparse product, tens of times faster per slice on CPU (see
bench/bench_degradations.py), and its transpose is the back-projector of the FBP. Both are tested
against the analytic Radon transform of a disc.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.ndimage import distance_transform_edt, uniform_filter1d

from napari_unifuse.errors import InputError

# Mass attenuation coefficients mu/rho (cm^2/g) at the centres of 10 keV bins. Values are the NIST
# XCOM / Elam-Ravel-Sieber tables as returned by `xraydb.mu_elam` (xraydb 4.5.8); "bone" is ICRU-44
# cortical bone (mass fractions H .034, C .155, N .042, O .435, Na .001, Mg .002, P .103, S .003,
# Ca .225) by the mixture rule. Tabulated here so nothing is looked up at run time.
ENERGIES_KEV = np.array([30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 110.0])
MASS_ATTENUATION_CM2_PER_G = {
    "water": np.array([0.3756, 0.2683, 0.2269, 0.2059, 0.1929, 0.1837, 0.1766, 0.1707, 0.1657]),
    "bone": np.array([1.3311, 0.6655, 0.4242, 0.3148, 0.2570, 0.2229, 0.2008, 0.1855, 0.1743]),
    "titanium": np.array([4.9719, 2.2126, 1.2135, 0.7660, 0.5361, 0.4053, 0.3247, 0.2721, 0.2360]),
    "iron": np.array([8.1775, 3.6289, 1.9574, 1.2049, 0.8164, 0.5952, 0.4597, 0.3717, 0.3118]),
    "aluminium": np.array([1.1284, 0.5684, 0.3682, 0.2778, 0.2301, 0.2018, 0.1833, 0.1704, 0.1608]),
}
DENSITY_G_PER_CM3 = {"water": 1.0, "bone": 1.92, "titanium": 4.506, "iron": 7.874, "aluminium": 2.699}
METALS = ("titanium", "iron")


class NoRoomForMetal(InputError):
    """The image holds no tissue region deep enough for a metal object of the drawn size: a
    property of the image (or crop), which a caller synthesising training data may redraw."""


# HU are defined at this energy: mu_water(70 keV) = 0.193 /cm.
REFERENCE_ENERGY_INDEX = int(np.flatnonzero(ENERGIES_KEV == 70.0)[0])
MU_WATER_REFERENCE_PER_CM = float(MASS_ATTENUATION_CM2_PER_G["water"][REFERENCE_ENERGY_INDEX])
# A 12-bit CT image: what a scanner stores, and where its streaks saturate.
HU_MIN, HU_MAX = -1024.0, 3071.0
# Soft water/bone split: pure water-like below, pure bone-like above, linear in between.
BONE_FRACTION_HU = (100.0, 1500.0)


def xray_spectrum(kvp: float = 120.0, filtration_mm_al: float = 6.0) -> np.ndarray:
    """Relative photon count per energy bin of a tungsten-anode tube, summing to 1.

    Kramers' law for the bremsstrahlung continuum (photons ~ (kVp - E) / E) hardened by aluminium
    filtration of the order of a clinical CT's total filtration. It has the right shape and mean
    energy (~65 keV at 120 kVp) but no tungsten K lines: enough for beam hardening, which depends
    on how the spectrum's mean shifts with path length, not on its fine structure.
    """
    photons = np.clip(kvp - ENERGIES_KEV, 0.0, None) / ENERGIES_KEV
    mu_al = MASS_ATTENUATION_CM2_PER_G["aluminium"] * DENSITY_G_PER_CM3["aluminium"]
    photons = photons * np.exp(-mu_al * filtration_mm_al / 10.0)
    return photons / photons.sum()


@dataclass(frozen=True)
class ParallelBeamProjector:
    """Parallel-beam projector for (y, x) slices, views uniform over [0, pi).

    Detector coordinate of a pixel centre (x right, y up, both from the slice centre, in pixels):
    t = x cos(theta) + y sin(theta). Detector bins are one pixel wide; position (n_detectors - 1) / 2
    on the detector is t = 0.
    """

    shape: tuple[int, int]
    n_views: int
    n_detectors: int
    matrix: scipy.sparse.csc_matrix  # (n_views * n_detectors, y * x), in pixel lengths

    @property
    def angles(self) -> np.ndarray:
        return np.arange(self.n_views) * np.pi / self.n_views

    def project(self, slices: np.ndarray, pixel_size_cm: float) -> np.ndarray:
        """Line integrals (z, n_views, n_detectors) of (z, y, x) slices; cm * input unit."""
        columns = slices.reshape(slices.shape[0], self.shape[0] * self.shape[1]).T.astype(np.float32, copy=False)
        sinograms = (self.matrix @ columns).T * pixel_size_cm
        return sinograms.reshape(slices.shape[0], self.n_views, self.n_detectors)

    def filtered_back_projection(self, sinograms: np.ndarray, pixel_size_cm: float) -> np.ndarray:
        """Ram-Lak filtered back-projection of (z, n_views, n_detectors) -> (z, y, x), 1/cm."""
        spectrum = np.fft.rfft(sinograms.astype(np.float32), n=_padded_length(self.n_detectors), axis=-1)
        filtered = np.fft.irfft(spectrum * _ramp_filter(self.n_detectors), axis=-1)[..., : self.n_detectors]
        columns = filtered.reshape(filtered.shape[0], -1).T
        images = (self.matrix.T @ columns).T * (np.pi / (2 * self.n_views) / pixel_size_cm)
        return images.reshape(sinograms.shape[0], *self.shape)


def _padded_length(n_detectors: int) -> int:
    # Zero-pad to >= 2n so the circular convolution of the FFT does not wrap the ramp kernel.
    return max(64, int(2 ** np.ceil(np.log2(2 * n_detectors))))


@functools.lru_cache(maxsize=4)
def _ramp_filter(n_detectors: int) -> np.ndarray:
    """Frequency response of the band-limited ramp, built from its spatial samples.

    Kak & Slaney, "Principles of Computerized Tomographic Imaging", eq. 3.61 (also what
    scikit-image's iradon uses): sampling the kernel in space avoids the DC offset of a sampled |f|.
    """
    size = _padded_length(n_detectors)
    n = np.concatenate([np.arange(1, size // 2 + 1, 2), np.arange(size // 2 - 1, 0, -2)])
    kernel = np.zeros(size)
    kernel[0] = 0.25
    kernel[1::2] = -1.0 / (np.pi * n) ** 2
    return (2.0 * np.real(np.fft.rfft(kernel))).astype(np.float32)


@functools.lru_cache(maxsize=2)
def get_projector(shape: tuple[int, int], n_views: int) -> ParallelBeamProjector:
    """Build (once per slice shape; ~2 s and ~200 MB at 160^2 x 360 views) the sparse projector.

    Exact strip integrals of square pixels (the parallel-beam case of the separable-footprint
    projector, Long, Fessler & Balter, IEEE TMI 2010): a pixel's shadow on the detector is a
    trapezoid, integrated over each one-pixel-wide bin it covers (at most 3). Point-splatting pixel
    centres instead leaves a moire of ~20 HU in a uniform brain.
    """
    ny, nx = shape
    n_detectors = int(np.ceil(np.hypot(ny, nx))) + 3  # +3 keeps every touched bin inside
    rows, cols = np.mgrid[:ny, :nx]
    x = (cols - (nx - 1) / 2).ravel()
    y = ((ny - 1) / 2 - rows).ravel()
    weights = np.empty((n_views, ny * nx, 3), np.float32)
    bin_rows = np.empty((n_views, ny * nx, 3), np.int32)
    for view, angle in enumerate(np.arange(n_views) * np.pi / n_views):
        centre = np.cos(angle) * x + np.sin(angle) * y + (n_detectors - 1) / 2
        first_bin = np.rint(centre).astype(np.int32) - 1
        edges = first_bin[:, None] - 0.5 + np.arange(4)
        weights[view] = np.diff(_trapezoid_cdf(edges - centre[:, None], angle), axis=1)
        bin_rows[view] = view * n_detectors + first_bin[:, None] + np.arange(3)
    # Laid out pixel by pixel (its 3 bins in every view, rows increasing), these are the arrays of
    # a compressed-column matrix as they stand: no sorting of ~30 M entries.
    matrix = scipy.sparse.csc_matrix(
        (
            weights.transpose(1, 0, 2).ravel(),
            bin_rows.transpose(1, 0, 2).ravel(),
            np.arange(ny * nx + 1, dtype=np.int64) * n_views * 3,
        ),
        shape=(n_views * n_detectors, ny * nx),
    )
    matrix.eliminate_zeros()
    return ParallelBeamProjector((ny, nx), n_views, n_detectors, matrix)


def _trapezoid_cdf(u: np.ndarray, angle: float) -> np.ndarray:
    """Fraction of a unit pixel's shadow at angle `angle` lying left of offset `u` from its centre.

    The shadow is a box of width |cos| convolved with one of width |sin|: a trapezoid with a plateau
    of half-width (wide - narrow) / 2, ramps `narrow` wide, height 1 / wide, area 1.
    """
    wide, narrow = max(abs(np.cos(angle)), abs(np.sin(angle))), min(abs(np.cos(angle)), abs(np.sin(angle)))
    plateau, outer = (wide - narrow) / 2, (wide + narrow) / 2
    ramp = max(narrow, 1e-12)  # a zero-width ramp (0 or 90 degrees) never reaches its formula
    clipped = np.clip(u, -outer, outer)
    left_ramp = (np.minimum(clipped, -plateau) + outer) ** 2 / (2 * ramp)
    middle = np.clip(clipped, -plateau, plateau) + plateau
    right_ramp = ramp / 2 - (outer - np.maximum(clipped, plateau)) ** 2 / (2 * ramp)
    return (left_ramp + middle + right_ramp) / wide


def hu_to_densities(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Water-like and bone-like density maps (g/cm^3) whose 70 keV attenuation sums to the HU image."""
    mu = np.clip(MU_WATER_REFERENCE_PER_CM * (1.0 + hu / 1000.0), 0.0, None)
    low, high = BONE_FRACTION_HU
    bone_fraction = np.clip((hu - low) / (high - low), 0.0, 1.0)
    water = mu * (1.0 - bone_fraction) / MASS_ATTENUATION_CM2_PER_G["water"][REFERENCE_ENERGY_INDEX]
    bone = mu * bone_fraction / MASS_ATTENUATION_CM2_PER_G["bone"][REFERENCE_ENERGY_INDEX]
    return water, bone


@functools.lru_cache(maxsize=8)
def water_beam_hardening_correction(kvp: float = 120.0, max_water_cm: float = 60.0) -> np.ndarray:
    """Polynomial taking polychromatic water projections to monochromatic (70 keV) ones.

    What every scanner calibrates on a water phantom; bone and metal stay uncorrected.
    """
    spectrum = xray_spectrum(kvp)
    lengths = np.linspace(0.0, max_water_cm, 256)
    mu_water = MASS_ATTENUATION_CM2_PER_G["water"] * DENSITY_G_PER_CM3["water"]
    polychromatic = -np.log(np.exp(-np.outer(lengths, mu_water)) @ spectrum)
    return np.polyfit(polychromatic, lengths * MU_WATER_REFERENCE_PER_CM, deg=4)


def simulate_ct_scan(
    hu: np.ndarray,
    metal_mask: np.ndarray,
    metal: str,
    photons_per_ray: float,
    scatter_to_primary: float,
    pixel_size_mm: float,
    n_views: int,
    rng: np.random.Generator,
    kvp: float = 120.0,
) -> np.ndarray:
    """Re-acquire (z, y, x) HU slices with `metal_mask` voxels made of `metal`; returns HU, float32.

    Slices without metal get the same scan (noise, bone beam hardening) with no metal projection;
    `MetalArtifact` decides which slices to pass.
    """
    projector = get_projector(hu.shape[1:], n_views)
    pixel_size_cm = pixel_size_mm / 10.0
    water, bone = hu_to_densities(np.where(metal_mask, -1000.0, hu))
    n_slices = hu.shape[0]
    tissue_paths = projector.project(np.concatenate([water, bone]), pixel_size_cm)  # g/cm^2
    metal_slices = np.flatnonzero(metal_mask.any(axis=(1, 2)))  # only these need metal's projection
    metal_path = projector.project(metal_mask[metal_slices] * DENSITY_G_PER_CM3[metal], pixel_size_cm)

    # float32 throughout (Python-float coefficients keep it so): ~13 M rays at 160^3.
    primary = np.zeros((n_slices, n_views, projector.n_detectors), np.float32)
    for energy_index, weight in enumerate(xray_spectrum(kvp)):
        line_integral = float(MASS_ATTENUATION_CM2_PER_G["water"][energy_index]) * tissue_paths[:n_slices]
        line_integral += float(MASS_ATTENUATION_CM2_PER_G["bone"][energy_index]) * tissue_paths[n_slices:]
        line_integral[metal_slices] += float(MASS_ATTENUATION_CM2_PER_G[metal][energy_index]) * metal_path
        primary += float(photons_per_ray * weight) * np.exp(-line_integral)
    # Scatter: a fraction of the primary blurred across the detector (two box filters of 1/8 of it,
    # a triangle kernel; the convolution model of scatter). It fills in photon-starved rays behind
    # metal, which then read too little attenuation and darken the streaks, as in real scans.
    width = projector.n_detectors // 8
    scatter = primary
    for _ in range(2):
        scatter = uniform_filter1d(scatter, width, axis=-1, mode="nearest")
    expected = primary + scatter_to_primary * scatter
    counts = np.maximum(rng.poisson(expected), 1).astype(np.float32)  # a zero count reads as one
    measured = np.float32(np.log(photons_per_ray)) - np.log(counts)
    corrected = np.polyval(water_beam_hardening_correction(kvp).astype(np.float32), measured)
    mu = projector.filtered_back_projection(corrected, pixel_size_cm)
    return (1000.0 / MU_WATER_REFERENCE_PER_CM) * mu - 1000.0


def place_metal_objects(
    hu: np.ndarray,
    radii_mm: list[float],
    voxel_size_mm: tuple[float, float, float],
    rng: np.random.Generator,
    margin_mm: float = 2.0,
) -> tuple[np.ndarray, list[dict]]:
    """Mask of metal spheres (discs when `hu` has one slice), each wholly inside the head.

    The head is the non-air voxels (> -500 HU); a centre is drawn among voxels at least
    radius + `margin_mm` deep in it, so implants sit in tissue or bone, never in air.
    """
    depth_mm = distance_transform_edt(hu > -500.0, sampling=voxel_size_mm)
    axes = np.ogrid[tuple(slice(0, n) for n in hu.shape)]
    mask = np.zeros(hu.shape, bool)
    objects = []
    for radius in radii_mm:
        candidates = np.flatnonzero(depth_mm > radius + margin_mm)
        if candidates.size == 0:
            raise NoRoomForMetal(f"no tissue region deep enough for a {radius:.1f} mm metal object (its centre must "
                                 f"lie over {radius + margin_mm:.1f} mm inside tissue, above -500 HU): give a larger "
                                 "image of the anatomy, or another degradation", "metal simulation")
        centre = np.unravel_index(rng.choice(candidates), hu.shape)
        squared_distance = sum(((axis - c) * size) ** 2 for axis, c, size in zip(axes, centre, voxel_size_mm))
        mask |= squared_distance <= radius**2
        objects.append({"centre_voxel": [int(c) for c in centre], "radius_mm": float(radius)})
    return mask, objects
