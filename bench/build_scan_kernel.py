"""Build mamba-ssm from its source distribution for this machine's GPU alone, offline
(``bench/gpu_check.sh`` runs this when its wheel folder holds the sdist instead of a wheel).

mamba-ssm's own setup.py compiles its selective-scan kernel for every architecture from sm_75 to
sm_121, eight of them with CUDA 13: tens of minutes, too long for a first look at a lent GPU.
torch's extension builder compiles the same sources with the same nvcc flags for the visible GPU's
architecture only (``TORCH_CUDA_ARCH_LIST``), over all cores with ninja. The Python package is the
sdist's own ``mamba_ssm`` folder, copied unchanged; ``causal-conv1d`` is not built (the selective
scan, the only kernel UniFuse calls, does not use it).

  python bench/build_scan_kernel.py mamba_ssm-2.3.2.post1.tar.gz /tmp/mamba-site
  PYTHONPATH=/tmp/mamba-site python -c "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn"
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

KERNEL = "selective_scan_cuda"
# setup.py's nvcc flags for the selective scan (mamba-ssm 2.3.2), less its -gencode list.
NVCC_FLAGS = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo"]


def unpack_sdist(sdist: Path, into: Path) -> Path:
    """The sdist's top folder (the one holding ``setup.py``), unpacked under ``into``."""
    with tarfile.open(sdist) as archive:
        archive.extractall(into, filter="data")
    (root,) = [path.parent for path in into.glob("*/setup.py")]
    return root


def build(sdist: Path, target: Path, *, verbose: bool = False) -> Path:
    """Copy ``mamba_ssm`` into ``target`` and compile ``selective_scan_cuda`` there; returns the
    kernel's shared library."""
    import torch
    from torch.utils.cpp_extension import load

    if not torch.cuda.is_available():
        raise SystemExit("build_scan_kernel: torch sees no CUDA GPU to build for")
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = unpack_sdist(sdist, Path(scratch))
        shutil.copytree(root / "mamba_ssm", target / "mamba_ssm", dirs_exist_ok=True)
        sources = root / "csrc" / "selective_scan"
        build_dir = target / f"{KERNEL}-build"
        build_dir.mkdir(exist_ok=True)
        load(name=KERNEL, sources=[str(sources / "selective_scan.cpp"), *map(str, sorted(sources.glob("*.cu")))],
             extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[str(sources)],
             build_directory=str(build_dir), verbose=verbose)
    library = target / f"{KERNEL}.so"
    shutil.copy2(build_dir / f"{KERNEL}.so", library)
    return library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help="mamba_ssm-*.tar.gz")
    parser.add_argument("target", type=Path, help="folder to put on PYTHONPATH")
    parser.add_argument("--verbose", action="store_true", help="print the compiler's commands")
    args = parser.parse_args(argv)
    if not args.sdist.is_file():
        print(f"build_scan_kernel: no file {args.sdist}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    library = build(args.sdist, args.target, verbose=args.verbose)
    print(f"build_scan_kernel: {library} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
