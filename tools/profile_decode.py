"""KV-cache decoding profile (greedy, bf16 autocast, GPT-2 small): tokens/s, device and host time per token, for
the project's GPT (``standard`` vs ``ra``) and transformers' GPT-2 vs its ``convert_gpt2`` conversion.

    python tools/profile_decode.py OUT_DIR [--tokens 128] [--batch 1] [--rounds 3]

Decoding GPT-2 small is bound by host time (one token is ~150 small kernels), so the Python and dispatch cost of a
layer is what its tokens/s ratio measures. Writes ``OUT_DIR/profile_decode.md``: tokens/s, device ms and aten ops per
token of each model, the top functions by own time (cProfile) and the top ops by own host time (torch.profiler).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path

import torch

from reciprocal_attention.lab.bench_model import ModelBenchConfig, _decode_tokens_per_s, _gpt, _hf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelBenchConfig(device=dev.type)
    models = {"gpt2/standard": (_gpt(cfg, "standard", 1024, dev), False),
              "gpt2/ra": (_gpt(cfg, "ra", 1024, dev), False),
              "hf-gpt2/baseline": (_hf(cfg, False, 1024, dev), True),
              "hf-gpt2/low_rank": (_hf(cfg, True, 1024, dev), True)}
    lines = [f"# Decoding profile: greedy, B={args.batch}, {args.tokens} new tokens, bf16 autocast", "",
             f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}. "
             f"Each model first decodes the full length once (after an 8-token warm-up, the first run over new key "
             f"lengths was ~8x slower on an H100), then the models decode in turn over "
             f"{args.rounds} rounds (median tokens/s). Device time: the CUDA kernels' own time per token "
             f"(torch.profiler); below it, the top functions by own host time (cProfile).", "",
             "| model | tokens/s (median) | ms/token | device ms/token | aten ops/token |", "|---|---|---|---|---|"]
    for model, hf in models.values():
        _decode_tokens_per_s(model, hf, args.batch, args.tokens, dev, 50257)
    tps: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            model, hf = models[name]
            tps[name].append(_decode_tokens_per_s(model, hf, args.batch, args.tokens, dev, 50257))
    details = []
    for name, (model, hf) in models.items():
        pr = cProfile.Profile()
        pr.enable()
        _decode_tokens_per_s(model, hf, args.batch, args.tokens, dev, 50257)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda"
                                                        else [])
        with torch.profiler.profile(activities=acts) as prof:
            _decode_tokens_per_s(model, hf, args.batch, 16, dev, 50257)
        avg = prof.key_averages()
        n_ops = sum(e.count for e in avg if e.key.startswith("aten::"))
        dev_us = sum(getattr(e, "self_device_time_total", 0.0) for e in avg if getattr(e, "device_type", None)
                     == torch.autograd.DeviceType.CUDA)
        med = statistics.median(tps[name])
        lines.append(f"| {name} | {med:.0f} | {1e3 * args.batch / med:.3f} | {dev_us / 1e3 / 16:.3f} | "
                     f"{n_ops / 16:.0f} |")
        table = avg.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)
        details += [f"## {name}", "", "```", buf.getvalue().strip()[-4000:], "```", "",
                    "torch.profiler, 16 tokens, by own host time:", "", "```", table.strip()[-6000:], "```", ""]
        print(lines[-1], flush=True)
    lines += [""] + details
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
