"""Does restricting SimpleITK's metric to the reference's tissue make small 2-D residuals worth aligning?

    .venv/bin/python bench/probe_sitk_tissue_mask.py [--harvard ../shared/data/harvard-aanlib]
        [--regimes mild,none] [--limit N] [--out FILE.md]

For each Harvard validation pair of ``unifuse evaluate`` (same split, seeds and regimes), SimpleITK
rigid + B-spline (``engine.classical.register_sitk``) registers the degraded moving image onto the
MRI twice: as shipped, and with its Mattes metric sampled only where the reference shows tissue
(``reference_mask=engine.alignment_guard.tissue_mask(reference)``: the background, where neither
image says anything about the field, no longer votes). Reported per task: the end-point error over
that tissue (px), mean and median, beside the identity's. A registration worth keeping on the
``mild`` pairs must cut the identity's error there and leave the ``none`` pairs near 0.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard, unit_intensities
from napari_unifuse.engine.alignment_guard import tissue_mask
from napari_unifuse.engine.classical import register_sitk
from napari_unifuse.metrics import end_point_error
from napari_unifuse.model.checkpoint import read_metadata

REPOSITORY = Path(__file__).resolve().parents[1]
VARIANTS = ("identity", "sitk", "sitk, tissue mask")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, default=REPOSITORY.parent / "shared" / "data" / "harvard-aanlib")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard", help="whose case split to use")
    parser.add_argument("--regimes", default="mild,none")
    parser.add_argument("--limit", type=int, help="pairs per task (all when not given)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    lines = ["| regime | task | n | " + " | ".join(f"{v}: mean / median" for v in VARIANTS) + " |",
             "|---|---|---:|" + "---:|" * len(VARIANTS)]
    for regime in args.regimes.split(","):
        pairs = pairs_from_harvard(args.harvard, "val", ["CT", "PET", "SPECT"], args.limit, seed=0, size=None,
                                   none_fraction=0.0, cases=cases, regime=regime)
        errors: dict[tuple[str, str], list[float]] = defaultdict(list)
        for pair in pairs:
            reference, _ = unit_intensities(pair.reference)
            moving, _ = unit_intensities(pair.moving)  # RGB PET/SPECT: its luma
            tissue = tissue_mask(reference)
            geometry = pair.reference.geometry
            fields = {"identity": np.zeros_like(pair.displacement),
                      "sitk": register_sitk(reference, moving, geometry),
                      "sitk, tissue mask": register_sitk(reference, moving, geometry, reference_mask=tissue)}
            for variant, field in fields.items():
                errors[pair.task, variant].append(end_point_error(field, pair.displacement, tissue))
            print(regime, pair.name, {v: round(errors[pair.task, v][-1], 2) for v in VARIANTS}, flush=True)
        for task in sorted({task for task, _ in errors}):
            cells = [f"{np.mean(errors[task, v]):.2f} / {np.median(errors[task, v]):.2f}" for v in VARIANTS]
            lines.append(f"| {regime} | {task} | {len(errors[task, VARIANTS[0]])} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text("# SimpleITK on small 2-D residuals, with and without a tissue mask\n\n"
                            "End-point error (px) over the reference's tissue; "
                            "`.venv/bin/python bench/probe_sitk_tissue_mask.py`.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
