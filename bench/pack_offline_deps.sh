#!/usr/bin/env bash
# Pack what an offline CUDA machine lacks for bench/gpu_check.sh, where there is network: the
# package's dependencies that the machine's Python does not have, as one xz archive of their
# unpacked wheels (to extract into a folder on PYTHONPATH there), and mamba-ssm's sdist, which
# gpu_check.sh builds there for the one GPU. Small enough to send with the checkout: SimpleITK's
# library is stripped of symbols, and the packages' tests and nilearn's surface meshes (the
# phantoms use its MNI152 volumes only) are left out.
#
#   bench/pack_offline_deps.sh OUT_DIR [PYTHON_VERSION] [PACKAGE ...]
#
# PYTHON_VERSION is the target's (default 3.12); PACKAGE names default to what a stock CUDA image
# with PyTorch, NumPy, SciPy and scikit-image lacks. Versions are this venv's, so the target runs
# what the tests ran. Then, on the target:
#   python3 -c "import tarfile; tarfile.open('OUT_DIR/site.tar.xz').extractall('/tmp/site')"
#   PYTHONPATH=/tmp/site PYTHON=python3 bench/gpu_check.sh OUT_DIR
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/pack_offline_deps.sh OUT_DIR [PYTHON_VERSION] [PACKAGE ...]}
PY_VERSION=${2:-3.12}
shift $(( $# > 1 ? 2 : 1 ))
PACKAGES=("$@")
if [ ${#PACKAGES[@]} -eq 0 ]; then PACKAGES=(SimpleITK nibabel torchio Deprecated nilearn PyWavelets pydicom); fi
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

mkdir -p "$OUT"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for package in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -m pip show "$package" | awk '/^Version:/ {print $2}')
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$scratch/wheels" \
        "$package==$version"
done
mkdir "$scratch/site"
for wheel in "$scratch"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$scratch/site"; done
find "$scratch/site" -name '*.so' -exec strip --strip-unneeded {} +
find "$scratch/site" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
rm -rf "$scratch/site/nilearn/datasets/data/fsaverage5" "$scratch/site/nilearn/_assets"
tar -C "$scratch/site" -cf - . | xz -9 -T0 > "$OUT/site.tar.xz"
# The sdist's metadata step runs its setup.py: without the CUDA build, and against this torch
# (build isolation would fetch another torch first).
MAMBA_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    -d "$OUT" mamba-ssm
ls -l "$OUT"
