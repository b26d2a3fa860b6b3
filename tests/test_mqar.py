"""MQAR batches: the value after each query is the one paired with that key earlier in the sequence."""

import pytest
import torch

from reciprocal_attention.lab.mqar import IGNORE, MQARSpec, accuracy, make_batch


def test_targets_are_the_paired_values():
    spec = MQARSpec(seq_len=64, n_kv=8, n_queries=10, n_keys=32, n_values=32)
    x, y = make_batch(spec, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 64)
    for b in range(16):
        pairs = {int(x[b, 2 * i]): int(x[b, 2 * i + 1]) for i in range(8)}
        assert len(pairs) == 8  # distinct keys
        assert all(1 <= k <= 32 for k in pairs) and all(33 <= v <= 64 for v in pairs.values())
        q = (y[b] != IGNORE).nonzero().flatten()
        assert len(q) == 10 and q.min() >= 16
        for pos in q.tolist():
            assert y[b, pos] == pairs[int(x[b, pos])]
    assert int(x.max()) < spec.vocab_size


def test_deterministic_given_generator():
    spec = MQARSpec(seq_len=32, n_kv=4, n_queries=4, n_keys=16, n_values=16)
    a = make_batch(spec, 4, torch.Generator().manual_seed(3))
    b = make_batch(spec, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_accuracy_counts_only_queries():
    y = torch.tensor([[IGNORE, 5, IGNORE, 7]])
    logits = torch.zeros(1, 4, 10)
    logits[0, 1, 5] = 1.0
    logits[0, 3, 2] = 1.0
    assert accuracy(logits, y) == 0.5


@pytest.mark.parametrize("kw,match", [(dict(n_kv=40, n_keys=32), "n_kv"), (dict(seq_len=20), "seq_len"),
                                      (dict(n_queries=0), "n_kv and n_queries")])
def test_spec_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MQARSpec(**kw)


# ---- the probe's model setup ----------------------------------------------------------------------------------

from reciprocal_attention.lab import mqar  # noqa: E402
from reciprocal_attention.model import GPT, GPTConfig  # noqa: E402


def test_probe_setup_shares_weights_across_arms_and_keeps_gpt2_default():
    spec = mqar.zoology_spec(seq_len=32, n_kv=4, vocab_size=257)
    std = GPT(mqar.probe_config("standard", 64, spec), seed=5)
    ra = GPT(mqar.probe_config("ra", 64, spec), seed=5)
    other = GPT(mqar.probe_config("standard", 64, spec), seed=6)
    ps, pr = dict(std.named_parameters()), dict(ra.named_parameters())
    assert set(std.shared_parameter_names()) <= set(pr)
    for name in std.shared_parameter_names():
        assert torch.equal(ps[name], pr[name]), name  # bitwise identical shared init
    assert not torch.equal(ps["lm_head.weight"], dict(other.named_parameters())["lm_head.weight"])
    # untied head with a bias; PyTorch-default scales: N(0, 1) embeddings, U(+-1/sqrt(fan_in)) Linear
    assert std.lm_head.weight is not std.transformer.wte.weight and std.lm_head.bias is not None
    assert 0.9 < float(std.transformer.wte.weight.detach().std()) < 1.1
    for lin in (std.lm_head, std.transformer.h[0].mlp.c_proj):
        bound, w_max = 1 / lin.in_features ** 0.5, float(lin.weight.detach().abs().max())
        assert 0.9 * bound < w_max <= bound
        assert float(lin.bias.detach().abs().max()) > 0  # biases are drawn too, not zero
    gpt2 = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=257), seed=5)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight and gpt2.lm_head.bias is None
    assert 0.015 < float(gpt2.transformer.wte.weight.detach().std()) < 0.025


def test_an_arm_can_change_one_argument_of_its_preset():
    """``PRESET:key=value``: the preset with one argument changed, every other weight still the shared one."""
    assert mqar.arm_attention("ra_disc") == "ra_disc"
    assert mqar.arm_attention("ra_disc:rank=7") == {"preset": "ra_disc", "rank": 7}
    assert mqar.arm_attention("ra:gates=seed") == {"preset": "ra", "gates": "seed"}
    spec = mqar.zoology_spec(seq_len=32, n_kv=4, vocab_size=65)
    r7 = GPT(mqar.probe_config("ra_disc:rank=7", 64, spec), seed=3)
    r8 = GPT(mqar.probe_config("ra_disc", 64, spec), seed=3)
    assert r7.transformer.h[0].attn.W_recip.shape[1] == 7 and r8.transformer.h[0].attn.W_recip.shape[1] == 8
    assert torch.equal(r7.transformer.h[1].mlp.c_fc.weight, r8.transformer.h[1].mlp.c_fc.weight)
    for bad in ("ra:rank", "ra:=7", ":rank=7", "ra:2x=1"):
        with pytest.raises(ValueError, match="PRESET:key=value"):
            mqar.arm_attention(bad)


@pytest.mark.parametrize("kw,match", [(dict(init="xavier"), "init must be one of"),
                                      (dict(tie_embeddings=1), "tie_embeddings must be a bool")])
def test_model_setup_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kw)


def test_baseline_learns_recall_past_the_shortcut():
    """4 pairs: the "most frequent value" shortcut scores ~0.33; the probe's baseline must recall (>= 0.9)."""
    run = mqar.MQARRun(arm="standard", seed=0, d_model=128, seq_len=32, n_kv=4, lr=1e-3, steps=450,
                       vocab_size=33, eval_every=50, eval_sequences=256, stop_at=0.9)
    rec = mqar.train(run, progress=False)
    assert rec["accuracy"] >= 0.9, rec["curve"]
    assert rec["steps_run"] < run.steps  # it stopped early on reaching stop_at


def test_query_logits_are_the_full_forward_at_query_positions():
    spec = mqar.zoology_spec(seq_len=32, n_kv=4, vocab_size=65)
    model = GPT(mqar.probe_config("ra", 64, spec), seed=1)
    x, y = make_batch(spec, 3, torch.Generator().manual_seed(0))
    mask = y != IGNORE
    full, _ = model(x)
    pos = mqar.query_positions(y, spec.n_queries)
    torch.testing.assert_close(mqar.query_logits(model, x, pos), full[mask])
    assert not model.lm_head._forward_pre_hooks  # the hook is removed again


def test_query_positions_are_the_target_mask_in_order():
    spec = mqar.zoology_spec(seq_len=64, n_kv=8, vocab_size=65)
    _, y = make_batch(spec, 32, torch.Generator().manual_seed(4))
    pos = mqar.query_positions(y, spec.n_queries)
    assert pos.shape == (32, spec.n_queries)
    assert torch.equal(y.gather(1, pos).flatten(), y[y != IGNORE])  # the same targets in the same order
    assert bool((pos[:, 1:] > pos[:, :-1]).all())


def test_query_loss_is_cross_entropy_at_the_targets():
    spec = mqar.zoology_spec(seq_len=32, n_kv=4, vocab_size=65)
    model = GPT(mqar.probe_config("standard", 64, spec), seed=2)
    x, y = make_batch(spec, 5, torch.Generator().manual_seed(1))
    full, _ = model(x)
    want = torch.nn.functional.cross_entropy(full.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(mqar.query_loss(model, x, y, spec.n_queries), want)


def test_cuda_graph_step_needs_cuda():
    run = mqar.MQARRun(arm="standard", seed=0, d_model=64, seq_len=32, n_kv=4, lr=1e-3, steps=2, vocab_size=33)
    with pytest.raises(ValueError, match="graphs=True needs a CUDA device"):
        mqar.train(run, "cpu", progress=False, graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("arm", ["standard", "ra", "ra_disc_channel", "full", "output_gate"])
def test_cuda_graph_step_trains_as_the_eager_step(arm):
    """Replayed from a CUDA graph, the probe's steps give the eager steps' parameters, and the held-out accuracy
    after them is the accuracy of a fresh copy of those parameters (no fold cached before the replays is used)."""
    spec = mqar.zoology_spec(seq_len=64, n_kv=8, vocab_size=65)
    run = mqar.MQARRun(arm=arm, seed=0, d_model=64, seq_len=64, n_kv=8, lr=3e-3, steps=12, vocab_size=65)
    models = {}
    for graphs in (False, True):
        model = GPT(mqar.probe_config(arm, 64, spec), seed=0).cuda()
        step = mqar.TrainStep(model, mqar.make_optimizer(model, run, True), spec.n_queries, graphs)
        gen = torch.Generator(device="cuda").manual_seed(5)
        for i in range(run.steps):
            step(*make_batch(spec, 32, gen), 1e-3 * (1 + i % 3))
            if i == 5:  # an evaluation between replays caches the fold of the parameters as they are then
                mqar.held_out_accuracy(model, spec, 128, torch.device("cuda"))
        assert (step.graph is not None) == graphs
        models[graphs] = model
    for (name, pe), pg in zip(models[False].named_parameters(), models[True].parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-5, msg=name)
    fresh = GPT(mqar.probe_config(arm, 64, spec), seed=0).cuda()
    fresh.load_state_dict(models[True].state_dict())
    dev = torch.device("cuda")
    assert mqar.held_out_accuracy(models[True], spec, 256, dev) == mqar.held_out_accuracy(fresh, spec, 256, dev)


def _group_runs(**kw):
    base = dict(seed=0, d_model=64, seq_len=32, n_kv=4, lr=3e-3, steps=12, vocab_size=33, batch_size=16,
                eval_every=4, eval_sequences=64)
    return [mqar.MQARRun(**{**base, "arm": arm, **kw}) for arm in ("standard", "ra", "full")] + \
        [mqar.MQARRun(**{**base, "arm": "standard", "seed": 1, "steps": 8, **kw})]


_SAME = ("accuracy", "steps_run", "final_train_loss", "curve")


def test_runs_trained_together_give_what_each_gives_alone():
    """A group interleaves its runs' steps (on CUDA, each on its own stream): every run's record is the one it
    gets alone, also for a run with fewer steps and one that stops early at ``stop_at``."""
    runs = _group_runs() + [mqar.MQARRun(arm="ra", seed=2, d_model=64, seq_len=32, n_kv=4, lr=3e-3, steps=12,
                                         vocab_size=33, batch_size=16, eval_every=4, eval_sequences=64,
                                         stop_at=0.0)]
    together = mqar.train_group(runs, progress=False)
    for run, rec in zip(runs, together):
        alone = mqar.train(run, progress=False)
        assert {k: rec[k] for k in _SAME} == {k: alone[k] for k in _SAME}, run.key
        assert rec["group"] == len(runs) and alone["group"] == 1
    assert together[3]["steps_run"] == 8 and together[4]["steps_run"] == 4  # stop_at=0: done at its first eval
    with pytest.raises(ValueError, match="at least one"):
        mqar.train_group([], progress=False)


@pytest.mark.gpu
def test_runs_trained_together_on_cuda_streams_match_each_alone():
    """The same on CUDA with CUDA-graph steps replayed on one stream per run (numbers within float tolerance:
    SDPA's backward is not bitwise deterministic)."""
    runs = _group_runs()
    together = mqar.train_group(runs, "cuda", progress=False)
    for run, rec in zip(runs, together):
        alone = mqar.train(run, "cuda", progress=False)
        assert rec["steps_run"] == alone["steps_run"] and rec["cuda_graph"] and alone["cuda_graph"]
        assert rec["final_train_loss"] == pytest.approx(alone["final_train_loss"], rel=1e-4, abs=1e-5), run.key
        assert rec["accuracy"] == pytest.approx(alone["accuracy"], abs=2 / (64 * run.n_kv)), run.key
