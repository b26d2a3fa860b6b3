"""Hugging Face GPT-2 retrofit: exact conversion, generation with transformers' cache, training,
save/load, unconvert, nanoGPT-style state names. Random-init ``GPT2Config`` models only (no hub downloads)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

from reciprocal_attention.attention import ReciprocalAttention  # noqa: E402
from reciprocal_attention.hf import (GPT2ReciprocalAttention, GPT2ReciprocalLMHeadModel,  # noqa: E402
                                     convert_gpt2, converted_layers, gpt_state_from_hf, layer_indices,
                                     load_converted, save_converted, unconvert_gpt2)

F64 = torch.float64


def make_config(**kw) -> GPT2Config:
    # initializer_range 0.2 (not GPT-2's 0.02) so attention patterns and greedy tokens depend on the weights.
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=64, initializer_range=0.2,
                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    base.update(kw)
    return GPT2Config(**base)


def make_model(dtype=F64, seed=0, cls=GPT2LMHeadModel, **kw):
    torch.manual_seed(seed)
    return cls(make_config(**kw)).to(dtype).eval()


@pytest.fixture(scope="module")
def base64():
    return make_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def greedy(model, ids, use_cache=True, n=10, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=use_cache, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Optional dependency
# ----------------------------------------------------------------------------------------------------------------

def test_package_import_does_not_need_transformers():
    code = ("import sys, reciprocal_attention\n"
            "assert 'transformers' not in sys.modules, 'import reciprocal_attention pulled in transformers'\n"
            "sys.modules['transformers'] = None  # as if it were not installed\n"
            "try:\n"
            "    import reciprocal_attention.hf\n"
            "except ImportError as e:\n"
            "    assert 'reciprocal-attention[hf]' in str(e), str(e)\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------------------------------
# Exact conversion
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", ["all", "middle", [0], [1]])
def test_convert_same_logits_float64(base64, ids, layers):
    m = convert_gpt2(copy.deepcopy(base64), layers=layers)
    want = layer_indices(layers, 2)
    assert converted_layers(m) == want
    assert all(isinstance(m.transformer.h[i].attn, GPT2ReciprocalAttention) for i in want)
    assert (logits(m, ids) - logits(base64, ids)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("preset,kw", [("full", {}), ("standard", {}), ("output_gate", {}),
                                       ("low_rank", {"rank": 4}),
                                       ("ra_disc", {"variant": "low_rank"}),
                                       ("low_rank", {"discoverability": "content"}),
                                       ("full", {"discoverability": "positional"}),
                                       ("low_rank", {"routing_threshold": -1.0})])
def test_convert_presets_same_logits(base64, ids, preset, kw):
    m = convert_gpt2(copy.deepcopy(base64), preset=preset, **kw)
    assert (logits(m, ids) - logits(base64, ids)).abs().max().item() <= 1e-10
    assert m.transformer.h[0].attn.ra.variant == kw.get("variant", preset if preset in ("full", "low_rank")
                                                        else "standard")


def test_convert_float32(ids):
    ref = make_model(torch.float32)
    m = convert_gpt2(copy.deepcopy(ref))
    assert (logits(m, ids) - logits(ref, ids)).abs().max().item() <= 2e-5


def test_convert_bare_gpt2model(ids):
    ref = make_model(cls=GPT2Model)
    m = convert_gpt2(copy.deepcopy(ref), layers=[1])
    with torch.no_grad():
        d = (m(ids).last_hidden_state - ref(ids).last_hidden_state).abs().max().item()
    assert d <= 1e-10


@pytest.mark.parametrize("cfg", [{"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True},
                                 {"reorder_and_upcast_attn": True, "attn_implementation": "eager"},
                                 {"attn_implementation": "eager"}])
def test_config_details(ids, cfg):
    cfg = dict(cfg)
    impl = cfg.pop("attn_implementation", None)
    upcast = cfg.get("reorder_and_upcast_attn", False)  # transformers' upcast path refuses float64
    ref = make_model(torch.float32 if upcast else F64, **cfg)
    if impl:
        ref.set_attn_implementation(impl)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    for preset in ("low_rank", "full"):
        m = convert_gpt2(copy.deepcopy(ref), preset=preset)
        d = (logits(m, ids, attention_mask=am) - logits(ref, ids, attention_mask=am)).abs().max().item()
        assert d <= (2e-5 if upcast else 1e-10)
        if upcast:  # fp32 logits under bf16 autocast, as GPT2Attention's eager upcast path
            with torch.autocast("cpu", dtype=torch.bfloat16):
                a, b = logits(m, ids, attention_mask=am).float(), logits(ref, ids, attention_mask=am).float()
            assert (a - b).abs().max().item() <= 0.1 * b.abs().max().item()


def test_cross_attention_config(ids):
    ref = make_model(add_cross_attention=True)
    m = convert_gpt2(copy.deepcopy(ref))
    enc = torch.randn(2, 5, 64, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert (logits(m, ids, encoder_hidden_states=enc)
            - logits(ref, ids, encoder_hidden_states=enc)).abs().max().item() <= 1e-10


def test_dropout_and_block_size_from_config(base64):
    m = convert_gpt2(make_model(attn_pdrop=0.25, resid_pdrop=0.05, n_positions=48), preset="ra_disc",
                     variant="low_rank")
    ra = m.transformer.h[0].attn.ra
    assert ra.dropout == 0.25 and ra.resid_dropout.p == 0.05 and ra.block_size == 48
    assert ra.d_bias.shape == (4, 48)


# ----------------------------------------------------------------------------------------------------------------
# Generation with transformers' cache, left padding
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,kw", [("low_rank", {}), ("full", {}), ("ra_disc", {"variant": "low_rank"})])
def test_generate_same_tokens(base64, ids, preset, kw):
    m = convert_gpt2(copy.deepcopy(base64), preset=preset, **kw)
    want = greedy(base64, ids[:, :6])
    assert torch.equal(greedy(m, ids[:, :6], use_cache=True), want)
    assert torch.equal(greedy(m, ids[:, :6], use_cache=False), want)


def test_left_padding(base64, ids):
    m = convert_gpt2(copy.deepcopy(base64), layers="all")
    am = torch.ones_like(ids)
    am[0, :5] = 0
    x = ids.masked_fill(am == 0, 0)
    got, want = logits(m, x, attention_mask=am), logits(base64, x, attention_mask=am)
    assert not torch.isnan(got).any()
    assert (got - want)[am.bool()].abs().max().item() <= 1e-10
    ref_tokens = greedy(base64, x, attention_mask=am)
    assert torch.equal(greedy(m, x, attention_mask=am), ref_tokens)
    assert torch.equal(greedy(m, x, attention_mask=am, use_cache=False), ref_tokens)


def test_unsupported_attention_paths(base64, ids):
    m = convert_gpt2(copy.deepcopy(base64))
    attn = m.transformer.h[0].attn
    x = torch.randn(2, 4, 64, dtype=F64)
    with pytest.raises(NotImplementedError, match="4-D attention masks"):
        attn(x, attention_mask=torch.ones(2, 4))
    with pytest.raises(NotImplementedError, match="head_mask"):
        attn(x, head_mask=torch.ones(4))
    with pytest.raises(NotImplementedError, match="Cache object"):
        attn(x, layer_past=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        greedy(m, ids[:, :4], n=2, cache_implementation="static")


def test_output_attentions_eager(ids):
    ref = make_model()
    ref.set_attn_implementation("eager")
    m = convert_gpt2(copy.deepcopy(ref), layers=[0])
    with torch.no_grad():
        got, want = m(ids, output_attentions=True).attentions, ref(ids, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    assert all((a - b).abs().max().item() <= 1e-10 for a, b in zip(got, want))


def test_output_attentions_direct(base64):
    m = convert_gpt2(copy.deepcopy(base64), preset="full")
    attn = m.transformer.h[0].attn
    x = torch.randn(2, 5, 64, dtype=F64)
    y, w = attn(x, output_attentions=True)
    y2, w2 = attn(x)
    assert w2 is None and w.shape == (2, 4, 5, 5)
    assert torch.allclose(y, y2, atol=1e-12) and torch.allclose(w.sum(-1), torch.ones(2, 4, 5, dtype=F64))
    assert (w.triu(1) == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# RA is live: training moves it, the cache still matches
# ----------------------------------------------------------------------------------------------------------------

def train_steps(m, ids, steps=4, lr=3e-2):
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    for _ in range(steps):
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("preset,kw", [("low_rank", {}), ("full", {}), ("ra_disc", {"variant": "low_rank"})])
def test_training_turns_ra_on_and_cache_matches(base64, ids, preset, kw):
    m = convert_gpt2(copy.deepcopy(base64), preset=preset, **kw)
    ra0 = m.transformer.h[0].attn.ra
    assert ra0.w_rec.abs().max().item() == 0.0
    train_steps(m, ids)
    for i in (0, 1):
        ra = m.transformer.h[i].attn.ra
        assert ra.w_rec.abs().min().item() > 0, f"layer {i}: w_rec did not move (RA not trainable)"
        assert (ra.w_std - 1).abs().max().item() > 0
        if ra.discoverability == "positional":
            assert ra.d_bias.abs().max().item() > 0
    assert (logits(m, ids) - logits(base64, ids)).abs().max().item() > 1e-3  # the function changed
    prompt = ids[:, :6]
    assert torch.equal(greedy(m, prompt, use_cache=True), greedy(m, prompt, use_cache=False))
    am = torch.ones_like(prompt)
    am[1, :2] = 0  # left padding: positions (and positional discoverability) come from the mask
    assert torch.equal(greedy(m, prompt, attention_mask=am), greedy(m, prompt, attention_mask=am, use_cache=False))
    # incremental forward with transformers' DynamicCache equals the full forward
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        a = m(ids[:, :9], cache=cache, use_cache=True).logits
        b = m(ids[:, 9:], cache=cache, use_cache=True).logits
    assert (torch.cat([a, b], 1) - logits(m, ids)).abs().max().item() <= 1e-10


def test_padding_invariance_with_live_discoverability(base64, ids):
    """Left padding changes nothing on the real tokens: the positional bias follows GPT-2's position_ids."""
    m = train_steps(convert_gpt2(copy.deepcopy(base64), preset="ra_disc", variant="low_rank"), ids, steps=3)
    assert m.transformer.h[0].attn.ra.d_bias.abs().max().item() > 0
    x = ids[:1, :8]
    padded = torch.cat([torch.zeros(1, 3, dtype=x.dtype), x], 1)
    am = torch.cat([torch.zeros(1, 3, dtype=x.dtype), torch.ones_like(x)], 1)
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    got = logits(m, padded, attention_mask=am, position_ids=pos)[:, 3:]
    assert (got - logits(m, x)).abs().max().item() <= 1e-10
    gen = greedy(m, padded, attention_mask=am, n=6)
    assert torch.equal(gen[:, 3:], greedy(m, x, n=6))


def test_wrapper_chunks_with_cache_and_no_mask(base64):
    """Chunked calls against a DynamicCache with no mask (causal, bottom-right aligned) equal one full call."""
    from transformers import DynamicCache

    m = train_steps(convert_gpt2(copy.deepcopy(base64), preset="full"), torch.randint(1, 100, (2, 16)), steps=2)
    attn = m.transformer.h[1].attn
    x = torch.randn(2, 12, 64, dtype=F64, generator=torch.Generator().manual_seed(7))
    cache = DynamicCache()
    with torch.no_grad():
        full, _ = attn(x)
        parts = [attn(x[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 12))]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,kw,match", [
    ("seed", {}, "routing is absorbing"),
    ("ra", {}, "same_flop"),
    ("ra_disc", {}, "same_flop"),
    ("low_rank", {"gates": "seed"}, "seed gates"),
    ("low_rank", {"routing_threshold": 0.1}, "absorbing"),
    ("full", {"bias": False}, "bias"),
    ("low_rank", {"init": {"w_rec": 0.3}}, "w_rec"),
    ("low_rank", {"dropout": 0.1}, "dropout"),
    ("low_rank", {"block_size": 16}, "block_size"),
    ("nope", {}, "preset must be one of"),
])
def test_convert_errors(base64, preset, kw, match):
    m = copy.deepcopy(base64)
    with pytest.raises(ValueError, match=match):
        convert_gpt2(m, preset=preset, **kw)
    assert converted_layers(m) == []


@pytest.mark.parametrize("layers", ["first", [2], [-1], [0, 0], [True], 3])
def test_bad_layers(base64, layers):
    with pytest.raises(ValueError, match="layer"):
        convert_gpt2(copy.deepcopy(base64), layers=layers)


def test_layer_selection():
    assert layer_indices("middle", 6) == [2, 3]
    assert layer_indices("middle", 12) == [4, 5, 6, 7]
    assert layer_indices("none", 4) == [] and layer_indices((3, 1), 4) == [1, 3]


def test_already_converted_and_attn_implementation(base64):
    m = convert_gpt2(copy.deepcopy(base64), layers=[0])
    with pytest.raises(ValueError, match="already converted"):
        convert_gpt2(m, layers="all")
    m2 = copy.deepcopy(base64)
    m2.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="sdpa"):
        convert_gpt2(m2)


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------

def test_save_load_roundtrip(base64, ids, tmp_path):
    """save_converted / load_converted are save_pretrained / from_pretrained; mixed presets per layer survive."""
    m = convert_gpt2(copy.deepcopy(base64), layers=[0], preset="low_rank", rank=4)
    convert_gpt2(m, layers=[1], preset="ra_disc", variant="low_rank")
    train_steps(m, ids, steps=2)
    save_converted(m, tmp_path / "ra")
    meta = json.loads((tmp_path / "ra" / "config.json").read_text())
    assert meta["model_type"] == "gpt2-reciprocal" and meta["ra_layers"] == [0, 1] and meta["ra_preset"] is None
    assert meta["ra_per_layer"]["0"] == {"preset": "low_rank", "overrides": {"rank": 4}}
    assert meta["ra_per_layer"]["1"] == {"preset": "ra_disc", "overrides": {"variant": "low_rank"}}
    assert meta["layer_types"] == ["reciprocal_attention"] * 2 and meta["n_embd"] == 64
    loaded = load_converted(tmp_path / "ra")
    assert type(loaded) is GPT2ReciprocalLMHeadModel and converted_layers(loaded) == [0, 1]
    assert loaded.dtype == F64 and not loaded.training
    assert loaded.transformer.h[1].attn.ra.discoverability == "positional"
    sd, sd2 = m.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(logits(loaded, ids), logits(m, ids))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with pytest.raises(TypeError, match="convert_gpt2"):
        save_converted(copy.deepcopy(base64), tmp_path / "plain")
    base64.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="plain GPT-2"):
        load_converted(tmp_path / "plain")


# ----------------------------------------------------------------------------------------------------------------
# Unconvert
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,kw", [("low_rank", {}), ("full", {}), ("output_gate", {}),
                                       ("ra_disc", {"variant": "low_rank"})])
def test_unconvert_roundtrip(base64, ids, preset, kw):
    m = unconvert_gpt2(convert_gpt2(copy.deepcopy(base64), preset=preset, **kw))
    assert converted_layers(m) == []
    assert type(m.transformer.h[0].attn).__name__ == "GPT2Attention"
    assert (logits(m, ids) - logits(base64, ids)).abs().max().item() <= 1e-10
    sd, sd0 = m.state_dict(), base64.state_dict()
    assert all(torch.equal(sd[k], sd0[k]) for k in sd0)


def test_unconvert_refuses_live_ra(base64, ids):
    m = train_steps(convert_gpt2(copy.deepcopy(base64)), ids, steps=1)
    with pytest.raises(ValueError, match=r"layer 0 .*w_rec"):
        unconvert_gpt2(m)
    assert converted_layers(m) == [0, 1]  # nothing changed
    m = convert_gpt2(copy.deepcopy(base64), preset="ra_disc", variant="low_rank")
    with torch.no_grad():
        m.transformer.h[1].attn.ra.d_bias[2, 3] = 0.5
    with pytest.raises(ValueError, match=r"layer 1 .*d_bias"):
        unconvert_gpt2(m)


def test_unconvert_folds_gates_and_same_flop(base64, ids):
    """Exact beyond the init: w_std != 1, output gates, and same_flop with any gates/routing fold to GPT-2."""
    m = convert_gpt2(copy.deepcopy(base64), layers=[0], preset="output_gate")
    convert_gpt2(m, layers=[1], preset="low_rank")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.transformer.h[0].attn.ra.out_gate.copy_(torch.randn(4, generator=g, dtype=F64))
        m.transformer.h[1].attn.ra.w_std.copy_(0.5 + torch.rand(4, generator=g, dtype=F64))
    want = logits(m, ids)
    assert (logits(unconvert_gpt2(m), ids) - want).abs().max().item() <= 1e-10
    # same_flop can't be a conversion target, but its fold is a width-D standard attention: build one by hand
    # (layer 1: the seed preset itself -- seed gates, routing at 0.1 with head 0 routed, bias-free projections)
    m = copy.deepcopy(base64)
    for i, preset in enumerate(["ra", "seed"]):
        old = m.transformer.h[i].attn
        ra = ReciprocalAttention.from_preset(preset, n_embd=64, n_head=4, block_size=64).to(F64)
        with torch.no_grad():
            ra.c_attn.weight.copy_(old.c_attn.weight.t())
            ra.c_proj.weight.copy_(old.c_proj.weight.t())
            if ra.c_attn.bias is not None:
                ra.c_attn.bias.copy_(old.c_attn.bias)
                ra.c_proj.bias.copy_(old.c_proj.bias)
            ra.W_recip.copy_(torch.randn(16, 8, generator=g, dtype=F64) * 0.3)
            ra.w_std.copy_(0.5 + torch.rand(4, generator=g, dtype=F64))
            ra.w_rec.copy_(torch.tensor([0.05, 0.9, 0.5, 1.3], dtype=F64))
        m.transformer.h[i].attn = GPT2ReciprocalAttention(ra, m.config, i, preset).eval()
    want = logits(m, ids)
    assert (want - logits(base64, ids)).abs().max().item() > 1e-3
    assert (logits(unconvert_gpt2(m), ids) - want).abs().max().item() <= 1e-10


# ----------------------------------------------------------------------------------------------------------------
# nanoGPT-style names
# ----------------------------------------------------------------------------------------------------------------

def expected_names(n_layer):
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
             "lm_head.weight"]
    for i in range(n_layer):
        for s in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{s}.weight", f"transformer.h.{i}.{s}.bias"]
    return sorted(names)


def test_gpt_state_from_hf_names_and_layout(base64):
    sd = gpt_state_from_hf(base64)
    assert sorted(sd) == expected_names(2)
    h0 = base64.transformer.h[0]
    assert torch.equal(sd["transformer.h.0.attn.c_attn.weight"], h0.attn.c_attn.weight.t())
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (256, 64)
    assert torch.equal(sd["lm_head.weight"], base64.transformer.wte.weight)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt_state_from_hf(make_model(scale_attn_by_inverse_layer_idx=True))


@pytest.mark.parametrize("convert", [False, True])
def test_gpt_state_loads_into_nanogpt_model(ids, convert):
    model_mod = pytest.importorskip("reciprocal_attention.model")
    hf = make_model(activation_function="gelu")  # nanoGPT's MLP uses exact-erf nn.GELU()
    attn = "standard"
    if convert:
        convert_gpt2(hf, layers=[1], preset="low_rank")
        train_steps(hf, ids, steps=2)
        attn = "low_rank"
    cfg = model_mod.GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=100, attn=attn,
                              ra_layers=[1] if convert else "all")
    gpt = model_mod.GPT(cfg).to(F64).eval()
    gpt.load_state_dict(gpt_state_from_hf(hf), strict=True)
    with torch.no_grad():
        got, _ = gpt(ids)
    assert (got - logits(hf, ids)).abs().max().item() <= 1e-10


# ----------------------------------------------------------------------------------------------------------------
# ra train --init-from DIR (model.init_from): the trainer's GPT starts at the HF checkpoint's exact function
# ----------------------------------------------------------------------------------------------------------------

INIT_BASE = ["system.device=cpu", "system.dtype=float32", "system.threads=1", "system.progress=false",
             "data.fixture=true", "data.batch_size=2", "eval.interval=0", "eval.iters=1", "budget.max_steps=1",
             "checkpoint.interval=1", "checkpoint.keep_last=0", "schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random-init tiny GPT-2 (byte vocabulary, gelu_new) saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=257, n_positions=64, initializer_range=0.2,
                     bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    assert cfg.activation_function == "gelu_new"
    d = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(d)
    return d, model


def _init_run(out, hf_path, *extra):
    from reciprocal_attention.lab import train as T
    from reciprocal_attention.lab.config import load_config

    cfg = load_config("tiny", overrides=INIT_BASE + [f"system.out_dir={out}", f"model.init_from={hf_path}", *extra])
    n = torch.get_num_threads()
    try:
        return T.train(cfg)
    finally:
        torch.set_num_threads(n)


def _gpt_at_step(run, step):
    """The trainer's GPT as its checkpoint of ``step`` holds it (step 0: before any update)."""
    from reciprocal_attention.lab import checkpoint as ckpt
    from reciprocal_attention.lab import train as T
    from reciprocal_attention.lab.config import TrainConfig
    from reciprocal_attention.model import GPT

    d = ckpt.step_dir(run / "checkpoints", step)
    cfg = TrainConfig.from_dict(ckpt.read_state(d)["config"])
    gpt = GPT(T.gpt_config(cfg, 257), seed=cfg.system.seed)
    ckpt.load_checkpoint(d, gpt, restore_rng=False)
    return gpt.eval(), cfg


@pytest.mark.parametrize("attn", ["low_rank", "standard"])
def test_init_from_hf_checkpoint_same_logits(hf_dir, tmp_path, attn):
    path, hf = hf_dir
    run = tmp_path / "run"
    summary = _init_run(run, path, f"model.attn={attn}")
    assert summary["steps"] == 1
    gpt, cfg = _gpt_at_step(run, 0)
    m = cfg.model  # the resolved architecture is recorded in the run's config
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.activation) == (2, 2, 32, 64, "gelu_tanh")
    assert m.init_from == str(path) and 'init_from = "' in (run / "config.toml").read_text()
    assert gpt.config.ra_layer_indices() == [0, 1]
    if attn == "low_rank":
        for b in gpt.transformer.h:
            assert b.attn.variant == "low_rank"
            assert torch.all(b.attn.w_std == 1) and torch.all(b.attn.w_rec == 0)
            assert b.attn.W_recip.abs().sum() > 0  # RA can switch on at the first step
    ids = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, _ = gpt(ids)
    want = logits(hf, ids)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    # ... and training then moved it (the step-1 checkpoint differs)
    after, _ = _gpt_at_step(run, 1)
    assert not torch.equal(after.transformer.wte.weight, gpt.transformer.wte.weight)


def test_init_from_resume_uses_run_checkpoint(hf_dir, tmp_path):
    import shutil

    from reciprocal_attention.lab import train as T
    from reciprocal_attention.lab.checkpoint import read_state
    from reciprocal_attention.lab.config import TrainConfig

    path, _ = hf_dir
    copy_dir = tmp_path / "hf"
    shutil.copytree(path, copy_dir)
    run = tmp_path / "run"
    _init_run(run, copy_dir, "model.attn=low_rank")
    shutil.rmtree(copy_dir)  # a resumed run neither needs nor reads the HF checkpoint
    saved = read_state(run)["config"]
    saved["budget"]["max_steps"] = 2
    n = torch.get_num_threads()
    try:
        out = T.train(TrainConfig.from_dict(saved), resume=run)
    finally:
        torch.set_num_threads(n)
    assert out["resumed_from_step"] == 1 and out["steps"] == 2


def test_init_from_errors(hf_dir, tmp_path):
    from reciprocal_attention.lab import train as T
    from reciprocal_attention.lab.config import ConfigError

    path, _ = hf_dir
    with pytest.raises(ConfigError, match=r"attn='ra'.*same_flop.*model\.attn=low_rank"):
        _init_run(tmp_path / "a", path, "model.attn=ra")
    with pytest.raises(ConfigError, match=r"model\.n_embd=64 \(checkpoint: 32\)"):
        _init_run(tmp_path / "b", path, "model.n_embd=64")
    with pytest.raises(ConfigError, match=r"model\.activation='gelu' \(checkpoint: 'gelu_tanh'\)"):
        _init_run(tmp_path / "c", path, "model.activation=gelu")
    with pytest.raises(ConfigError, match="no config.json"):
        _init_run(tmp_path / "d", tmp_path)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ConfigError, match="no weights"):
        _init_run(tmp_path / "e", tmp_path / "noweights")
    with pytest.raises(ConfigError, match="model.bias must be true"):
        _init_run(tmp_path / "f", path, "model.bias=false")
    # --init-from is sugar for --set model.init_from=DIR
    assert T.build_parser().parse_args(["--init-from", str(path)]).init_from == str(path)


def test_init_from_vocab_mismatch(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=32, bos_token_id=None,
                               eos_token_id=None)).save_pretrained(tmp_path / "hf")
    from reciprocal_attention.lab.config import ConfigError

    with pytest.raises(ConfigError, match="vocab_size 300 differs from the corpus tokenizer's 257"):
        _init_run(tmp_path / "run", tmp_path / "hf")


# ----------------------------------------------------------------------------------------------------------------
# Causal-only calls: the flash path even where transformers materialises the causal mask (torch.compile)

def _sdpa_calls(monkeypatch):
    """Record ``(attn_mask is None, is_causal)`` of every SDPA call of the converted layers."""
    from reciprocal_attention.hf import modeling

    calls, real = [], modeling.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", spy)
    return calls


def test_causal_only_call_skips_the_materialised_mask(base64, ids, monkeypatch):
    """With transformers forced to build its 4-D causal mask (what it does while compiling on torch < 2.14), a call
    without mask, cache or positions still runs the layers with ``is_causal`` and gives the same logits as the
    masked path; a padding mask, positions or a cache keep the mask."""
    from transformers import masking_utils

    m = convert_gpt2(copy.deepcopy(base64)).to(torch.float32)
    m.config._attn_implementation = "sdpa"
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
    calls = _sdpa_calls(monkeypatch)
    got = logits(m, ids)
    assert calls and all(c == (True, True) for c in calls), calls
    state = m.transformer._ra_call_state
    assert state.causal_only and all(blk.attn.call_state is state for blk in m.transformer.h)
    calls.clear()
    want = logits(m, ids, attention_mask=torch.ones_like(ids))  # same function through the 4-D mask
    assert calls and all(c == (False, False) for c in calls), calls
    assert not state.causal_only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls.clear()
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    torch.testing.assert_close(logits(m, ids, position_ids=pos), want, rtol=1e-5, atol=1e-5)
    assert calls and all(c == (False, False) for c in calls), calls
    # generate passes a cache: the mask path (left padding and offsets are the mask's job)
    calls.clear()
    greedy(m, ids, n=3)
    assert calls and all(c == (False, False) for c in calls), calls


def test_call_state_follows_conversion(base64):
    m = convert_gpt2(copy.deepcopy(base64), layers=[1])
    assert m.transformer.h[1].attn.call_state is m.transformer._ra_call_state
    assert len(m.transformer._forward_pre_hooks) == 1
    clone = copy.deepcopy(m)  # the copy's layers share the copy's state
    assert clone.transformer.h[1].attn.call_state is clone.transformer._ra_call_state is not m.transformer._ra_call_state
    unconvert_gpt2(m)
    assert not m.transformer._forward_pre_hooks and not hasattr(m.transformer, "_ra_call_state")
