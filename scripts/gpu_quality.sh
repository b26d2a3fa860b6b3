#!/usr/bin/env bash
# The quality study on one GPU within a fixed time: a short probe measures per-process training throughput with
# the card shared, then the token budget per run is set so that all (arm, seed) runs fit (equal tokens for all).
# Usage: bash scripts/gpu_quality.sh OUT_DIR   (env: RA_QUALITY_SECONDS total time for training, RA_QUALITY_PAR)
set -uo pipefail
OUT="${1:?usage: gpu_quality.sh OUT_DIR}"; mkdir -p "$OUT"
SECS="${RA_QUALITY_SECONDS:-300}"; PAR="${RA_QUALITY_PAR:-9}"; ARMS="${RA_QUALITY_ARMS:-standard,seed,ra,ra_disc,full,output_gate}"
SEEDS="${RA_QUALITY_SEEDS:-0,1,2}"
n_runs=$(( $(echo "$ARMS" | tr ',' '\n' | wc -l) * $(echo "$SEEDS" | tr ',' '\n' | wc -l) ))
# probe: PAR copies of the slowest arm (full) for a fixed number of steps, all at once, as in the study
export RA_FLASH_AUTOTUNE="${RA_FLASH_AUTOTUNE:-0}"  # fixed kernel configs: no autotuning under a shared card
python3 - "$OUT" "$PAR" <<'PY' > "$OUT/probe.txt"
import json, subprocess, sys, pathlib
out, par = pathlib.Path(sys.argv[1]) / "probe", int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
procs = [subprocess.Popen([sys.executable, "-m", "reciprocal_attention.lab.train", "--preset", "quality-gpu",
         "--out", str(out / f"p{i}"), "--set", "model.attn=full", "--set", "budget.max_tokens=0",
         "--set", "budget.max_steps=60", "--set", "eval.interval=0", "--set", "eval.iters=1",
         "--set", "checkpoint.interval=0", "--set", "system.log_interval=10", "--set", "system.progress=false"],
         stdout=open(out / f"p{i}.log", "w"), stderr=subprocess.STDOUT) for i in range(par)]
rcs = [p.wait() for p in procs]
tps = []
for i in range(par):
    try:
        recs = [json.loads(l) for l in (out / f"p{i}" / "metrics.jsonl").read_text().splitlines() if l.strip()]
        tr = [r["tokens_per_s"] for r in recs if r.get("kind") == "train"][2:]
        tps.append(sum(tr) / len(tr))
    except Exception as e:
        print(f"probe {i} (rc={rcs[i]}) gave no throughput ({e}); its log ends:", file=sys.stderr)
        print((out / f"p{i}.log").read_text()[-3000:], file=sys.stderr)
print(min(tps) if tps else 0)
PY
tps=$(tail -n 1 "$OUT/probe.txt")
waves=$(( (n_runs + PAR - 1) / PAR ))
tokens=$(python3 -c "t=float('$tps'); print(int(t * $SECS / $waves * 0.85 // 8192 * 8192) if t > 0 else 3_000_000)")
[ "$tps" = "0" ] && echo "probe failed: falling back to 3,000,000 tokens per run (see the log above)"
echo "probe: ${tps} tokens/s per process with $PAR sharing the card; $n_runs runs in $waves waves -> $tokens tokens per run"
echo "{\"probe_tokens_per_s_per_process\": $tps, \"parallel\": $PAR, \"waves\": $waves, \"tokens_per_run\": $tokens}" > "$OUT/budget.json"
rm -rf "$OUT/probe"
python3 -m reciprocal_attention.lab.cli quality --preset quality-gpu --arms "$ARMS" --seeds "$SEEDS" --parallel "$PAR" \
  --out "$OUT" --set budget.max_tokens="$tokens" --set checkpoint.interval=100000 --mqar-steps "${RA_MQAR_STEPS:-600}"
