#!/usr/bin/env bash
# The prepared accelerator check (issues 4 and 5) for a session that is lent a GPU, in one call:
#   1. parity with the official code on CUDA (float32 with TF32 off, float64), the precision tests
#   2. torchrun with NCCL (one process, two chunks): train, evaluate, sample the tiny preset on CUDA
#   3. DenseFlow-74-10 (CIFAR-10 shape), B=64: float32 (cuDNN's default TF32 convolutions) with a
#      profile, bf16 autocast of the conditioner nets, low-memory mode, IWBO (B=16), torch.compile
#      with the cudagraphs backend (CUDA-graph capture of each net: the step is launch-bound), then
#      with inductor
# On the first H200 run (2026-11-29, docs/benchmarks.md) the whole check needed about 11 minutes of
# device time with the machine's start; compilation did not finish in the time left.
# Runs with the device's own python3/torch (no install: PYTHONPATH), the parity fixture from
# $DENSEFLOW_SHARED (default .devshared, a copy of ../shared carried along). Every step has a
# timeout cut to a global deadline ($BUDGET seconds), so one slow step cannot eat the rest.
# Reports (at most 8 files) go to $OUT (default device_out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
BUDGET=${BUDGET:-520}
export DENSEFLOW_SHARED=${DENSEFLOW_SHARED:-$PWD/.devshared} PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
mkdir -p "$OUT"
LOG=$OUT/log.txt
step() {  # seconds, name, command...: run with a timeout no later than the deadline
    local want=$1 name=$2; shift 2
    local left=$((BUDGET - SECONDS))
    local limit=$((want < left ? want : left))
    if ((limit < 20)); then echo "== $name: skipped (deadline)" | tee -a "$LOG"; return; fi
    echo "== $name (limit ${limit}s, t=${SECONDS}s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$LOG"
}
bench() {  # seconds, name, bench options...
    local want=$1 name=$2; shift 2
    step "$want" "bench $name" $PY -m denseflow bench --preset "${PRESET:-cifar10}" --device "${DEVICE:-cuda}" \
        --json "$OUT/bench_$name.json" "$@"
}
B64=(--batch-size 64 --steps 5 --warmup 2)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } | tee -a "$LOG"
step 120 "parity and precision tests on CUDA" $PY -m pytest -q -x -p no:cacheprovider \
    tests/test_parity.py tests/test_precision.py
step 90 "torchrun NCCL tiny" $PY -m torch.distributed.run --nproc_per_node=1 -m denseflow train --preset tiny \
    --out "$(mktemp -d)/run" --quiet --set train.device="${DEVICE:-cuda}" --set train.batch_chunks=2
bench 150 float32 "${B64[@]}" --what train,sample --profile "$OUT/profile_float32.txt"
bench 80 bf16 "${B64[@]}" --what train,sample --set train.precision=bfloat16
bench 60 low_memory "${B64[@]}" --what train --set train.low_memory=true
bench 90 iwbo --batch-size 16 --steps 3 --warmup 1 --what iwbo
bench 120 compile_cudagraphs "${B64[@]}" --what train --set train.compile=true --set train.compile_backend=cudagraphs
bench 300 compile "${B64[@]}" --what train --set train.compile=true
echo "== done at t=${SECONDS}s" | tee -a "$LOG"
