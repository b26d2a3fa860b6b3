"""The equal-wall-clock reading of an equal-tokens study: tokens scaled by the per-seed speed ratio, the loss read
from the arm's curve there, and a verdict against the same noise floor."""

import json

import pytest

from reciprocal_attention.lab import quality, quality_report
from reciprocal_attention.lab.quality_wallclock import equal_wallclock, loss_at_tokens


def test_loss_at_tokens_interpolates_between_evaluations():
    curve = [(100, 5.0), (200, 4.0), (300, 3.5)]
    assert loss_at_tokens(curve, 150) == pytest.approx(4.5)
    assert loss_at_tokens(curve, 50) == 5.0 and loss_at_tokens(curve, 400) == 3.5
    with pytest.raises(ValueError, match="no evaluation"):
        loss_at_tokens([], 10)


def _run(loss, tps, curve, tokens=1000):
    return {"final_val_loss": loss, "tokens": tokens, "tokens_per_s": tps, "curve": curve}


def test_a_slower_arm_is_read_earlier_on_its_curve():
    """Equal tokens: ra is 0.03 better in every seed. At half the baseline's speed it would have trained 500 tokens
    in the baseline's time, where its curve is at 4.5: worse by ~0.5 in every seed."""
    curve = [(0, 6.0), (500, 4.5), (1000, 3.97)]
    runs = {}
    for s, b in enumerate((4.00, 4.01, 3.99)):
        runs[("standard", s)] = _run(b, 100.0, [(1000, b)])
        runs[("ra", s)] = _run(b - 0.03, 50.0, curve)
    wc = equal_wallclock(runs, ["standard", "ra"], [0, 1, 2], "standard", noise=0.02)["ra"]
    assert [r["tokens"] for r in wc["seeds"].values()] == [500.0] * 3
    assert wc["seeds"][0]["diff"] == pytest.approx(4.5 - 4.00)
    assert wc["speed_mean"] == pytest.approx(0.5) and wc["verdict"].startswith("worse")


def test_a_faster_arm_is_capped_at_its_final_loss():
    runs = {("standard", 0): _run(4.0, 100.0, [(1000, 4.0)]), ("standard", 1): _run(4.1, 100.0, [(1000, 4.1)]),
            ("ra", 0): _run(4.0, 110.0, [(1000, 4.0)]), ("ra", 1): _run(4.1, 110.0, [(1000, 4.1)])}
    wc = equal_wallclock(runs, ["standard", "ra"], [0, 1], "standard", noise=0.1)["ra"]
    assert all(r["capped"] and r["tokens"] == 1000 and r["diff"] == 0.0 for r in wc["seeds"].values())
    assert wc["verdict"].startswith("no difference that the data support at equal wall clock")
    del runs[("ra", 1)]
    assert equal_wallclock(runs, ["standard", "ra"], [0, 1], "standard", 0.1)["ra"]["verdict"].startswith("incomplete")


def test_the_report_has_the_wallclock_table(tmp_path):
    for arm, tps in (("standard", 100.0), ("ra", 80.0)):
        for s, loss in enumerate((4.0, 4.02)):
            d = tmp_path / "runs" / f"{arm}-s{s}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"final_val_loss": loss, "tokens": 1000, "tokens_per_s": tps,
                                                        "device": "cpu", "dtype": "float32", "params": 1}))
            (d / "metrics.jsonl").write_text("\n".join(json.dumps({"kind": "eval", "tokens": t, "loss": v}) for t, v in
                                                       ((500, loss + 0.5), (1000, loss))) + "\n")
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1], out_dir=str(tmp_path), mqar=False)
    res = quality.analyse(qc)
    assert res["wallclock"]["ra"]["seeds"][0]["tokens"] == pytest.approx(800.0)
    assert res["wallclock"]["ra"]["seeds"][0]["diff"] == pytest.approx(0.2)  # 4.5 -> 4.0 at 800 of 1000: 4.2
    quality_report.write_report(res, tmp_path)
    md = (tmp_path / "quality.md").read_text()
    assert "## Equal wall clock" in md and "| ra | 0.800, 0.800 | 800, 800 | +0.2000, +0.2000 | worse" in md
    assert "several kinds of card" not in md  # no card names in these summaries


def test_the_report_names_each_runs_card_when_they_differ(tmp_path):
    for arm, card in (("standard", "NVIDIA H100 80GB HBM3"), ("ra", "NVIDIA H200")):
        for s in (0, 1):
            d = tmp_path / "runs" / f"{arm}-s{s}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"final_val_loss": 4.0 + s / 100, "tokens": 1000,
                                                        "tokens_per_s": 100.0, "device_name": card}))
            (d / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "tokens": 1000, "loss": 4.0 + s / 100}))
    qc = quality.QualityConfig(arms=["standard", "ra"], seeds=[0, 1], out_dir=str(tmp_path), mqar=False)
    res = quality.analyse(qc)
    assert res["cards"] == {"NVIDIA H100 80GB HBM3": ["standard-s0", "standard-s1"], "NVIDIA H200": ["ra-s0", "ra-s1"]}
    assert res["wallclock"]["ra"]["verdict"].startswith("no reading: seed 0 trained standard on NVIDIA H100")
    quality_report.write_report(res, tmp_path)
    md = (tmp_path / "quality.md").read_text()
    assert ("Runs trained on several kinds of card: NVIDIA H100 80GB HBM3 (standard-s0, standard-s1); NVIDIA H200 "
            "(ra-s0, ra-s1).") in md


def test_speeds_from_different_cards_give_no_reading():
    """A seed whose baseline and arm trained on different cards has no equal-wall-clock reading: their tokens/s do
    not compare. Runs without a card name (older summaries) pair as before."""
    runs = {}
    for s, b in enumerate((4.00, 4.01)):
        runs[("standard", s)] = {**_run(b, 100.0, [(1000, b)]), "device_name": "NVIDIA H100 80GB HBM3"}
        runs[("ra", s)] = {**_run(b, 100.0, [(1000, b)]), "device_name": "NVIDIA H100 80GB HBM3"}
    runs[("ra", 1)]["device_name"] = "NVIDIA H200"
    wc = equal_wallclock(runs, ["standard", "ra"], [0, 1], "standard", noise=0.02)["ra"]
    assert list(wc["seeds"]) == [0] and wc["other_card"] == [1]
    assert wc["verdict"] == ("no reading: seed 1 trained standard on NVIDIA H100 80GB HBM3 and ra on NVIDIA H200 "
                             "(speeds from different cards do not compare)")
    runs[("ra", 1)]["device_name"] = "NVIDIA H100 80GB HBM3"
    assert equal_wallclock(runs, ["standard", "ra"], [0, 1], "standard", 0.02)["ra"]["other_card"] == []
