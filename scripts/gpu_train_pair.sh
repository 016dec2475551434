#!/usr/bin/env bash
# One call on a lent GPU machine (see /work/.library/device): continue the shipped pair with
# `diffusionx train pair --device cuda` (cloud + text encoder on partial-prompt captions, edge
# distilled from the cloud, bf16 autocast, batch 256, both U-Nets in one process) under a time
# budget, keep it only if validation accuracy improved, and bring back the pair and the logs.
# The GPU image has PyTorch but not diffusers: its wheel travels in .whl/ (docs/training.md).
# Usage (from the repository root): BUDGET=7 bash scripts/gpu_train_pair.sh   (minutes of training)
set -uo pipefail
BUDGET=${BUDGET:-7}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L; python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
quiet() { grep -v "Loading weights\|Writing model\|it/s\]\|s/it\]\|Casting directly"; }

# 1. smoke: a few steps, the check and the export; stop at once if the setup is broken
timeout 120 python3 -m diffusionx.cli train pair --smoke --device cuda --out /tmp/smoke --export-to /tmp/smoke_x \
  > "$OUT/smoke.log" 2>&1 || { quiet < "$OUT/smoke.log" | tail -40; exit 3; }
echo "smoke ok $(date +%T)"

# 2. the run (the budget covers training, the validation check and the export)
timeout $(( BUDGET * 60 + 120 )) python3 -m diffusionx.cli train pair --device cuda --budget-minutes "$BUDGET" \
  --resume-from shipped --out /tmp/pair --export-to /tmp/export 2>&1 | quiet > "$OUT/train.log"
echo "train rc ${PIPESTATUS[0]} $(date +%T)"; tail -5 "$OUT/train.log"
cp /tmp/pair/summary.json "$OUT/summary.json" 2>/dev/null
tar czf - -C /tmp export | split -b 15m - "$OUT/export.tgz.part"
tar czf "$OUT/logs.tgz" -C /tmp/pair logs summary.json
ls -la "$OUT"
