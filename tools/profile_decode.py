"""Host time of KV-cache decoding (greedy, bf16 autocast, GPT-2 small): where each model spends its time per
token, for the project's GPT (``standard`` vs ``ra``) and transformers' GPT-2 vs its ``convert_gpt2`` conversion.

    python tools/profile_decode.py OUT_DIR [--tokens 128] [--batch 1]

Decoding GPT-2 small is bound by host time (one token is ~150 small kernels), so the Python and dispatch cost of a
layer is what its tokens/s ratio measures. Writes ``OUT_DIR/profile_decode.md``: ms per token of each model and the
top functions by own time (cProfile), with the aten op count per token (torch.profiler).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

from reciprocal_attention.lab.bench_model import ModelBenchConfig, _decode_tokens_per_s, _gpt, _hf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelBenchConfig(device=dev.type)
    models = {"gpt2/standard": (_gpt(cfg, "standard", 1024, dev), False),
              "gpt2/ra": (_gpt(cfg, "ra", 1024, dev), False),
              "hf-gpt2/baseline": (_hf(cfg, False, 1024, dev), True),
              "hf-gpt2/low_rank": (_hf(cfg, True, 1024, dev), True)}
    lines = [f"# Decoding host profile: greedy, B={args.batch}, {args.tokens} new tokens, bf16 autocast", "",
             f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}.", ""]
    for name, (model, hf) in models.items():
        for _ in range(2):
            _decode_tokens_per_s(model, hf, args.batch, 8, dev, 50257)
        t0 = time.perf_counter()
        tps = _decode_tokens_per_s(model, hf, args.batch, args.tokens, dev, 50257)
        wall = time.perf_counter() - t0
        pr = cProfile.Profile()
        pr.enable()
        _decode_tokens_per_s(model, hf, args.batch, args.tokens, dev, 50257)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _decode_tokens_per_s(model, hf, args.batch, 16, dev, 50257)
        n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        lines += [f"## {name}: {1e3 * args.batch / tps:.3f} ms/token ({tps:.0f} tokens/s, {wall:.1f} s), "
                  f"~{n_ops / 16:.0f} aten ops per token (incl. nested)", "", "```",
                  buf.getvalue().strip()[-4000:], "```", ""]
        print(lines[-5], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
