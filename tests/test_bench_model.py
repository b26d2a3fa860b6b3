"""``ra bench --model gpt2`` (``lab/bench_model.py``, ``lab/bench_model_cli.py``) on CPU at a tiny size: the record contract the README and
``benchmarks/results/<card>/model.json`` rely on, the paired timing, decoding, and its user errors."""

import functools
import json

import pytest

from reciprocal_attention.lab import bench_model as bm
from reciprocal_attention.lab import bench_model_cli as bmc
from reciprocal_attention.lab import bench_model_report as bmr
from reciprocal_attention.lab import cli

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 96}
FIELDS = ("model", "preset", "mode", "B", "T", "ms_median", "ratio_vs_baseline", "peak_mem_bytes", "device",
          "torch", "triton")


def test_records_have_the_contract_fields():
    cfg = bm.ModelBenchConfig(presets=("standard", "ra", "hf-gpt2"), modes=("eager",), shapes=((2, 16),),
                              rounds=2, steps=1, warmup=1, decode_batches=(1, 2), decode_tokens=4, device="cpu",
                              overrides=TINY)
    records = bm.run_model_bench(cfg, log=lambda s: None)
    steps = [r for r in records if r["kind"] == "train_step"]
    dec = [r for r in records if r["kind"] == "decode"]
    assert [(r["model"], r["preset"]) for r in steps] == [("gpt2", "ra"), ("hf-gpt2", "low_rank")]
    assert sorted((r["model"], r["B"]) for r in dec) == [("gpt2", 1), ("gpt2", 2), ("hf-gpt2", 1), ("hf-gpt2", 2)]
    for r in records:
        assert all(k in r for k in FIELDS), sorted(set(FIELDS) - set(r))
        assert r["device"] == "cpu" and r["ms_median"] > 0 and r["ratio_vs_baseline"] > 0
    for r in steps:
        assert (r["B"], r["T"], r["mode"]) == (2, 16, "eager")
        assert r["ratio_min"] <= r["ratio_vs_baseline"] <= r["ratio_max"]
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["ms_median"] / 1e3))
    for r in dec:
        assert r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0
        assert r["ratio_min"] <= r["ratio_vs_baseline"] <= r["ratio_max"] and r["rounds"] == 5
    md = bmr.render_markdown(records)
    assert md.count("| gpt2 | ra | eager | 2 x 16 |") == 1 and "decoding" in md
    json.dumps(records, allow_nan=False)


def test_time_pair_alternates_and_pairs_rounds():
    """Round r times (base, arm) for even r and (arm, base) for odd r; the ratio is the median of per-round
    ratios, not the ratio of medians."""
    calls = []

    class Fake:
        def __init__(self, name, ms):
            self.name, self.ms, self.device = name, list(ms), bm.torch.device("cpu")

    base, arm = Fake("base", [10, 10, 10]), Fake("arm", [11, 30, 12])

    def fake_time(a, batch, steps):
        calls.append(a.name)
        return a.ms.pop(0)

    orig = bm._time_steps
    bm._time_steps = fake_time
    try:
        cfg = bm.ModelBenchConfig(rounds=3, device="cpu")
        rec = bm.time_pair(cfg, base, arm, (bm.torch.zeros(2, 4), None))
    finally:
        bm._time_steps = orig
    assert calls == ["base", "arm", "arm", "base", "base", "arm"]
    assert rec["ratio_vs_baseline"] == pytest.approx(1.2) and rec["ratio_max"] == pytest.approx(3.0)


@pytest.mark.parametrize("argv,match", [
    (["--model-presets", "ra,nope"], "--model-presets"),
    (["--model-modes", "jit"], "--model-modes"),
    (["--model-shapes", "8by1024"], "--model-shapes"),
    (["--model-modes", "compile", "--device", "cpu"], "CUDA only"),
    (["--model-presets", "ra+turbo"], "--model-presets"),
    (["--model-presets", "standard+pytorch-fold"], "--model-presets"),
])
def test_user_errors(capsys, argv, match):
    try:
        code = cli.main(["bench", "--model", "gpt2", "--no-progress", *argv])
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("ra: error:") and match in err[0], err


def test_cli_writes_results(tmp_path, capsys, monkeypatch):
    """The CLI path end to end on CPU (a tiny GPT-2, one tiny shape): model.json / .md / .png under ``--out``."""
    monkeypatch.setattr(bmc, "ModelBenchConfig", functools.partial(bm.ModelBenchConfig, overrides=TINY))
    code = cli.main(["bench", "--model", "gpt2", "--device", "cpu", "--model-modes", "eager", "--model-presets", "ra",
                     "--model-shapes", "1x8", "--model-rounds", "1", "--no-decode", "--no-progress",
                     "--out", str(tmp_path)])
    assert code == 0
    records = json.loads((tmp_path / "model.json").read_text())
    assert [(r["model"], r["preset"], r["mode"], r["B"], r["T"]) for r in records] == [("gpt2", "ra", "eager", 1, 8)]
    assert (tmp_path / "model.png").stat().st_size > 0 and "| gpt2 | ra | eager | 1 x 8 |" in \
        (tmp_path / "model.md").read_text()


def test_merge_replaces_only_what_is_measured_again():
    def rec(preset, mode, ms, kind="train_step"):
        return {"kind": kind, "model": "gpt2", "preset": preset, "mode": mode, "B": 8, "T": 1024, "ms_median": ms}

    old = [rec("ra", "eager", 1.0), rec("ra", "compile", 2.0), rec("full", "eager", 3.0)]
    new = [rec("ra", "compile", 20.0), rec("seed", "eager", 4.0)]
    got = bmr.merge_records(old, new)
    assert [(r["preset"], r["mode"], r["ms_median"]) for r in got] == [
        ("ra", "eager", 1.0), ("ra", "compile", 20.0), ("full", "eager", 3.0), ("seed", "eager", 4.0)]


def test_cli_merge_keeps_other_records(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bmc, "ModelBenchConfig", functools.partial(bm.ModelBenchConfig, overrides=TINY))
    kept = {"kind": "train_step", "model": "gpt2", "preset": "full", "mode": "compile", "B": 8, "T": 1024,
            "ms_median": 1.0, "ratio_vs_baseline": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "peak_mem_bytes": None,
            "device": "cpu", "torch": "x", "triton": "y"}
    (tmp_path / "model.json").write_text(json.dumps([kept]))
    argv = ["bench", "--model", "gpt2", "--device", "cpu", "--model-modes", "eager", "--model-presets", "ra",
            "--model-shapes", "1x8", "--model-rounds", "1", "--no-decode", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv + ["--model-merge"]) == 0
    records = json.loads((tmp_path / "model.json").read_text())
    assert [(r["preset"], r["mode"]) for r in records] == [("full", "compile"), ("ra", "eager")]
    (tmp_path / "model.json").write_text("{not json")
    try:
        code = cli.main(argv + ["--model-merge"])
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and "--model-merge" in err[-1], err


def test_profile_model_report_leaves_out_gpu_annotations_and_counts_launches():
    """tools/profile_model.py: a GPU-side annotation (``Optimizer.step#AdamW.step``) spans gaps and its kernels are
    counted by name, so it is not in the totals; the host table counts the kernel launches per step."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "tools" / "profile_model.py"
    spec = importlib.util.spec_from_file_location("profile_model", path)
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    timing = {"host_ms": 20.0, "wall_ms": 22.0, "unique_graphs": 1, "graph_breaks": 0, "recompiles": 0}
    data = {"device": "card", "torch": "t", "mode": "compile", "B": 8, "T": 1024, "steps": 3,
            "baseline_of": {"ra": "standard"},
            "us_per_step": {"ra": {"triton_poi_fused_add_3": 100.0, "Optimizer.step#AdamW.step": 900.0},
                            "standard": {"triton_poi_fused_add_7": 90.0, "Optimizer.step#AdamW.step": 500.0}},
            "runtime_per_step": {"ra": {"cuLaunchKernel": [10, 50.0], "cuLaunchKernelEx": [3, 20.0]},
                                 "standard": {"cuLaunchKernel": [12, 60.0], "cudaMemsetAsync": [1, 5.0]}},
            "timing": {"ra": timing, "standard": timing}}
    md = pm.render_markdown(data)
    assert "## ra vs standard: 100 us vs 90 us (1.111x)" in md
    assert "Optimizer.step" not in md.split("| kernel family |")[1]
    assert "| kernel launches | 13 | 12 |" in md
    assert pm.kernel_family("triton_poi_fused_add_3") == "triton_poi_fused_add"


def test_profile_model_host_ops_sum_per_step_by_family(tmp_path):
    """Host ops from a Chrome trace: per-step calls and inclusive microseconds, the compiled graphs' hashes and
    inductor's kernel indices dropped (the forward and backward graph calls are one row), GPU events left out."""
    import gzip
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "tools" / "profile_model.py"
    spec = importlib.util.spec_from_file_location("profile_model", path)
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    events = [{"ph": "X", "cat": "cpu_op", "name": "## Call CompiledFxGraph abc123 ##", "dur": 30.0},
              {"ph": "X", "cat": "cpu_op", "name": "## Call CompiledFxGraph def456 ##", "dur": 50.0},
              {"ph": "X", "cat": "cpu_op", "name": "Torch-Compiled Region: 0/1", "dur": 40.0},
              {"ph": "X", "cat": "cpu_op", "name": "triton_poi_fused_add_3", "dur": 4.0},
              {"ph": "X", "cat": "cpu_op", "name": "triton_poi_fused_add_12", "dur": 6.0},
              {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_add_3", "dur": 100.0}]
    trace = tmp_path / "trace_ra.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    ops = pm.host_ops(trace, steps=2)
    assert ops == {"## Call CompiledFxGraph ##": [1.0, 40.0], "Torch-Compiled Region": [0.5, 20.0],
                   "triton_poi_fused_add": [1.0, 5.0]}


def test_combine_processes_takes_medians_and_keeps_each_ratio():
    def rec(ratio, lo, hi, ms, preset="ra"):
        return {"kind": "train_step", "model": "gpt2", "preset": preset, "mode": "compile", "B": 8, "T": 1024,
                "ratio_vs_baseline": ratio, "ratio_min": lo, "ratio_max": hi, "ms_median": ms, "ms_min": ms - 1,
                "ms_max": ms + 1, "baseline_ms_median": 20.0, "peak_mem_bytes": None, "device": "card", "torch": "t",
                "triton": "t"}

    runs = [[rec(1.02, 1.01, 1.15, 22.5), rec(1.0, 1.0, 1.0, 1.0, "seed")],
            [rec(1.19, 0.98, 1.33, 26.2)], [rec(1.21, 1.11, 1.33, 27.8)]]
    ra, seed = bmr.combine_processes(runs)
    assert ra["ratio_vs_baseline"] == pytest.approx(1.19) and ra["process_ratios"] == [1.02, 1.19, 1.21]
    assert (ra["ratio_min"], ra["ratio_max"], ra["ms_min"], ra["ms_max"]) == (0.98, 1.33, 21.5, 28.8)
    assert ra["ms_median"] == pytest.approx(26.2) and ra["processes"] == 3 and ra["peak_mem_bytes"] is None
    assert seed["processes"] == 1 and seed["process_ratios"] == [1.0]
    md = bmr.render_markdown([ra, seed])
    assert "**1.190x** [0.980-1.330] (processes: 1.020, 1.190, 1.210)" in md and "(processes" not in \
        md.split("| seed |")[1]


def test_cli_model_processes_runs_fresh_processes_and_combines(tmp_path, capsys, monkeypatch):
    """--model-processes 2: the same benchmark in two child processes (their command checked; the children faked
    here, each writing a record), combined into one record with both ratios."""
    import subprocess
    from pathlib import Path

    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        ratio = 1.0 + 0.1 * len(seen)
        out.joinpath("model.json").write_text(json.dumps([{
            "kind": "train_step", "model": "gpt2", "preset": "ra", "mode": "eager", "B": 1, "T": 8, "ms_median": 2.0,
            "ratio_vs_baseline": ratio, "ratio_min": ratio, "ratio_max": ratio, "peak_mem_bytes": None,
            "device": "cpu", "torch": "x", "triton": "y"}]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    code = cli.main(["bench", "--model", "gpt2", "--device", "cpu", "--model-modes", "eager", "--model-presets", "ra",
                     "--model-shapes", "1x8", "--model-rounds", "3", "--no-decode", "--no-progress",
                     "--model-processes", "2", "--out", str(tmp_path)])
    assert code == 0 and len(seen) == 2
    assert seen[0][1:5] == ["-m", "reciprocal_attention.lab.cli", "bench", "--model"]
    assert "--model-processes" not in seen[0] and seen[0][seen[0].index("--model-rounds") + 1] == "3"
    [rec] = json.loads((tmp_path / "model.json").read_text())
    assert rec["process_ratios"] == [1.1, 1.2] and rec["ratio_vs_baseline"] == pytest.approx(1.15)
    try:
        code = cli.main(["bench", "--model", "gpt2", "--device", "cpu", "--model-modes", "eager",
                         "--model-processes", "0", "--no-progress"])
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and "--model-processes" in err[-1], err


def test_variant_arm_sets_the_choice_on_every_layer():
    """``ra+pytorch-fold``: the ``ra`` model with ``traced_fold="pytorch"`` on every attention layer, timed under its
    own name against the same baseline."""
    from reciprocal_attention import ReciprocalAttention

    cfg = bm.ModelBenchConfig(device="cpu", overrides=TINY)
    model = bm._gpt(cfg, "ra+pytorch-fold", 16, bm.torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, ReciprocalAttention)]
    assert len(layers) == 2 and all(m.traced_fold == "pytorch" and m.variant == "same_flop" for m in layers)
    assert all(m.traced_fold == "triton" for m in bm._gpt(cfg, "ra", 16, bm.torch.device("cpu")).modules()
               if isinstance(m, ReciprocalAttention))
    # eagerly the variant is its preset's model: not timed twice, and the log says so
    cfg = bm.ModelBenchConfig(presets=("ra", "ra+pytorch-fold"), modes=("eager",), shapes=((1, 8),), rounds=1,
                              steps=1, warmup=1, decode_batches=(), device="cpu", overrides=TINY)
    lines = []
    [rec] = bm.run_model_bench(cfg, log=lines.append)
    assert rec["preset"] == "ra" and rec["ratio_vs_baseline"] > 0
    assert "  eager: skipping ra+pytorch-fold (the same eager model as its preset)" in lines


def test_static_launch_arms_run_in_child_processes_with_their_environment(monkeypatch):
    """``ra+static-launch``: a process-wide inductor setting, so the arm runs in child processes started with the
    variant's environment (compiled modes only, no decoding), which time it under its own name against their own
    baseline; the processes' ratios are combined."""
    import argparse
    import subprocess
    from pathlib import Path

    seen = []

    def fake_run(cmd, env=None, **kw):
        seen.append((cmd, env))
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        ratio = 1.0 + 0.01 * len(seen)
        out.joinpath("model.json").write_text(json.dumps([{
            "kind": "train_step", "model": "gpt2", "preset": "ra+static-launch", "mode": "compile", "B": 8, "T": 1024,
            "ms_median": 2.0, "ratio_vs_baseline": ratio, "ratio_min": ratio, "ratio_max": ratio,
            "peak_mem_bytes": None, "device": "cuda", "torch": "x", "triton": "y"}]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = argparse.Namespace(model="gpt2", model_shapes="8x1024", model_rounds=5)
    recs = bmc._process_variant_records(args, "cuda", 2, ("ra+static-launch",), ("eager", "compile"))
    assert len(seen) == 2
    for cmd, env in seen:
        assert cmd[cmd.index("--model-presets") + 1] == "ra+static-launch"
        assert cmd[cmd.index("--model-modes") + 1] == "compile" and "--no-decode" in cmd
        assert env["TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"] == "1"
    [rec] = recs
    assert rec["preset"] == "ra+static-launch" and rec["process_ratios"] == [1.01, 1.02]
    lines = []  # eager only: nothing to time, and the log says so
    assert bmc._process_variant_records(args, "cuda", 1, ("ra+static-launch",), ("eager",), log=lines.append) == []
    assert lines == ["  eager: skipping ra+static-launch (the same eager model as its preset)"] and len(seen) == 2


def test_static_launch_arm_is_never_the_plain_preset_under_its_name(monkeypatch):
    """Built in a process without the variant's environment (or where inductor's setting is off), ``ra+static-launch``
    raises instead of timing ``ra`` under its name; in a process that has both it is the ``ra`` model, and that
    process refuses to compile a plain RA arm (it would run with the setting too)."""
    import torch._inductor.config as inductor_config

    from reciprocal_attention.lab.errors import UserError

    cfg = bm.ModelBenchConfig(device="cpu", overrides=TINY)
    monkeypatch.delenv("TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS", raising=False)
    with pytest.raises(RuntimeError, match="TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1"):
        bm._gpt(cfg, "ra+static-launch", 16, bm.torch.device("cpu"))
    bmc._check_process_variants(("ra", "ra+static-launch"), ("compile",))  # nothing set: the child runs the variant
    monkeypatch.setenv("TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS", "1")
    monkeypatch.setattr(inductor_config, "static_launch_user_defined_triton_kernels", False)
    with pytest.raises(RuntimeError, match="static_launch_user_defined_triton_kernels"):
        bm._gpt(cfg, "ra+static-launch", 16, bm.torch.device("cpu"))
    monkeypatch.setattr(inductor_config, "static_launch_user_defined_triton_kernels", True)
    model = bm._gpt(cfg, "ra+static-launch", 16, bm.torch.device("cpu"))
    assert {type(m).__name__ for m in model.modules()} >= {"ReciprocalAttention"}
    with pytest.raises(UserError, match="name them ra\\+static-launch"):
        bmc._check_process_variants(("standard", "ra", "ra+static-launch"), ("compile",))
    bmc._check_process_variants(("standard", "ra+static-launch"), ("compile",))
    bmc._check_process_variants(("ra",), ("eager",))  # eager steps launch no inductor kernels
    with pytest.raises(UserError, match="standard\\+static-launch"):  # the variant of the baseline is no arm
        bmc._arms("standard+static-launch")


def test_cli_times_the_plain_arms_here_and_skips_the_process_variant_eagerly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bmc, "ModelBenchConfig", functools.partial(bm.ModelBenchConfig, overrides=TINY))
    monkeypatch.delenv("TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS", raising=False)
    code = cli.main(["bench", "--model", "gpt2", "--device", "cpu", "--model-modes", "eager", "--model-presets",
                     "ra,ra+static-launch", "--model-shapes", "1x8", "--model-rounds", "1", "--no-decode",
                     "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    assert [r["preset"] for r in json.loads((tmp_path / "model.json").read_text())] == ["ra"]
    assert "skipping ra+static-launch" in capsys.readouterr().out
