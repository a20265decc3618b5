"""Where the engine's resident memory peaks on a clinical-size 3-D pair, stage by stage.

    OMP_NUM_THREADS=2 .venv/bin/python bench/profile_memory_3d.py [--pair motion-256x256x180] [--workbench]

Runs ``FusionEngine.run_fusion`` (bundled ``unifuse-3d-phantom``, CPU) on one pair of
``bench_3d_pairs.py`` while a thread samples the process's resident memory every 20 ms. The engine's
progress callback says which stage began when, so each sample is charged to the stage running then
(SimpleITK's registration overlaps the matching and the dense refinement; those samples go to the
stage the engine last announced). ``--workbench`` runs what the workbench's worker runs instead, with
the pair's truth as its label: ``_qt.analysis.run_and_analyse`` (the engine, then the review maps:
stage ``analyse``) and then ``volume_metrics`` (stage ``volume metrics``); napari's own layers come on
top of that. Prints, per stage, the peak and its rise over the memory when the
run began (the pair's own volumes already loaded), in GB and in bytes per reference voxel.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_3d_pairs import PAIRS  # noqa: E402

from napari_unifuse._qt.analysis import RunRequest, run_and_analyse, volume_metrics  # noqa: E402
from napari_unifuse.engine.inference import FusionEngine  # noqa: E402
from napari_unifuse.engine.progress import CancelToken  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="motion-256x256x180", choices=list(PAIRS))
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--workbench", action="store_true", help="the workbench worker's path: review maps and volume metrics too")
    args = parser.parse_args()
    pair = PAIRS[args.pair]()
    engine = FusionEngine(args.checkpoint, device="cpu")
    process = psutil.Process()
    stages: list[tuple[float, str]] = [(time.monotonic(), "start")]
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            samples.append((time.monotonic(), process.memory_info().rss))

    def progress(stage: str, finished: int, total: int) -> None:
        if stage != stages[-1][1]:
            stages.append((time.monotonic(), stage))

    baseline = process.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    if args.workbench:
        request = RunRequest(pair.reference, pair.moving, args.checkpoint, device="cpu", label=pair.truth)
        outcome = run_and_analyse(request, engine, progress, CancelToken())
        progress("volume metrics", 0, 1)
        volume_metrics(outcome)
    else:
        engine.run_fusion(pair.reference, pair.moving, progress=progress)
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    voxels = pair.reference.array.size
    peaks: dict[str, tuple[int, float]] = {}
    for moment, rss in samples:
        stage = next(name for start, name in reversed(stages) if start <= moment)
        if rss > peaks.get(stage, (0, 0.0))[0]:
            peaks[stage] = (rss, moment - started)
    print(f"{args.pair}: {voxels / 1e6:.1f} M voxels, {seconds:.1f} s, memory at the start "
          f"{baseline / 2**30:.2f} GB, peak {max(r for _, r in samples) / 2**30:.2f} GB\n")
    print("| stage (first announced at s) | peak (GB) | at s | rise over the start (GB) | rise in bytes per voxel |")
    print("|---|---:|---:|---:|---:|")
    for start, name in stages:
        if name in peaks:
            rss, moment = peaks[name]
            print(f"| {name} ({start - started:.1f}) | {rss / 2**30:.2f} | {moment:.1f} | "
                  f"{(rss - baseline) / 2**30:.2f} | {(rss - baseline) / voxels:.0f} |")


if __name__ == "__main__":
    main()
