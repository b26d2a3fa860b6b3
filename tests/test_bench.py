"""The benchmark harness on CPU: it runs, records every required key, computes ratios and writes its reports."""

import json

from reciprocal_attention.lab import bench

REQUIRED = {"impl", "variant", "heads_pct", "B", "T", "C", "H", "pass", "mode", "ms_median", "ms_min", "ms_max",
            "ratio_vs_baseline", "peak_mem_bytes", "device", "torch", "triton"}


def test_cpu_bench_writes_records_and_reports(tmp_path, capsys):
    rc = bench.main(["--out", str(tmp_path), "--repeats", "1", "--inner", "1", "--groups", "core,evolution",
                     "--shapes", "1x16", "--no-progress"])
    assert rc == 0
    assert "no CUDA device" in capsys.readouterr().out
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
    assert "Full Results" in md and "Performance Evolution" in md
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
    assert torch.allclose(bench.MaskBiasBlock(disc)(x), disc(x), atol=1e-12)
    plain = ReciprocalAttention.from_preset("ra", n_embd=64, n_head=4, block_size=16).double()
    assert torch.allclose(bench.ActivationFoldBlock(plain)(x), plain(x), atol=1e-12)
    for pct in (100, 50, 25):
        seed = bench._seed_routed(pct)(64, 4, 16, False).double()
        assert torch.allclose(bench.SeedBlock(seed)(x), seed(x), atol=1e-12)


def test_arms_filter_keeps_baselines_and_cleans_partial(tmp_path):
    """--arms runs only the named impls plus the baselines (their ratios need them); the per-record partial file
    that survives a cut run is removed once the full results are written."""
    rc = bench.main(["--out", str(tmp_path), "--repeats", "1", "--inner", "1", "--groups", "core,kernels",
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

    timer = bench.Timer(torch.device("cpu"), warmup=1, repeats=4, inner=2)
    ta, tb = timer.measure_paired((lambda: order.append("a"), lambda: ctx("a")),
                                  (lambda: order.append("b"), lambda: ctx("b")))
    assert len(ta) == len(tb) == 4 and all(t > 0 for t in ta + tb)
    assert order == ["a", "b"] + ["a", "a", "b", "b", "b", "b", "a", "a"] * 2
    assert entered == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
