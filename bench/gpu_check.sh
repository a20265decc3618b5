#!/usr/bin/env bash
# The first GPU, in under 8 minutes: install the cuda extra offline, then bench/gpu_check.py
# (mamba-ssm's selective scan against the torch scan, 160³ fusion with memory, 50 training steps of
# the paper preset). Run from the repository root, in the venv that has torch's CUDA build:
#
#   bench/gpu_check.sh [--dry-run] [WHEELS_DIR] [-- ARGS FOR gpu_check.py]
#
# WHEELS_DIR holds either mamba-ssm and causal-conv1d wheels built for this torch and CUDA, or
# mamba-ssm's sdist (mamba_ssm-*.tar.gz), which bench/build_scan_kernel.py compiles with nvcc for
# this GPU's architecture alone (minutes; setup.py's build for eight architectures takes tens).
# Without WHEELS_DIR they must already be installed. Where there is network,
# bench/pack_offline_deps.sh WHEELS_DIR fetches the sdist (and packs what else the machine lacks).
# Environment: PYTHON (default .venv/bin/python, else python3), BUDGET_S (default 480), BUILD_BUDGET_S
# (the kernel build's share, default 55 % of BUDGET_S).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
BUDGET_S=${BUDGET_S:-480}
DRY_RUN=""
WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; break ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) WHEELS="$1"; shift ;;
    esac
done

run() {  # print each command; run it unless this is a dry run
    echo "+ $*"
    if [ -z "$DRY_RUN" ]; then "$@"; fi
}

started=$(date +%s)
if [ -n "$WHEELS" ]; then
    if [ ! -d "$WHEELS" ]; then echo "gpu_check.sh: no folder $WHEELS" >&2; exit 2; fi
    sdists=("$WHEELS"/mamba_ssm-*.tar.gz)
    if [ -f "${sdists[0]}" ] && ! compgen -G "$WHEELS/mamba_ssm-*.whl" >/dev/null; then
        kernel_site=${KERNEL_SITE:-${TMPDIR:-/tmp}/unifuse-mamba-site}
        if compgen -G "$kernel_site/selective_scan_cuda*.so" >/dev/null && [ -d "$kernel_site/mamba_ssm" ]; then
            # Built by an earlier run and carried back (the build is a third of the budget); one built
            # for another torch fails to import, which the scan check reports.
            echo "gpu_check.sh: reusing the kernel built in $kernel_site"
        else
            # At most BUILD_BUDGET_S (default: 55 % of the budget), so that a slow build leaves time
            # for the checks. A failed or stopped build leaves the checks to run without mamba-ssm:
            # the scan check then reports it, and the fusion and training figures still come.
            run timeout "${BUILD_BUDGET_S:-$(( BUDGET_S * 55 / 100 ))}" \
                "$PYTHON" bench/build_scan_kernel.py "${sdists[-1]}" "$kernel_site" \
                || echo "gpu_check.sh: the kernel build failed; the checks run without mamba-ssm" >&2
        fi
        export PYTHONPATH="$kernel_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        mapfile -t requirements < <("$PYTHON" bench/gpu_check.py --print-cuda-requirements)
        # Offline: only what the folder holds; no build isolation, so sdists build against this torch.
        run "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation "${requirements[@]}"
    fi
fi
if [ -z "$DRY_RUN" ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: torch sees no CUDA GPU')"
fi
left=$(( BUDGET_S - ($(date +%s) - started) ))
if [ "$left" -lt 60 ]; then echo "gpu_check.sh: the install used the time budget" >&2; exit 1; fi
args=(--device "$([ -n "$DRY_RUN" ] && echo auto || echo cuda)" "$@")
if [ -n "$DRY_RUN" ]; then args+=(--dry-run); fi
# timeout: the whole check stays within the budget even if a step hangs.
echo "+ timeout $left $PYTHON bench/gpu_check.py ${args[*]}"
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout "$left" "$PYTHON" bench/gpu_check.py "${args[@]}"
