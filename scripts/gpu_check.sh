#!/usr/bin/env bash
# make gpu-check: the CUDA paths in one command of at most 8 minutes on one GPU, one report file.
#   1. tests/gpu: bf16 FlexAttention under the dtype probe, the Lightning module trained after a bf16 sanity check
#      (one device and ModelParallelStrategy), FSDP2's bf16 policy, fused AdamW, the compiled sampler;
#   2. benchmarks/gpu.py at d16 (one training and one sampling run, no batch search) with Dynamo's recompile log.
# Settings (environment): PY (a Python with torch; default python3), WHEELS (a local wheel folder: varlib's other
# dependencies are installed from it with pip --no-index, the preinstalled torch kept), REPORT (default
# gpu_check_report.txt), DRY_RUN=1 (no GPU: runs what the CPU can and says in the report what it skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
REPORT=${REPORT:-gpu_check_report.txt}
DRY_RUN=${DRY_RUN:-0}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0

section() { printf '\n== %s\n' "$1" >> "$REPORT"; }
run() {  # run <seconds> <command...>: appends its output and exit status to the report
    timeout "$1" "${@:2}" >> "$REPORT" 2>&1
    local rc=$?
    echo "exit status $rc: ${*:2}" >> "$REPORT"
    [ "$rc" -eq 0 ] || status=1
}

: > "$REPORT"
section "machine"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|',
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" >> "$REPORT" 2>&1

if [ -n "${WHEELS:-}" ]; then
    section "dependencies from $WHEELS"
    torch_version=$("$PY" -c "import torch; print(torch.__version__)")
    run 300 "$PY" -m pip install --no-index --find-links "$WHEELS" -c <(echo "torch==$torch_version") -e ".[dev]"
fi

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    section "tests/gpu"
    run 330 "$PY" -m pytest -q -p no:randomly -p no:xdist -m gpu tests/gpu -rs
    section "benchmarks/gpu.py at d16, Dynamo recompile log (TORCH_LOGS=recompiles)"
    log=$(mktemp)
    TORCH_LOGS=recompiles timeout 150 "$PY" benchmarks/gpu.py --depths 16 --train-batches 32 --sample-batches 16 \
        --max-batch 0 --steps 3 --warmup 1 > "$log" 2>&1
    rc=$?
    cat "$log" >> "$REPORT"
    echo "exit status $rc: benchmarks/gpu.py; recompiles logged: $(grep -c 'Recompiling function' "$log")" >> "$REPORT"
    [ "$rc" -eq 0 ] || status=1
    rm -f "$log"
elif [ "$DRY_RUN" = 1 ]; then
    section "dry run: no CUDA device"
    echo "SKIPPED (needs CUDA): tests/gpu's checks and benchmarks/gpu.py's recompile log; tests/gpu is collected" \
         "below (every test skipped), and the CPU proofs of the same paths run instead." >> "$REPORT"
    run 120 "$PY" -m pytest -q -p no:randomly -p no:xdist -m gpu tests/gpu -rs
    run 300 "$PY" -m pytest -q -p no:randomly -p no:xdist -m "not slow" tests/test_cuda_paths_on_cpu.py \
        tests/test_fsdp2_numerics.py tests/test_slurm_preemption.py
else
    echo "no CUDA device: run on a GPU machine, or DRY_RUN=1 for the CPU part" | tee -a "$REPORT" >&2
    exit 1
fi
section "result"
[ "$status" -eq 0 ] && echo "gpu-check passed" >> "$REPORT" || echo "gpu-check FAILED (see exit statuses above)" >> "$REPORT"
echo "report: $REPORT"
exit "$status"
