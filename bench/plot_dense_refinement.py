"""Picture of the dense refinement the 3-D guard kept: a 128³ CT -> PET phantom pair with a mild
residual (`bench/eval_engine_3d_regimes.py`'s seed 0), the low-dose PET moved by the identity, the
matching's field (kept before), the refinement (kept now) and the true field, under the clean
PET's edges, and each field's error on the same slice.

    OMP_NUM_THREADS=2 .venv/bin/python bench/plot_dense_refinement.py [--out docs/images/dense_refinement_ctpet.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
from scipy import ndimage

from napari_unifuse.data.misalign import warp_array
from napari_unifuse.engine.inference import FusionEngine

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_engine_3d_regimes import HEAD, in_units, phantom_pairs  # noqa: E402


def plot_fields(pair, fields: dict[str, np.ndarray], title: str, out: Path) -> None:
    """The pair's moving image moved by each field on the middle axial slice, under the clean label's
    edges (red), and each field's end-point error in the head below it."""
    z = pair.label.array.shape[0] // 2
    gradient = ndimage.gaussian_gradient_magnitude(pair.label.array[z], 1.0)
    edges = gradient > np.percentile(gradient, 90)
    head = pair.label.array > HEAD
    figure, axes = plt.subplots(2, len(fields), figsize=(4 * len(fields), 8))
    for column, (name, field) in enumerate(fields.items()):
        error = np.linalg.norm(field - pair.displacement, axis=0)
        axes[0, column].imshow(warp_array(pair.moving.array, field)[z], cmap="gray")
        axes[0, column].contour(edges, levels=[0.5], colors="r", linewidths=0.5)
        axes[0, column].set_title(f"{name}\nend-point error {error[head].mean():.2f} voxels")
        image = axes[1, column].imshow(np.where(head[z], error[z], np.nan), vmin=0, vmax=6, cmap="magma")
        axes[1, column].set_title("|error| in the head (voxels)")
        for axis in axes[:, column]:
            axis.axis("off")
    figure.colorbar(image, ax=axes[1].tolist(), shrink=0.6)
    figure.suptitle(f"{title}, slice {z}")
    figure.savefig(out, dpi=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images/dense_refinement_ctpet.png"))
    args = parser.parse_args()
    side, seed = 128, 0
    ((_, _, _, pair, reference_modality, moving_modality),) = phantom_pairs(side, ["ct-pet"], ["mild"], [seed])
    fields = {"identity": np.zeros_like(pair.displacement)}
    for weighed in (False, True):
        engine = FusionEngine("unifuse-3d-phantom", device="cpu", weigh_dense_refinement=weighed)
        result = engine.run_fusion(in_units(pair.reference, reference_modality), in_units(pair.moving, moving_modality),
                                   reference_modality=reference_modality, moving_modality=moving_modality,
                                   quality=False)
        fields[f"{result.alignment_guard.kept}, kept {'now' if weighed else 'before'}"] = result.displacement
    fields["truth"] = pair.displacement
    plot_fields(pair, fields, f"CT → PET, mild residual, seed {seed}, {side}³: the low-dose PET moved by each field; "
                "red: edges of the clean PET", args.out)


if __name__ == "__main__":
    main()
