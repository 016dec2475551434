#!/usr/bin/env bash
# On a lent GPU machine: the refinement service's load test (continuous batching vs one request
# at a time) on CUDA, for the embedded cloud model and the random-weight SD v1.5 at 512x512.
# The GPU image lacks diffusers and the web stack: their wheels travel in .whl/ (py3.12, from
# `pip download --no-deps`): diffusers, importlib_metadata, fastapi, starlette, pydantic,
# pydantic_core, typing_inspection, annotated_types, uvicorn and opentelemetry-api (fastapi imports it).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L
timeout ${T1:-120} python3 benchmarks/loadtest.py --clients 1 4 8 16 --per-client 8 --steps 10 2>&1 | tee $OUT/loadtest_embedded_gpu.txt
timeout ${T2:-120} python3 benchmarks/loadtest.py --model random-sd15 --clients 1 4 8 --per-client 3 --steps 10 2>&1 | tee $OUT/loadtest_sd15_gpu.txt
