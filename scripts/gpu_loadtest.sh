#!/usr/bin/env bash
# On a lent GPU machine, one call: the scaling benchmark (t(b) and the bound b / (k t(b)) for
# b = 1..16, fp32 and fp16) and the load test (refinements/s, share of the bound, p50/p95/p99 per
# client count), for the embedded cloud model and the random-weight SD v1.5 at 512x512. Raw output
# goes to $OUT (copy it to benchmarks/results/ and commit it).
# The GPU image lacks diffusers and the web stack: their wheels travel in .whl/ (py3.12, from
# `pip download --no-deps`): diffusers, importlib_metadata, fastapi, starlette, pydantic,
# pydantic_core, typing_inspection, annotated_types, uvicorn, h11, redis and opentelemetry-api.
# Tested on the CPU with DEVICE=cpu SMOKE=1 (a few batch sizes, one client count).
set -uo pipefail
OUT=${OUT:-outputs/gpu_loadtest}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
if [[ ${SMOKE:-0} == 1 ]]; then MODELS=embedded; BATCHES="1 2"; CLIENTS="1 2"; PER=1
else MODELS="embedded sd15"; BATCHES="1 2 4 8 12 16"; CLIENTS="1 4 8 16"; PER=8; fi
for dtype in float32 float16; do
  [[ $DEVICE == cpu && $dtype == float16 ]] && continue
  timeout ${T0:-150} python3 benchmarks/batch_scaling.py --models $MODELS --device "$DEVICE" --dtype $dtype \
    --batches $BATCHES --out "$OUT/batch_scaling_${DEVICE}_${dtype}.json" 2>&1 | tee "$OUT/batch_scaling_${DEVICE}_${dtype}.txt"
done
timeout ${T1:-150} python3 benchmarks/loadtest.py --clients $CLIENTS --per-client $PER --steps 10 \
  --json "$OUT/loadtest_embedded_${DEVICE}.json" 2>&1 | tee "$OUT/loadtest_embedded_${DEVICE}.txt"
[[ $MODELS == *sd15* ]] && timeout ${T2:-180} python3 benchmarks/loadtest.py --model random-sd15 --clients ${CLIENTS% 16} --per-client 3 --steps 10 \
  --json "$OUT/loadtest_sd15_${DEVICE}.json" 2>&1 | tee "$OUT/loadtest_sd15_${DEVICE}.txt"
ls -la "$OUT"
