#!/usr/bin/env bash
# The MQAR grid on one GPU within a fixed time: worker processes share the card and claim runs in priority order
# (the width sweep at the main learning rate first, then the n_kv sweep, then the other learning rates; the grid is
# lab/mqar_study.py's GridConfig: 5 arms x 3 seeds, widths 64-256 at 4 pairs, 4-32 pairs at width 128). Finished
# runs are kept: calling it again with the same OUT_DIR resumes (scripts/gpu_suite.sh's stage `mqar` carries them
# between machines). The report (mqar.json/md/png) covers every finished run and lists what remains; its table is
# printed last. Each run's step is replayed from a CUDA graph (lab/mqar.py, TrainStep). Measured on an H100 with
# 400-step runs (model build, capture and two evaluations included): 84 steps/s per worker with 4 workers (eager
# steps: 55 with 4 workers, 19 with 12); in the grid (2000-step runs, 4 workers) 100-110 steps/s at seq 64 and
# width 128, 55-60 at seq 128, 35 at width 256, 28 at seq 256: about 165 steps/s for the card, so the grid
# (at most 210 runs x 2000 steps; solved runs stop early) takes several runs of this script.
# Usage: bash scripts/gpu_mqar.sh OUT_DIR
# RA_MQAR_GROUP=G: each worker trains G runs of one task shape together, each on its own CUDA stream (one process's
# streams run at once; separate processes only take turns on the card); not yet timed on a GPU, so the default is 1.
# env: RA_MQAR_SECONDS (time for the grid, default 420), RA_MQAR_PAR (workers, default 4), RA_MQAR_STEPS (per run,
#      default 2000; runs stop early at 0.99 accuracy), RA_MQAR_VOCAB (default 256; Zoology's large setting is 8192,
#      where the baseline's accuracy was still 0 after 800 steps of batch 256 on CPU), RA_MQAR_ARGS (more options
#      for `python -m reciprocal_attention.lab.mqar_study`, e.g. "--widths 64,128 --lrs 3e-3 --tie"),
#      RA_MQAR_RESTORE (a committed report whose runs are put back into the folder first, default
#      reports/quality/mqar.json: the GPU grid's; "" for a grid of another batch size, which must not mix with it).
set -uo pipefail
OUT="${1:?usage: gpu_mqar.sh OUT_DIR}"; mkdir -p "$OUT"
SECS="${RA_MQAR_SECONDS:-420}"; PAR="${RA_MQAR_PAR:-4}"; STEPS="${RA_MQAR_STEPS:-2000}"; GROUP="${RA_MQAR_GROUP:-1}"
RESTORE="${RA_MQAR_RESTORE-reports/quality/mqar.json}"
# the runner stops its workers at the deadline; the outer timeout guards against a hang after it (report included)
# shellcheck disable=SC2086
timeout --kill-after=20 $(( SECS + 90 )) python3 -m reciprocal_attention.lab.mqar_study --out "$OUT/grid" \
  --report "$OUT" --parallel "$PAR" --group "$GROUP" --deadline "$SECS" --steps "$STEPS" --vocab "${RA_MQAR_VOCAB:-256}" \
  ${RESTORE:+--restore "$RESTORE"} ${RA_MQAR_ARGS:-} > "$OUT/mqar.log" 2>&1
rc=$?
[ "$rc" -ne 0 ] && { echo "mqar_study exited with $rc; the log ends:"; tail -n 30 "$OUT/mqar.log"; }
# throughput of the finished runs, to size the next run of the grid
python3 - "$OUT/grid/runs" <<'PY'
import json, pathlib, sys
recs = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("*.json")]
if recs:
    by_group = {}
    for r in recs:
        by_group.setdefault(r.get("group", 1), []).append(r["steps_per_s"])
    print(f"{len(recs)} finished runs; steps run: {sum(r['steps_run'] for r in recs)}; steps/s per run (median) by "
          "runs trained together: " + ", ".join(f"{g}: {sorted(v)[len(v) // 2]:.0f}" for g, v in sorted(by_group.items())))
PY
[ -f "$OUT/mqar.md" ] && cat "$OUT/mqar.md"
exit "$rc"
