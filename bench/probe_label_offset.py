"""How far do intensity-based registrations move pairs that the atlas already calls aligned?

    .venv/bin/python bench/probe_label_offset.py [--harvard ../shared/data/harvard-aanlib]
        [--checkpoint unifuse-2d-harvard] [--split val|train] [--methods matching,sitk] [--out FILE.md]

`unifuse evaluate` scores alignment against the atlas's own registration of each Harvard pair (the
label is the untouched moving image, the ground-truth field the synthesised motion). A method that
maximises image similarity ends at the similarity optimum, not at the atlas's alignment; where the
two differ, that difference is a floor on the method's end-point error and a ceiling on its NCC
to the label, whatever the synthesised motion was. This probe measures it: each method registers
the unmoved, undegraded moving image (Y channel of PET/SPECT) onto its MRI, and the script prints,
per task and atlas case, the mean displacement (what the end-point error would be with no motion
to undo), its mean vector (a systematic offset), and the NCC of the registered image to the
unmoved one. The split is the one `unifuse evaluate --split val` uses for ``--checkpoint``: the
atlas cases that checkpoint held out of training.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_unifuse.cli.evaluate import checkpoint_split
from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.engine import classical
from napari_unifuse.metrics.registration import registration_metrics
from napari_unifuse.model.checkpoint import read_metadata
from napari_unifuse.training.harvard import index_harvard, read_harvard_pair, split_cases

REPOSITORY = Path(__file__).resolve().parents[1]


def luma(image: np.ndarray) -> np.ndarray:
    return rgb_to_ycbcr(image)[..., 0] if image.ndim == 3 else image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, default=REPOSITORY.parent / "shared" / "data" / "harvard-aanlib")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard", help="whose case split to use")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--methods", default="matching,sitk")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    train, validation = split_cases(index_harvard(args.harvard), val_fraction=cases.val_fraction, seed=cases.seed)
    pairs = validation if args.split == "val" else train

    # (task, case, method) -> per-pair (mean |u|, mean u_y, mean u_x, NCC to the unmoved image)
    records: dict[tuple[str, int, str], list[tuple[float, float, float, float]]] = defaultdict(list)
    for pair in pairs:
        reference, moving = read_harvard_pair(pair)
        moving = np.ascontiguousarray(luma(moving), dtype=np.float32)
        for method in methods:
            registration = classical.register(method, reference, moving)
            field = registration.displacement
            ncc = registration_metrics(registration.aligned, moving)["ncc"]
            records[pair.task, pair.case, method].append(
                (float(np.linalg.norm(field, axis=0).mean()), float(field[0].mean()), float(field[1].mean()), ncc))

    lines = [f"Registration of the unmoved Harvard {args.split} pairs (`bench/probe_label_offset.py`)", "",
             "| task | atlas case | pairs | method | mean displacement px | mean vector (y, x) px | NCC to the unmoved image |",
             "|---|---:|---:|---|---:|---|---:|"]
    for (task, case, method), values in sorted(records.items()):
        magnitude, along_y, along_x, ncc = np.mean(values, axis=0)
        lines.append(f"| {task} | {case} | {len(values)} | {method} | {magnitude:.1f} | "
                     f"({along_y:+.1f}, {along_x:+.1f}) | {ncc:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
