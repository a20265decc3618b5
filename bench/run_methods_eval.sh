#!/bin/bash
# Every method on the Harvard validation split, one regime after another (OMP_NUM_THREADS=1).
# Run from the repository root: HARVARD=/path/to/harvard-aanlib bench/run_methods_eval.sh
export OMP_NUM_THREADS=1
mkdir -p runs/methods-eval
for regime in none mild large; do
  "${PYTHON:-.venv/bin/python}" -m napari_unifuse.cli evaluate --harvard "${HARVARD:-../shared/data/harvard-aanlib}" \
    --misalignment $regime --limit 8 --out runs/methods-eval/$regime --device cpu \
    --methods mmif-amin:none mmif-amin mmif-amin:sitk bsafusion --baselines identity,sitk \
    --fusion-rules max,average,wavelet > runs/methods-eval/$regime.log 2>&1
done
