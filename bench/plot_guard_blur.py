"""Picture of a call the guard's blur changed: the 128³ MRI → CT phantom pair with a mild residual
(`bench/eval_engine_3d_regimes.py`'s seed 5), the metal CT moved by the identity, SimpleITK's field
(kept with the images as given), the matching's (kept with both blurred by half a voxel) and the
true field, under the clean CT's edges, and each field's error on the same slice.

    OMP_NUM_THREADS=2 .venv/bin/python bench/plot_guard_blur.py [--out docs/images/guard_blur_mrct.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import MATCHING, SIMPLEITK

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_engine_3d_regimes import in_units, phantom_pairs  # noqa: E402
from plot_dense_refinement import plot_fields  # noqa: E402
from probe_guard_blur import capture_guard_calls  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images/guard_blur_mrct.png"))
    args = parser.parse_args()
    side, seed = 128, 5
    ((_, _, _, pair, reference_modality, moving_modality),) = phantom_pairs(side, ["mr-ct"], ["mild"], [seed])
    calls = capture_guard_calls(FusionEngine("unifuse-3d-phantom", device="cpu"),
                                in_units(pair.reference, reference_modality), in_units(pair.moving, moving_modality),
                                reference_modality=reference_modality, moving_modality=moving_modality)
    candidates = calls[0][2]  # the guard's first decision: the matching's field against SimpleITK's
    fields = {"identity": np.zeros_like(pair.displacement), "SimpleITK (images as given)": candidates[SIMPLEITK],
              "matching (blurred by 0.5 voxels)": candidates[MATCHING], "truth": pair.displacement}
    plot_fields(pair, fields, f"MRI → CT, mild residual, seed {seed}, {side}³: the metal CT moved by each field "
                "the guard weighed; red: edges of the clean CT", args.out)


if __name__ == "__main__":
    main()
