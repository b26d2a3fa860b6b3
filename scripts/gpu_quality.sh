#!/usr/bin/env bash
# The language-model quality study on one GPU, resumable across runs: every (arm, seed) run trains for the
# preset's token budget (quality-gpu-40m: 40,960,000 tokens), several processes share the card, and at the deadline
# the running ones checkpoint the step they are on (SIGTERM) and resume there on the next run with the same OUT_DIR.
# Arms in order of interest (standard, ra, full, output_gate for every seed, then seed, ra_disc). The report
# (quality.json/md/png) says what remains; an earlier study's quality.json (RA_QUALITY_PRIOR) is kept in it as a row.
# On a machine of several GPUs each run is pinned to the least busy one (CUDA_VISIBLE_DEVICES): raise RA_QUALITY_PAR
# to the runs per GPU times the GPUs.
# Usage: bash scripts/gpu_quality.sh OUT_DIR   (needs data/corpus: the GPU machine has no internet, so build it with
#        `ra data prepare --out data/corpus` beforehand and send data/corpus/{manifest.json,train.bin,val.bin,test.bin})
# env: RA_QUALITY_SECONDS (time for this run, default 540), RA_QUALITY_PAR (runs at once, default 9),
#      RA_QUALITY_ARMS (standard is added when left out), RA_QUALITY_SEEDS, RA_QUALITY_PRESET (default
#      quality-gpu-40m), RA_QUALITY_TOKENS (override the preset's tokens per run), RA_QUALITY_PRIOR (default
#      reports/quality/quality-4m.json when it exists),
#      RA_QUALITY_SET (more `--set key=value` overrides, space-separated, e.g. "system.compile=true"),
#      RA_QUALITY_RESTORE (the study's committed report, whose finished runs are restored into OUT_DIR first; default
#      reports/quality/quality.json for the default preset and tokens, "" for none).
set -uo pipefail
OUT="${1:?usage: gpu_quality.sh OUT_DIR}"; mkdir -p "$OUT"
if [ ! -f data/corpus/manifest.json ]; then
  echo "gpu_quality.sh: data/corpus/manifest.json not found; build it with \`ra data prepare --out data/corpus\` and send data/corpus/{manifest.json,train.bin,val.bin,test.bin} along" >&2
  exit 2
fi
SECS="${RA_QUALITY_SECONDS:-540}"; PAR="${RA_QUALITY_PAR:-9}"
ARMS="${RA_QUALITY_ARMS:-standard,ra,full,output_gate,seed,ra_disc}"; SEEDS="${RA_QUALITY_SEEDS:-0,1,2}"
case ",$ARMS," in
  *,standard,*) ;;
  *) echo "gpu_quality.sh: adding the baseline 'standard' to RA_QUALITY_ARMS=$ARMS (the paired differences are against it; its finished runs are not trained again)" >&2
     ARMS="standard,$ARMS" ;;
esac
PRESET="${RA_QUALITY_PRESET:-quality-gpu-40m}"
PRIOR="${RA_QUALITY_PRIOR:-reports/quality/quality-4m.json}"
# fixed Triton attention configs (ops.settings.flash_autotune): no autotuning races while runs share the card; one
# CPU thread per run: the runs share the machine's cores (twelve MQAR workers with every thread each finished
# nothing in 390 s on the H100 machine)
args=(--preset "$PRESET" --arms "$ARMS" --seeds "$SEEDS" --parallel "$PAR" --out "$OUT" --deadline "$SECS"
      --set system.flash_autotune=false --set system.threads=1)
[ -n "${RA_QUALITY_TOKENS:-}" ] && args+=(--set "budget.max_tokens=$RA_QUALITY_TOKENS")
for kv in ${RA_QUALITY_SET:-}; do args+=(--set "$kv"); done
[ -f "$PRIOR" ] && args+=(--prior "$PRIOR")
# the finished runs of the committed report count as done here: the study resumes without its run folders
if [ "$PRESET" = quality-gpu-40m ] && [ -z "${RA_QUALITY_TOKENS:-}" ]; then RESTORE="${RA_QUALITY_RESTORE-reports/quality/quality.json}"
else RESTORE="${RA_QUALITY_RESTORE:-}"; fi
[ -n "$RESTORE" ] && args+=(--restore "$RESTORE")
# the study stops its runs at the deadline; the outer timeout guards against a hang in the report after it
timeout --kill-after=20 $(( SECS + 120 )) python3 -m reciprocal_attention.lab.cli quality "${args[@]}" \
  > "$OUT/quality.log" 2>&1
rc=$?
[ "$rc" -ne 0 ] && { echo "ra quality exited with $rc; the log ends:"; tail -n 40 "$OUT/quality.log"; }
[ -f "$OUT/quality.md" ] && cat "$OUT/quality.md"
exit "$rc"
