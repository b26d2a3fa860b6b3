"""GPT with Reciprocal Attention: shapes, tied weights, arm-independent init, KV-cached generation, layer choice."""

import math

import pytest
import torch

from reciprocal_attention.model import GPT, GPTConfig

V = 97



ARMS = ["standard", "seed", "ra", "ra_disc", "full", "low_rank", "output_gate"]


def tiny(**kw) -> GPTConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=V)
    return GPTConfig(**{**base, **kw})


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(tiny(attn="ra"), seed=0)
    idx, tgt = torch.randint(0, V, (3, 17)), torch.randint(0, V, (3, 17))
    logits, loss = model(idx, tgt)
    assert logits.shape == (3, 17, V) and loss.shape == ()
    assert abs(loss.item() - math.log(V)) < 0.2  # near-uniform predictions at init
    logits2, none = model(idx)
    assert none is None and torch.equal(logits, logits2)
    targets = idx.clone()
    targets[:, :5] = -1  # ignored positions
    assert model(idx, targets)[1].isfinite()


def test_bad_inputs():
    model = GPT(tiny(), seed=0)
    with pytest.raises(ValueError, match="idx must be an int64"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="n_embd must be divisible"):
        tiny(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="ra_layers"):
        tiny(ra_layers=[0, 5])
    with pytest.raises(ValueError, match="ra_layers"):
        tiny(ra_layers="first")
    with pytest.raises(ValueError, match="GPT preset"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)


def test_named_configs():
    for name, (L, H, C) in {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
                            "gpt2-xl": (48, 25, 1600)}.items():
        cfg = GPTConfig.from_preset(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (L, H, C, 1024, 50257)
    assert GPTConfig.from_preset("tiny", vocab_size=257).n_layer == 2


def test_tied_embeddings_counted_once():
    model = GPT(tiny(), seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == n
    assert model.num_params() == n - 32 * 32
    assert model.estimate_mfu(1e4, 1e12) > 0


def test_shared_init_identical_across_arms():
    ref = dict(GPT(tiny(attn="standard"), seed=3).named_parameters())
    for arm in ARMS[1:]:
        model = GPT(tiny(attn=arm), seed=3)
        shared = model.shared_parameter_names()
        assert set(shared) == set(ref), arm  # same shared parameters (and biases) in every arm
        params = dict(model.named_parameters())
        for name in shared:
            assert torch.equal(params[name], ref[name]), (arm, name)
    other = dict(GPT(tiny(), seed=4).named_parameters())
    assert not torch.equal(other["transformer.h.0.attn.c_attn.weight"], ref["transformer.h.0.attn.c_attn.weight"])


def test_init_statistics_and_determinism():
    cfg = tiny(n_layer=4, n_embd=64, vocab_size=512, attn="ra")
    a, b = GPT(cfg, seed=1), GPT(cfg, seed=1)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n  # RA-only parameters too
    p = dict(a.named_parameters())
    assert abs(p["transformer.wte.weight"].std().item() - 0.02) < 0.002
    assert abs(p["transformer.h.0.mlp.c_proj.weight"].std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert torch.count_nonzero(p["transformer.h.0.attn.c_attn.bias"]) == 0
    assert torch.all(p["transformer.h.1.ln_2.weight"] == 1)
    state = torch.random.get_rng_state()
    GPT(cfg, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # building a model leaves the global RNG alone


def test_ra_layer_selection():
    cfg = tiny(n_layer=6, attn="ra", ra_layers="middle")
    assert cfg.ra_layer_indices() == [2, 3]
    model = GPT(cfg, seed=0)
    variants = [b.attn.variant for b in model.transformer.h]
    assert variants == ["standard", "standard", "same_flop", "same_flop", "standard", "standard"]
    assert [b.attn.variant for b in GPT(tiny(attn="full", ra_layers=[1]), seed=0).transformer.h] == \
        ["standard", "full"]
    assert all(b.attn.variant == "standard" for b in GPT(tiny(attn="ra", ra_layers="none"), seed=0).transformer.h)
    dict_cfg = tiny(attn={"preset": "ra", "rank": 4})
    assert GPT(dict_cfg, seed=0).transformer.h[0].attn.W_recip.shape == (16, 4)
    plain = tiny(attn={"variant": "low_rank", "rank": 2, "gates": "seed"})
    assert GPT(plain, seed=0).transformer.h[1].attn.variant == "low_rank"
    with pytest.raises(ValueError, match="must not set"):
        GPT(tiny(attn={"preset": "ra", "n_head": 4}), seed=0)


def test_optimizer_groups():
    model = GPT(tiny(attn="ra_disc"), seed=0)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)].split(".")[-1] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)].split(".")[-1] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decay == {"weight", "W_recip"}  # Linear/Embedding weights and W_recip
    assert {"bias", "w_std", "w_rec", "w_disc", "d_bias"} <= no_decay
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _randomize_ra(model: GPT) -> None:
    """Make the RA-only parameters matter (gates away from init, non-zero positional bias)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.transformer.h:
            for name in ("w_std", "w_rec", "w_disc", "d_bias", "u", "out_gate"):
                if hasattr(block.attn, name) and getattr(block.attn, name).requires_grad:
                    p = getattr(block.attn, name)
                    p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("attn", ["standard", {"preset": "ra"}, {"preset": "low_rank"}, {"preset": "full"},
                                  {"preset": "ra_disc"}, {"preset": "ra", "discoverability": "content"}],
                         ids=["standard", "same_flop", "low_rank", "full", "positional_disc", "content_disc"])
def test_cached_generation_equals_uncached(attn):
    torch.manual_seed(0)
    model = GPT(tiny(attn=attn, vocab_size=V), seed=0).double().eval()
    _randomize_ra(model)
    idx = torch.randint(0, V, (2, 5))
    # logits: prefill + one token at a time through the cache == one full forward
    seq = torch.randint(0, V, (2, 20))
    full, _ = model(seq)
    from reciprocal_attention.model import KVCache

    cache = KVCache()
    parts = [model(seq[:, :7], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-10)
    # greedy generation, including past block_size (the window then slides)
    a = model.generate(idx, 40, temperature=0.0, use_cache=True)
    b = model.generate(idx, 40, temperature=0.0, use_cache=False)
    assert a.shape == (2, 45) and torch.equal(a, b)


def test_sampling_is_seeded():
    model = GPT(tiny(attn="ra"), seed=0).eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(idx, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_backward_reaches_ra_parameters():
    model = GPT(tiny(attn="ra_disc"), seed=0)
    idx = torch.randint(0, V, (2, 16))
    model(idx, idx)[1].backward()
    attn = model.transformer.h[0].attn
    for name in ("W_recip", "w_std", "w_rec", "d_bias"):
        assert getattr(attn, name).grad is not None and getattr(attn, name).grad.abs().sum() > 0, name
    assert attn.w_disc.grad is not None  # zero at init: it multiplies d_bias = 0
