"""Training never loses work: kills at any moment, divergence, full disks, a second writer, moved runs, and
broken checkpoint files each end in a resumable run or one clear error, never in lost or corrupt state."""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from reciprocal_attention.lab import atomic, rundir
from reciprocal_attention.lab import checkpoint as C
from reciprocal_attention.lab import train as T
from reciprocal_attention.lab import train_step as TS
from reciprocal_attention.lab.config import load_config
from reciprocal_attention.lab.errors import (CheckpointError, ConfigError, DiskFullError, NonFiniteError,
                                             RunLockedError, UserError)
from reciprocal_attention.lab.runlock import RunLock

SRC = str(Path(__file__).resolve().parents[1] / "src")
BASE = ["system.device=cpu", "system.dtype=float32", "system.threads=1", "system.progress=false",
        "model.n_embd=32", "model.block_size=32", "data.batch_size=4", "system.log_interval=1",
        "schedule.warmup_steps=2", "schedule.decay_steps=12", "eval.iters=2"]
# 12 steps, a checkpoint every 3 (the first at step 0), evaluations at 0, 6 and 12
RUN = BASE + ["budget.max_steps=12", "checkpoint.interval=3", "checkpoint.keep_last=2", "eval.interval=6"]


def cfg_for(out: Path, extra=()):
    return load_config("tiny", overrides=RUN + [f"system.out_dir={out}", *extra])


def trace(out: Path) -> tuple[list, list]:
    """(step, loss, lr) of every train record and (step, loss) of every eval record, strictly parsed."""
    recs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"], r["lr"]) for r in recs if r["kind"] == "train"],
            [(r["step"], r["loss"]) for r in recs if r["kind"] == "eval"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    T.train(cfg_for(out))
    return trace(out)


def resume(run: Path) -> dict:
    return T.train(rundir.resume_config(run), resume=run)


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs (no except Exception catches it)."""


# ----------------------------------------------------------------------------------------------------------------
# Kill windows, injected deterministically
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", ["before_latest_first", "before_latest_later", "mid_model_write",
                                   "after_commit_final"])
def test_interrupted_checkpoint_resumes_bitwise(tmp_path, monkeypatch, straight, window):
    run = tmp_path / "run"
    calls = {"latest": 0, "model": 0}
    real_write_text, real_save_model = C.atomic.write_text, C.save_model

    def write_text(path, text):
        if Path(path).name == C.LATEST:
            calls["latest"] += 1
            if (window == "before_latest_first" and calls["latest"] == 1) or \
                    (window == "before_latest_later" and calls["latest"] == 3):
                raise Killed  # step_N renamed into place, latest not yet updated
        return real_write_text(path, text)

    def save_model(path, model, metadata=None):
        calls["model"] += 1
        if window == "mid_model_write" and calls["model"] == 2:
            Path(path).write_bytes(b"torn")  # a half-written file in the partial directory
            raise Killed
        return real_save_model(path, model, metadata)

    def plot(*a, **k):
        if window == "after_commit_final":
            (run / "metrics.jsonl").open("a").write('{"kind": "train", "step": 13, "lo')  # a torn append
            raise Killed
    monkeypatch.setattr(C.atomic, "write_text", write_text)
    monkeypatch.setattr(C, "save_model", save_model)
    monkeypatch.setattr(T, "plot_loss_curve", plot)
    with pytest.raises(Killed):
        T.train(cfg_for(run))
    monkeypatch.undo()
    (run / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))  # as a kill leaves

    summary = resume(run)
    assert summary["steps"] == 12
    assert trace(run) == straight  # bit-identical losses, each step once
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_000009", "step_000012"], names  # nothing uncommitted or partial left
    assert not (run / ".lock").exists()


def test_fresh_start_over_uncommitted_first_checkpoint(tmp_path, straight, monkeypatch):
    """Killed between the first rename and the first commit, a plain restart (no --resume) is fine too."""
    run = tmp_path / "run"
    real = C.atomic.write_text
    monkeypatch.setattr(C.atomic, "write_text",
                        lambda p, t: (_ for _ in ()).throw(Killed) if Path(p).name == C.LATEST else real(p, t))
    with pytest.raises(Killed):
        T.train(cfg_for(run))
    monkeypatch.undo()
    assert (run / "checkpoints" / "step_000000").is_dir() and not (run / "checkpoints" / "latest").exists()
    T.train(cfg_for(run))
    assert trace(run) == straight
    with pytest.raises(CheckpointError, match="already holds a run.*resume it with --resume"):
        T.train(cfg_for(run))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------------------------------------
# Randomized SIGKILLs of a real training process
# ----------------------------------------------------------------------------------------------------------------

# Runs ra train with markers printed in the windows that matter and those windows widened, so a kill lands there.
_DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from reciprocal_attention.lab import checkpoint as C, train as T
    real_text, real_model = C.atomic.write_text, C.save_model
    def write_text(path, text):
        if Path(path).name == C.LATEST:
            print("WINDOW", flush=True); time.sleep(0.15)
        return real_text(path, text)
    def save_model(path, model, metadata=None):
        print("SAVING", flush=True); time.sleep(0.05)
        return real_model(path, model, metadata)
    C.atomic.write_text, C.save_model = write_text, save_model
    sys.exit(T.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_random_sigkills_always_resume_bitwise(tmp_path, straight):
    trials = int(os.environ.get("RA_KILL_TRIALS", "4"))  # more: RA_KILL_TRIALS=32
    rng = random.Random(int(os.environ.get("RA_KILL_SEED", "0")))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the first trials aim at the windows (first checkpoint's, a later one's, mid-write), the rest at random times
    targets = [("WINDOW", 1), ("WINDOW", 3), ("SAVING", 2)] + [("TIME", None)] * max(0, trials - 3)
    for trial, (marker, nth) in enumerate(targets[:trials]):
        run = tmp_path / f"run{trial}"
        args = ["--preset", "tiny", "--out", str(run)] + [a for s in RUN for a in ("--set", s)]
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        try:
            if marker == "TIME":
                deadline = time.time() + 120
                while not (run / "config.toml").exists():
                    assert proc.poll() is None and time.time() < deadline, "training did not start"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 2.5))
            else:
                seen = 0
                for line in proc.stdout:
                    seen += line.strip() == marker
                    if seen == nth:
                        break
            proc.kill()
        finally:
            proc.kill()
            proc.wait()
        if not (run / "config.toml").exists():
            continue  # killed before the run existed: nothing to resume
        if marker != "TIME":
            assert not (run / "summary.json").exists(), "the kill came too late to test a window"
        resume(run)
        assert trace(run) == straight, f"trial {trial} ({marker} {nth})"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stop_signal_checkpoints_the_step_reached_and_resumes_bitwise(tmp_path, sig):
    """SIGTERM (``ra quality --deadline``, a scheduler) or a first Ctrl-C: the run checkpoints the step it reached,
    writes no summary, exits 128 + the signal, and resumes to the uninterrupted run's losses."""
    import signal

    long = ["budget.max_steps=150", "checkpoint.interval=1000", "eval.interval=50"]
    straight_run = tmp_path / "straight"
    T.train(cfg_for(straight_run, long))
    run = tmp_path / "stopped"
    args = ["--preset", "tiny", "--out", str(run)] + [a for x in RUN + long for a in ("--set", x)]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "reciprocal_attention.lab.train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count('"train"') >= 3):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.005)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert f"stopped by {sig}" in err and "ra train --resume" in err
    assert not (run / "summary.json").exists()
    step = rundir.committed_state(run)["step"]
    assert 3 <= step < 150  # the step it reached, not the last periodic checkpoint (step 0)
    resume(run)
    assert trace(run) == trace(straight_run)


def test_ra_cli_reports_a_stopped_run_in_one_line(monkeypatch, capsys):
    import signal

    from reciprocal_attention.lab import cli

    def stopped(_argv):
        raise T.RunStopped(signal.SIGINT, 7, "runs/x")

    monkeypatch.setattr(T, "main", stopped)
    assert cli.main(["train", "--preset", "tiny"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "ra: stopped by SIGINT after step 7; its checkpoint is in runs/x/checkpoints; continue with " \
                  "`ra train --resume runs/x`"


def test_stop_signals_restore_the_previous_handlers():
    import signal

    from reciprocal_attention.lab.stop_signals import StopSignals

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    with StopSignals(enabled=True) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._request
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread: recorded, not fatal
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopSignals(enabled=False):
        assert signal.getsignal(signal.SIGTERM) == before[0]


# ----------------------------------------------------------------------------------------------------------------
# Resume where the run is; one writer
# ----------------------------------------------------------------------------------------------------------------

def test_moved_run_resumes_in_place(tmp_path, straight):
    orig = tmp_path / "orig"
    T.train(cfg_for(orig, ["budget.max_steps=6"]))
    before = sorted(p.name for p in (orig / "checkpoints").iterdir())
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(orig, moved)
    cfg = rundir.resume_config(moved)
    cfg.budget.max_steps = 12
    summary = T.train(cfg, resume=moved / "checkpoints")
    assert summary["out_dir"] == str(moved) and trace(moved) == straight
    assert sorted(p.name for p in (orig / "checkpoints").iterdir()) == before  # the original is untouched
    assert rundir.committed_state(moved)["config"]["system"]["out_dir"] == str(moved)


def test_second_writer_gets_one_clear_error(tmp_path, caplog):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunLockedError, match=rf"{run} is in use by pid {os.getpid()} on host "):
            RunLock(run).acquire()
        with pytest.raises(RunLockedError, match="is in use by pid"):
            T.train(cfg_for(run))
    lock = run / ".lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    with caplog.at_level("WARNING"), RunLock(run):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text and not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(RunLockedError, match="pid 1 on host another-host.*delete the lock file"):
        RunLock(run).acquire()


# ----------------------------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------------------------

def _finite_checkpoint(run: Path) -> int:
    cfg = rundir.resume_config(run)
    model = T.GPT(T.gpt_config(cfg, 257))
    return C.load_checkpoint(run, model, restore_rng=False)["step"]  # refuses non-finite weights


@pytest.mark.parametrize("lr", ["1e6", "1e4"])
def test_divergence_stops_with_the_step_and_keeps_a_finite_checkpoint(tmp_path, lr):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step \d+: (non-finite loss|weight .* is not finite)"):
        T.train(cfg_for(run, [f"optim.lr={lr}", "optim.grad_clip=0", "checkpoint.interval=1",
                              "checkpoint.keep_last=1", "schedule.warmup_steps=0"]))
    assert _finite_checkpoint(run) >= 0
    assert not (run / "summary.json").exists()
    trace(run)  # strict JSON throughout


def test_skip_policy_is_bounded(tmp_path, monkeypatch):
    real = TS.accumulate_gradients
    bad_steps = {2, 4}

    def flaky(model, batches, autocast, scaler):
        loss = real(model, batches, autocast, scaler)
        flaky.n += 1
        return loss * float("nan") if flaky.n in bad_steps or flaky.n > 8 else loss
    flaky.n = 0
    monkeypatch.setattr(TS, "accumulate_gradients", flaky)  # where the step looks it up
    run = tmp_path / "run"
    s = T.train(cfg_for(run, ["train.on_nonfinite=skip", "train.max_skips=2", "budget.max_steps=8"]))
    assert s["skipped_steps"] == 2 and s["steps"] == 8
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["action"], e["loss"]) for e in events if e["kind"] == "nonfinite"] == \
        [(2, "skip", None), (4, "skip", None)]
    flaky.n = 0
    with pytest.raises(NonFiniteError, match=r"step 9: non-finite loss nan.*more than train.max_skips=2"):
        T.train(cfg_for(tmp_path / "run2", ["train.on_nonfinite=skip", "train.max_skips=2"]))


def test_nonfinite_values_are_never_written_or_silently_loaded(tmp_path):
    model = T.GPT(T.gpt_config(cfg_for(tmp_path), 257))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    C.save_checkpoint(tmp_path / "ck", 1, model, opt, {})
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="lm_head.weight|wte.weight"):
        C.save_checkpoint(tmp_path / "ck", 2, model, opt, {})
    assert C.read_latest(tmp_path / "ck") == "step_000001" and not (tmp_path / "ck" / "step_000002").exists()
    tensors, aliases = C.model_tensors(model)
    atomic.write_safetensors(tmp_path / "nan.safetensors", tensors, {"format": C.FORMAT, "aliases": json.dumps(aliases)})
    with pytest.raises(CheckpointError, match="non-finite.*allow_nonfinite=True"):
        C.load_model(tmp_path / "nan.safetensors", model)
    C.load_model(tmp_path / "nan.safetensors", model, allow_nonfinite=True)
    assert atomic.dumps({"a": float("nan"), "b": [float("inf")]}) == '{"a": null, "b": [null]}'
    with pytest.raises(ValueError):
        atomic.dumps(float("nan"), nonfinite="raise")


# ----------------------------------------------------------------------------------------------------------------
# Full disks and I/O errors
# ----------------------------------------------------------------------------------------------------------------

def test_full_disk_names_file_bytes_and_free_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic.write_bytes(target, b"old")
    monkeypatch.setattr(atomic, "free_bytes", lambda p: 10)
    with pytest.raises(DiskFullError, match=rf"cannot write {target}: .*1,000 bytes needed, 10 bytes free"):
        atomic.write_bytes(target, b"x" * 1000)
    monkeypatch.undo()

    def enospc(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError, match=rf"cannot write {target}: No space left on device"):
        atomic.write_stream(target, enospc)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    assert issubclass(DiskFullError, UserError)


_EFBIG = textwrap.dedent("""
    import resource, signal, sys, torch
    from reciprocal_attention.lab import checkpoint as C
    from reciprocal_attention.lab.errors import DiskFullError
    from reciprocal_attention.model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=300), seed=0)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward(); opt.step()
    C.save_checkpoint(sys.argv[1], 1, model, opt, {})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))  # every write past 20 kB fails
    try:
        C.save_checkpoint(sys.argv[1], 2, model, opt, {})
    except DiskFullError as e:
        print("ERROR", e)
""")


def test_real_write_failure_keeps_previous_checkpoint(tmp_path):
    pytest.importorskip("resource")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    root = tmp_path / "ck"
    out = subprocess.run([sys.executable, "-c", _EFBIG, str(root)], env=env, capture_output=True, text=True,
                         timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("ERROR")]
    assert len(line) == 1, out.stdout + out.stderr[-2000:]
    assert "model.safetensors" in line[0] and "bytes needed" in line[0] and "bytes free" in line[0]
    assert C.read_latest(root) == "step_000001" and sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    C.verify_files(C.read_state(root))


# ----------------------------------------------------------------------------------------------------------------
# What is loaded is validated
# ----------------------------------------------------------------------------------------------------------------

def _edit_state(d: Path, edit, fix_checksum: bool) -> None:
    body = json.loads((d / C.STATE_FILE).read_text())
    edit(body)
    if fix_checksum:
        body["checksum"] = C._checksum(body)
    (d / C.STATE_FILE).write_text(json.dumps(body))


def test_state_json_schema_checksum_and_contents(tmp_path):
    model = T.GPT(T.gpt_config(cfg_for(tmp_path), 257))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    d = C.save_checkpoint(tmp_path / "ck", 1, model, opt, {"data_position": 5})
    good = (d / C.STATE_FILE).read_text()
    _edit_state(d, lambda b: b.update(data_position=6), fix_checksum=False)
    with pytest.raises(CheckpointError, match=r"state.json: checksum differs"):
        C.read_state(d)
    for key in ("files", "rng"):
        (d / C.STATE_FILE).write_text(good)
        _edit_state(d, lambda b: b.pop(key), fix_checksum=True)
        with pytest.raises(CheckpointError, match=rf"state.json: missing key '{key}'"):
            C.read_state(d)
    (d / C.STATE_FILE).write_text(good)
    with pytest.raises(CheckpointError, match=r"missing key 'tokens'"):
        rundir.committed_state(d)  # a training resume needs the loop's fields too
    with pytest.raises(CheckpointError, match="rng.safetensors: no 'torch_cpu'"):
        C.restore_rng_state({}, {"python": [], "numpy": []})
    # an optimizer moment of the wrong shape is named before any step runs
    tensors, meta = C.optimizer_tensors(opt, None)
    key = next(k for k in tensors if k.endswith("exp_avg"))
    tensors[key] = torch.zeros(3, 5)
    atomic.write_safetensors(tmp_path / "opt.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=r"optimizer exp_avg of transformer\.\S+ is \[3, 5\]/torch.float32, "
                                              r"the parameter is"):
        C.load_optimizer(tmp_path / "opt.safetensors", opt, None, model)


# ----------------------------------------------------------------------------------------------------------------
# The config is checked before anything is written
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr must be a finite number; got inf"),
    ("optim.lr=1e400", "optim.lr must be a finite number; got inf"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.lr=-1", r"optim.lr must be a finite number > 0"),
    ("model.n_head=5", "does not build a model: n_embd must be divisible by n_head"),
    ("model.ra_layers=[9]", "does not build a model: ra_layers indices"),
    ('model.attn_overrides={"rnk": 4}', r"unknown key\(s\) \['rnk'\]; valid keys: preset, rank, "),
    ("train.on_nonfinite=ignore", "train.on_nonfinite must be one of"),
])
def test_bad_config_fails_before_anything_is_written(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=RUN + [f"system.out_dir={tmp_path / 'run'}", override])
    cfg = cfg_for(tmp_path / "run")
    key, value = override.split("=", 1)
    sec, name = key.split(".")
    setattr(getattr(cfg, sec), name, json.loads(value) if value[:1] in "[{" else
            float(value) if sec == "optim" else int(value) if name == "n_head" else value)
    with pytest.raises(ConfigError, match=message):
        T.train(cfg)
    assert not (tmp_path / "run").exists()
