"""The benchmark harness on CPU: it runs, records every required key, computes ratios and writes its reports; its
command line refuses what it cannot honour; the reports and plots say what they show."""

import json

import pytest
import torch

from reciprocal_attention.lab import bench, bench_arms, bench_cli, bench_report, timing
from reciprocal_attention.lab.errors import UserError

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the command line")

REQUIRED = {"impl", "variant", "heads_pct", "B", "T", "C", "H", "pass", "mode", "ms_median", "ms_min", "ms_max",
            "ratio_vs_baseline", "peak_mem_bytes", "device", "torch", "triton"}


def test_cpu_bench_writes_records_and_reports(tmp_path, capsys):
    rc = bench_cli.main(["--out", str(tmp_path), "--repeats", "1", "--inner", "1", "--groups", "core,evolution",
                     "--shapes", "1x16", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "For comparison: the committed GPU results" in out
    records = json.loads((tmp_path / "bench.json").read_text())
    assert records and all(REQUIRED <= set(r) for r in records)
    ok = [r for r in records if r["ms_median"] is not None]
    assert {r["impl"] for r in ok} >= {"baseline_flash", "ra_fast", "seed_as_ran", "open_coded", "full_sdpa",
                                       "low_rank_fold", "same_flop_act_fold"}
    assert not [r for r in records if r.get("error")], [r["error"] for r in records if r.get("error")]
    for r in ok:
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        if r["impl"] == "baseline_flash":
            assert r["ratio_vs_baseline"] == 1.0
        else:
            assert r["ratio_vs_baseline"] > 0
            # eager rows are timed in alternating rounds with their baseline; the ratio is the paired one
            assert r["mode"] != "eager" or r["ratio_vs_baseline"] == r["ratio_paired"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "CPU timings are not a result" in md and "Full Results" not in md and " ms" not in md
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_plan_keeps_full_matrix_at_one_shape():
    cfg = bench.BenchConfig()
    jobs = bench._plan(cfg, bench.default_arms(cfg.groups))
    full = [j for j in jobs if (j[1], j[2]) == (8, 1024) and j[3] == 768]
    assert {j[6] for j in full} == {"eager", "graph", "compile"}
    assert {j[0].impl for j in full if j[6] == "compile"} == {"baseline_cudnn", "ra_fast"}
    assert {j[5] for j in full} == {"fwd", "fwd+bwd", "step"}
    assert any(j[2] == 8192 for j in jobs) and any(j[3] == 1280 for j in jobs)
    # an arm that syncs the host is never planned in graph mode
    assert not [j for j in jobs if j[0].syncs_host and j[6] == "graph"]


def test_peer_arms_compute_the_module_function():
    """Every benchmark arm is the same function as the module it wraps (float64), so timings compare like with like."""
    import torch

    from reciprocal_attention.attention import ReciprocalAttention

    torch.manual_seed(0)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    disc = ReciprocalAttention.from_preset("ra_disc", n_embd=64, n_head=4, block_size=16).double()
    with torch.no_grad():
        disc.d_bias.normal_()
    assert torch.allclose(bench_arms.MaskBiasBlock(disc)(x), disc(x), atol=1e-12)
    plain = ReciprocalAttention.from_preset("ra", n_embd=64, n_head=4, block_size=16).double()
    assert torch.allclose(bench_arms.ActivationFoldBlock(plain)(x), plain(x), atol=1e-12)
    for pct in (100, 50, 25):
        seed = bench_arms._seed_routed(pct)(64, 4, 16, False).double()
        assert torch.allclose(bench_arms.SeedBlock(seed)(x), seed(x), atol=1e-12)


def test_arms_filter_keeps_baselines_and_cleans_partial(tmp_path):
    """--arms runs only the named impls plus the baselines (their ratios need them); the per-record partial file
    that survives a cut run is removed once the full results are written."""
    rc = bench_cli.main(["--out", str(tmp_path), "--repeats", "1", "--inner", "1", "--groups", "core,kernels",
                     "--arms", "ra_fast,channel_bias", "--shapes", "1x16", "--widths", "", "--no-progress"])
    assert rc == 0
    records = json.loads((tmp_path / "bench.json").read_text())
    assert {r["impl"] for r in records} == {"baseline_flash", "ra_fast", "channel_bias"}
    assert not [r for r in records if r.get("error")], [r["error"] for r in records if r.get("error")]
    assert not (tmp_path / "bench.partial.json").exists()


def test_paired_timing_alternates_and_enters_each_context():
    """Timer.measure_paired: both callables timed every round, the order flipping, each block inside a fresh
    context (SDPA backend contexts are single-use generators)."""
    import contextlib

    import torch

    order, entered = [], []

    @contextlib.contextmanager
    def ctx(name):
        entered.append(name)
        yield

    timer = timing.Timer(torch.device("cpu"), warmup=1, repeats=4, inner=2)
    ta, tb = timer.measure_paired((lambda: order.append("a"), lambda: ctx("a")),
                                  (lambda: order.append("b"), lambda: ctx("b")))
    assert len(ta) == len(tb) == 4 and all(t > 0 for t in ta + tb)
    assert order == ["a", "b"] + ["a", "a", "b", "b", "b", "b", "a", "a"] * 2
    assert entered == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------

def _rec(impl, pass_, ratio, device="cpu (x86_64)", mode="eager", T=64, C=64, **kw):
    r = {"impl": impl, "variant": "same_flop", "heads_pct": 100, "B": 2, "T": T, "C": C, "H": 4, "pass": pass_,
         "mode": mode, "sdpa": "flash", "baseline_impl": "baseline_flash", "precision": "fp32", "bias": True,
         "note": "", "device": device, "torch": "2.x", "triton": "3.x", "cuda": "none", "ms_median": 1.0,
         "ms_min": 0.9, "ms_max": 1.2, "ratio_vs_baseline": ratio}
    if not impl.startswith("baseline"):
        r.update(ratio_paired=ratio, ratio_paired_min=ratio - 0.1, ratio_paired_max=ratio + 0.2)
    return {**r, **kw}


def test_cpu_report_shows_paired_ratios_only():
    records = [_rec("baseline_flash", p, 1.0) for p in bench.PASSES] + \
              [_rec("ra_fast", p, r) for p, r in zip(bench.PASSES, (1.17, 1.3, 0.9))]
    md = bench_report.markdown_report(records)
    assert "CPU timings are not a result" in md
    assert "| ra_fast | flash | 2 x 64 | 64 | 1.17x (1.07-1.37) | 1.30x (1.20-1.50) | 0.90x (0.80-1.10) |" in md
    assert "baseline_flash |" not in md  # no unpaired baseline milliseconds beside the ratios
    assert "GPU" not in md and "Ratio vs T" not in md and "Full Results" not in md


def test_gpu_report_prints_no_empty_table():
    dev = "NVIDIA H100"
    eager = [_rec(i, p, r, device=dev) for i, r in (("baseline_flash", 1.0), ("ra_fast", 1.05)) for p in bench.PASSES]
    md = bench_report.markdown_report(eager)
    assert "Full Results" in md and "eager fwd+bwd" in md
    assert "Ratio vs T and width" not in md and "graph fwd" not in md and "CUDA-graph" not in md
    graph = eager + [_rec(i, p, r, device=dev, mode="graph") for i, r in (("baseline_flash", 1.0), ("ra_fast", 1.02))
                     for p in bench.PASSES]
    md = bench_report.markdown_report(graph)
    assert "| ra_fast | flash | 2 x 64 | 64 | 1.020 | 1.020 | 1.020 |" in md


def test_committed_gpu_table(tmp_path, monkeypatch):
    path = tmp_path / "benchmarks" / "results" / "card" / "bench.json"
    path.parent.mkdir(parents=True)
    dev = "NVIDIA Test Card"
    path.write_text(json.dumps([_rec("ra_fast", p, 1.01, device=dev, mode="graph", T=1024, C=768)
                                for p in bench.PASSES] + [_rec("seed_as_ran", "fwd", 4.5, device=dev, C=768)]))
    assert bench_report.find_committed_results([tmp_path / "nowhere", tmp_path]) == path
    table = bench_report.committed_gpu_table({"ra_fast", "seed_as_ran", "baseline_flash"}, path)
    assert "NVIDIA Test Card" in table
    assert "| ra_fast | flash | 2 x 1024 | graph | 1.010x | 1.010x | 1.010x |" in table
    assert "| seed_as_ran | flash | 2 x 64 | eager | 4.500x | - | - |" in table  # no graph rows: eager shown
    assert bench_report.find_committed_results([tmp_path / "nowhere"]) is None
    monkeypatch.setattr(bench_report, "find_committed_results", lambda roots=None: None)
    assert "No committed GPU results found" in bench_report.committed_gpu_table({"ra_fast"})
    (tmp_path / "bad.json").write_text("{")
    assert "could not be read" in bench_report.committed_gpu_table({"ra_fast"}, tmp_path / "bad.json")
    assert "no rows for" in bench_report.committed_gpu_table({"open_coded"}, path)


def test_ratio_plot_is_linear_around_one_with_labelled_bars():
    records = [_rec("ra_fast", p, r) for p, r in zip(bench.PASSES, (0.97, 1.02, 1.10))] + \
              [_rec("open_coded", p, 17.0) for p in bench.PASSES]
    fig = bench_report.ratio_figure(records)
    try:
        for ax in fig.axes:
            assert ax.get_xscale() == "linear"
            lo, hi = ax.get_xlim()
            assert lo < 0.97 and 1.10 < hi < 2 * bench_report.CLIP  # the long bar is clipped, not the scale
            fig.canvas.draw()
            ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert ticks and all(t.endswith("x") and "10^" not in t for t in ticks)
            labels = {t.get_text() for t in ax.texts}
            assert "17.00x \u2192" in labels and any(t in labels for t in ("0.97x", "1.02x", "1.10x"))
        assert "hatched bars run past 3x" in fig._suptitle.get_text()
        assert "CPU: not a result" in fig._suptitle.get_text()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Command line: nothing silently ignored, every option explained
# ----------------------------------------------------------------------------------------------------------------

def test_every_option_has_help():
    from reciprocal_attention.lab import compare

    for parser in (bench_cli.build_parser(), compare.build_parser()):
        missing = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
        assert not missing, f"{parser.prog}: options without help {missing}"


@pytest.mark.parametrize("argv,match", [
    (["--arms", "nonsense"], r"--arms: unknown value\(s\) nonsense; valid: .*ra_fast"),
    (["--groups", "core", "--arms", "triton_bias"], r"triton_bias is in group 'kernels'"),
    (["--groups", "bogus"], r"--groups: unknown value\(s\) bogus; valid: core, heads, evolution, kernels"),
    (["--passes", "fwd,back"], r"--passes: unknown value\(s\) back"),
    (["--shapes", "8by1024"], r"--shapes: expected BxT"),
    (["--widths", "100/3"], r"multiple of the heads"),
    (["--repeats", "0"], r"--repeats: expected an integer >= 1"),
    (["--device", "tpu"], r"--device: expected cpu, cuda or cuda:N"),
])
def test_bench_refuses_bad_options(argv, match, tmp_path):
    with pytest.raises(UserError, match=match):
        bench_cli.main(argv + ["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before any timing


@cpu_only
@pytest.mark.parametrize("argv,match", [
    (["--modes", "graph"], r"--modes graph: .*CUDA only"),
    (["--modes", "eager,compile"], r"CUDA only"),
    (["--precision", "bf16"], r"--precision bf16: a CPU runs fp32"),
    (["--arms", "triton_bias"], r"triton_bias need\(s\) CUDA"),
    (["--device", "cuda"], r"no CUDA device here"),
])
def test_bench_on_cpu_refuses_what_needs_cuda(argv, match, tmp_path):
    with pytest.raises(UserError, match=match):
        bench_cli.main(argv + ["--out", str(tmp_path)])


@cpu_only
def test_bench_on_cpu_honours_explicit_counts():
    args = bench_cli.build_parser().parse_args(["--repeats", "11", "--inner", "4", "--shapes", "1x32", "--widths",
                                            "128/4", "--precision", "amp"])
    cfg = bench_cli.config_from_args(args)
    assert (cfg.repeats, cfg.inner, cfg.shapes, cfg.scaling_widths, cfg.precision, cfg.modes) == \
        (11, 4, [(1, 32)], [(128, 4)], "amp", ("eager",))


def test_render_refuses_timing_options_and_missing_json(tmp_path):
    with pytest.raises(UserError, match=r"--shapes do\(es\) not apply"):
        bench_cli.main(["--render", str(tmp_path), "--shapes", "1x16"])
    with pytest.raises(UserError, match="no bench.json there"):
        bench_cli.main(["--render", str(tmp_path)])


def test_user_error_reaches_the_cli_as_one_line(capsys):
    from reciprocal_attention.lab import cli

    assert cli.main(["bench", "--arms", "nonsense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ra: error: --arms: unknown value(s) nonsense; valid:")


# ----------------------------------------------------------------------------------------------------------------
# ra compare: options, live progress, the summary
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--skip-speed", "--skip-quality"], "nothing to run"),
    (["--skip-quality", "--steps", "5"], r"--steps set\(s\) the quality runs, which --skip-quality skips"),
    (["--seeds", "0,x"], "--seeds: expected distinct comma-separated integers"),
    (["--seeds", "1,1"], "--seeds: expected distinct"),
    (["--steps", "0"], r"--steps: expected an integer >= 1"),
])
def test_compare_refuses_bad_options(argv, match):
    from reciprocal_attention.lab import compare

    with pytest.raises(UserError, match=match):
        compare.main(argv)


def _study(tmp_path):
    from reciprocal_attention.lab import quality

    return quality.QualityConfig(arms=["standard", "ra"], seeds=[0], preset="compare-cpu", out_dir=str(tmp_path),
                                 mqar=False)


def test_run_progress_reports_step_loss_and_eta(tmp_path, capsys):
    """Without a terminal each run prints a line per tenth of its steps (step/total, loss, ETA) and one at its end,
    read from the run's metrics.jsonl while the study runs."""
    from reciprocal_attention.lab import progress as lab_progress, quality

    qc = _study(tmp_path)
    d = quality.run_dir(qc, "ra", 0)
    d.mkdir(parents=True)
    (d / "requested.toml").write_text("[budget]\nmax_steps = 0\nmax_tokens = 40960\n")  # 40 steps of 1024
    progress = lab_progress.RunProgress({("ra", 0): d, ("standard", 0): quality.run_dir(qc, "standard", 0)},
                                        tty=False)
    recs = [{"kind": "train", "step": s, "tokens": 1024 * s, "loss": 6.0 - s / 10} for s in (4, 8, 12)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tr')  # a torn line
    progress.poll()
    line = capsys.readouterr().out.strip()
    assert line.startswith("[quality] ra seed 0: 12/40 steps [") and "<" in line and "loss 4.800" in line
    progress.poll()
    assert capsys.readouterr().out == ""  # no new step, no new line
    with open(d / "metrics.jsonl", "a") as f:
        f.write('ain"}\n' + json.dumps({"kind": "eval", "step": 40, "tokens": 40960, "loss": 4.5}) + "\n")
    (d / "summary.json").write_text("{}")
    progress.poll()
    line = capsys.readouterr().out.strip()
    assert line.startswith("[quality] ra seed 0: 40/40 steps") and "val 4.500" in line and line.endswith("(done)")


def test_run_progress_bars_on_a_terminal(tmp_path):
    from reciprocal_attention.lab import progress as lab_progress, quality

    qc = _study(tmp_path)
    d = quality.run_dir(qc, "standard", 0)
    d.mkdir(parents=True)
    (d / "requested.toml").write_text("[budget]\nmax_steps = 40\nmax_tokens = 0\n")
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 20, "tokens": 20480, "loss": 5.0}) + "\n")
    with lab_progress.RunProgress({("standard", 0): d}, tty=True, interval=60) as progress:
        progress.poll()
        bar = progress.bars[("standard", 0)]
        assert (bar.n, bar.total) == (20, 40) and "loss=5.000" in bar.postfix


def test_run_progress_total_from_evals_when_no_train_record_yet(tmp_path):
    """A short run (log interval past its last step) writes only evals: their tokens still give the total."""
    from reciprocal_attention.lab import progress as lab_progress, quality

    qc = _study(tmp_path)
    d = quality.run_dir(qc, "ra", 0)
    d.mkdir(parents=True)
    (d / "requested.toml").write_text("[budget]\nmax_steps = 0\nmax_tokens = 16384\n")  # 2 steps of 8192
    recs = [{"kind": "eval", "step": s, "tokens": 8192 * s, "loss": 10.0 - s} for s in (0, 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with lab_progress.RunProgress({("ra", 0): d}, tty=True, interval=60) as progress:
        progress.poll()
        assert progress.bars[("ra", 0)].total == 2


def test_summary_says_what_ran_and_what_it_is():
    from reciprocal_attention.lab import compare

    records = [_rec("ra_fast", p, r) for p, r in zip(bench.PASSES, (1.1, 1.2, 1.3))]
    res = {"complete": True, "config": {"seeds": [0, 1]}, "verdicts": {"ra": "no difference that the data support"},
           "arms": {"standard": {"mean": 5.0, "std": 0.01}, "ra": {"mean": 5.01, "std": 0.02,
                                                                   "paired_diff": {0: 0.01, 1: 0.0}}}}
    text = compare.summary(records, res, {"speed": 12.0, "quality": 250.0}, bench.Path("runs/compare"), cuda=False)
    assert "speed (12s)" in text and "fwd+bwd 1.20x" in text and "CPU timings are not a result" in text
    assert "quality (4m 10s): At this scale, no arm beat the baseline" in text
    assert "ra: val loss 5.0100 +- 0.0200; paired diff vs standard per seed +0.0100, +0.0000" in text
    assert "total: 4m 22s" in text


def test_bench_ab_compares_matching_arms_and_flags_a_slowdown(tmp_path):
    """tools/bench_ab.py: rows pair on (impl, share of RA heads, SDPA, shape, width, mode, pass); exit 1 past the
    tolerance. The seed's table times one arm at 100/50/25% RA heads: each pairs with its own share."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ab", bench.Path(__file__).parents[1] / "tools" / "bench_ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)

    def rec(impl, ratio, sdpa="cudnn", ms=1.0, heads_pct=100):
        return {"impl": impl, "sdpa": sdpa, "B": 8, "T": 1024, "C": 768, "mode": "graph", "pass": "fwd+bwd",
                "ratio_vs_baseline": ratio, "ms_median": ms * ratio, "device": "card", "torch": "t", "triton": "x",
                "precision": "bf16", "heads_pct": heads_pct}
    prev = [rec("baseline_cudnn", 1.0), rec("ra_fast", 1.02), rec("ra_fast", 1.01, sdpa="flash"),
            rec("seed_fast", 1.02), rec("seed_fast", 1.10, heads_pct=50)]
    for new_ratio, rc in ((1.025, 0), (1.04, 1)):
        new = [rec("baseline_cudnn", 1.0), rec("ra_fast", new_ratio), rec("channel_bias", 1.05),
               rec("seed_fast", 1.02), rec("seed_fast", 1.10, heads_pct=50)]
        (tmp_path / "p.json").write_text(json.dumps(prev))
        (tmp_path / "n.json").write_text(json.dumps(new))
        out = tmp_path / "ab.md"
        assert ab.main([str(tmp_path / "p.json"), str(tmp_path / "n.json"), str(out)]) == rc
        text = out.read_text()
        assert text.count("| ra_fast | 100% | cudnn |") == 1 and "flash" not in text and "channel_bias" not in text
        for pct, ratio in ((100, "1.0200"), (50, "1.1000")):
            assert f"| seed_fast | {pct}% | cudnn | 8 x 1024 | 768 | graph | fwd+bwd | {ratio} | {ratio} | +0.00% |" in text
    assert ab.main([str(tmp_path / "missing.json"), str(tmp_path / "n.json"), str(out)]) == 2
