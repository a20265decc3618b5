"""`unifuse evaluate --harvard` records the seed and undegraded fraction its pairs were synthesised
with, as it records the case split's seed: without them its scores cannot be reproduced."""

import numpy as np
from PIL import Image

from napari_unifuse.cli import main
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.io import normalize_intensity

SIDE = 48  # the fusion metrics' windows need at least 41 pixels


def test_the_evaluation_header_names_the_synthesis_seed_and_none_fraction(tmp_path):
    slices = make_brain_phantom_slices((SIDE, SIDE), ("t1", "ct"))
    root = tmp_path / "aanlib"
    for folder, name, modality in (("MRI", "t1", "mr"), ("CT", "ct", "ct")):
        (root / "CT-MRI" / folder).mkdir(parents=True)
        grey = np.round(255 * normalize_intensity(slices[name], modality)[0].array).astype(np.uint8)
        for case in (1, 2, 3):
            Image.fromarray(grey).save(root / "CT-MRI" / folder / f"{case}012.png")
    out = tmp_path / "out"
    assert main(["evaluate", "--methods", "identity+max", "--harvard", str(root), "--tasks", "CT", "--limit", "1",
                 "--misalignment", "mild", "--seed", "7", "--none-fraction", "0.25", "--baselines", "identity",
                 "--fusion-rules", "average", "--out", str(out), "--device", "cpu"]) == 0
    header = (out / "evaluation.md").read_text(encoding="utf-8").split("\n\n")[1]
    assert "synthesised with seed 7 (--seed) and none_fraction 0.25 (--none-fraction)" in header
