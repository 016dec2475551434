#!/usr/bin/env bash
# One call on a lent GPU machine (see /work/.library/device): rebuild the embedded pair with
# `--device cuda` under a time budget, then time the real SD v1.5 / Tiny-SD architectures there.
# The GPU image has PyTorch but not diffusers: its wheel (and importlib_metadata's) travel in .whl/,
# fetched here with `pip download --no-deps --python-version 3.12 ...` (see docs/training.md).
# Everything lands in $OUT (at most 8 files of 16 MiB: the exported pair comes back as a split tar).
set -uo pipefail
BUDGET=${BUDGET:-6}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L; python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
quiet() { grep -v "Loading weights\|Writing model\|it/s\]\|s/it\]\|Casting directly"; }

# 1. smoke: every stage for a few steps on the GPU; stop at once if the setup is broken
timeout 150 python3 -m diffusionx.cli train embedded --smoke --device cuda --out /tmp/smoke --export-to /tmp/smoke_x \
  > $OUT/smoke.log 2>&1 || { quiet < $OUT/smoke.log | tail -40; exit 3; }
echo "smoke ok $(date +%T)"

# 2. the real run
timeout $(( BUDGET * 60 + 150 )) python3 -m diffusionx.cli train embedded --device cuda --budget-minutes $BUDGET \
  --out /tmp/run --export-to /tmp/export 2>&1 | quiet > $OUT/train.log
echo "train rc ${PIPESTATUS[0]} $(date +%T)"; tail -25 $OUT/train.log
tar czf - -C /tmp export | split -b 15m - $OUT/export.tgz.part
tar czf $OUT/logs.tgz -C /tmp/run logs run.json
ls -la $OUT

# 3. per-step latency of the real architectures (fp16, batch 1 + CFG), and the bench calibration
timeout 90 python3 benchmarks/unet_latency.py --device cuda --dtype float16 --steps 20 --warmup 3 \
  --out $OUT/unet_latency_gpu.json 2>&1 | quiet
timeout 120 python3 - <<'PY' 2>&1 | quiet
import json, os, torch
from diffusionx.bench import write_calibration
from diffusionx.models import load_pair
calib = write_calibration(load_pair("random-sd15", device="cuda", dtype=torch.float16),
                          os.path.join(os.environ["OUT"], "calibration_sd15_gpu.json"), repeats=10)
print(json.dumps({k: v for k, v in calib.items() if k in ("edge", "cloud")}, indent=1))
PY
echo "done $(date +%T)"
