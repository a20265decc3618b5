"""Does the fused image carry both sources? A constructed pair with a bright disc in each source alone.

    .venv/bin/python bench/probe_fusion_copy.py [--checkpoint unifuse-2d-harvard]

An MRI and a CT phantom slice of the same anatomy (data.phantoms, 128²), each with a bright disc
that the other lacks, fused by the checkpoint. Prints the mean intensity of each source and of the
fused image inside each disc, the CT's bone (CT > 0.8) in the fused image, and the correlation of
the fused image with each source over the head. A copy of the MRI shows the MRI's values in the
CT-only disc and bone, and a correlation of ~1 with the MRI. tests/engine/test_bundled_fusion.py
asserts the same on the shipped weights.
"""

from __future__ import annotations

import argparse

import numpy as np

from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import ImageVolume


def disc(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grids = np.indices(shape, dtype=float)
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


def ct_as_atlas_png(hounsfield: np.ndarray) -> np.ndarray:
    """[0, 1] with a [-300, 1100] HU window: brain ~0.24, bone white, as the atlas's CT PNGs look."""
    return np.clip((hounsfield + 300.0) / 1400.0, 0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    args = parser.parse_args()
    phantoms = make_brain_phantom_slices((128, 128), ("t1", "ct"))
    geometry = phantoms["t1"].geometry
    mri, ct = np.clip(phantoms["t1"].array, 0, 1), ct_as_atlas_png(phantoms["ct"].array)
    only_ct, only_mri = disc(mri.shape, (70, 45), 7), disc(mri.shape, (60, 85), 7)
    bone = ct > 0.8
    ct, mri = np.where(only_ct, 1.0, ct), np.where(only_mri, 1.0, mri)
    to_uint8 = lambda x: (x * 255).round().astype(np.uint8)  # noqa: E731
    result = FusionEngine(args.checkpoint, device="cpu").run_fusion(
        ImageVolume(to_uint8(mri), geometry), ImageVolume(to_uint8(ct), geometry),
        reference_modality="mr", moving_modality="ct")
    fused = np.asarray(result.fused.array, dtype=np.float32)
    fused = fused / 255.0 if fused.max() > 1.5 else fused
    head = (mri > 0.05) | (ct > 0.05)
    print(f"checkpoint {args.checkpoint}")
    print("region          MRI    CT   fused")
    for name, region in (("CT-only disc", only_ct), ("MRI-only disc", only_mri), ("CT bone", bone & ~only_ct)):
        print(f"{name:14s} {mri[region].mean():5.2f} {ct[region].mean():5.2f} {fused[region].mean():6.2f}")
    for name, source in (("MRI", mri), ("CT", ct)):
        print(f"NCC(fused, {name}) over the head: {np.corrcoef(fused[head], source[head])[0, 1]:.3f}")


if __name__ == "__main__":
    main()
