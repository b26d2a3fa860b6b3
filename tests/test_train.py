"""Trainer: the loss falls on the fixture, config errors are clear, and a SIGKILLed run resumes exactly."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reciprocal_attention.lab import train as T
from reciprocal_attention.lab.config import ConfigError, TrainConfig, load_config, to_toml

SRC = str(Path(__file__).resolve().parents[1] / "src")
# A fast, deterministic CPU run on the fixture: float32, one thread, no progress bar.
BASE = ["system.device=cpu", "system.dtype=float32", "system.threads=1", "system.progress=false",
        "model.n_embd=32", "model.block_size=32", "data.batch_size=8"]




def records(out: Path, kind: str) -> list[dict]:
    return [r for r in T.Metrics.read(out / "metrics.jsonl") if r["kind"] == kind]


def test_loss_falls_on_fixture(tmp_path):
    cfg = load_config("tiny", overrides=BASE + [f"system.out_dir={tmp_path}", "budget.max_steps=100",
                                                "eval.interval=100", "checkpoint.interval=0", "model.attn=ra"])
    summary = T.train(cfg)
    evals = records(tmp_path, "eval")
    assert [r["step"] for r in evals] == [0, 100]
    assert evals[0]["loss"] > math.log(200)  # about uniform over the 257 byte tokens at init
    assert evals[-1]["loss"] < evals[0]["loss"] - 2.0, evals
    assert summary["steps"] == 100 and summary["tokens"] == 100 * 8 * 32
    assert summary["tokens_per_s"] > 0 and summary["final_val_loss"] == evals[-1]["loss"]
    assert summary["device"] == "cpu" and summary["device_name"] == "cpu"  # the card, on CUDA: pairs speeds by card
    assert len(records(tmp_path, "train")) == 10  # log_interval 10
    for name in ("metrics.jsonl", "loss_curve.png", "summary.json", "config.toml", "checkpoints/latest"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 100


def test_lr_schedule():
    cfg = load_config("tiny", overrides=["optim.lr=1.0", "schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1"])
    lrs = [T.lr_at(s, cfg, decay_steps=110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; valid keys in \[optim\]: lr, "):
        load_config("tiny", overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config section 'optimizer'"):
        load_config("tiny", overrides=["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="optim.lr: cannot parse 'fast' as a number"):
        load_config("tiny", overrides=["optim.lr=fast"])
    with pytest.raises(ConfigError, match="--set expects section.key=value"):
        load_config("tiny", overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="model.attn must be one of"):
        load_config("tiny", overrides=["model.attn=reciprocal"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="set at least one budget"):
        load_config("tiny", overrides=["budget.max_steps=0"])
    with pytest.raises(ConfigError, match="has no horizon"):
        load_config("tiny", overrides=["budget.max_steps=0", "budget.max_seconds=5"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nbatch_size = \"eight\"\n")
    with pytest.raises(ConfigError, match=r"bad.toml: data.batch_size must be an int; got 'eight'"):
        load_config(config_file=bad)
    bad.write_text("[optim]\nlr = 1e-3\n[schedul]\nwarmup_steps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[schedul\]"):
        load_config(config_file=bad)
    with pytest.raises(TypeError, match="cfg must be a TrainConfig"):
        T.train({"optim": {}})


def test_config_parsing_and_toml_round_trip(tmp_path):
    cfg = load_config("tiny", overrides=["model.ra_layers=[0, 1]", 'model.attn_overrides={"rank": 4}',
                                         "system.compile=true", "budget.max_tokens=1_000", "optim.lr=3e-4"])
    assert cfg.model.ra_layers == [0, 1] and cfg.model.attn_overrides == {"rank": 4}
    assert cfg.system.compile is True and cfg.budget.max_tokens == 1000 and cfg.optim.lr == 3e-4
    assert load_config("tiny", overrides=["model.ra_layers=middle"]).model.ra_layers == "middle"
    f = tmp_path / "c.toml"
    f.write_text(to_toml(cfg))
    assert load_config(config_file=f) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert T.main(["--preset", "tiny", "--set", "optim.lr=1e-3", "--print-config"]) == 0


def test_sigkilled_run_resumes_exactly(tmp_path):
    common = BASE + ["schedule.decay_steps=40", "schedule.warmup_steps=5", "eval.interval=0",
                     "system.log_interval=1", "checkpoint.interval=5", "checkpoint.keep_last=0"]
    killed = tmp_path / "killed"
    args = ["--preset", "tiny", "--out", str(killed)] + [a for c in common + ["budget.max_steps=100000"]
                                                         for a in ("--set", c)]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "reciprocal_attention.lab.train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:  # kill it between checkpoints, after the first one exists
            steps = [r["step"] for r in records(killed, "train")] if (killed / "metrics.jsonl").exists() else []
            if (killed / "checkpoints" / "latest").exists() and steps and steps[-1] >= 7:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the training subprocess made no progress"
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    latest = int((killed / "checkpoints" / "latest").read_text().strip().split("_")[1])
    logged_before = max(r["step"] for r in records(killed, "train"))
    assert 0 < latest < 30 and logged_before >= latest  # steps logged after the checkpoint are redone

    resumed = T.train(T.TrainConfig.from_dict(_with(killed, "budget.max_steps", 30)), resume=killed)
    assert resumed["resumed_from_step"] == latest and resumed["steps"] == 30

    straight = tmp_path / "straight"
    T.train(load_config("tiny", overrides=common + ["budget.max_steps=30", f"system.out_dir={straight}"]))

    a = [(r["step"], r["loss"], r["lr"]) for r in records(killed, "train")]
    b = [(r["step"], r["loss"], r["lr"]) for r in records(straight, "train")]
    assert [s for s, _, _ in a] == list(range(1, 31))
    assert a == b  # bit-identical losses, step for step
    assert records(killed, "eval")[-1]["loss"] == records(straight, "eval")[-1]["loss"]

    with pytest.raises(ConfigError, match="optim.lr would not continue the run exactly"):
        T.train(T.TrainConfig.from_dict(_with(killed, "optim.lr", 1.0)), resume=killed)


def _with(run: Path, key: str, value) -> dict:
    from reciprocal_attention.lab.checkpoint import read_state

    cfg = read_state(run)["config"]
    sec, name = key.split(".")
    cfg[sec][name] = value
    return cfg


def test_model_section_and_gpt_config_share_field_names():
    """[model] holds every GPTConfig field under its own name (vocab_size comes from the corpus), plus only the
    fields that choose a GPTConfig; gpt_config copies them by name."""
    import dataclasses

    from reciprocal_attention.lab.config import MODEL_LAB_FIELDS, ModelConfig
    from reciprocal_attention.model import GPTConfig

    gpt = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    lab = {f.name for f in dataclasses.fields(ModelConfig)} - set(MODEL_LAB_FIELDS)
    assert gpt == lab
    cfg = load_config("tiny", overrides=["model.n_layer=3", "model.activation=gelu_tanh", "model.attn=low_rank",
                                         'model.attn_overrides={"rank": 4}', "model.ra_layers=[1]"])
    g = cfg.model.gpt_config(300)
    assert (g.n_layer, g.activation, g.attn, g.ra_layers, g.vocab_size) == (3, "gelu_tanh",
                                                                          {"preset": "low_rank", "rank": 4}, [1], 300)
