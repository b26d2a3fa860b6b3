"""Kernel-by-kernel profile of the whole GPT-2 training step, RA against the baseline (torch.profiler, CUDA).

    python tools/profile_model.py OUT_DIR [--presets ra,ra_disc_channel,hf-gpt2] [--mode compile] [--shape 8x1024]

Writes ``OUT_DIR/profile_model.md`` (per preset: GPU time per kernel name, summed over the profiled steps, and the
difference to the baseline; where the step's wall time goes: host time to enqueue one step, the step's wall time
after a synchronisation, the CUDA runtime calls per step, and dynamo's graph and recompile counts),
``profile_model.json``, and gzipped Chrome traces ``trace_<preset>.json.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from reciprocal_attention.lab.bench_model import ModelBenchConfig, _Arm, _batch, _gpt, _hf


def host_and_wall(arm: _Arm, batch, steps: int = 10) -> dict[str, float]:
    """Median milliseconds per step of the host's work to enqueue it (``step()`` returning, from an idle GPU) and
    of its wall time to completion. Host close to wall: the step is host-bound or waits on the GPU inside."""
    host, wall = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        arm.step(*batch)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return {"host_ms": statistics.median(host), "wall_ms": statistics.median(wall)}


def dynamo_counts() -> dict[str, int]:
    """Graphs compiled, graph breaks and recompilations dynamo counted since the last reset."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": int(sum(v for k, v in counters["recompiles"].items()))}


def is_annotation(ev) -> bool:
    """A GPU-side user annotation (``Optimizer.step#AdamW.step``, ``ProfilerStep#3``): its "device time" spans its
    kernels and the gaps between them, and its kernels are counted under their own names already."""
    name = ev if isinstance(ev, str) else ev.key
    return bool(getattr(ev, "is_user_annotation", False)) or "#" in name


def kernel_times(arm: _Arm, batch, steps: int, trace: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    """GPU microseconds per kernel name, and ``[calls, host us]`` per CUDA runtime/driver call, per step."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            arm.step(*batch)
        torch.cuda.synchronize()
    raw = trace.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    out: dict[str, float] = {}
    runtime: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if ev.device_type == torch.autograd.DeviceType.CUDA and us and not is_annotation(ev):
            out[ev.key] = out.get(ev.key, 0.0) + us / steps
        elif ev.device_type == torch.autograd.DeviceType.CPU and re.match(r"cu[A-Z]|cuda[A-Z]", ev.key):
            runtime[ev.key] = [ev.count / steps, ev.cpu_time_total / steps]
    return out, runtime


def host_ops(trace: Path, steps: int) -> dict[str, list[float]]:
    """``[calls, inclusive host us]`` per step of every CPU-side op of a gzipped Chrome trace (aten ops, autograd
    nodes such as ``AccumulateGrad``, the compiled graphs' calls, Triton launches): where a host-bound step's
    enqueue time goes."""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    out: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("ph") == "X" and ev.get("cat") in ("cpu_op", "user_annotation"):
            name = re.sub(r"CompiledFxGraph \w+", "CompiledFxGraph", ev["name"])  # forward and backward graphs
            name = kernel_family(re.sub(r"Torch-Compiled Region: [\d/]+", "Torch-Compiled Region", name))
            row = out.setdefault(name, [0.0, 0.0])
            row[0] += 1.0 / steps
            row[1] += ev.get("dur", 0.0) / steps
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--presets", default="ra,ra_disc_channel,hf-gpt2",
                    help="comma list of RA presets (and hf-gpt2: its convert_gpt2 conversion vs transformers' GPT-2)")
    ap.add_argument("--mode", default="compile", choices=("eager", "compile", "compile-cudagraphs"))
    ap.add_argument("--shape", default="8x1024", help="BxT")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per model")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="write profile_model.md to OUT from an existing profile_model.json (no GPU needed)")
    args = ap.parse_args(argv)
    if args.render is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        data = json.loads(args.render.read_text())
        for arm in data["us_per_step"]:  # host ops from the traces beside the JSON when it predates them
            trace = args.render.parent / f"trace_{arm}.json.gz"
            if trace.exists() and arm not in data.setdefault("host_ops_per_step", {}):
                data["host_ops_per_step"][arm] = host_ops(trace, data.get("steps", 3))
        (args.out / "profile_model.json").write_text(json.dumps(data, indent=1))
        (args.out / "profile_model.md").write_text(render_markdown(data))
        return 0
    if not torch.cuda.is_available():
        print("profile_model: needs CUDA", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    B, T = (int(n) for n in args.shape.split("x"))
    dev = torch.device("cuda")
    cfg = ModelBenchConfig(device="cuda")
    batch = _batch(B, T, 50257, dev)
    torch._dynamo.config.recompile_limit = 64
    result: dict[str, dict[str, float]] = {}
    runtime: dict[str, dict[str, list[float]]] = {}
    timing: dict[str, dict[str, float]] = {}
    host: dict[str, dict[str, list[float]]] = {}
    presets = args.presets.split(",")
    # hf-gpt2: transformers' GPT2LMHeadModel (sdpa) against its convert_gpt2 conversion
    names = ["standard"] * any(p != "hf-gpt2" for p in presets) + ["hf-gpt2-baseline"] * ("hf-gpt2" in presets)
    baseline_of = {p: "hf-gpt2-baseline" if p == "hf-gpt2" else "standard" for p in presets}
    for name in names + presets:
        if name.startswith("hf-gpt2"):
            arm = _Arm(_hf(cfg, name == "hf-gpt2", T, dev), True, args.mode, dev, 50257)
        else:
            arm = _Arm(_gpt(cfg, name, T, dev), False, args.mode, dev, 50257)
        torch._dynamo.utils.counters.clear()
        for _ in range(5):
            arm.step(*batch)
        timing[name] = {**host_and_wall(arm, batch), **dynamo_counts()}
        result[name], runtime[name] = kernel_times(arm, batch, args.steps, args.out / f"trace_{name}.json.gz")
        host[name] = host_ops(args.out / f"trace_{name}.json.gz", args.steps)
        del arm
        torch.cuda.empty_cache()
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "mode": args.mode, "B": B, "T": T,
            "steps": args.steps, "baseline_of": baseline_of, "us_per_step": result, "runtime_per_step": runtime,
            "timing": timing, "host_ops_per_step": host}
    (args.out / "profile_model.json").write_text(json.dumps(data, indent=1))
    md = render_markdown(data)
    (args.out / "profile_model.md").write_text(md)
    print(md[:6000])
    return 0


def kernel_family(name: str) -> str:
    """A kernel's name without what varies between two compiled graphs of the same work: inductor's trailing
    index (``triton_poi_fused_gelu_view_9`` and ``..._10`` are the same GELU) and argument lists."""
    return re.sub(r"_\d+$", "", name.split("(")[0].strip())


def render_markdown(data: dict) -> str:
    """Per arm: total GPU time per step against its baseline, then kernel families by the difference."""
    lines = [f"# Kernel time per training step: GPT-2 small, {data['mode']}, B x T = {data['B']} x {data['T']}", "",
             f"{data['device']}, torch {data['torch']}. GPU microseconds per step, summed by kernel family (name "
             f"without inductor's index) over {data.get('steps', 3)} profiled steps (`tools/profile_model.py`; "
             f"Chrome traces `trace_<arm>.json.gz`); GPU-side annotations such as `Optimizer.step#AdamW.step` are "
             f"left out (they span gaps, and their kernels are counted by name).", ""]
    fam = {arm: {} for arm in data["us_per_step"]}
    for arm, times in data["us_per_step"].items():
        for k, us in times.items():
            if not is_annotation(k):
                fam[arm][kernel_family(k)] = fam[arm].get(kernel_family(k), 0.0) + us
    for arm, base_name in data["baseline_of"].items():
        times, base = fam[arm], fam[base_name]
        tot, btot = sum(times.values()), sum(base.values())
        lines += [f"## {arm} vs {base_name}: {tot:.0f} us vs {btot:.0f} us ({tot / btot:.3f}x)", ""]
        lines += _host_lines(data, arm, base_name)
        lines += ["",
                  "| kernel family | RA us | baseline us | difference |", "|---|---|---|---|"]
        names = sorted(set(times) | set(base), key=lambda k: -abs(times.get(k, 0.0) - base.get(k, 0.0)))
        for k in names[:20]:
            lines.append(f"| `{k[:100]}` | {times.get(k, 0.0):.1f} | {base.get(k, 0.0):.1f} | "
                         f"{times.get(k, 0.0) - base.get(k, 0.0):+.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _host_lines(data: dict, arm: str, base_name: str) -> list[str]:
    """Where the wall time goes, RA against its baseline: host enqueue and wall time per step, dynamo's counts, and
    the CUDA runtime calls whose count or host time differ."""
    timing = data.get("timing", {})
    if arm not in timing or base_name not in timing:
        return []
    t, b = timing[arm], timing[base_name]
    lines = ["| per step | RA | baseline |", "|---|---|---|"]
    for key, unit in (("host_ms", "ms"), ("wall_ms", "ms"), ("unique_graphs", ""), ("graph_breaks", ""),
                      ("recompiles", "")):
        lines.append(f"| {key.replace('_ms', '')}{' ' + unit if unit else ''} | {t[key]:.3g} | {b[key]:.3g} |")
    rt, brt = data.get("runtime_per_step", {}).get(arm, {}), data.get("runtime_per_step", {}).get(base_name, {})

    def launches(calls: dict[str, list[float]]) -> float:
        return sum(v[0] for k, v in calls.items() if "LaunchKernel" in k)

    lines.append(f"| kernel launches | {launches(rt):.0f} | {launches(brt):.0f} |")
    lines += ["", "| CUDA runtime call | RA calls | baseline calls | RA host us | baseline host us |",
              "|---|---|---|---|---|"]
    for k in sorted(set(rt) | set(brt), key=lambda k: -abs(rt.get(k, [0, 0])[1] - brt.get(k, [0, 0])[1])):
        r, q = rt.get(k, [0.0, 0.0]), brt.get(k, [0.0, 0.0])
        lines.append(f"| `{k}` | {r[0]:.1f} | {q[0]:.1f} | {r[1]:.0f} | {q[1]:.0f} |")
    ho, bho = data.get("host_ops_per_step", {}).get(arm), data.get("host_ops_per_step", {}).get(base_name)
    if ho and bho:
        lines += ["", "Host (CPU) ops per step whose inclusive host time differs most (nested ops are counted in "
                  "their parents too; under the profiler, whose own overhead inflates short ops):", "",
                  "| host op | RA calls | baseline calls | RA host us | baseline host us | difference |",
                  "|---|---|---|---|---|---|"]
        for k in sorted(set(ho) | set(bho), key=lambda k: -abs(ho.get(k, [0, 0])[1] - bho.get(k, [0, 0])[1]))[:15]:
            r, q = ho.get(k, [0.0, 0.0]), bho.get(k, [0.0, 0.0])
            lines.append(f"| `{k[:90]}` | {r[0]:.1f} | {q[0]:.1f} | {r[1]:.0f} | {q[1]:.0f} | {r[1] - q[1]:+.0f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
