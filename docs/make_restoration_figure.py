"""Restoration on Harvard validation pairs (docs/images/restoration_2d.png).

For one validation pair per task (``unifuse evaluate``'s first pair of the task, large
misalignment): the degraded moving image warped by UniFuse's field, UniFuse's restored image, the
clean label (the moving image aligned by the true field), all at the grey scale [0, 1] over the
central half of the image, and the restoration's change (restored − warped input). Titles give
each image's SSIM to the label over the whole image, as ``unifuse evaluate`` scores it.

    .venv/bin/python docs/make_restoration_figure.py --harvard ../shared/data/harvard-aanlib
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from make_fusion_figure import TASKS, validation_pair  # noqa: E402

from napari_unifuse.cli.evaluate import aligned_unit_luma, unit_intensities  # noqa: E402
from napari_unifuse.data.misalign import warp_array  # noqa: E402
from napari_unifuse.engine.inference import FusionEngine  # noqa: E402
from napari_unifuse.metrics import registration_metrics  # noqa: E402

OUT = Path(__file__).parent / "images" / "restoration_2d.png"
CHANGE_RANGE = 0.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    args = parser.parse_args()
    engine = FusionEngine(args.checkpoint, device="cpu")
    fig, axes = plt.subplots(len(TASKS), 4, figsize=(11, 2.9 * len(TASKS)))
    for row, task in zip(axes, TASKS):
        pair = validation_pair(args.harvard, task, 0, args.checkpoint, "large")
        result = engine.run_fusion(pair.reference, pair.moving)
        restored = aligned_unit_luma(result)
        warped = warp_array(unit_intensities(pair.moving)[0], result.displacement)
        centre = tuple(slice(side // 4, side - side // 4) for side in pair.label.shape)
        panels = {"degraded input, warped": warped, "restored": restored, "clean label": pair.label}
        for ax, (name, image) in zip(row, panels.items()):
            ax.imshow(image[centre], cmap="gray", vmin=0, vmax=1)
            ssim = "" if name == "clean label" else f", SSIM {registration_metrics(image, pair.label)['ssim']:.3f}"
            ax.set_title(f"{pair.name}: {name}{ssim}", fontsize=8)
        change = row[-1].imshow((restored - warped)[centre], cmap="coolwarm", vmin=-CHANGE_RANGE, vmax=CHANGE_RANGE)
        row[-1].set_title("restored − input", fontsize=8)
        fig.colorbar(change, ax=row[-1], fraction=0.046)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(OUT, dpi=90)
    print(OUT)


if __name__ == "__main__":
    main()
