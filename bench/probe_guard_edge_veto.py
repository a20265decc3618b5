"""Would a second opinion stop the alignment guard's wrong moves? (issue 17, none adopted)

    .venv/bin/python bench/probe_guard_edge_veto.py [--harvard ../shared/data/harvard-aanlib]
        [--checkpoint unifuse-2d-harvard] [--split train|val] [--regimes none mild large] [--pairs 25]

The guard accepts a field when its mutual information gain beats k times its noise and the field
moves the tissue by at least the credible-motion floor (docs/alignment_guard.md). On a few SPECT
pairs MI still prefers a wrong 9-11 px move. The question: does a similarity with another bias,
normalised gradient fields (NGF, Haber & Modersitzki 2006: the squared cosine between the two
images' Gaussian gradients at scale sigma, each damped by its median magnitude over the tissue),
say "worse than not moving" on those pairs, and not on the pairs the guard moves rightly? And does
a measure that reads no intensities at all, the Dice overlap of the two brain masks
(``brain_mask`` of ``bench/probe_atlas_offset.py``: the MRI's intracranial region, the PET/SPECT
uptake outline, the CT's non-bone brain), say it? Or the round trip: the matching run the other
way (the MRI registered onto the moving image), composed with the kept field, should come back to
where it started if the move is real (inverse consistency)?

Each pair runs through ``FusionEngine`` as ``unifuse evaluate`` synthesises it (same split, seeds
and regimes; always all three tasks, since the case split depends on the task list). For every
pair whose kept field is not the identity, the kept field is *right* when its end-point error
against the true field is below the identity's. Per regime, task and sigma the
script prints how many wrong moves an NGF veto (revert to the identity when NGF of the kept field is
below NGF of the unmoved image) would revert, and how many right moves it would undo; then the same
two counts for a brain-mask veto (revert when the moved image's mask overlaps the MRI's less than
the unmoved one's), and for an inverse-consistency veto (revert when the round trip misses by more
than ``ROUND_TRIP_RATIOS`` of the kept field's mean motion over the tissue).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard, unit_intensities
from napari_unifuse.data.misalign import warp_array
from napari_unifuse.engine.alignment_guard import FOREGROUND_FRACTION, IDENTITY, tissue_mask
from napari_unifuse.engine.classical import register_matching
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.model.checkpoint import read_metadata
from napari_unifuse.model.warp import compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_atlas_offset import brain_mask  # noqa: E402  (the atlas probe's masks, no segmentation model)

SIGMAS = (1.0, 2.0, 4.0)
ROUND_TRIP_RATIOS = (0.3, 0.4, 0.5)


def normalised_gradient_fields(reference: np.ndarray, moving: np.ndarray, mask: np.ndarray, sigma: float) -> float:
    """Mean over ``mask`` of cos²(∇R, ∇M), each gradient damped by its median magnitude there."""
    gradients = [np.stack([ndimage.gaussian_filter(image, sigma, order=order) for order in ((1, 0), (0, 1))])
                 for image in (reference, moving)]
    norms = []
    for gradient in gradients:
        magnitude = np.sqrt((gradient**2).sum(axis=0))
        norms.append(np.sqrt(magnitude**2 + np.median(magnitude[mask]) ** 2))
    cosine = (gradients[0] * gradients[1]).sum(axis=0) / (norms[0] * norms[1])
    return float((cosine[mask] ** 2).mean())


def brain_overlap(reference_brain: np.ndarray, moving: np.ndarray, modality: str) -> float:
    """Dice of the MRI reference's brain mask and the moving image's (``modality``: ct, pet or spect)."""
    moved = brain_mask(moving, modality)
    return float(2 * (reference_brain & moved).sum() / max(1, reference_brain.sum() + moved.sum()))


def round_trip_ratio(reference: np.ndarray, moving: np.ndarray, field: np.ndarray, tissue: np.ndarray,
                     geometry) -> float:
    """Mean over ``tissue`` of |field(x) + reverse(x + field(x))| over the mean of |field(x)| there;
    the reverse is ``engine.classical``'s matching (the paper preset's step and range) of the
    reference onto the moving image."""
    reverse = register_matching(moving, reference, geometry)
    miss = compose(torch.from_numpy(reverse)[None], torch.from_numpy(field)[None])[0].numpy()
    return float(np.linalg.norm(miss, axis=0)[tissue].mean() / np.linalg.norm(field, axis=0)[tissue].mean())


def _end_point_error(field: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(field - truth, axis=0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, default=Path("../shared/data/harvard-aanlib"))
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--regimes", nargs="+", default=["none", "mild", "large"])
    parser.add_argument("--pairs", type=int, default=25, help="pairs per task")
    args = parser.parse_args()
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    engine = FusionEngine(args.checkpoint, device="cpu")
    print("| regime | task | pairs | moved: right / wrong | wrong moves reverted, sigma "
          + " / ".join(f"{s:g}" for s in SIGMAS) + " | right moves undone, sigma " + " / ".join(f"{s:g}" for s in SIGMAS)
          + " | brain-mask veto: wrong reverted / right undone | round-trip veto, ratio "
          + " / ".join(f"{r:g}" for r in ROUND_TRIP_RATIOS) + ": wrong reverted; right undone |")
    print("|---|---|---:|---|---|---|---|---|")
    for regime in args.regimes:
        pairs = pairs_from_harvard(args.harvard, args.split, ["CT", "PET", "SPECT"], args.pairs, seed=0, size=None,
                                   none_fraction=0.0, cases=cases, regime=regime)
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for pair in pairs:
            result = engine.run_fusion(pair.reference, pair.moving)
            tally = counts[pair.task]
            tally["pairs"] += 1
            if result.alignment_guard.kept == IDENTITY:
                continue
            field = np.asarray(result.displacement, dtype=np.float32)
            truth = np.zeros_like(field) if pair.displacement is None else np.asarray(pair.displacement, np.float32)
            right = _end_point_error(field, truth) < _end_point_error(np.zeros_like(field), truth)
            tally["right" if right else "wrong"] += 1
            reference, moving = unit_intensities(pair.reference)[0], unit_intensities(pair.moving)[0]
            moved = warp_array(moving, field)
            shown = FOREGROUND_FRACTION * np.percentile(moving, 99)  # the guard's joint foreground
            tissue = tissue_mask(reference)
            mask = tissue & ((moving > shown) | (moved > shown))
            for sigma in SIGMAS:
                vetoed = (normalised_gradient_fields(reference, moved, mask, sigma)
                          < normalised_gradient_fields(reference, moving, mask, sigma))
                if vetoed:
                    tally[f"{'undone' if right else 'reverted'}{sigma:g}"] += 1
            modality = pair.task.split("-")[0].lower()
            reference_brain = brain_mask(reference, "mri")
            if brain_overlap(reference_brain, moved, modality) < brain_overlap(reference_brain, moving, modality):
                tally["undone_mask" if right else "reverted_mask"] += 1
            ratio = round_trip_ratio(reference, moving, field, tissue, pair.reference.geometry)
            for limit in ROUND_TRIP_RATIOS:
                if ratio > limit:
                    tally[f"{'undone' if right else 'reverted'}_trip{limit:g}"] += 1
        for task, tally in counts.items():
            print(f"| {regime} | {task} | {tally['pairs']} | {tally['right']} / {tally['wrong']} | "
                  + " / ".join(str(tally[f"reverted{s:g}"]) for s in SIGMAS) + " | "
                  + " / ".join(str(tally[f"undone{s:g}"]) for s in SIGMAS)
                  + f" | {tally['reverted_mask']} / {tally['undone_mask']} | "
                  + " / ".join(str(tally[f"reverted_trip{r:g}"]) for r in ROUND_TRIP_RATIOS) + "; "
                  + " / ".join(str(tally[f"undone_trip{r:g}"]) for r in ROUND_TRIP_RATIOS) + " |", flush=True)


if __name__ == "__main__":
    main()
