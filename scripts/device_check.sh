#!/usr/bin/env bash
# The prepared accelerator check of issue 12 (the training step as one CUDA graph) for a session
# that is lent an H200, in one call. NOT YET RUN: written without a GPU. Most important first:
#   1. scripts/graph_check.py, tiny preset, 2 chunks: does the capture work at all (seconds)
#   2. scripts/graph_check.py, DenseFlow-74-10 B=64: N=5 replayed steps against eager ones from
#      the same state (tolerances in its docstring), eager and replayed step times, capture time,
#      memory, a masked non-finite replay
#   3. scripts/inference_check.py, DenseFlow-74-10 B=64: elbo, iwbo and sampling replayed from
#      graphs against the eager calls (tolerances in its docstring), after an in-place weight change
#      too; eager and replayed times, capture time
#   4. parity and precision tests on CUDA (log_abs_det replaced slogdet in every model)
#   5. denseflow bench, DenseFlow-74-10 B=64, float32, graphed: train and sampling 64 images
#   6. the same with --profile (train only): kernels, host launch calls, GPU busy fraction
#   7. bf16 networks, graphed: train and sampling
#   8. IWBO k=16 at B=16 (graphed), 8 copies a pass as on 2026-11-29 and 16 (one pass: what
#      `denseflow evaluate --k 16` runs), without the eager elbo-loop baselines (--no-loops: about
#      50 s of eager calls, measured on 2026-11-29 and not changed by the graphs)
#   9. a lead: the 79 log-determinants of the 1x1 convolutions one LU per matrix (as the model)
#      against one batched LU per size and one for all padded to the largest, eager and from a
#      graph (scripts/lu_check.py, seconds), and the float32 step of 5 with them batched
#      (train.batched_logdets=true: is it worth turning on by default?)
# A second call on the same (warm) machine, if the first passed and device time is left:
#   `bash scripts/device_check.sh compile`: torch.compile(mode="reduce-overhead") of the networks,
#   DenseFlow-74-10 B=64 train (bench_compile.json), next to the graphed step of the first call.
#   Inductor had not compiled the 74 nets after 192 s on 2026-11-29 (default mode; dynamo makes 21
#   graphs of them, no graph breaks, counted on the CPU), so it cannot share the first call's
#   deadline: the whole of the second call is its limit.
# The eager float32 step is timed in 2 (the train_step copies) and was profiled on 2026-11-29
# (46,621 kernels, docs/benchmarks.md), so it is not benched again.
#
# Time: every step has its own limit, cut to a global deadline ($BUDGET, default 450 s of script,
# so that with the machine's start the call needs about 10 of the 15 device minutes). Expected
# durations (from the 2026-11-29 run: a B=64 bench process took about 40 s, the parity tests 37 s):
# 20 + 70 + 45 + 40 + 45 + 40 + 45 + 25 + 25 + 15 + 45 s = about 415 s.
#
# How to run (the device tool sends the session's own checkout):
#   mkdir -p .devshared && cp -r ../shared/parity .devshared/ && echo /.devshared/ >> .git/info/exclude
#   run(command="bash scripts/device_check.sh", carry=[".devshared"], timeout_s=480)
#   then, only if it passed and status shows time left (no rerun needed), at once (warm):
#   run(command="BUDGET=<seconds left - 30> bash scripts/device_check.sh compile", timeout_s=...)
# Raw JSON and the log land in $OUT (11 files: log.txt, graph_tiny.json, graph_cifar10.json,
# inference_cifar10.json, bench_float32.json, bench_profile.json, bench_bf16.json,
# bench_iwbo.json, bench_iwbo_kbs16.json, lu_check.json, bench_logdets.json; the profiler's table is appended to
# log.txt; the second call: log.txt and bench_compile.json). Keep them under
# docs/benchmarks/h200-<date>/ (the second call's log as log_compile.txt);
# `python scripts/device_report.py docs/benchmarks/h200-<date>/` prints the target table from them
# (the first call also prints it at the end of its log, so the run's output_tail shows it).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-main}
case $PART in main | compile) ;; *) echo "device_check.sh: unknown part '$PART' (main, compile)" >&2; exit 2 ;; esac
OUT=${OUT:-device_out}
BUDGET=${BUDGET:-450}
export DENSEFLOW_PARITY_DIR=${DENSEFLOW_PARITY_DIR:-$PWD/.devshared/parity}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
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
    step "$want" "bench $name" $PY -m denseflow bench --preset cifar10 --device cuda \
        --json "$OUT/bench_$name.json" --quiet "$@"
}
B64=(--batch-size 64 --steps 5 --warmup 2)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  [ "$PART" = compile ] || ls "$DENSEFLOW_PARITY_DIR" \
      || echo "no parity fixtures in $DENSEFLOW_PARITY_DIR: the parity tests will skip"
} 2>&1 | tee -a "$LOG"
if [ "$PART" = compile ]; then
    bench "$BUDGET" compile "${B64[@]}" --what train --set train.compile=true \
        --set train.compile_mode=reduce-overhead
    echo "== done at t=${SECONDS}s" | tee -a "$LOG"
    exit 0
fi
step 60 "graph check, tiny, 2 chunks" $PY scripts/graph_check.py --preset tiny --batch-size 16 \
    --chunks 2 --steps 4 --json "$OUT/graph_tiny.json"
step 150 "graph check, DenseFlow-74-10 B=64" $PY scripts/graph_check.py --preset cifar10 \
    --batch-size 64 --steps 5 --json "$OUT/graph_cifar10.json"
step 75 "inference graphs, DenseFlow-74-10 B=64" $PY scripts/inference_check.py --preset cifar10 \
    --batch-size 64 --json "$OUT/inference_cifar10.json"
step 90 "parity and precision tests on CUDA" $PY -m pytest -q -x -rs -p no:cacheprovider \
    tests/test_parity.py tests/test_precision.py
bench 90 float32 "${B64[@]}" --what train,sample
bench 90 profile --batch-size 64 --steps 2 --warmup 0 --what train --profile /tmp/profile_train.txt
[ -f /tmp/profile_train.txt ] && { echo "== profiler table, graphed train step"; cat /tmp/profile_train.txt; } >> "$LOG"
bench 75 bf16 "${B64[@]}" --what train,sample --set train.precision=bfloat16
bench 40 iwbo --batch-size 16 --steps 3 --warmup 1 --what iwbo --no-loops
bench 40 iwbo_kbs16 --batch-size 16 --steps 3 --warmup 1 --what iwbo --kbs 16 --no-loops
step 40 "lead: batched LU of the 1x1 log-determinants" $PY scripts/lu_check.py --preset cifar10 \
    --json "$OUT/lu_check.json"
bench 60 logdets "${B64[@]}" --what train --set train.batched_logdets=true
echo "== done at t=${SECONDS}s" | tee -a "$LOG"
$PY scripts/device_report.py "$OUT" 2>&1 | tee -a "$LOG"  # the target table, at the log's end
