#!/usr/bin/env bash
# The prepared accelerator check (issues 4 and 5), for a session that is lent a GPU: DenseFlow-74-10
# (CIFAR-10 shape) training step and sampling at B=64 in float32 eager, bf16 autocast of the
# conditioner networks, and torch.compile of them; then the precision and distributed tests.
# Needs a CUDA build of torch on the device; writes JSON reports to $OUT (default: device_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
python -m pip install -q --no-deps -e . >/dev/null
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
run() {  # name, extra --set options
    local name=$1; shift
    timeout 240 denseflow bench --preset cifar10 --batch-size 64 --steps 5 --warmup 2 --what train,sample \
        --device cuda "$@" --json "$OUT/bench_$name.json" | tee "$OUT/bench_$name.txt" || echo "$name: failed or timed out"
}
run float32
run bf16 --set train.precision=bfloat16
run compile --set train.compile=true
timeout 240 python -m pytest -q tests/test_precision.py tests/test_distributed.py | tail -3 | tee "$OUT/tests.txt"
