"""Which stage remaps the intensities of a clean PET/SPECT moving image on its way to aligned.png?

    .venv/bin/python bench/probe_restoration_remap.py [--harvard ../shared/data/harvard-aanlib]
        [--checkpoint unifuse-2d-harvard] [--pairs 5] [--tile-size N]

Issue 16: a clean PET/SPECT image came out of `unifuse fuse` with its grey background turned black
and its contrast changed. Each moving image is probed twice: as the atlas stores it (RGB
pseudo-colour on black) and as an 8-bit grey luma on a grey surround (luma * 0.7 + 0.3, the
export style that shows the symptom). Alignment is held equal throughout: every stage is compared
with the input luma warped by the run's own output displacement, so what is left is a change of
intensities, not of position. Per task and input the script prints the mean of

* ``model input``  SSIM of the model's input (``engine.inference._prepare``), mapped back by the
                   recorded intensity mapping, to the input luma: the normalisation round trip
* ``input bg``     the model input's value in the background (the image corners): what the
                   network sees around the anatomy (training images: 0)
* ``restored``     SSIM of the restored image (``aligned`` mapped back into the model's units)
                   to the input moved by the output field: the network's restoration
* ``aligned.png``  the same for the written aligned.png (RGB recombination, 8 bits)
* ``bg change``    the background of aligned.png minus the input's (0: kept)
* ``p_none``       the classifier's probability that the input is clean
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.engine.inference import FusionEngine, _prepare
from napari_unifuse.engine.outputs import write_fusion_outputs
from napari_unifuse.io import ImageVolume, read_image
from napari_unifuse.model.warp import warp

REPOSITORY = Path(__file__).resolve().parents[1]
GREY_SURROUND = 0.3
CORNER = 16  # voxels per side of the corner squares that sample the background


def luma(volume: ImageVolume) -> np.ndarray:
    """Y in [0, 1] of an RGB image, or an 8-bit grey image / 255."""
    return rgb_to_ycbcr(volume.array)[..., 0] if volume.is_rgb else volume.array.astype(np.float32) / 255.0


def on_grey_surround(moving: ImageVolume) -> ImageVolume:
    grey = np.round(255 * (GREY_SURROUND + (1 - GREY_SURROUND) * luma(moving))).astype(np.uint8)
    return dataclasses.replace(moving, array=grey, is_rgb=False)


def background(image: np.ndarray) -> float:
    return float(np.mean([image[:CORNER, :CORNER], image[:CORNER, -CORNER:],
                          image[-CORNER:, :CORNER], image[-CORNER:, -CORNER:]]))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, data_range=1.0))


def probe_pair(engine: FusionEngine, reference: ImageVolume, moving: ImageVolume) -> dict[str, float]:
    result = engine.run_fusion(reference, moving)
    field = torch.from_numpy(result.displacement)[None]
    prepared = _prepare(moving, "auto")
    source = luma(moving)
    in_units = prepared.mapping.inverse(prepared.luma.array) / (1.0 if moving.is_rgb else 255.0)
    target = warp(torch.from_numpy(source)[None, None], field)[0, 0].numpy()
    restored_units = rgb_to_ycbcr(result.aligned.array)[..., 0] if moving.is_rgb else result.aligned.array
    restored = prepared.mapping.apply(restored_units)
    warped_input = warp(torch.from_numpy(prepared.luma.array)[None, None], field)[0, 0].numpy()
    with tempfile.TemporaryDirectory() as folder:
        written = write_fusion_outputs(result, folder)
        on_disk = luma(read_image(written[f"aligned.{result.output_extension}"]))
    return {
        "model input": ssim(in_units.astype(np.float32), source),
        "input bg": background(prepared.luma.array),
        "restored": ssim(restored, warped_input),
        "aligned.png": ssim(on_disk, target),
        "bg change": background(on_disk) - background(source),
        "p_none": result.class_probs["none"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, default=REPOSITORY.parent / "shared" / "data" / "harvard-aanlib")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    parser.add_argument("--pairs", type=int, default=5, help="pairs per task (evenly spread over the folder)")
    parser.add_argument("--tile-size", type=int, default=None, help="default: the checkpoint's training crop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = FusionEngine(args.checkpoint, device="cpu", tile_size=args.tile_size)
    table: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task, modality in (("PET-MRI", "PET"), ("SPECT-MRI", "SPECT")):
        names = sorted(path.name for path in (args.harvard / task / modality).glob("*.png"))
        for name in names[:: max(1, len(names) // args.pairs)][: args.pairs]:
            reference = read_image(args.harvard / task / "MRI" / name)
            atlas = read_image(args.harvard / task / modality / name)
            for variant, moving in (("atlas RGB", atlas), ("grey surround", on_grey_surround(atlas))):
                row = probe_pair(engine, reference, moving)
                print(task, name, f"{variant:13s}", "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
                for key, value in row.items():
                    table[task, variant][key].append(value)
    print()
    for (task, variant), columns in table.items():
        print(f"{task:9s} {variant:13s} mean:", "  ".join(f"{k} {np.mean(v):.3f}" for k, v in columns.items()))


if __name__ == "__main__":
    main()
