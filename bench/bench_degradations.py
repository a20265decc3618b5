"""Time each degradation at 256^2 (2D) and 160^3 (3D) on this machine; mean of a few runs.

    .venv/bin/python bench/bench_degradations.py [--runs-2d 3] [--runs-3d 2]

The CT projector (a sparse matrix per slice shape, cached) is timed separately: its one-off build is
paid once per shape per process, not per sample.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from skimage.transform import iradon, radon

from napari_unifuse.data import metal as ct
from napari_unifuse.data.degrade import DEGRADATION_CLASSES, make_degradation
from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms

# The phantom each degradation acts on (the paper's tasks).
MODALITY = {"none": "t2", "motion": "t2", "metal": "ct", "lowdose": "pet"}


def mean_seconds(function, runs: int) -> float:
    times = []
    for run in range(runs):
        start = time.perf_counter()
        function(run)
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-2d", type=int, default=3)
    parser.add_argument("--runs-3d", type=int, default=2)
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")

    for shape, runs in (((256, 256), args.runs_2d), ((160, 160, 160), args.runs_3d)):
        ndim = len(shape)
        make_phantoms = make_brain_phantom_slices if ndim == 2 else make_brain_phantoms
        phantoms = make_phantoms(shape, ("t2", "ct", "pet"))
        start = time.perf_counter()
        ct.get_projector(shape[-2:], 360)
        print(f"{shape}: CT projector build (once per slice shape) {time.perf_counter() - start:.2f} s")
        variants = [(name, {}) for name in DEGRADATION_CLASSES]
        if ndim == 3:
            variants.append(("metal", {"metal_slices_only": True}))
        for name, extra in variants:
            phantom = phantoms[MODALITY[name]]
            image = phantom.array
            options = {"voxel_size_mm": tuple(phantom.geometry.spacing)} if name in ("motion", "metal") else {}
            degradation = make_degradation(name, 0.5, **options, **extra)
            seconds = mean_seconds(lambda run: degradation(image, np.random.default_rng(run)), runs)
            label = name + (" (metal slices only)" if extra else "")
            print(f"{shape}: {label:28s} {seconds:7.2f} s  (mean of {runs})")

    # What the sparse projector replaces: scikit-image's radon/iradon, one 160^2 slice at 360 views.
    image = make_brain_phantom_slices((160, 160), ("ct",))["ct"].array
    angles = np.arange(360) * 0.5
    start = time.perf_counter()
    sinogram = radon(image, angles, circle=False)
    middle = time.perf_counter()
    iradon(sinogram, angles, circle=False)
    end = time.perf_counter()
    print(f"skimage, one 160^2 slice: radon {middle - start:.2f} s, iradon {end - middle:.2f} s")


if __name__ == "__main__":
    main()
