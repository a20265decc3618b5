"""What skipping DAPL's class read-out saves in a routed network pass (``UniFuse.refine`` with
``class_probs=``, as every engine tile runs once the ``classify`` stage has read p).

Times one fixed-field pass of the bundled 3-D network on a random ``--side``³ pair, as shipped
(read-out skipped) and with DAPL forced to read the class anyway, alternating, ``--repeats`` each
after a warm-up; prints the seconds and the ratio. The outputs are bitwise the same either way
(``tests/model/test_unifuse.py``).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_routed_readout.py [--side 160] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_unifuse.model.checkpoint import load_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    args = parser.parse_args(argv)
    network, _ = load_checkpoint(args.checkpoint)
    network = network.eval().to(memory_format=torch.channels_last_3d)  # as the engine runs it on a CPU
    shape = (1, 1, *[args.side] * 3)
    moving, reference = torch.rand(shape), torch.rand(shape)
    field = torch.zeros(1, 3, *shape[2:])
    class_probs = torch.tensor([[0.1, 0.7, 0.1, 0.1]])
    skipping = network.dapl.forward

    def reading(*a, **k):
        return skipping(*a, **{**k, "read_class": True})

    def one_pass(forward) -> float:
        network.dapl.forward = forward
        with torch.no_grad():
            start = time.perf_counter()
            network.refine(moving, reference, field, fixed_field=True, class_probs=class_probs)
            return time.perf_counter() - start

    one_pass(skipping)
    times: dict[str, list[float]] = {"read-out skipped (shipped)": [], "read-out computed": []}
    for _ in range(args.repeats):
        times["read-out computed"].append(one_pass(reading))
        times["read-out skipped (shipped)"].append(one_pass(skipping))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name}: {' / '.join(f'{v:.2f}' for v in values)} s (torch threads {torch.get_num_threads()})")
    print(f"skipped / computed: {medians['read-out skipped (shipped)'] / medians['read-out computed']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
