#!/usr/bin/env bash
# The measurements quoted in the issues' closing notes. Run from the repo root with the venv active.
set -euo pipefail
OUT=${OUT:-outputs/final}
mkdir -p "$OUT"
{ time diffusionx demo --out "$OUT/demo"; } 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" > "$OUT/demo.log"
diffusionx evaluate --n 256 --batch 64 --out "$OUT/evaluate" 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" > "$OUT/evaluate.log"
diffusionx bench --n 256 --batch 64 --policy fixed-0.3 --policy fixed-0.5 --policy fixed-0.7 --policy fixed-1-0.5 --out "$OUT/bench" 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\|s/it" > "$OUT/bench.log"
