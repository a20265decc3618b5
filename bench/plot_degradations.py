"""Before/after figure of each degradation on a 2D phantom slice -> docs/images/degradations.png.

    .venv/bin/python bench/plot_degradations.py [--out docs/images/degradations.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from napari_unifuse.data.degrade import DEGRADATION_CLASSES, make_degradation
from napari_unifuse.data.phantoms import make_brain_phantom_slices

# Which phantom each degradation acts on (the paper's tasks), its severity, and the display window.
SHOWN = {
    "none": ("t2", 0.0, (0.0, 1.0)),
    "motion": ("t2", 0.7, (0.0, 1.0)),
    "metal": ("ct", 0.8, (-150.0, 250.0)),  # a brain window, HU, so the streaks show
    "lowdose": ("pet", 0.7, (0.0, 1.0)),
}
MODALITY_NAMES = {"t2": "MR T2", "ct": "CT (HU)", "pet": "FDG-PET"}


def describe(params: dict) -> str:
    if params["name"] == "motion":
        return f"{len(params['times'])} movements, phase-encode axis {params['phase_encode_axis']}"
    if params["name"] == "metal":
        return f"{len(params['objects'])} x {params['metal']}, {params['photons_per_ray']:.1e} photons/ray"
    if params["name"] == "lowdose":
        return f"dose / {params['dose_reduction_factor']:.1f}, PSF {params['psf_fwhm_voxels']} px"
    return "identity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "images" / "degradations.png")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    phantoms = make_brain_phantom_slices((args.size, args.size), ("t2", "ct", "pet"))
    figure, axes = plt.subplots(
        2, len(DEGRADATION_CLASSES), figsize=(4 * len(DEGRADATION_CLASSES), 9), layout="constrained"
    )
    for column, name in enumerate(DEGRADATION_CLASSES):
        modality, severity, window = SHOWN[name]
        clean = phantoms[modality]
        spacing = float(clean.geometry.spacing[-1])
        options = {"voxel_size_mm": spacing} if name in ("motion", "metal") else {}
        degradation = make_degradation(name, severity, **options)
        degraded = degradation(clean.array, np.random.default_rng(args.seed))
        for row, (image, caption) in enumerate(((clean.array, "clean"), (degraded, describe(degradation.last_params)))):
            axes[row, column].imshow(image, cmap="gray", vmin=window[0], vmax=window[1])
            axes[row, column].set_title(
                f"{MODALITY_NAMES[modality]}: clean" if row == 0 else f"{name} (severity {severity})\n{caption}",
                fontsize=10,
            )
            axes[row, column].axis("off")
    figure.suptitle(f"napari_unifuse.data.degrade on {args.size}x{args.size} phantom slices (seed {args.seed})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
