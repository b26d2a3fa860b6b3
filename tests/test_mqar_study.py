"""The MQAR grid runner: priority order, resumable workers, best-lr marking, report and what remains."""

import json
from pathlib import Path

import pytest

from reciprocal_attention.lab import mqar_study as ms


def _toy(tmp_path, **kw):
    base = dict(arms=["standard", "ra"], seeds=[0, 1], widths=[32, 64], width_task=(16, 2), kv_width=32,
                kv_sweep=[(16, 4)], lrs=[1e-3, 3e-3], steps=4, vocab_size=33, batch_size=4, eval_every=2,
                out_dir=str(tmp_path / "grid"), parallel=2)
    return ms.GridConfig(**{**base, **kw})


def test_runs_are_in_priority_order_without_duplicates(tmp_path):
    gc = _toy(tmp_path, kv_sweep=[(16, 2), (16, 4)])  # (32, 16, 2) is in both sweeps: once
    runs = gc.runs()
    assert len(runs) == len({r.key for r in runs}) == 2 * 2 * 3 * 2
    assert [r.lr for r in runs[:12]] == [1e-3] * 12  # the main learning rate first
    assert (runs[0].d_model, runs[0].seed, runs[0].arm, runs[1].arm) == (32, 0, "standard", "ra")


def test_best_lr_is_marked_per_arm_and_cell(tmp_path):
    gc = _toy(tmp_path)
    (tmp_path / "grid" / "runs").mkdir(parents=True)
    acc = {(1e-3, 0): 0.5, (1e-3, 1): 0.95, (3e-3, 0): 0.9, (3e-3, 1): 0.2}  # means 0.725 vs 0.55
    for (lr, seed), a in acc.items():
        r = ms.MQARRun(arm="standard", seed=seed, d_model=32, seq_len=16, n_kv=2, lr=lr, steps=4, vocab_size=33)
        curve = [[2, 0.3], [4, a]] if a < 0.95 else [[2, 0.91], [4, a]]
        (tmp_path / "grid" / "runs" / f"{r.key}.json").write_text(json.dumps(
            {**r.__dict__, "accuracy": a, "steps_run": 4, "seconds": 1.0, "device": "cpu", "curve": curve}))
    recs = ms.load_records(tmp_path / "grid")
    assert {(r["lr"], r["seed"]) for r in recs if r["best_lr"]} == {(1e-3, 0), (1e-3, 1)}
    assert set(recs[0]) >= {"arm", "seed", "d_model", "seq_len", "n_kv", "lr", "steps", "accuracy", "best_lr"}
    # the first evaluation at or above 0.9, or None: 0.91 at step 2; 0.9 at step 4; never
    assert {(r["lr"], r["seed"]): r["steps_to_solve"] for r in recs} == {
        (1e-3, 0): None, (1e-3, 1): 2, (3e-3, 0): 4, (3e-3, 1): None}
    md = ms.markdown(recs, remaining=gc.runs()[1:])
    assert "0.725 [0.50-0.95] n=2, 1 solved" in md and f"**Remaining:** {len(gc.runs()) - 1} runs" in md
    assert "| 32 | 16 | 2 | -, 2 |" in md  # steps to 0.9 at the best lr (1e-3), in seed order
    assert f"| 32 | 16 | 2 | 4 | 33 | False | {r.batch_size} | 0.725" in md  # the batch is a column of the cell
    # every rate of a cell that tried several: mean (seeds, solved)
    assert "| 32 | 16 | 2 | 4 | 33 | 0.001 | 0.725 (2, 1) |" in md and "| 32 | 16 | 2 | 4 | 33 | 0.003 | 0.550 (2, 1) |" in md


def test_best_lr_compares_rates_on_the_seeds_both_have(tmp_path):
    """3e-3 has only seed 0 so far (0.9): against 1e-3's seed 0 (0.5) it wins, although 1e-3's mean over its two
    seeds (0.975 with seed 1) is higher."""
    (tmp_path / "grid" / "runs").mkdir(parents=True)
    for (lr, seed), a in {(1e-3, 0): 0.5, (1e-3, 1): 1.0, (3e-3, 0): 0.9}.items():
        r = ms.MQARRun(arm="ra", seed=seed, d_model=32, seq_len=16, n_kv=2, lr=lr, steps=4, vocab_size=33)
        (tmp_path / "grid" / "runs" / f"{r.key}.json").write_text(json.dumps(
            {**r.__dict__, "accuracy": a, "steps_run": 4, "seconds": 1.0, "device": "cpu", "curve": [[4, a]]}))
    recs = ms.load_records(tmp_path / "grid")
    assert {(r["lr"], r["seed"]) for r in recs if r["best_lr"]} == {(3e-3, 0)}


def test_toy_grid_runs_resumes_and_reports(tmp_path):
    gc = _toy(tmp_path, lrs=[1e-3], widths=[32])
    assert ms.run_grid(gc, progress=False) == []
    recs = ms.write_report(gc, tmp_path / "report")
    assert len(recs) == len(gc.runs()) == 2 * 2 * 2
    assert all(r["best_lr"] and 0.0 <= r["accuracy"] <= 1.0 for r in recs)
    assert (tmp_path / "report" / "mqar.png").exists()
    assert "**Remaining:** 0 runs" in (tmp_path / "report" / "mqar.md").read_text()
    done = sorted((tmp_path / "grid" / "runs").glob("*.json"))
    first = done[0].read_text()
    done[-1].unlink()  # one run lost: the next run_grid runs only that one
    assert ms.run_grid(gc, progress=False) == []
    assert done[0].read_text() == first and done[-1].exists()


def test_restore_resumes_a_grid_from_its_report_alone(tmp_path, capsys):
    """A report's records rebuild the finished runs in a folder that never held them: the grid counts them as done
    (nothing trains) and reports the same records; a run already in the folder is kept; bad files are one line."""
    gc = _toy(tmp_path, lrs=[1e-3], widths=[32])
    ms.run_grid(gc, progress=False)
    recs = ms.write_report(gc, tmp_path / "report")
    other = _toy(tmp_path, lrs=[1e-3], widths=[32], out_dir=str(tmp_path / "elsewhere"))
    mine = ms.MQARRun(arm="ra", seed=0, d_model=32, seq_len=16, n_kv=2, lr=1e-3, steps=4, vocab_size=33,
                      batch_size=4, eval_every=2)
    kept = {**mine.__dict__, "accuracy": 0.123, "steps_run": 4, "seconds": 1.0, "device": "cpu", "curve": [[4, 0.1]]}
    (tmp_path / "elsewhere" / "runs").mkdir(parents=True)
    (tmp_path / "elsewhere" / "runs" / f"{mine.key}.json").write_text(json.dumps(kept))
    assert len(ms.restore_runs(Path(other.out_dir), tmp_path / "report" / "mqar.json")) == len(recs) - 1
    assert ms.run_grid(other, progress=False) == []  # every run is finished: nothing to train
    again = ms.write_report(other, tmp_path / "report2")
    assert [r for r in again if r["seed"] or r["arm"] != "ra" or r["d_model"] != 32 or r["n_kv"] != 2] == \
        [r for r in recs if r["seed"] or r["arm"] != "ra" or r["d_model"] != 32 or r["n_kv"] != 2]
    assert [r["accuracy"] for r in again if r["arm"] == "ra" and r["seed"] == 0 and r["n_kv"] == 2] == [0.123]
    assert ms.restore_runs(Path(other.out_dir), tmp_path / "report" / "mqar.json") == []
    from reciprocal_attention.lab.errors import RunLockedError
    from reciprocal_attention.lab.runlock import RunLock

    with RunLock(tmp_path / "grid"), pytest.raises(RunLockedError):  # its study is running: not written into
        ms.restore_runs(tmp_path / "grid", tmp_path / "report" / "mqar.json")
    (tmp_path / "bad.json").write_text('{"runs": []}')
    for bad, msg in ((tmp_path / "missing.json", "no such file"), (tmp_path / "bad.json", "not an mqar.json")):
        assert ms.main(["--out", str(tmp_path / "x"), "--report-only", "--restore", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]


def test_a_folder_holds_one_setting_of_what_the_run_key_leaves_out(tmp_path, capsys):
    """The run key (file name) has no batch size: a grid with another batch in a folder of finished runs would
    count them as its own (resume) and mix both in one report. It stops before training, one line, exit 2."""
    gc = _toy(tmp_path, lrs=[1e-3], widths=[32], seeds=[0])
    assert ms.run_grid(gc, progress=False) == []
    other = _toy(tmp_path, lrs=[1e-3], widths=[32], seeds=[0, 1], batch_size=8)
    with pytest.raises(ms.UserError, match=r"runs with batch_size \[4\] and this grid asks for \[8\]"):
        ms.run_grid(other, progress=False)
    assert len(list((tmp_path / "grid" / "runs").glob("*.json"))) == 4  # nothing trained
    with pytest.raises(ms.UserError, match="one batch_size per folder; use another --out"):
        ms.write_report(other, tmp_path / "report")
    argv = ["--out", gc.out_dir, "--arms", "standard,ra", "--seeds", "0", "--widths", "32", "--width-task", "16:2",
            "--kv-width", "32", "--kv-sweep", "16:4", "--lrs", "1e-3", "--steps", "4", "--vocab", "33", "--batch", "8",
            "--eval-every", "2", "--report-only"]
    assert ms.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use another --out" in err[0]
    assert ms.main(argv[:-4] + ["4"] + argv[-3:]) == 0  # the folder's own batch: reports


def test_one_study_per_folder_at_a_time(tmp_path, capsys):
    """A second study on a folder in use would clear the first one's claims and train its runs again: it stops
    with one line naming the holder, exit 2, and nothing is trained; once the folder is free it runs."""
    from reciprocal_attention.lab.errors import RunLockedError
    from reciprocal_attention.lab.runlock import RunLock

    gc = _toy(tmp_path, lrs=[1e-3], widths=[32], seeds=[0])
    argv = ["--out", gc.out_dir, "--arms", "standard,ra", "--seeds", "0", "--widths", "32", "--width-task", "16:2",
            "--kv-width", "32", "--kv-sweep", "16:4", "--lrs", "1e-3", "--steps", "4", "--vocab", "33", "--batch", "4",
            "--eval-every", "2", "--parallel", "1"]
    with RunLock(tmp_path / "grid"):  # a live study holds it (this process's pid: never stale)
        with pytest.raises(RunLockedError, match="is in use by pid"):
            ms.run_grid(gc, progress=False)
        assert ms.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by pid" in err[0]
    assert not list((tmp_path / "grid" / "runs").glob("*.json"))
    assert ms.run_grid(gc, progress=False) == [] and not (tmp_path / "grid" / ".lock").exists()


def test_cli_errors_are_one_line_exit_2(capsys):
    assert ms.main(["--kv-sweep", "128-16", "--plan"]) == 2
    err = capsys.readouterr().err
    assert "SEQ:KV" in err and len(err.strip().splitlines()) == 1
    assert ms.main(["--arms", "standard,magic", "--plan"]) == 2
    assert "arms: unknown ['magic']" in capsys.readouterr().err
    assert ms.main(["--arms", "standard,ra_disc:rnak=7", "--plan"]) == 2
    err = capsys.readouterr().err
    assert "'ra_disc:rnak=7' does not build" in err and len(err.strip().splitlines()) == 1
    assert ms.main(["--arms", "standard,ra_disc:rank=7", "--plan"]) == 0
    assert "ra_disc:rank=7-d" in capsys.readouterr().out


def test_report_keeps_an_override_arm_after_the_presets(tmp_path):
    gc = _toy(tmp_path, lrs=[1e-3], widths=[32], arms=["standard", "ra:rank=4", "ra"])
    assert ms.run_grid(gc, progress=False) == []
    ms.write_report(gc, tmp_path / "report")
    md = (tmp_path / "report" / "mqar.md").read_text()
    assert "| standard | ra | ra:rank=4 |" in md


def test_workers_train_groups_of_one_task_shape_with_the_same_results(tmp_path):
    """``group=3``: each worker claims up to 3 runs of one task shape (never two shapes in one group), and every
    record equals the one-at-a-time grid's but for its timing and group size."""
    one = _toy(tmp_path / "one", lrs=[1e-3], widths=[32], parallel=1)
    three = _toy(tmp_path / "three", lrs=[1e-3], widths=[32], parallel=1, group=3)
    assert ms.run_grid(one, progress=False) == [] and ms.run_grid(three, progress=False) == []
    recs = {}
    for gc in (one, three):
        recs[gc.group] = {p.name: json.loads(p.read_text()) for p in (Path(gc.out_dir) / "runs").glob("*.json")}
    timing = {"seconds", "steps_per_s", "group"}
    assert recs[1].keys() == recs[3].keys()
    for name, r in recs[3].items():
        assert {k: v for k, v in r.items() if k not in timing} == \
            {k: v for k, v in recs[1][name].items() if k not in timing}, name
    # 2 arms x 2 seeds per task shape: groups of 3, then 1, per shape
    assert sorted(r["group"] for r in recs[3].values()) == [1, 1, 3, 3, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="group must be >= 1"):
        _toy(tmp_path, group=0).validate()


def test_workers_spread_over_the_machines_gpus(tmp_path, monkeypatch, pinned_popen):
    """Several GPUs: worker i is pinned (CUDA_VISIBLE_DEVICES) to GPU i mod n, round robin."""
    pinned = pinned_popen
    monkeypatch.setattr(ms, "visible_gpus", lambda: ["0", "1"])
    remaining = ms.run_grid(_toy(tmp_path, lrs=[1e-3], widths=[32], parallel=3), progress=False)
    assert pinned == ["0", "1", "0"] and len(remaining) == 8  # the fake workers trained nothing


def test_report_says_when_no_run_reached_recall(tmp_path):
    (tmp_path / "grid" / "runs").mkdir(parents=True)
    for arm in ("standard", "ra"):
        r = ms.MQARRun(arm=arm, seed=0, d_model=32, seq_len=16, n_kv=2, lr=1e-3, steps=4, vocab_size=33)
        (tmp_path / "grid" / "runs" / f"{r.key}.json").write_text(json.dumps(
            {**r.__dict__, "accuracy": 0.2, "steps_run": 4, "seconds": 1.0, "device": "cpu", "curve": [[4, 0.2]]}))
    md = ms.markdown(ms.load_records(tmp_path / "grid"))
    assert "No run reached 0.9 held-out accuracy within its steps." in md and "Steps to reach" not in md


def test_report_marks_a_run_without_a_recorded_batch(tmp_path):
    """Records written before runs recorded their batch size report it as ``-``, never as another cell's."""
    (tmp_path / "grid" / "runs").mkdir(parents=True)
    r = ms.MQARRun(arm="standard", seed=0, d_model=32, seq_len=16, n_kv=2, lr=1e-3, steps=4, vocab_size=33)
    rec = {k: v for k, v in r.__dict__.items() if k != "batch_size"}
    (tmp_path / "grid" / "runs" / f"{r.key}.json").write_text(json.dumps(
        {**rec, "accuracy": 0.2, "steps_run": 4, "seconds": 1.0, "device": "cpu", "curve": [[4, 0.2]]}))
    recs = ms.load_records(tmp_path / "grid")
    assert recs[0]["batch_size"] is None and "| 32 | 16 | 2 | 4 | 33 | False | - | 0.200" in ms.markdown(recs)
