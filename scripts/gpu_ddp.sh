#!/usr/bin/env bash
# Multi-GPU DDP on one host, one job: GPT-2 small (124M) with the RA fast path under torchrun.
#  scale_N*:  N = 1, 2, 4, 8 (up to the GPUs present), the same per-GPU batch (16 x 1024, grad_accum 2):
#             tokens/s and scaling efficiency = tokens/s(N) / (N * tokens/s(1)).
#  agree_N1:  scale_N<N> (N GPUs, grad_accum 2) against 1 GPU with the same global batch (grad_accum 2N): the same samples
#             per step, so the loss curves must agree to bf16 noise.
#  resume_*:  the N-GPU run checkpointed half-way and resumed on 1 GPU (grad_accum 2N): continues agree_N.
# Usage: bash scripts/gpu_ddp.sh OUT_DIR   (needs data/corpus; writes OUT_DIR/ddp.json and prints it)
set -uo pipefail
OUT="${1:?usage: gpu_ddp.sh OUT_DIR}"; mkdir -p "$OUT"
NG=$(nvidia-smi -L | wc -l)
STEPS="${RA_DDP_STEPS:-40}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
COMMON=(--preset gpt2 --set model.attn=ra --set budget.max_tokens=0 --set eval.interval=0 --set eval.iters=5
        --set system.log_interval=5 --set system.progress=false --set schedule.warmup_steps=10
        --set schedule.decay_steps=$STEPS --set checkpoint.keep_last=0)
run() {  # run NPROC OUT_SUBDIR extra --set args...
  local n=$1 d=$2; shift 2
  timeout "${RA_DDP_RUN_TIMEOUT:-240}" torchrun --standalone --nproc_per_node "$n" -m reciprocal_attention.lab.train \
    "${COMMON[@]}" --out "$OUT/$d" "$@" 2>&1 | grep -v "^\s*$" | tail -n 4
}
for n in 1 2 4 8; do
  [ "$n" -le "$NG" ] || continue
  run "$n" "scale_N$n" --set budget.max_steps=$STEPS --set checkpoint.interval=0
done
if [ "$NG" -ge 2 ]; then
  half=$((STEPS / 2))
  run 1 "agree_N1" --set budget.max_steps=$STEPS --set checkpoint.interval=0 --set data.grad_accum=$((2 * NG))
  run "$NG" "resume_N$NG" --set budget.max_steps=$half --set checkpoint.interval=$half
  timeout 240 python3 -m reciprocal_attention.lab.train --resume "$OUT/resume_N$NG" --set budget.max_steps=$STEPS \
    --set data.grad_accum=$((2 * NG)) 2>&1 | tail -n 4
fi
python3 - "$OUT" "$NG" <<'PY'
import json, pathlib, sys
import torch
out, ng = pathlib.Path(sys.argv[1]), int(sys.argv[2])

def train_recs(d):
    p = out / d / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip() and json.loads(l).get("kind") == "train"] \
        if p.exists() else []

res = {"device": torch.cuda.get_device_name(), "gpus": ng, "torch": torch.__version__,
       "config": "preset gpt2, RA fast path (attn=ra), 16 x 1024 tokens x grad_accum 2 per GPU, bf16, compile",
       "scaling": []}
base = None
for n in (1, 2, 4, 8):
    tr = train_recs(f"scale_N{n}")
    if not tr:
        continue
    steady = [r["tokens_per_s"] for r in tr[len(tr) // 2:]]
    tps = sum(steady) / len(steady)
    base = tps if n == 1 else base
    res["scaling"].append({"N": n, "tokens_per_s": tps, "efficiency": tps / (n * base) if base else None})
a, b = train_recs(f"scale_N{ng}"), train_recs("agree_N1")  # scale_N{ng} is the N-GPU run of the same config
if a and b:
    diffs = [abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b)]
    res["agreement"] = {"steps": [x["step"] for x in a], "loss_N": [x["loss"] for x in a],
                        "loss_1": [y["loss"] for y in b], "max_rel_diff": max(diffs)}
r = train_recs(f"resume_N{ng}")
if r and a:
    ref = {x["step"]: x["loss"] for x in a}
    res["resume"] = {"steps": [x["step"] for x in r], "max_rel_diff_vs_uninterrupted":
                     max(abs(x["loss"] - ref[x["step"]]) / abs(ref[x["step"]]) for x in r if x["step"] in ref)}
(out / "ddp.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY
