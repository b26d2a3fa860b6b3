#!/usr/bin/env bash
# One job on the GPU machine: GPU tests, correctness check, benchmarks, training throughput, quality study.
# Usage: bash scripts/gpu_suite.sh OUT_DIR [STAGE ...]
#   stages: tests compiletests flashtests foldtests foldsweep check model model2 profile_model profile_decode bench bench_amp bench_ab profile ncu overlap
#   eager ddp train mqar quality (default: tests model profile_model check bench)
# Every stage has its own timeout and log; the full results land in OUT_DIR/results.tar.gz, and a short
# summary is printed last. Runs on the GPU image's python3 (torch 2.11 / triton 3.6) with src/ on PYTHONPATH.
set -uo pipefail
OUT="${1:?usage: gpu_suite.sh OUT_DIR [STAGE ...]}"; shift || true
STAGES="${*:-tests model profile_model check bench}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RA_CACHE_DIR="$ROOT/.cache"
RES="$ROOT/.gpuout/results"; export RA_RESULTS_DIR="$RES"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$RES" "$OUT"
PY=python3
summary="$RES/summary.txt"; : > "$summary"
note() { echo "$*" | tee -a "$summary"; }
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "=== [$name] $* (timeout ${secs}s)"
  timeout --signal=TERM --kill-after=20 "$secs" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  note "stage $name: rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$RES/$name.log"
  return 0
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RES/device.txt"
# the card's results folder (benchmarks/results/h100, h200): the model stages merge their records into its model.json
CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -o 'H[0-9]\+' | head -n 1 | tr 'H' 'h')"
$PY -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" | tee -a "$RES/device.txt"
for s in $STAGES; do
  case "$s" in
    tests)   stage tests "${RA_TESTS_TIMEOUT:-540}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/ --timeout=300 -o addopts="" -rfE
             ;;
    flashtests) stage flashtests "${RA_FLASHTESTS_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_gpu_flash.py --timeout=90 -o addopts="" -rfE ${RA_FLASHTESTS_K:+-k "$RA_FLASHTESTS_K"} ;;
    foldtests)  stage foldtests "${RA_FOLDTESTS_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider tests/test_gpu_fold.py --timeout=150 -o addopts="" -rfE ;;
    foldsweep)  stage foldsweep 180 $PY tools/fold_bench.py "$RES/fold_bench.json" ;;
    bench_amp)  stage bench_amp 60 $PY -m reciprocal_attention.lab.cli bench --out "$RES/bench_amp" --no-progress --precision amp \
                  --groups core --shapes 8x1024,2x4096,1x8192 --widths "" --modes graph --inner 10 ;;
    compiletests) stage compiletests "${RA_COMPILETESTS_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider tests/test_compile.py -m gpu --timeout=240 -o addopts="" -rfE ;;
    model|model2)  # model2: a second set of arms (RA_MODEL2_ARGS) in the same run; both merge into the card's records
             seed="benchmarks/results/$CARD/model.json"; [ "$s" = model2 ] && [ -f "$RES/model/model.json" ] && seed="$RES/model/model.json"
             mkdir -p "$RES/$s"; [ -f "$seed" ] && cp "$seed" "$RES/$s/model.json"
             if [ "$s" = model ]; then args="${RA_MODEL_ARGS:-}"; secs="${RA_MODEL_TIMEOUT:-420}"; else args="${RA_MODEL2_ARGS:-}"; secs="${RA_MODEL2_TIMEOUT:-420}"; fi
             # shellcheck disable=SC2086
             stage "$s" "$secs" $PY -m reciprocal_attention.lab.cli bench --model gpt2 --out "$RES/$s" --model-merge $args
             mkdir -p "$OUT/$s"; cp "$RES/$s"/model.* "$OUT/$s/" 2>/dev/null ;;
    profile_decode) stage profile_decode "${RA_PROFILE_DECODE_TIMEOUT:-150}" $PY tools/profile_decode.py "$RES/profile_decode" ${RA_PROFILE_DECODE_ARGS:-}
             cp "$RES"/profile_decode/profile_decode.md "$OUT/" 2>/dev/null ;;
    profile_model) stage profile_model "${RA_PROFILE_MODEL_TIMEOUT:-240}" $PY tools/profile_model.py "$RES/profile_model" ${RA_PROFILE_MODEL_ARGS:-}
             cp "$RES"/profile_model/profile_model.* "$OUT/" 2>/dev/null ;;
    mqar)    # the runs of reports/quality/mqar.json are restored by gpu_mqar.sh; this also resumes the finished runs of
             # earlier runs of the suite, not yet committed, kept in an ignored folder sent along with `carry` (default
             # build/mqar; after a run: tar -xzf results.tar.gz -C /tmp && mkdir -p build/mqar/grid &&
             # cp -r /tmp/results/mqar/grid/runs build/mqar/grid/)
             keep="${RA_MQAR_RESUME:-build/mqar}"
             if [ -d "$keep/grid/runs" ]; then mkdir -p "$RES/mqar/grid"; cp -r "$keep/grid/runs" "$RES/mqar/grid/"; fi
             stage mqar "${RA_MQAR_TIMEOUT:-540}" bash scripts/gpu_mqar.sh "$RES/mqar"
             mkdir -p "$OUT/mqar"; cp "$RES"/mqar/mqar.json "$RES"/mqar/mqar.md "$RES"/mqar/mqar.png "$OUT/mqar/" 2>/dev/null ;;
    profile) stage profile "${RA_PROFILE_TIMEOUT:-300}" $PY tools/profile_kernels.py "$RES/profile" ;;
    ncu)     stage ncu 120 ncu --kernel-name regex:_fold -c 3 --section SpeedOfLight --section LaunchStats --section Occupancy $PY tools/ncu_fold.py ;;
    check)   stage check 240 $PY -m reciprocal_attention.lab.cli check ;;
    bench)   stage bench "${RA_BENCH_TIMEOUT:-480}" $PY -m reciprocal_attention.lab.cli bench --out "$RES/bench" --no-progress ${RA_BENCH_ARGS:-}
             # training precision: fp32 parameters under bf16 autocast (the fused fold replaces F.linear's cast)
             [ "${RA_BENCH_AMP:-1}" = 1 ] && stage bench_amp 150 $PY -m reciprocal_attention.lab.cli bench --out "$RES/bench_amp" --no-progress --precision amp \
               --groups core --shapes 8x1024,2x4096,1x8192 --widths "" --modes graph ;;
    bench_ab)  # the block bench of another commit's src (RA_AB_SRC; its CLI module RA_AB_MODULE) and of this tree, one
               # after the other in this run, same arguments: a code change's effect on the same card
             if [ -z "${RA_AB_SRC:-}" ] || [ ! -d "$RA_AB_SRC" ]; then
               note "stage bench_ab: set RA_AB_SRC to a src folder, e.g. git archive COMMIT src | tar -x -C build/ab"; continue; fi
             read -r -a ab_args <<< "${RA_AB_ARGS:---groups core --shapes 8x1024,2x4096 --widths= --modes graph}"
             stage bench_ab_prev "${RA_AB_TIMEOUT:-150}" env PYTHONPATH="$ROOT/$RA_AB_SRC" $PY -m "${RA_AB_MODULE:-reciprocal_attention.lab.cli}" \
               bench --out "$RES/bench_ab/prev" --no-progress "${ab_args[@]}"
             stage bench_ab_new "${RA_AB_TIMEOUT:-150}" $PY -m reciprocal_attention.lab.cli bench --out "$RES/bench_ab/new" --no-progress "${ab_args[@]}"
             mkdir -p "$OUT/bench_ab"; for w in prev new; do cp "$RES/bench_ab/$w/bench.json" "$OUT/bench_ab/$w.json" 2>/dev/null; done
             $PY tools/bench_ab.py "$OUT/bench_ab/prev.json" "$OUT/bench_ab/new.json" "$OUT/bench_ab/bench_ab.md" | tee -a "$summary" ;;
    overlap) stage overlap 200 $PY tools/overlap_ab.py "$RES/overlap_ab.json" --trace --rounds 15 --memory ;;
    eager)   stage eager 150 $PY tools/eager_overhead.py "$RES/eager_overhead.json"
             cp "$RES"/eager_overhead.json "$OUT/" 2>/dev/null ;;
    ddp)     stage ddp "${RA_DDP_TIMEOUT:-560}" bash scripts/gpu_ddp.sh "$RES/ddp" ;;
    train)   stage train "${RA_TRAIN_TIMEOUT:-300}" bash scripts/gpu_train.sh "$RES/train" ;;
    quality) # the study's own deadline, then its runs' checkpoints and the report, inside the stage's limit.
             # The finished runs recorded in reports/quality/quality.json are restored by gpu_quality.sh; those of
             # a later machine, not yet committed, come along in an ignored folder sent with `carry` (default
             # build/quality; after a run: tar -xzf results.tar.gz -C /tmp && mkdir -p build/quality/runs &&
             # cp -r /tmp/results/quality/runs/* build/quality/runs/); only finished ones (summary.json) are
             # kept: an unfinished run's checkpoints stay on its machine, so elsewhere it starts again.
             keep="${RA_QUALITY_RESUME:-build/quality}"
             for d in "$keep"/runs/*/; do
               [ -f "$d/summary.json" ] || continue
               mkdir -p "$RES/quality/runs"; [ -e "$RES/quality/runs/$(basename "$d")" ] || cp -r "$d" "$RES/quality/runs/"
             done
             qsecs="${RA_QUALITY_SECONDS:-420}"
             stage quality "${RA_QUALITY_TIMEOUT:-$((qsecs + 150))}" env RA_QUALITY_SECONDS="$qsecs" bash scripts/gpu_quality.sh "$RES/quality"
             mkdir -p "$OUT/quality"; cp "$RES"/quality/quality.json "$RES"/quality/quality.md "$RES"/quality/quality.png "$OUT/quality/" 2>/dev/null ;;
    *) note "unknown stage $s" ;;
  esac
done
# weights don't travel back, but they stay on the machine: the next run on it resumes the quality study's runs
tar -C "$ROOT/.gpuout" --exclude=checkpoints -czf "$OUT/results.tar.gz" results
cp "$summary" "$OUT/summary.txt"
echo "=== summary"; cat "$summary"
for m in model model2; do [ -f "$RES/$m/model.md" ] && cat "$RES/$m/model.md"; done
[ -f "$RES/bench/bench.md" ] && head -n 40 "$RES/bench/bench.md"
exit 0
