"""Does a checkpoint's degradation class see the artefact, or only the modality?

    OMP_NUM_THREADS=2 .venv/bin/python bench/class_evidence.py --checkpoint unifuse-3d-phantom
        [--sides 96 176] [--seeds 0 1 2] [--regimes none large] [--out bench/results/class_evidence_3d.md] [--write]
    OMP_NUM_THREADS=2 .venv/bin/python bench/class_evidence.py --checkpoint unifuse-2d-harvard
        --harvard ../shared/data/harvard-aanlib [--pairs 10] [--out ...] [--write]

The engine (``FusionEngine.run_fusion``, as ``unifuse fuse`` runs it, without quality maps) is
given each input twice: clean, and degraded by its modality's degradation. 3-D: the
MNI phantom pairs of ``training.datasets.PHANTOM_TASKS`` at each of ``sides``³ (176³: voxels of
about 1 mm, as a clinical volume), one pair per seed and misalignment regime (``--regimes``;
aligned by default), drawn as ``bench/eval_engine_3d_regimes.py`` draws them; the clean input of
an aligned size is the same volume for every seed. 2-D: the first ``pairs`` validation pairs of
each Harvard task, as ``unifuse evaluate`` loads them (the checkpoint's own case split), in each
of ``--regimes``.
The table gives, per moving modality and condition, how often each class was named, the mean
probability of the modality's degradation, and the likelihood ratio the engine weighs
(``engine.class_evidence``) for the call the input should get: "none" on a clean one, its
degradation on a degraded one. ``--write`` stores the counts as ``degradation_evidence`` in the
checkpoint's sidecar, with the command that produced them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.data.misalign import MISALIGNMENT_REGIMES
from napari_unifuse.engine.class_evidence import CLEAN, METADATA_KEY, class_evidence
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import ImageVolume
from napari_unifuse.model.checkpoint import read_metadata, set_metadata_section

# (moving modality, true condition, input size, reference, moving, modalities for the engine)
Case = tuple[str, str, str, ImageVolume, ImageVolume, dict[str, str]]


def phantom_cases(sides: list[int], seeds: list[int], regimes: list[str]) -> Iterator[Case]:
    for side in sides:
        for regime in regimes:
            yield from _phantom_cases_of_size(side, seeds, regime)


def _phantom_cases_of_size(side: int, seeds: list[int], regime: str) -> Iterator[Case]:
    from eval_engine_3d_regimes import in_units  # sibling bench script: CT back in Hounsfield units

    from napari_unifuse.data.misalign import misalignment_from_options
    from napari_unifuse.data.pairs import make_pair
    from napari_unifuse.data.phantoms import make_brain_phantoms
    from napari_unifuse.io import normalize_intensity
    from napari_unifuse.training.datasets import MODALITY_DEGRADATION, PHANTOM_INTENSITY, PHANTOM_TASKS

    phantoms = make_brain_phantoms((side,) * 3, tuple(PHANTOM_INTENSITY))
    for reference_name, moving_name in PHANTOM_TASKS.values():
        reference_modality, moving_modality = PHANTOM_INTENSITY[reference_name], PHANTOM_INTENSITY[moving_name]
        reference = normalize_intensity(phantoms[reference_name], reference_modality)[0]
        label = normalize_intensity(phantoms[moving_name], moving_modality)[0]
        for degradation in (DEGRADATION_CLASSES[0], MODALITY_DEGRADATION[moving_name]):
            for seed in seeds:
                pair = make_pair(reference, label, degradation, np.random.default_rng(seed),
                                 misalignment=misalignment_from_options({"regime": regime}))
                size = f"{side}³" if regime == "none" else f"{side}³, {regime} misalignment"
                yield (moving_name, _condition(degradation), size, in_units(pair.reference, reference_modality),
                       in_units(pair.moving, moving_modality),
                       {"reference_modality": reference_modality, "moving_modality": moving_modality})


def harvard_cases(root: Path, checkpoint: str, pairs: int, regimes: list[str]) -> Iterator[Case]:
    from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard

    split = checkpoint_split(read_metadata(checkpoint), None, None)
    for regime in regimes:
        size = "atlas" if regime == "none" else f"atlas, {regime} misalignment"
        for none_fraction in (1.0, 0.0):  # every pair clean, then every pair degraded
            for pair in pairs_from_harvard(root, "val", ["CT", "PET", "SPECT"], pairs, seed=0, size=None,
                                           none_fraction=none_fraction, cases=split, regime=regime):
                yield (str(pair.moving_modality), _condition(str(pair.degradation)), size, pair.reference,
                       pair.moving, {})


def _condition(degradation: str) -> str:
    return CLEAN if degradation == DEGRADATION_CLASSES[0] else degradation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sides", type=int, nargs="+", default=[96], help="3-D: phantom sides in voxels")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="3-D: one pair per seed")
    parser.add_argument("--regimes", nargs="+", default=["none"], choices=list(MISALIGNMENT_REGIMES),
                        help="the misalignment of each pair (none: aligned); the counts pool them")
    parser.add_argument("--harvard", type=Path, help="2-D: the Harvard AANLIB folder")
    parser.add_argument("--pairs", type=int, default=10, help="2-D: validation pairs per task")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write", action="store_true", help="store the counts in the checkpoint's sidecar")
    args = parser.parse_args()
    engine = FusionEngine(args.checkpoint, device="cpu")
    if engine.config.spatial_dims == 2 and args.harvard is None:
        parser.error("a 2-D checkpoint is calibrated on the Harvard pairs: give --harvard")
    cases = (phantom_cases(args.sides, args.seeds, args.regimes) if engine.config.spatial_dims == 3
             else harvard_cases(args.harvard, args.checkpoint, args.pairs, args.regimes))
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    probabilities: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    degradation_of: dict[str, str] = {}
    named_by_size: dict[tuple[str, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for modality, condition, size, reference, moving, modalities in cases:
        result = engine.run_fusion(reference, moving, quality=False, **modalities)
        counts[modality][condition][result.predicted_class] += 1
        named_by_size[(modality, condition, size)][result.predicted_class] += 1
        if condition != CLEAN:
            degradation_of.setdefault(modality, condition)
        probabilities[(modality, condition)].append(result.class_probs)
        print(f"{modality} {condition} {size}: named {result.predicted_class} "
              f"({', '.join(f'{k} {v:.2f}' for k, v in result.class_probs.items())})", flush=True)
    table = {modality: {condition: dict(named) for condition, named in conditions.items()}
             for modality, conditions in counts.items()}
    lines = [f"# Degradation class on clean and degraded inputs: `{args.checkpoint}`", "",
             f"`{_command()}` (the engine without quality maps; misalignment: {', '.join(args.regimes)}).", "",
             "| moving modality | input | n | named | mean p of the modality's degradation "
             "| likelihood ratio of the call it should make |", "|---|---|---:|---|---:|---:|"]
    for modality, conditions in table.items():
        degradation = degradation_of.get(modality)
        for condition, named in sorted(conditions.items(), key=lambda item: item[0] != CLEAN):
            mean_p = (np.mean([p[degradation] for p in probabilities[(modality, condition)]])
                      if degradation else float("nan"))
            # On clean inputs the right call is "none", on degraded ones the degradation.
            evidence = class_evidence(table, DEGRADATION_CLASSES[0] if condition == CLEAN else condition, modality)
            ratio = f"{evidence.likelihood_ratio:.2f}" if evidence is not None else ""
            named_text = ", ".join(f"{name} {count}" for name, count in sorted(named.items()))
            lines.append(f"| {modality} | {condition} | {sum(named.values())} | {named_text} | {mean_p:.3f} | {ratio} |")
    if len({size for _, _, size in named_by_size}) > 1:
        lines += ["", "By input size:", "", "| moving modality | input | size | named |", "|---|---|---|---|"]
        for (modality, condition, size), named in named_by_size.items():
            named_text = ", ".join(f"{name} {count}" for name, count in sorted(named.items()))
            lines.append(f"| {modality} | {condition} | {size} | {named_text} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    if args.write:
        sidecar = set_metadata_section(args.checkpoint, METADATA_KEY, {"modalities": table, "calibration": _command()})
        print(f"wrote {METADATA_KEY} to {sidecar}")


def _command() -> str:
    return " ".join(["bench/class_evidence.py", *map(shlex.quote, sys.argv[1:])]).replace(" --write", "")


if __name__ == "__main__":
    main()
