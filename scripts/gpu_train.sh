#!/usr/bin/env bash
# Training throughput on one GPU: GPT-2 small (124M), the same config with standard attention and with the
# recommended RA preset (fast path), torch.compile on. Writes one run dir per arm and throughput.json.
# Usage: bash scripts/gpu_train.sh OUT_DIR   (needs data/corpus built by `ra data prepare`)
set -uo pipefail
OUT="${1:?usage: gpu_train.sh OUT_DIR}"; mkdir -p "$OUT"
STEPS="${RA_TRAIN_STEPS:-80}"
for arm in standard ra; do
  python3 -m reciprocal_attention.lab.cli train --preset gpt2 --out "$OUT/$arm" \
    --set model.attn=$arm --set budget.max_tokens=0 --set budget.max_steps=$STEPS --set eval.interval=0 \
    --set eval.iters=5 --set checkpoint.interval=0 --set system.log_interval=10 --set system.progress=false \
    --set schedule.warmup_steps=10 2>&1 | grep -v "^\s*$" | tail -n 25
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = {}
for arm in ("standard", "ra"):
    s = json.loads((out / arm / "summary.json").read_text())
    recs = [json.loads(l) for l in (out / arm / "metrics.jsonl").read_text().splitlines() if l.strip()]
    tr = [r for r in recs if r.get("kind") == "train"]
    steady = [r["tokens_per_s"] for r in tr[len(tr) // 2:]]  # second half: compiled, warmed up
    rows[arm] = {"tokens_per_s_steady": sum(steady) / len(steady), "mfu_last": tr[-1].get("mfu"),
                 "final_train_loss": tr[-1]["loss"], "final_val_loss": s["final_val_loss"], "steps": s["steps"],
                 "params": s["params"], "device": s["device"], "dtype": s["dtype"]}
import torch, triton
res = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "config": "preset gpt2 (124M, 16x1024 tokens x 2 micro-batches, bf16 autocast, torch.compile)",
       "arms": rows, "ratio_ra_vs_standard": rows["ra"]["tokens_per_s_steady"] / rows["standard"]["tokens_per_s_steady"]}
(out / "throughput.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY
