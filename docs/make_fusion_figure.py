"""Fusion side by side on Harvard validation pairs (docs/images/fusion_<task>.png).

For one validation pair per task (``unifuse evaluate``'s pair of that index, large misalignment):
reference, moving input, UniFuse's fused luma, and max, average and wavelet fusion of the same
aligned inputs (the moving input warped by UniFuse's field), all at the same grey scale [0, 1],
plus the clean label for reference. Titles give the per-source gains and, for CT, the bone
retention.

    .venv/bin/python docs/make_fusion_figure.py --harvard ../shared/data/harvard-aanlib
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard, unit_intensities  # noqa: E402
from napari_unifuse.data.color import rgb_to_ycbcr  # noqa: E402
from napari_unifuse.data.misalign import warp_array  # noqa: E402
from napari_unifuse.engine import classical  # noqa: E402
from napari_unifuse.engine.inference import FusionEngine  # noqa: E402
from napari_unifuse.io import ImageVolume  # noqa: E402
from napari_unifuse.metrics import ssim_gains  # noqa: E402
from napari_unifuse.model.checkpoint import read_metadata  # noqa: E402

IMAGES = Path(__file__).parent / "images"
TASKS = {"CT-MRI": "CT", "PET-MRI": "PET", "SPECT-MRI": "SPECT"}
BONE = 0.8


def _luma(volume: ImageVolume) -> np.ndarray:
    array = np.asarray(volume.array, dtype=np.float32)
    array = rgb_to_ycbcr(array)[..., 0] if volume.is_rgb else array
    return array / 255.0 if array.max() > 1.5 else array


def figure(harvard: Path, task: str, index: int, checkpoint: str, engine: FusionEngine, out: Path) -> None:
    cases = checkpoint_split(read_metadata(checkpoint), None, None)
    pair = pairs_from_harvard(harvard, "val", [TASKS[task]], None, seed=0, size=None, none_fraction=0.0,
                              cases=cases, regime="large")[index]
    reference, moving_luma, label = unit_intensities(pair.reference)[0], unit_intensities(pair.moving)[0], pair.label
    result = engine.run_fusion(pair.reference, pair.moving)
    fused = _luma(result.fused)
    aligned = np.clip(warp_array(moving_luma, result.displacement), 0, 1)
    panels = {"reference (MRI)": reference, f"moving ({TASKS[task]}, degraded)": moving_luma,
              "clean label": label, "UniFuse": fused}
    for rule in classical.FUSION_RULES:
        panels[rule] = classical.fuse_classical(rule, reference, aligned)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.5))
    for ax, (name, image) in zip(axes, panels.items()):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        title = name
        if name in ("UniFuse", *classical.FUSION_RULES):
            gains = ssim_gains(np.clip(image, 0, 1), reference, label)
            title += f"\ngain MRI {gains.a:.2f}, {TASKS[task]} {gains.b:.2f}"
            if task == "CT-MRI" and (label > BONE).any():
                title += f"\nbone {image[label > BONE].mean():.2f}"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--index", type=int, default=3, help="validation pair of each task")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    args = parser.parse_args()
    engine = FusionEngine(args.checkpoint, device="cpu")
    for task in TASKS:
        figure(args.harvard, task, args.index, args.checkpoint, engine, IMAGES / f"fusion_{TASKS[task].lower()}.png")


if __name__ == "__main__":
    main()
