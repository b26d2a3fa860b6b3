"""The quality study: analysis and verdict on synthetic runs, and a tiny end-to-end study that resumes."""

import json

import pytest

from reciprocal_attention.lab import quality, quality_report


def _fake_run(root, arm, seed, loss):
    d = root / "runs" / f"{arm}-s{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"final_val_loss": loss, "tokens": 1000, "tokens_per_s": 10.0,
                                                "device": "cpu", "dtype": "float32", "params": 1}))
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "tokens": 1000, "loss": loss}) + "\n")


@pytest.mark.parametrize("ra_losses,expect", [
    ((3.80, 3.81, 3.79), "better"),      # lower than the baseline by more than the noise floor in every seed
    ((4.10, 4.11, 4.09), "worse"),
    ((3.99, 4.02, 4.00), "no difference"),
])
def test_verdict_needs_every_seed_beyond_the_noise_floor(tmp_path, ra_losses, expect):
    base = (4.00, 4.01, 3.99)  # noise floor (max pairwise |diff|) = 0.02
    for s, (b, r) in enumerate(zip(base, ra_losses)):
        _fake_run(tmp_path, "standard", s, b)
        _fake_run(tmp_path, "ra", s, r)
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1, 2], out_dir=str(tmp_path), mqar=False)
    res = quality.analyse(qc)
    assert res["noise_floor"]["max"] == pytest.approx(0.02)
    assert res["verdicts"]["ra"].startswith(expect)
    assert res["arms"]["ra"]["paired_diff"][0] == pytest.approx(ra_losses[0] - 4.00)
    quality_report.write_report(res, tmp_path)
    assert "Verdict" in (tmp_path / "quality.md").read_text() and (tmp_path / "quality.png").exists()


def test_incomplete_study_gives_no_verdict(tmp_path):
    _fake_run(tmp_path, "standard", 0, 4.0)
    _fake_run(tmp_path, "standard", 1, 4.1)
    _fake_run(tmp_path, "ra", 0, 3.0)
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1], out_dir=str(tmp_path), mqar=False)
    res = quality.analyse(qc)
    assert res["verdicts"]["ra"].startswith("incomplete")
    assert quality_report.verdict_sentence(res) == "The study is incomplete; no verdict."


def test_incomplete_study_states_the_arms_it_can(tmp_path):
    """Arms with every seed finished get their verdict in the headline; the others are counted as remaining."""
    for seed, (base, ra) in enumerate([(4.0, 4.02), (4.1, 4.08)]):
        _fake_run(tmp_path, "standard", seed, base)
        _fake_run(tmp_path, "ra", seed, ra)
    _fake_run(tmp_path, "full", 0, 3.0)
    qc = quality.QualityConfig(arms=["standard", "ra", "full"], seeds=[0, 1], out_dir=str(tmp_path), mqar=False)
    res = quality.analyse(qc)
    assert res["verdicts"]["full"].startswith("incomplete")
    assert quality_report.verdict_sentence(res) == (
        "The study is incomplete (1 run remains); arms with every seed finished: ra, no difference that the data "
        "support.")


def test_one_seed_has_no_noise_floor_and_no_verdict(tmp_path):
    """A single seed gives paired differences but no baseline-vs-baseline spread: the report says so."""
    _fake_run(tmp_path, "standard", 0, 4.0)
    _fake_run(tmp_path, "ra", 0, 3.0)
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0], out_dir=str(tmp_path), mqar=False)
    res = quality.analyse(qc)
    assert res["noise_floor"]["max"] is None and res["arms"]["ra"]["paired_diff"] == {0: -1.0}
    assert res["verdicts"]["ra"].startswith("no verdict: the noise floor needs")
    assert quality_report.verdict_sentence(res).startswith("No verdict: the noise floor needs")
    quality_report.write_report(res, tmp_path)
    assert "No verdict" in (tmp_path / "quality.md").read_text()


def test_config_errors():
    with pytest.raises(ValueError, match="unknown arm"):
        quality.QualityConfig(arms=["standard", "magic"]).validate()
    with pytest.raises(ValueError, match="baseline 'standard'"):
        quality.QualityConfig(arms=["ra"]).validate()
    with pytest.raises(ValueError, match="wall_seconds"):
        quality.QualityConfig(equal="wallclock").validate()


def test_tiny_study_end_to_end_and_resume(tmp_path):
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1], preset="quality-cpu", parallel=2,
                               overrides=["budget.max_steps=4", "eval.interval=2", "eval.iters=1",
                                          "checkpoint.interval=2"],
                               out_dir=str(tmp_path), mqar=True, mqar_steps=2, mqar_width=32, mqar_seq_len=16,
                               mqar_kv=2, mqar_vocab=33)
    res = quality.study(qc)
    assert res["complete"] and set(res["arms"]) == {"standard", "ra"} and res["remaining"] == []
    assert res["tokens_per_run"] == 4 * 16 * 64  # steps x batch x block of the tiny preset
    assert all(len(a["val_loss"]) == 2 for a in res["arms"].values())
    assert set(res["mqar"]) == {"standard", "ra"} and all(len(v) == 2 for v in res["mqar"].values())
    first = (tmp_path / "runs" / "ra-s0" / "summary.json").read_text()
    quality.study(qc)  # resumes: finished runs are kept, not retrained
    assert (tmp_path / "runs" / "ra-s0" / "summary.json").read_text() == first


def test_deadline_stops_runs_with_sigterm_and_waits_for_their_checkpoints(tmp_path, monkeypatch):
    """At the deadline every running job gets SIGTERM (on which ``ra train`` checkpoints the step it is on) and
    the study waits for each to exit: none is killed while it writes."""
    import subprocess
    import sys

    script = ("import signal, sys, time\n"
              "def stop(*_):\n"
              "    time.sleep(0.5)  # a checkpoint being written\n"
              "    open(sys.argv[1], 'w').write('saved')\n"
              "    sys.exit(143)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "open(sys.argv[1] + '.started', 'w').close()\n"
              "time.sleep(120)\n")

    def fake_launch(qc, arm, seed, gpu=None):
        return subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"{arm}-{seed}")])

    monkeypatch.setattr(quality, "_launch", fake_launch)
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0], parallel=2, out_dir=str(tmp_path), mqar=False,
                               deadline_s=3.0)
    quality.run_study(qc)
    for job in ("standard-0", "ra-0"):
        assert (tmp_path / f"{job}.started").exists()  # it ran until the deadline
        assert (tmp_path / job).read_text() == "saved"  # and finished its checkpoint before the study went on


def test_runs_spread_over_the_machines_gpus(tmp_path, monkeypatch, pinned_popen):
    """Several GPUs: each run is pinned (CUDA_VISIBLE_DEVICES) to the GPU with the fewest running jobs; one GPU or
    none: the environment is left as it is."""
    pinned = pinned_popen
    monkeypatch.setattr(quality, "visible_gpus", lambda: ["3", "5"])
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1, 2], parallel=3, out_dir=str(tmp_path),
                               mqar=False)
    quality.run_study(qc)
    assert len(pinned) == 6 and pinned[:3] == ["3", "5", "3"]  # the next three start as these finish: 2 + 1 again
    assert sorted(pinned[3:]) in (["3", "3", "5"], ["3", "5", "5"])
    monkeypatch.setattr(quality, "visible_gpus", lambda: ["0"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pinned.clear()
    quality.run_study(quality.QualityConfig(arms=["standard"], seeds=[7], parallel=1, out_dir=str(tmp_path),
                                            mqar=False))
    assert pinned == [None]


def test_arms_of_interest_run_first_and_remaining_is_reported(tmp_path):
    qc = quality.QualityConfig(arms=list(quality.ARMS), seeds=[0, 1], out_dir=str(tmp_path), mqar=False)
    order = quality.job_order(qc)
    assert order[:8] == [(a, s) for s in (0, 1) for a in ("standard", "ra", "full", "output_gate")]
    assert set(order[8:]) == {(a, s) for s in (0, 1) for a in ("seed", "ra_disc")}
    for a in ("standard", "ra"):
        for s in (0, 1):
            _fake_run(tmp_path, a, s, 4.0 + s / 100)
    res = quality.analyse(qc)
    assert res["remaining"] == [f"{a}-s{s}" for a, s in order if a not in ("standard", "ra")]
    assert not res["complete"] and "What remains:** 8 runs" in quality_report.markdown(res)


def test_prior_study_is_one_row_and_cpu_report_says_cpu(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for root, loss in ((old, 4.4), (new, 3.9)):
        for s in (0, 1):
            _fake_run(root, "standard", s, loss + s / 100)
            _fake_run(root, "ra", s, loss + 0.005 + s / 100)
    qc_old = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1], out_dir=str(old), mqar=False)
    quality_report.write_report(quality.analyse(qc_old), old)
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1], out_dir=str(new), mqar=False,
                               prior=[str(old / "quality.json")])
    res = quality.analyse(qc)
    assert res["tokens_per_run"] == 1000 and len(res["prior_studies"]) == 1
    md = quality_report.markdown(res)
    assert "## Earlier studies" in md and "| 1,000 |" in md and "4.4100 (+0.0050)" in md
    assert "share one GPU" not in md and "share the CPU cores" in md
    with pytest.raises(ValueError, match="prior must name a readable quality.json"):
        quality_report.load_prior([str(tmp_path / "missing.json")])


def test_restore_resumes_a_study_from_its_report_alone(tmp_path):
    """A report's per-run records rebuild the finished runs where their directories are gone: the analysis of the
    restored folder is the original's, the restored runs are not trained again, and a run already here is kept."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for s, (b, r) in enumerate([(4.00, 3.98), (4.01, 4.02), (3.99, 3.97)]):
        _fake_run(src, "standard", s, b)
        _fake_run(src, "ra", s, r)
    (src / "runs" / "ra-s2" / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "eval", "step": i, "tokens": 250 * i, "loss": 5.0 - i * 0.25}) + "\n" for i in range(5)))
    summary = json.loads((src / "runs" / "ra-s1" / "summary.json").read_text())
    (src / "runs" / "ra-s1" / "summary.json").write_text(json.dumps({**summary, "tokens_per_s": 7.5,
                                                                     "device_name": "card A"}))
    (src / "runs" / "standard-s1" / "summary.json").write_text(json.dumps({**summary, "final_val_loss": 4.01,
                                                                           "device_name": "card A"}))
    arms = ["standard", "ra", "full"]
    orig = quality.analyse(quality.QualityConfig(arms=arms, seeds=[0, 1, 2], out_dir=str(src)))
    quality_report.write_report(orig, src)
    _fake_run(dst, "ra", 0, 9.0)  # a run already here wins over the report's record
    qc = quality.QualityConfig(arms=arms, seeds=[0, 1, 2], out_dir=str(dst), overrides=["system.threads=1"])
    assert sorted(quality.restore_runs(qc, src / "quality.json")) == ["ra-s1", "ra-s2", "standard-s0",
                                                                      "standard-s1", "standard-s2"]
    res = quality.analyse(qc)
    assert res["arms"]["ra"]["val_loss"] == {**orig["arms"]["ra"]["val_loss"], 0: 9.0}
    assert {**res["curves"], "ra-s0": orig["curves"]["ra-s0"]} == orig["curves"] and res["curves"]["ra-s0"] != \
        orig["curves"]["ra-s0"]
    assert res["cards"] == orig["cards"] and res["noise_floor"] == orig["noise_floor"]
    assert res["wallclock"]["ra"]["seeds"][1] == orig["wallclock"]["ra"]["seeds"][1]
    assert res["wallclock"]["ra"]["seeds"][2]["loss"] == orig["wallclock"]["ra"]["seeds"][2]["loss"]
    assert res["remaining"] == orig["remaining"] == ["full-s0", "full-s1", "full-s2"]
    assert quality.restore_runs(qc, src / "quality.json") == []  # idempotent
    assert quality._launch(qc, "ra", 2) is None  # a restored run counts as finished


def test_restore_refuses_what_it_cannot_use(tmp_path):
    from reciprocal_attention.lab.errors import UserError

    _fake_run(tmp_path / "src", "standard", 0, 4.0)
    res = quality.analyse(quality.QualityConfig(arms=["standard"], seeds=[0], out_dir=str(tmp_path / "src")))
    quality_report.write_report(res, tmp_path / "src")
    report = tmp_path / "src" / "quality.json"
    qc = quality.QualityConfig(arms=["standard"], seeds=[0], out_dir=str(tmp_path / "dst"))
    with pytest.raises(UserError, match="no such file"):
        quality.restore_runs(qc, tmp_path / "missing.json")
    with pytest.raises(UserError, match="is not this one"):
        quality.restore_runs(quality.QualityConfig(arms=["standard"], seeds=[0], out_dir=str(tmp_path / "dst"),
                                                   overrides=["budget.max_steps=9"]), report)
    with pytest.raises(UserError, match="is not this one"):
        quality.restore_runs(quality.QualityConfig(arms=["standard"], seeds=[0], out_dir=str(tmp_path / "dst"),
                                                   preset="quality-gpu"), report)
    old = json.loads(report.read_text())
    del old["runs"]
    report.write_text(json.dumps(old))
    with pytest.raises(UserError, match="no per-run records"):
        quality.restore_runs(qc, report)
    report.write_text("{not json")
    with pytest.raises(UserError, match="not readable as --restore: a quality.json"):
        quality.main(["--arms", "standard", "--seeds", "0", "--out", str(tmp_path / "dst"), "--report-only",
                      "--restore", str(report)])
    assert not (tmp_path / "dst" / "runs").exists()


def test_cli_user_errors():
    from reciprocal_attention.lab.errors import UserError

    with pytest.raises(UserError, match="unknown arm"):
        quality.main(["--arms", "standard,magic"])
    with pytest.raises(UserError, match="seeds"):
        quality.main(["--seeds", "0,0"])


def test_report_says_how_many_passes_over_the_training_split(tmp_path):
    """A study whose runs read a prepared corpus reports tokens per run as passes over its training split (a
    40M-token run on a ~10M-token corpus sees each token about 4 times); a fixture gives no such line."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text(json.dumps({"format": "reciprocal_attention.corpus/1",
                                                      "tokenizer": {"name": "gpt2", "n_vocab": 50257},
                                                      "splits": {"train": {"tokens": 400}}}))
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1], out_dir=str(tmp_path), mqar=False,
                               preset="quality-cpu", overrides=[f"data.dir={corpus}"])
    for a in ("standard", "ra"):
        for s in (0, 1):
            _fake_run(tmp_path, a, s, 4.0 + s / 100)
    res = quality.analyse(qc)
    assert res["tokens_per_run"] == 1000 and res["train_tokens"] == 400
    assert "tokens per run 1,000 (2.5 passes over the 400-token training split)" in quality_report.markdown(res)
    (corpus / "manifest.json").write_text("{}")
    assert quality.train_split_tokens(qc) is None  # not a corpus manifest: no count, no error
    fixture = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1], out_dir=str(tmp_path), mqar=False,
                                    preset="quality-cpu")
    assert quality.train_split_tokens(fixture) is None


@pytest.mark.parametrize("arms,expect", [("full,output_gate", "standard,full,output_gate"),
                                         ("ra,standard", "ra,standard")])
def test_gpu_quality_script_always_names_the_baseline(tmp_path, arms, expect):
    """scripts/gpu_quality.sh adds ``standard`` to an arm list without it (the study refuses such a list, and a GPU
    job is too dear to lose to it), and says so; a python3 stub records the study's command line. The study of the
    default preset and tokens restores its committed report's runs first; another study does not."""
    import os
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gpu_quality.sh"
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    (tmp_path / "data" / "corpus" / "manifest.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/usr/bin/env bash\necho "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RA_QUALITY_ARMS": arms}
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "out" / "quality.log").read_text()
    assert f"--arms {expect} " in log and "--restore reports/quality/quality.json" in log
    env["RA_QUALITY_TOKENS"] = "1000"
    subprocess.run(["bash", str(script), str(tmp_path / "out")], cwd=tmp_path, env=env, timeout=60, check=True,
                   capture_output=True)
    assert "--restore" not in (tmp_path / "out" / "quality.log").read_text()
    assert ("adding the baseline 'standard'" in done.stderr) == (expect != arms)
