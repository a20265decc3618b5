"""Fusion side by side on Harvard validation pairs (docs/images/fusion_<task>.png, methods_<task>.png).

For one validation pair per task (``unifuse evaluate``'s pair of that index, large misalignment):
reference, moving input, UniFuse's fused luma, and max, average and wavelet fusion of the same
aligned inputs (the moving input warped by UniFuse's field), all at the same grey scale [0, 1],
plus the clean label for reference. Titles give the per-source gains and, for CT, the bone
retention.

With ``--methods``: the same pair (``--regime``, default mild) through each engine method
(``engine.methods``: UniFuse, BSAFusion, MMIF-AMIN after the matching, the matching + max), each
with its own alignment, into docs/images/methods_<task>.png.

    .venv/bin/python docs/make_fusion_figure.py --harvard ../shared/data/harvard-aanlib [--methods]
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
from napari_unifuse.engine.methods import load_method  # noqa: E402
from napari_unifuse.io import ImageVolume  # noqa: E402
from napari_unifuse.metrics import ssim_gains  # noqa: E402
from napari_unifuse.model.checkpoint import read_metadata  # noqa: E402

IMAGES = Path(__file__).parent / "images"
TASKS = {"CT-MRI": "CT", "PET-MRI": "PET", "SPECT-MRI": "SPECT"}
BONE = 0.8
METHODS = {"UniFuse": "unifuse", "BSAFusion": "bsafusion", "MMIF-AMIN": "mmif-amin:matching",
           "matching + max": "matching+max"}


def _luma(volume: ImageVolume) -> np.ndarray:
    array = np.asarray(volume.array, dtype=np.float32)
    array = rgb_to_ycbcr(array)[..., 0] if volume.is_rgb else array
    return array / 255.0 if array.max() > 1.5 else array


def validation_pair(harvard: Path, task: str, index: int, checkpoint: str, regime: str):
    """``unifuse evaluate``'s ``index``-th pair of ``task``: the split is built over every task at
    once, as evaluate builds it (the case split and the seeds depend on the task list)."""
    cases = checkpoint_split(read_metadata(checkpoint), None, None)
    pairs = pairs_from_harvard(harvard, "val", list(TASKS.values()), None, seed=0, size=None, none_fraction=0.0,
                               cases=cases, regime=regime)
    return [pair for pair in pairs if pair.task == task][index]


def _plot(task: str, panels: dict[str, np.ndarray], fused: tuple[str, ...], out: Path) -> None:
    """One row at grey scale [0, 1]; the ``fused`` panels titled with their gains (and bone for CT)."""
    reference, label = panels["reference (MRI)"], panels["clean label"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.5))
    for ax, (name, image) in zip(axes, panels.items()):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        title = name
        if name in fused:
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


def _sources(pair, task: str) -> dict[str, np.ndarray]:
    return {"reference (MRI)": unit_intensities(pair.reference)[0],
            f"moving ({TASKS[task]}, degraded)": unit_intensities(pair.moving)[0], "clean label": pair.label}


def figure(harvard: Path, task: str, index: int, checkpoint: str, engine: FusionEngine, out: Path) -> None:
    pair = validation_pair(harvard, task, index, checkpoint, "large")
    panels = _sources(pair, task)
    result = engine.run_fusion(pair.reference, pair.moving)
    panels["UniFuse"] = _luma(result.fused)
    aligned = np.clip(warp_array(unit_intensities(pair.moving)[0], result.displacement), 0, 1)
    for rule in classical.FUSION_RULES:
        panels[rule] = classical.fuse_classical(rule, panels["reference (MRI)"], aligned)
    _plot(task, panels, ("UniFuse", *classical.FUSION_RULES), out)


def methods_figure(harvard: Path, task: str, index: int, checkpoint: str, regime: str, out: Path) -> None:
    pair = validation_pair(harvard, task, index, checkpoint, regime)
    panels = _sources(pair, task)
    for title, name in METHODS.items():
        engine = FusionEngine(load_method(name), device="cpu")
        panels[title] = _luma(engine.run_fusion(pair.reference, pair.moving).fused)
    _plot(task, panels, tuple(METHODS), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--index", type=int, default=3, help="validation pair of each task")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    parser.add_argument("--methods", action="store_true", help="every engine method instead of the rules")
    parser.add_argument("--regime", default="mild", help="misalignment regime of --methods' pairs")
    args = parser.parse_args()
    if args.methods:
        for task in TASKS:
            methods_figure(args.harvard, task, args.index, args.checkpoint, args.regime,
                           IMAGES / f"methods_{TASKS[task].lower()}.png")
        return
    engine = FusionEngine(args.checkpoint, device="cpu")
    for task in TASKS:
        figure(args.harvard, task, args.index, args.checkpoint, engine, IMAGES / f"fusion_{TASKS[task].lower()}.png")


if __name__ == "__main__":
    main()
