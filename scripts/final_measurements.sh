#!/usr/bin/env bash
# The measurements quoted in the issues' closing notes. Run from the repo root with the venv active.
# Each step is one line so a step can be rerun alone; two CPU-heavy steps at a time suit 2 cores
# (export OMP_NUM_THREADS=1 first). GPU numbers come from scripts/gpu_*.sh on a lent machine.
set -euo pipefail
OUT=${OUT:-outputs/final}
mkdir -p "$OUT/pred"
quiet() { tr '\r' '\n' | grep -v "it/s\|s/it"; }
step=${1:-all}

# issue 2/3: demo and edge-vs-cloud quality of the shipped pair
if [[ $step == all || $step == demo ]]; then { time diffusionx demo --out "$OUT/demo"; } 2>&1 | quiet > "$OUT/demo.log"; fi
if [[ $step == all || $step == evaluate ]]; then
  diffusionx evaluate --steps 20 --n 256 --batch 64 --out "$OUT/evaluate" 2>&1 | quiet > "$OUT/evaluate.log"; fi
# issue 5: the paper's comparison with fixed strengths, and the real-architecture latency table
if [[ $step == all || $step == bench ]]; then
  diffusionx bench --steps 20 --n 256 --batch 64 --policy fixed-0.3 --policy fixed-0.5 --policy fixed-0.7 --policy fixed-1-0.5 \
    --out "$OUT/bench" 2>&1 | quiet > "$OUT/bench.log"; fi
if [[ $step == all || $step == sd15 ]]; then
  diffusionx bench --steps 20 --arch sd15 --n 16 --policy fixed-0.3 --policy fixed-0.5 --policy fixed-0.7 --out "$OUT/bench_sd15_cpu" 2>&1 \
    | quiet > "$OUT/bench_sd15_cpu.log"
  diffusionx bench --steps 20 --arch sd15 --n 256 --batch 64 --policy fixed-0.3 --policy fixed-0.5 --policy fixed-0.7 --profile measured \
    --preview-decoder none --calibration benchmarks/results/calibration_sd15_h200.json --out "$OUT/bench_sd15_h200" 2>&1 | quiet > "$OUT/bench_sd15_h200.log"; fi
# issue 6 / 15 / 16: sweeps (train/validation for the predictors, test for the oracle), training, tuning
# (the cloud floor must also keep the final within --fidelity-floor dB of the preview)
if [[ $step == all || $step == collect ]]; then
  diffusionx predictors collect --steps 20 --train 120 --validation 40 --directions edge --out "$OUT/pred/edge.jsonl" 2>&1 | quiet > "$OUT/pred/collect_edge.log"
  diffusionx predictors collect --steps 20 --directions cloud --previews "$OUT/pred/edge.jsonl" --out "$OUT/pred/cloud.jsonl" 2>&1 | quiet > "$OUT/pred/collect_cloud.log"
  diffusionx predictors collect --steps 20 --test 48 --out "$OUT/pred/test.jsonl" 2>&1 | quiet > "$OUT/pred/collect_test.log"; fi
TUNE="--steps 20 --n 96 --batch 48 --cloud-floors 0,0.3,0.5,1 --fidelity-floor 20"
if [[ $step == all || $step == predictors ]]; then
  diffusionx predictors train --no-refit --data "$OUT/pred/edge.jsonl" "$OUT/pred/cloud.jsonl" --out src/diffusionx/assets/predictors \
    2>&1 | quiet > "$OUT/pred/train.log"
  # new predictors drop the old floors: choose them again on validation sessions
  diffusionx predictors tune $TUNE --edge-eps 0.01,0.02,0.03 --edge-floors 0,0.4 --write --out "$OUT/tune" 2>&1 | quiet > "$OUT/tune.log"
fi
# second pass (DAgger): edge rows from the tuned policy's own rollouts, cloud rows on that policy's own
# final previews, both retrained, tuned again. On a lent GPU, scripts/gpu_dagger_collect.py collects
# edge rows of this kind with four policies at once.
if [[ $step == all || $step == dagger ]]; then
  diffusionx predictors collect --steps 20 --train 200 --validation 40 --directions edge --seed 1 --rollout-policy learned-emin0.4 \
    --out "$OUT/pred/dagger.jsonl" 2>&1 | quiet > "$OUT/pred/dagger.log"
  diffusionx predictors collect --steps 20 --directions cloud --previews "$OUT/pred/dagger.jsonl" --out "$OUT/pred/cloud_dagger.jsonl" \
    2>&1 | quiet > "$OUT/pred/collect_cloud_dagger.log"
  diffusionx predictors train --directions edge --no-refit --data "$OUT/pred/edge.jsonl" "$OUT/pred/dagger.jsonl" \
    --out src/diffusionx/assets/predictors 2>&1 | quiet > "$OUT/pred/train_dagger.log"
  diffusionx predictors train --directions cloud --no-refit --data "$OUT/pred/cloud.jsonl" "$OUT/pred/cloud_dagger.jsonl" \
    --out src/diffusionx/assets/predictors 2>&1 | quiet > "$OUT/pred/train_dagger_cloud.log"
  diffusionx predictors tune $TUNE --edge-eps 0.01,0.03 --edge-floors 0,0.3 --write --out "$OUT/tune_dagger" 2>&1 \
    | quiet > "$OUT/tune_dagger.log"; fi
if [[ $step == all || $step == bench_predictors ]]; then
  diffusionx bench --steps 20 --n 48 --batch 48 --seed 200000 --oracle-sweeps "$OUT/pred/test.jsonl" --policy oracle --policy learned \
    --policy learned-emin0-cmin0 --policy load-aware-wait20 --policy similarity-rule --policy fixed-0.3 --policy fixed-0.5 \
    --policy fixed-0.7 --policy fixed-1 --policy fixed-1-1 --preview-decoder none --calibration benchmarks/results/calibration_embedded_cpu.json \
    --out "$OUT/bench_predictors" 2>&1 | quiet > "$OUT/bench_predictors.log"
  diffusionx bench --steps 20 --n 192 --batch 64 --policy learned --policy learned-cmin0 --policy learned-cmin0.5 --policy fixed-0.3 \
    --policy fixed-0.5 --policy fixed-0.7 --policy fixed-1-0.5 --policy fixed-1 --policy fixed-1-1 \
    --preview-decoder none --calibration benchmarks/results/calibration_embedded_cpu.json --out "$OUT/bench_learned" 2>&1 \
    | quiet > "$OUT/bench_learned.log"; fi
# issue 16 at 10 steps: steps vs quality; refine configurations chosen on validation, measured on test
if [[ $step == all || $step == steps10 ]]; then
  python benchmarks/steps_quality.py --n 128 > "$OUT/steps_quality.txt"
  python -c "from diffusionx.world import generate_sessions; from diffusionx.world.sessions import write_jsonl; \
write_jsonl(generate_sessions(96, 'validation'), '$OUT/validation96.jsonl')"
  for policies in "learned-cmin0.5 learned-emin0.6-cmin0.5 learned-emin0.8-cmin0.5 learned-emin0.6-cmin0.6 \
learned-emin0.8-cmin0.6 learned-emin0.8-cmin0.4 fixed-1-0.5 fixed-1-0.6 fixed-0.8-0.5" "learned-emin0.7-cmin0.4 \
learned-emin0.7-cmin0.3 learned-emin0.8-cmin0.3 learned-emin0.6-cmin0.4 fixed-0.7-0.4" "learned-emin0.7-eeps0.02-cmin0.3 \
learned-emin0.7-eeps0.04-cmin0.3 learned-emin0.7-ecw0.02-cmin0.3"; do
    diffusionx bench --n 96 --batch 48 --steps 10 --sessions "$OUT/validation96.jsonl" $(printf -- '--policy %s ' $policies) \
      --preview-decoder none --calibration benchmarks/results/calibration_embedded_cpu.json --out "$OUT/val10_${policies%% *}" 2>&1 | quiet \
      > "$OUT/val10_${policies%% *}.log"
  done
  diffusionx bench --n 192 --batch 64 --steps 10 --policy learned --policy learned-cmin0 --policy learned-cmin0.5 \
    --policy fixed-1-0.5 --preview-decoder none --calibration benchmarks/results/calibration_embedded_cpu.json --out "$OUT/bench10" 2>&1 \
    | quiet > "$OUT/bench10.log"
  diffusionx bench --n 192 --batch 64 --steps 10 --policy learned-emin0.7-eeps0.02-cmin0.3 --policy learned-emin0.7-cmin0.3 \
    --preview-decoder none --calibration benchmarks/results/calibration_embedded_cpu.json --out "$OUT/test10" 2>&1 | quiet > "$OUT/test10.log"
  python -c "from diffusionx.world import generate_sessions; from diffusionx.world.sessions import write_jsonl; \
write_jsonl(generate_sessions(288, 'validation')[96:], '$OUT/validation_next192.jsonl')"
  diffusionx bench --n 192 --batch 64 --steps 10 --sessions "$OUT/validation_next192.jsonl" \
    --policy learned-emin0.7-eeps0.02-cmin0.3 --policy learned-emin0.8-cmin0.4 --policy fixed-1-0.5 \
    --preview-decoder none --calibration benchmarks/results/calibration_embedded_cpu.json --out "$OUT/val10_next192" 2>&1 | quiet \
    > "$OUT/val10_next192.log"; fi
# issue 16, third session: the preview decoder, a fresh calibration, the edge floor chosen on 288 validation sessions
if [[ $step == all || $step == preview ]]; then
  diffusionx train preview-decoder --out "$OUT/pd" --export-to src/diffusionx/assets/embedded/preview_decoder 2>&1 \
    | quiet > "$OUT/pd.log"
  diffusionx bench --calibrate-only --out "$OUT/cal" > "$OUT/cal.log" 2>&1
  python benchmarks/calibration_two_teams.py one > "$OUT/two_teams.txt" 2>&1
  python benchmarks/calibration_two_teams.py two >> "$OUT/two_teams.txt" 2>&1
  python -c "from diffusionx.world import generate_sessions; from diffusionx.world.sessions import write_jsonl; \
write_jsonl(generate_sessions(288, 'validation'), '$OUT/validation288.jsonl')"
  diffusionx bench --n 288 --batch 48 --steps 10 --sessions "$OUT/validation288.jsonl" \
    --policy learned-emin0.7-eeps0.02-cmin0.3 --policy learned-emin0.7-eeps0.02-cmin0.4 --policy learned-emin0.7-eeps0.02-cmin0.5 \
    --policy learned-emin0.8-eeps0.02-cmin0.3 --policy learned-emin0.8-eeps0.02-cmin0.4 \
    --calibration "$OUT/cal/calibration.json" --out "$OUT/val288" 2>&1 | quiet > "$OUT/val288.log"
  diffusionx bench --n 288 --batch 48 --steps 10 --sessions "$OUT/validation288.jsonl" \
    --policy learned-emin0.8-eeps0.02-ceps0.01-cmin0.4 --policy learned-emin0.8-eeps0.02-ceps0.01-cmin0.3 \
    --policy learned-emin0.8-eeps0.02-ceps0-cmin0.3 --calibration "$OUT/cal/calibration.json" --out "$OUT/val288_ceps" \
    2>&1 | quiet > "$OUT/val288_ceps.log"
  diffusionx bench --n 192 --batch 64 --steps 10 --policy learned-emin0.8-eeps0.02-cmin0.3 \
    --policy learned-emin0.8-eeps0.02-cmin0.4 --policy learned-emin0.7-eeps0.02-cmin0.3 \
    --calibration "$OUT/cal/calibration.json" --out "$OUT/test_preview" 2>&1 | quiet > "$OUT/test_preview.log"
  python benchmarks/latency_under.py "$OUT/test_preview/results.json" --calibration "$OUT/cal/calibration.json" \
    --calibration benchmarks/results/calibration_embedded_cpu_with_preview_ratio.json --vae-previews \
    > "$OUT/test_preview_latency_under.md"
  diffusionx bench --n 576 --batch 64 --steps 10 --policy learned-emin0.8-eeps0.02-cmin0.4 \
    --calibration "$OUT/cal/calibration.json" --out "$OUT/test_preview576" 2>&1 | quiet > "$OUT/test_preview576.log"; fi
# issue 16, fourth session: the edge trained alone (pair6, cloud and text encoder frozen), checked on
# 384 validation finals, swapped in (edge/unet and pair.json), then the test sessions again. Steps above
# this one ran on pair5's edge (git show a8d72b2:src/diffusionx/assets/embedded/edge/unet/...).
if [[ $step == all || $step == pair6 ]]; then
  diffusionx train pair --resume-from shipped --out "$OUT/pair6" --export-to "$OUT/pair6_export" --seed 20663 \
    --cloud-share 0 --budget-minutes 75 2>&1 | quiet > "$OUT/pair6.log"
  python benchmarks/edge_accuracy.py --cloud shipped "$OUT/pair6_export/edge" 2>/dev/null > "$OUT/pair6_edge_accuracy.jsonl"
  cp "$OUT/pair6_export/edge/unet/diffusion_pytorch_model.safetensors" src/diffusionx/assets/embedded/edge/unet/
  cp "$OUT/pair6_export/pair.json" src/diffusionx/assets/embedded/pair.json
  diffusionx bench --n 192 --batch 64 --steps 10 --policy learned-emin0.8-eeps0.02-cmin0.3 \
    --policy learned-emin0.8-eeps0.02-cmin0.4 --policy learned-emin0.7-eeps0.02-cmin0.3 \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/test_pair6" 2>&1 \
    | quiet > "$OUT/test_pair6.log"
  diffusionx bench --n 576 --batch 64 --steps 10 --policy learned-emin0.8-eeps0.02-cmin0.4 \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/test_pair6_576" 2>&1 \
    | quiet > "$OUT/test_pair6_576.log"
  diffusionx evaluate --steps 20 --n 256 --batch 64 --refine-strengths 0.3,0.5 --out "$OUT/evaluate_pair6" 2>&1 \
    | quiet > "$OUT/evaluate_pair6.log"
  python -c "from diffusionx.world import generate_sessions; from diffusionx.world.sessions import write_jsonl; \
write_jsonl(generate_sessions(288, 'validation'), '$OUT/validation288.jsonl')"
  diffusionx bench --n 288 --batch 48 --steps 10 --sessions "$OUT/validation288.jsonl" --policy learned-emin0.8-eeps0.02-cmin0.4 \
    --policy learned-emin0.8-eeps0.02-cmin0.45 --policy learned-emin0.9-eeps0.02-cmin0.4 \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/val288_pair6" 2>&1 \
    | quiet > "$OUT/val288_pair6.log"
  diffusionx bench --n 192 --batch 64 --steps 10 --policy learned-emin0.9-eeps0.02-cmin0.4 \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/test_pair6_emin09" 2>&1 \
    | quiet > "$OUT/test_pair6_emin09.log"; fi
# issue 16, fifth session: predictors re-collected on pair6 at 10 steps (kept out: CLIP on validation), then the
# shipped predictors tuned at 10 steps on the 288 validation sessions (--write: the shipped defaults), then plain
# `learned` on the test sessions
if [[ $step == all || $step == pred6 ]]; then
  diffusionx predictors collect --train 240 --validation 60 --directions edge --steps 10 --seed 2 \
    --rollout-policy learned-emin0.8-eeps0.02 --out "$OUT/pred6/edge.jsonl" 2>&1 | quiet > "$OUT/pred6_collect_edge.log"
  diffusionx predictors collect --directions cloud --steps 10 --previews "$OUT/pred6/edge.jsonl" --out "$OUT/pred6/cloud.jsonl" \
    2>&1 | quiet > "$OUT/pred6_collect_cloud.log"
  diffusionx predictors train --no-refit --data "$OUT/pred6/edge.jsonl" "$OUT/pred6/cloud.jsonl" --out "$OUT/pred6/model" 2>&1 \
    | quiet > "$OUT/pred6_train.log"
  TUNE10="--sessions $OUT/validation288.jsonl --n 288 --steps 10 --batch 48 --edge-eps 0.02 --edge-floors 0.8 --cloud-floors 0,0.3,0.4 --fidelity-floor 20"
  diffusionx predictors tune $TUNE10 --predictors "$OUT/pred6/model" --out "$OUT/pred6_tune" 2>&1 | quiet > "$OUT/pred6_tune.log"
  diffusionx predictors tune $TUNE10 --write --out "$OUT/tune_shipped" 2>&1 | quiet > "$OUT/tune_shipped.log"
  diffusionx bench --n 192 --batch 64 --steps 10 --policy learned \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/test_learned" 2>&1 \
    | quiet > "$OUT/test_learned.log"
  python benchmarks/finals_by_prompt.py "$OUT/test_learned/results.json" > "$OUT/test_learned_finals_by_prompt.md"
  diffusionx bench --n 192 --batch 64 --steps 20 --policy learned \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/test_learned20" 2>&1 \
    | quiet > "$OUT/test_learned20.log"; fi
# issue 16, sixth session: 10 steps is the embedded pair's default (the plain command reproduces the 10-step run),
# and the cloud refining pair6's final previews (the pred6 step's rows) under other guidance scales and step counts
if [[ $step == all || $step == steps6 ]]; then
  diffusionx bench --n 192 --batch 64 --policy learned \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/test_learned_default_steps" 2>&1 \
    | quiet > "$OUT/test_learned_default_steps.log"
  python benchmarks/refine_settings.py "$OUT/pred6/cloud.jsonl" --configs 7.5:10,5:10,7.5:20 2>&1 \
    | quiet > "$OUT/refine_settings_pair6.txt"
  python benchmarks/refine_settings.py "$OUT/pred6/cloud.jsonl" --strengths 0.5 --configs 3:10,5:10,7.5:10,10:10,14:10 \
    --draws 1 --seed-offset 7 2>&1 | quiet > "$OUT/refine_settings_pair6_guidance.txt"
  python benchmarks/cloud_allocation.py "$OUT/pred6/cloud.jsonl" > "$OUT/cloud_allocation_pair6.txt"
  diffusionx bench-edits --n 140 --methods fresh,sdedit,local,auto --out "$OUT/edits_steps10" 2>&1 \
    | quiet > "$OUT/edits_steps10.log"
  diffusionx bench --sessions "$OUT/validation288.jsonl" --n 288 --batch 48 --policy learned-cmin0.6-ceps1 \
    --policy learned-cmin0.5-ceps1 --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json \
    --out "$OUT/validation_fixed_cloud" 2>&1 | quiet > "$OUT/validation_fixed_cloud.log"
  python -c "from diffusionx.world import generate_sessions, write_jsonl
write_jsonl(generate_sessions(768, 'test')[576:], '$OUT/test_577_768.jsonl')"
  diffusionx bench --sessions "$OUT/test_577_768.jsonl" --n 192 --batch 64 --policy learned \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/test_577_768" 2>&1 \
    | quiet > "$OUT/test_577_768.log"; fi
# issue 16, seventh session: the edge trained alone again (pair7), checked on 384 validation finals and the 288
# validation sessions, swapped in by hand (its own check saw 64 finals), then the test sessions and the edits again.
# Steps above this one ran on pair6's edge (git show db56bff:src/diffusionx/assets/embedded/edge/unet/...).
if [[ $step == all || $step == pair7 ]]; then
  diffusionx train pair --resume-from shipped --out "$OUT/pair7" --export-to "$OUT/pair7_export" --seed 20764 \
    --cloud-share 0 --budget-minutes 75 2>&1 | quiet > "$OUT/pair7.log"
  { python benchmarks/edge_accuracy.py --cloud shipped "$OUT/pair7/candidate/edge"
    python benchmarks/edge_accuracy.py --steps 20 shipped "$OUT/pair7/candidate/edge"; } 2>/dev/null \
    > "$OUT/pair7_edge_accuracy.jsonl"
  cp "$OUT/pair7/candidate/edge/unet/diffusion_pytorch_model.safetensors" src/diffusionx/assets/embedded/edge/unet/
  diffusionx bench --sessions "$OUT/validation288.jsonl" --n 288 --batch 48 --policy learned \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/val288_pair7" 2>&1 \
    | quiet > "$OUT/val288_pair7.log"
  diffusionx bench --n 576 --batch 64 --policy learned \
    --calibration benchmarks/results/calibration_embedded_cpu_2026-12-05.json --out "$OUT/test576_pair7" 2>&1 \
    | quiet > "$OUT/test576_pair7.log"
  python benchmarks/finals_by_prompt.py "$OUT/test576_pair7/results.json" > "$OUT/test576_pair7_finals_by_prompt.md"
  diffusionx bench-edits --n 140 --methods fresh,sdedit,local,auto --out "$OUT/edits_pair7" 2>&1 \
    | quiet > "$OUT/edits_pair7.log"
  { time diffusionx demo --out "$OUT/demo_pair7"; } 2>&1 | quiet > "$OUT/demo_pair7.log"; fi
# issue 17: round edits; the auto-mode table is chosen on validation edits, measured on test ones
if [[ $step == all || $step == edits ]]; then
  diffusionx bench-edits --steps 20 --split validation --n 140 --methods fresh,sdedit,local --write-auto-modes --out "$OUT/edits_validation" \
    2>&1 | quiet > "$OUT/edits_validation.log"
  diffusionx bench-edits --steps 20 --n 140 --out "$OUT/edits" 2>&1 | quiet > "$OUT/edits.log"
  diffusionx bench-edits --steps 20 --n 48 --side cloud --out "$OUT/edits_cloud" 2>&1 | quiet > "$OUT/edits_cloud.log"; fi
# issue 4: the service under load (needs the machine to itself)
if [[ $step == all || $step == loadtest ]]; then python benchmarks/loadtest.py --clients 8 16 --per-client 12 2>&1 \
  | quiet > "$OUT/loadtest.log"; fi
