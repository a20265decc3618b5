#!/bin/bash
# Every method on the whole Harvard validation split (117 pairs), one regime per process, JOBS
# processes at a time of one thread each (about 25 min per regime on one core of the 2-core CPU).
# none-clean: the unmoved pairs with clean moving images (MMIF-AMIN's setting, aligned clean pairs).
# Run from the repository root:
#   HARVARD=/path/to/harvard-aanlib bench/run_methods_eval.sh
#   .venv/bin/python bench/summarize_methods_eval.py --results runs/methods-eval --out docs/results/methods.md
# To rerun some methods only (new weights, say), set METHODS, CHECKPOINT= (no UniFuse), BASELINES /
# RULES to the cheapest pipelines and OUT, then pass OUT first to the summarizer, beside the
# earlier results folder:
#   METHODS="mmif-amin:none mmif-amin mmif-amin:sitk" CHECKPOINT= BASELINES=identity RULES=max OUT=runs/mmif-eval ...
#   ... summarize_methods_eval.py --results runs/mmif-eval runs/methods-eval
export OMP_NUM_THREADS=1
out=${OUT:-runs/methods-eval}
checkpoint=${CHECKPOINT-unifuse-2d-harvard}
mkdir -p $out
for run in none-clean none mild large; do
  regime=${run%-clean}
  clean=$([ "$run" = none-clean ] && echo "--none-fraction 1")
  "${PYTHON:-.venv/bin/python}" -m napari_unifuse.cli evaluate --harvard "${HARVARD:-../shared/data/harvard-aanlib}" \
    --misalignment $regime $clean --out $out/$run --device cpu \
    ${checkpoint:+--checkpoint "$checkpoint"} --methods ${METHODS:-mmif-amin:none mmif-amin mmif-amin:sitk bsafusion} \
    --baselines ${BASELINES:-identity,sitk} \
    --fusion-rules ${RULES:-max,average,wavelet} > $out/$run.log 2>&1 &
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do wait -n; done
done
wait
