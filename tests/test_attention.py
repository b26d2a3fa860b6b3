"""The module and the functional API against the float64 reference: outputs and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reciprocal_attention import fold, reference
from reciprocal_attention import PRESETS, LayerKVCache, ReciprocalAttention, reciprocal_attention
from reciprocal_attention.lab.seed_algorithm import seed_packed_attention

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error of ``a`` against ``b`` (absolute when ``b`` is zero)."""
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def randomize(m: ReciprocalAttention, gen: torch.Generator, positive_gates: bool = False) -> None:
    """Fresh random values in every parameter, including gates (some below routing thresholds) and biases."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("w_std", "w_rec", "w_disc"):
                lo = 0.05 if positive_gates else -0.5
                p.copy_(lo + torch.rand(p.shape, generator=gen, dtype=F64).to(p.dtype) * (1.0 - lo))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * 0.3)


def pair(gen: torch.Generator, backend: str = "sdpa", positive_gates: bool = False, **kw):
    """A module on ``backend`` and a reference-backend twin with identical parameters (float64)."""
    m = ReciprocalAttention(backend=backend, **kw).to(F64)
    randomize(m, gen, positive_gates=positive_gates or kw.get("gates") == "seed")
    ref = ReciprocalAttention(backend="reference", **kw).to(F64)
    ref.load_state_dict(m.state_dict())
    for p_ref, p in zip(ref.parameters(), m.parameters()):
        p_ref.requires_grad_(p.requires_grad)
    return m, ref


def grads_match(m: ReciprocalAttention, ref: ReciprocalAttention, x: torch.Tensor, tol: float = 1e-10) -> None:
    """Forward and backward both modules on the same input; compare output, dx and every parameter gradient."""
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = m(x1), ref(x2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert rel_err(y1, y2) <= tol, f"output rel err {rel_err(y1, y2)}"
    assert rel_err(x1.grad, x2.grad) <= tol, f"dx rel err {rel_err(x1.grad, x2.grad)}"
    for (name, p1), (_, p2) in zip(m.named_parameters(), ref.named_parameters()):
        if p2.grad is None:
            assert p1.grad is None or p1.grad.abs().max() == 0, name
            continue
        assert p1.grad is not None, f"no gradient for {name}"
        assert rel_err(p1.grad, p2.grad) <= tol, f"d{name} rel err {rel_err(p1.grad, p2.grad)}"


# ---------------------------------------------------------------------------------------------------------------
# Exactness in float64 (<= 1e-10), over the grid the spec names
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["standard", "full", "low_rank", "same_flop"])
@pytest.mark.parametrize("gates", ["seed", "signed"])
@pytest.mark.parametrize("disc", [None, "positional", "content"])
def test_sdpa_backend_matches_reference(variant, gates, disc):
    gen = torch.Generator().manual_seed(hash((variant, gates, disc)) % 2**31)
    for thr in ([None] if variant == "standard" else [None, 0.3]):
        m, ref = pair(gen, n_embd=24, n_head=3, rank=3, variant=variant, gates=gates, routing_threshold=thr,
                      discoverability=disc, bias=True, block_size=20)
        for T in (1, 7, 16):
            grads_match(m, ref, torch.randn(2, T, 24, generator=gen, dtype=F64))
            m.zero_grad(), ref.zero_grad()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), T=st.integers(1, 11), H=st.integers(1, 3), D=st.sampled_from([4, 6, 8]),
       data=st.data(), variant=st.sampled_from(["standard", "full", "low_rank", "same_flop"]),
       gates=st.sampled_from(["seed", "signed"]), routing=st.booleans(),
       disc=st.sampled_from([None, "positional", "content"]), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_module_matches_reference(B, T, H, D, data, variant, gates, routing, disc, bias, seed):
    R = data.draw(st.integers(1, D - 1))
    thr = 0.3 if routing and variant != "standard" else None
    gen = torch.Generator().manual_seed(seed)
    m, ref = pair(gen, n_embd=H * D, n_head=H, rank=R, variant=variant, gates=gates, routing_threshold=thr,
                  discoverability=disc, bias=bias, block_size=12)
    grads_match(m, ref, torch.randn(B, T, H * D, generator=gen, dtype=F64))


@pytest.mark.parametrize("variant", ["full", "low_rank", "same_flop"])
def test_functional_api_matches_reference(variant):
    gen = torch.Generator().manual_seed(1)
    B, H, T, D, R = 2, 3, 9, 8, 3
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=F64, requires_grad=True) for _ in range(3))
    W = torch.randn(D, R, generator=gen, dtype=F64, requires_grad=True)
    w_std = (torch.rand(H, generator=gen, dtype=F64) + 0.1).requires_grad_(True)
    w_rec = (torch.rand(H, generator=gen, dtype=F64) + 0.1).requires_grad_(True)
    c = torch.randn(B, H, T, generator=gen, dtype=F64, requires_grad=True)
    kw = dict(variant=variant, W=W, w_std=w_std, w_rec=w_rec, gates="seed", routing_threshold=0.5, col_bias=c)
    inputs = (q, k, v, W, w_std, w_rec, c)
    y = reciprocal_attention(q, k, v, backend="sdpa", **kw)
    y_ref = reference.ra_attention(q, k, v, **kw)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), inputs, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), inputs, allow_unused=True)
    assert rel_err(y, y_ref) <= 1e-10
    for a, b in zip(grads, grads_ref):
        if b is None:
            continue
        assert rel_err(a, b) <= 1e-10


def test_weight_fold_equals_activation_fold():
    """Section 3.2: the weight-space fold is the activation fold moved into c_attn (bias included, routed heads)."""
    gen = torch.Generator().manual_seed(2)
    C, H, R = 32, 4, 3
    D = C // H
    weight = torch.randn(3 * C, C, generator=gen, dtype=F64)
    bias = torch.randn(3 * C, generator=gen, dtype=F64)
    W = torch.randn(D, R, generator=gen, dtype=F64)
    qs, ks, qr, kr = (torch.randn(H, generator=gen, dtype=F64) for _ in range(4))
    routed = torch.tensor([False, True, False, True])
    x = torch.randn(2, 5, C, generator=gen, dtype=F64)
    for variant in ("same_flop", "low_rank"):
        wf, bf = fold.fold_qkv_weight(weight, bias, W, qs, ks, qr, kr, routed, H, variant)
        Dp = fold.folded_width(variant, D, R)
        qf, kf, _ = torch.nn.functional.linear(x, wf, bf).split([H * Dp, H * Dp, C], dim=-1)
        q, k, _ = torch.nn.functional.linear(x, weight, bias).split(C, dim=-1)
        heads = lambda t, w: t.view(2, 5, H, w).transpose(1, 2)  # noqa: E731
        qa, ka = fold.activation_fold(heads(q, D), heads(k, D), W, qs, ks, qr, kr, routed, variant)
        assert rel_err(heads(qf, Dp), qa) <= 1e-12
        assert rel_err(heads(kf, Dp), ka) <= 1e-12


def test_channel_fold_adds_bias_exactly():
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 6, 8, generator=gen, dtype=F64) for _ in range(2))
    c = torch.randn(3, 6, generator=gen, dtype=F64)
    scale = 0.37
    qc, kc = fold.channel_fold(q, k, c, scale)
    assert qc.shape[-1] % 8 == 0 and qc.shape[-1] > 8
    assert rel_err(scale * qc @ kc.transpose(-1, -2), scale * q @ k.transpose(-1, -2) + c.view(1, 3, 1, 6)) <= 1e-13


# ---------------------------------------------------------------------------------------------------------------
# The seed preset: RA Ultimate v2 exactly
# ---------------------------------------------------------------------------------------------------------------

SEED_KEYS = {"c_attn.weight": (3 * 64, 64), "c_proj.weight": (64, 64), "W_recip": (16, 8), "w_std": (4,),
             "w_rec": (4,), "w_disc": (4,), "d_bias": (4, 32)}


def seed_state_dict(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A state_dict with the seed module's names, shapes and init (UltimateRAv2(64, 4, block_size=32, R=8))."""
    sd = {k: torch.randn(*s, generator=gen) * 0.05 for k, s in SEED_KEYS.items()}
    sd["W_recip"] = torch.randn(16, 8, generator=gen) * 0.02
    sd["w_std"], sd["w_rec"], sd["w_disc"] = torch.full((4,), 0.5), torch.full((4,), 0.3), torch.full((4,), 0.2)
    sd["d_bias"] = torch.zeros(4, 32)
    return sd


def test_seed_preset_names_shapes_and_init():
    m = ReciprocalAttention.from_preset("seed", n_embd=64, n_head=4, block_size=32)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == SEED_KEYS
    assert set(dict(m.named_parameters())) == set(SEED_KEYS)
    assert m.c_attn.bias is None and m.c_proj.bias is None
    assert torch.all(m.w_std == 0.5) and torch.all(m.w_rec == 0.3) and torch.all(m.w_disc == 0.2)
    assert torch.all(m.d_bias == 0) and abs(m.W_recip.std().item() - 0.02) < 0.01
    assert (m.variant, m.rank, m.gates, m.routing_threshold, m.discoverability) == \
        ("same_flop", 8, "seed", 0.1, None)


@pytest.mark.parametrize("threshold,setup,n_ra", [
    (0.0, None, 4),                                 # 100% RA heads
    (0.25, lambda w: (w[:2].fill_(0.2), w[2:].fill_(0.4)), 2),   # 50%
    (0.35, lambda w: (w[:3].fill_(0.3), w[3:].fill_(0.4)), 1),   # 25%
])
def test_seed_preset_matches_seed_semantics(threshold, setup, n_ra):
    """A seed state_dict loads strictly and gives the seed algorithm's outputs, at 100/50/25% RA heads."""
    gen = torch.Generator().manual_seed(4)
    sd = seed_state_dict(gen)
    if setup is not None:
        setup(sd["w_rec"])
    m = ReciprocalAttention.from_preset("seed", n_embd=64, n_head=4, block_size=32, routing_threshold=threshold)
    m.load_state_dict(sd, strict=True)
    m = m.to(F64)
    assert int((m.w_rec > threshold).sum()) == n_ra
    x = torch.randn(2, 11, 64, generator=gen, dtype=F64)
    q, k, v = (t.view(2, 11, 4, 16).transpose(1, 2).contiguous() for t in m.c_attn(x).split(64, dim=2))
    y_seed = seed_packed_attention(q, k, v, m.w_std, m.w_rec, m.W_recip, threshold=threshold)
    y_seed = m.c_proj(y_seed.transpose(1, 2).reshape(2, 11, 64))
    assert rel_err(m(x), y_seed) <= 1e-12


def test_seed_centered_bias_is_softmax_noop():
    """The seed subtracts the mean of d_bias over j < T: a per-row constant, so the output is unchanged."""
    gen = torch.Generator().manual_seed(5)
    m = ReciprocalAttention(32, 2, rank=4, discoverability="positional", block_size=16, backend="reference").to(F64)
    randomize(m, gen)
    x = torch.randn(1, 9, 32, generator=gen, dtype=F64)
    y = m(x)
    m.center_bias = True
    assert rel_err(m(x), y) <= 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Lower precisions (stated tolerances), generation cache, fold cache, graphs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("preset", ["ra", "ra_disc", "full", "seed"])
def test_low_precision_within_tolerance(dtype, tol, preset):
    gen = torch.Generator().manual_seed(6)
    m64 = ReciprocalAttention.from_preset(preset, n_embd=64, n_head=4, block_size=32).to(F64)
    randomize(m64, gen, positive_gates=True)
    m = ReciprocalAttention.from_preset(preset, n_embd=64, n_head=4, block_size=32)
    m.load_state_dict(m64.state_dict())
    m = m.to(dtype)
    x = torch.randn(2, 17, 64, generator=gen, dtype=F64)
    assert rel_err(m(x.to(dtype)).to(F64), m64(x)) <= tol


@pytest.mark.parametrize("preset", ["standard", "seed", "ra", "ra_disc", "ra_disc_channel", "full", "low_rank",
                                    "output_gate"])
def test_cached_generation_equals_full_forward(preset):
    gen = torch.Generator().manual_seed(7)
    m = ReciprocalAttention.from_preset(preset, n_embd=48, n_head=3, block_size=16).to(F64)
    randomize(m, gen, positive_gates=True)
    x = torch.randn(2, 10, 48, generator=gen, dtype=F64)
    cache = LayerKVCache()
    chunks = [m(x[:, :4], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert rel_err(torch.cat(chunks, dim=1), m(x)) <= 1e-12


def test_fold_cache_can_be_switched_off():
    """cache_fold=False: every call folds (nothing kept between calls), with the same outputs."""
    gen = torch.Generator().manual_seed(9)
    m = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16).eval()
    randomize(m, gen, positive_gates=True)
    x = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        y_cached = m(x)
        assert m._fold_cache is not None
        m.cache_fold = False
        w0 = m.folded_weight()[0]
        assert m.folded_weight()[0] is not w0 and torch.equal(m.folded_weight()[0], w0)
        m.invalidate_cache()
        y = m(x)
        assert m._fold_cache is None
    torch.testing.assert_close(y, y_cached, rtol=0, atol=0)
    assert ReciprocalAttention.cache_fold  # the class default is untouched


def test_fold_cache_is_used_and_invalidated():
    gen = torch.Generator().manual_seed(8)
    m = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16)
    randomize(m, gen, positive_gates=True)
    x = torch.randn(1, 5, 32, generator=gen)
    m.eval()
    with torch.no_grad():
        y0 = m(x)
        w0 = m.folded_weight()[0]
        assert m.folded_weight()[0] is w0  # cached: the same tensor, no rebuild

    def fresh(mod):
        twin = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16, backend="reference")
        twin.load_state_dict(mod.state_dict())
        return twin(x)

    # an optimizer step changes every parameter in place
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        y1 = m(x)
        assert not torch.allclose(y1, y0)
        assert torch.allclose(y1, fresh(m), atol=1e-6)
    # load_state_dict
    other = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16)
    randomize(other, gen, positive_gates=True)
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(m(x), fresh(other), atol=1e-6)
    # .to(): new storage and dtype
    m.to(F64)
    with torch.no_grad():
        assert m.folded_weight()[0].dtype == F64
        assert torch.allclose(m(x.to(F64)).float(), fresh(other), atol=1e-5)
    # a write through .data bypasses version counters: invalidate_cache() is the documented remedy
    m.W_recip.data.mul_(2.0)
    m.invalidate_cache()
    with torch.no_grad():
        ref = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16, backend="reference").to(F64)
        ref.load_state_dict(m.state_dict())
        assert rel_err(m(x.to(F64)), ref(x.to(F64))) <= 1e-12


@pytest.mark.parametrize("opt_kw", [dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_fold_cache_follows_every_optimizer(opt_kw):
    """A fused optimizer updates parameters without bumping version counters; the cache must still refresh.

    This is the bug that made eval losses of same_flop runs use stale weights in a training run (fused AdamW).
    """
    gen = torch.Generator().manual_seed(11)
    m = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16)
    randomize(m, gen, positive_gates=True)
    x = torch.randn(2, 6, 32, generator=gen)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, **opt_kw)
    m.eval()
    for _ in range(3):
        with torch.no_grad():
            y = m(x)
        twin = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16, backend="reference")
        twin.load_state_dict(m.state_dict())
        with torch.no_grad():
            assert torch.allclose(y, twin(x), atol=1e-5), "stale folded weight"
        m(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def test_no_graph_breaks_under_compile():
    """Forward traces as one graph (no .item(), no data-dependent Python branching on tensor values)."""
    torch._dynamo.reset()
    for preset in ("ra", "seed", "ra_disc", "ra_disc_channel", "full"):
        m = ReciprocalAttention.from_preset(preset, n_embd=32, n_head=2, block_size=16)
        x = torch.randn(2, 8, 32, requires_grad=True)
        y = torch.compile(m, fullgraph=True, backend="eager")(x)
        y.sum().backward()
        g = [p.grad.clone() for p in m.parameters() if p.grad is not None]
        m.zero_grad()
        y2 = m(x)
        y2.sum().backward()
        assert torch.allclose(y, y2, atol=1e-6)
        for a, p in zip(g, [p for p in m.parameters() if p.grad is not None]):
            assert torch.allclose(a, p.grad, atol=1e-5)


def test_dropout_trains_and_eval_is_deterministic():
    m = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16, dropout=0.5)
    x = torch.randn(2, 8, 32)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_explain_backend():
    m = ReciprocalAttention.from_preset("ra_disc", n_embd=32, n_head=2)
    name, why = m.explain_backend("cpu")
    assert name == "sdpa" and "CUDA" in why
    assert ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2).explain_backend("cpu")[0] == "sdpa"
    assert ReciprocalAttention(32, 2, backend="reference").explain_backend()[0] == "reference"


# ---------------------------------------------------------------------------------------------------------------
# Errors name the parameter and the expected form
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(n_embd=30, n_head=4), ValueError, "n_embd must be divisible by n_head"),
    (dict(n_embd=32, n_head=4, rank=0), ValueError, r"rank must be an int in \[1, D-1\] = \[1, 7\]"),
    (dict(n_embd=32, n_head=4, rank=8), ValueError, "rank must be"),
    (dict(n_embd=32, n_head=2, variant="sparse"), ValueError, "variant must be one of 'standard', 'full'"),
    (dict(n_embd=32, n_head=2, gates="relu"), ValueError, "gates must be one of 'seed', 'signed'"),
    (dict(n_embd=32, n_head=2, backend="cuda"), ValueError, "backend must be one of 'auto', 'reference'"),
    (dict(n_embd=32, n_head=2, discoverability="yes"), ValueError, "discoverability must be one of None"),
    (dict(n_embd=32, n_head=2, dropout=1.5), ValueError, r"dropout must be in \[0, 1\)"),
    (dict(n_embd=0, n_head=4), ValueError, "n_embd must be a positive int"),
    (dict(n_embd=32, n_head=2, variant="standard", routing_threshold=0.1), ValueError, "routing_threshold"),
])
def test_constructor_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ReciprocalAttention(**kwargs)


def test_unknown_preset_lists_valid():
    with pytest.raises(ValueError, match="preset must be one of 'standard', 'seed', 'ra'"):
        ReciprocalAttention.from_preset("best", n_embd=32, n_head=4)
    assert "ra" in PRESETS


def test_input_errors():
    m = ReciprocalAttention.from_preset("ra_disc", n_embd=32, n_head=2, block_size=8)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, C\] with C = n_embd = 32"):
        m(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, C\]"):
        m(torch.randn(4, 32))
    with pytest.raises(ValueError, match="block_size = 8"):
        m(torch.randn(1, 9, 32))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the module's parameters have torch.float32"):
        m(torch.randn(1, 4, 32, dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(1, 4, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([[0.0] * 32])


def test_functional_errors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"q, k, v must have shape \[B, H, T, D\]"):
        reciprocal_attention(q, q[:, :1], q)
    with pytest.raises(ValueError, match="needs w_std and w_rec"):
        reciprocal_attention(q, q, q, variant="same_flop")
    with pytest.raises(ValueError, match="needs W of shape"):
        reciprocal_attention(q, q, q, variant="same_flop", w_std=torch.ones(2), w_rec=torch.ones(2))
    with pytest.raises(ValueError, match=r"col_bias must have shape \[H, T\]"):
        reference.ra_logits(q, q, col_bias=torch.zeros(3, 4))


def test_reference_logit_formulas_by_hand():
    """Pin each variant's logit on a tiny case computed element by element."""
    gen = torch.Generator().manual_seed(9)
    q, k = (torch.randn(1, 1, 3, 4, generator=gen, dtype=F64) for _ in range(2))
    W = torch.randn(4, 2, generator=gen, dtype=F64)
    a, b = torch.tensor([0.7], dtype=F64), torch.tensor([-0.4], dtype=F64)
    s = 1 / math.sqrt(4)
    qi, ki = q[0, 0], k[0, 0]
    expect = {
        "full": lambda i, j: s * (a * qi[i] @ ki[j] + b * qi[j] @ ki[i]),
        "low_rank": lambda i, j: s * (a * qi[i] @ ki[j] + b * (ki[i] @ W) @ (qi[j] @ W)),
        "same_flop": lambda i, j: s * (a * qi[i, :2] @ ki[j, :2] + b * (ki[i] @ W) @ (qi[j] @ W)),
    }
    for variant, fn in expect.items():
        lg = reference.ra_logits(q, k, variant=variant, W=W, w_std=a, w_rec=b, gates="signed")[0, 0]
        for i in range(3):
            for j in range(3):
                if j > i:
                    assert lg[i, j] == float("-inf")
                else:
                    assert abs(lg[i, j] - fn(i, j)).item() < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Bias channel (RA-SPEC 3.3): the discoverability bias in one reserved Q/K feature at width D
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("disc", ["positional", "content"])
@pytest.mark.parametrize("T", [1, 7, 16])
def test_bias_channel_matches_reference(disc, T, bias):
    """The reserved feature carries the bias exactly: output and every gradient (d_bias / u, w_disc included)
    equal the reference with d_std = D - R - 1, in float64, on the SDPA path (what runs on CUDA); kappa comes
    from the folded bias, or from add_bias_channel when c_attn has none."""
    gen = torch.Generator().manual_seed(21 + T)
    m, ref = pair(gen, n_embd=48, n_head=3, rank=5, variant="same_flop", discoverability=disc, block_size=16,
                  bias_channel=True, bias=bias)
    assert m.explain_backend("cuda")[0] == "sdpa"
    grads_match(m, ref, torch.randn(2, T, 48, generator=gen, dtype=F64))


def test_bias_channel_is_same_width_and_spec_budget():
    """ra_disc_channel: R-1 = 7 reciprocal features + 1 bias feature inside D (RA-SPEC 3.3), so the folded Q/K
    width is D (the baseline's kernel) and the standard term keeps D - 8 features, as in ``ra``."""
    m = ReciprocalAttention.from_preset("ra_disc_channel", n_embd=768, n_head=12)
    assert (m.rank, m.bias_channel) == (7, True)
    assert fold.folded_width(m.variant, 64, m.rank) == 64
    assert fold.std_width(m.variant, 64, m.rank, bias_channel=True) == 56 == fold.std_width("same_flop", 64, 8)
    wf, bf = m.folded_weight()
    wq = wf[: 12 * 64].view(12, 64, 768)
    wk = wf[12 * 64: 24 * 64].view(12, 64, 768)
    assert torch.count_nonzero(wq[:, 63]) == 0 and torch.count_nonzero(wk[:, 63]) == 0
    bq, bk = bf[: 12 * 64].view(12, 64), bf[12 * 64: 24 * 64].view(12, 64)
    assert torch.equal(bq[:, 63], torch.ones(12)) and torch.count_nonzero(bk[:, 63]) == 0  # kappa = 1 via the bias


def test_bias_channel_triton_backend_matches_reference():
    """Triton backend (interpreter on CPU): the reserved features stay zero and the kernel adds the bias."""
    from reciprocal_attention.ops import TRITON_AVAILABLE

    if not TRITON_AVAILABLE:
        pytest.skip("needs Triton")
    gen = torch.Generator().manual_seed(5)
    m, ref = pair(gen, backend="triton", n_embd=32, n_head=2, rank=3, variant="same_flop",
                  discoverability="positional", block_size=16, bias_channel=True)
    m.float()
    ref.float()
    x = torch.randn(2, 9, 32, generator=gen)
    grads_match(m, ref, x, tol=2e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(variant="low_rank", discoverability="positional"), "bias_channel reserves"),
    (dict(variant="same_flop", discoverability=None), "bias_channel reserves"),
    (dict(variant="same_flop", discoverability="positional", routing_threshold=0.1), "bias_channel reserves"),
    (dict(variant="same_flop", discoverability="positional", rank=15), "rank <= D-2 = 14"),
])
def test_bias_channel_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ReciprocalAttention(n_embd=32, n_head=2, bias_channel=True, **{"rank": 3, **kw})


def test_add_bias_channel_in_place_and_gradient():
    """add_bias_channel writes kappa / c / (scale kappa) into the reserved columns in place; the gradient of qkv
    passes through unchanged and the bias gradient is the K column's gradient (summed over B for [H, T])."""
    B, T, H, Dp, C = 2, 5, 3, 4, 12
    w = torch.randn(2 * H * Dp + C, 7, dtype=F64, requires_grad=True)
    x = torch.randn(B, T, 7, dtype=F64)
    c = torch.randn(H, T, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="q_channel=False means the folded bias already holds kappa = 1"):
        fold.add_bias_channel(torch.zeros(B * T, 2 * H * Dp + C, dtype=F64), c, H, Dp, scale=0.5, kappa=2.0,
                              q_channel=False)
    with pytest.raises(ValueError, match="not a view"):
        fold.add_bias_channel(torch.nn.functional.linear(x, w), c, H, Dp, scale=0.5)  # 3-D linear: a view
    qkv = torch.nn.functional.linear(x.reshape(B * T, 7), w)
    ptr = qkv.data_ptr()
    out = fold.add_bias_channel(qkv, c, H, Dp, scale=0.5, kappa=2.0).view(B, T, -1)
    assert out.data_ptr() == ptr
    assert out.grad_fn is not None and "CopySlices" not in type(out.grad_fn).__name__
    expect = (x @ w.t()).detach().clone()
    for h in range(H):
        expect[..., h * Dp + Dp - 1] += 2.0
        expect[..., H * Dp + h * Dp + Dp - 1] += c[h].detach() / (0.5 * 2.0)
    torch.testing.assert_close(out, expect)
    g = torch.randn_like(out)
    dw, dc = torch.autograd.grad(out, [w, c], g)
    torch.testing.assert_close(dw, g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, 7))
    torch.testing.assert_close(dc, torch.stack([g[..., H * Dp + h * Dp + Dp - 1].sum(0) for h in range(H)]) / 1.0)


@pytest.mark.parametrize("shared", [True, False], ids=["bias_HT", "bias_BHT"])
@pytest.mark.parametrize("q_channel", [True, False])
@pytest.mark.parametrize("T", [1, 6])
def test_add_bias_channel_heads_equals_the_in_place_form(T, q_channel, shared):
    """The traced form (out of place on the split heads) gives the in-place form's Q~, K~ and every gradient
    (of the GEMM weight, through all of qkv, and of the column bias) in float64."""
    B, H, Dp, C, scale = 3, 2, 5, 10, 0.37
    kappa = 1.7 if q_channel else 1.0
    torch.manual_seed(T)
    w = torch.randn(2 * H * Dp + C, 7, dtype=F64, requires_grad=True)
    x = torch.randn(B * T, 7, dtype=F64)
    c = torch.randn(*((H, T) if shared else (B, H, T)), dtype=F64, requires_grad=True)
    gq, gk = torch.randn(B, H, T, Dp, dtype=F64), torch.randn(B, H, T, Dp, dtype=F64)

    def heads(qkv):
        q, k, _ = qkv.view(B, T, -1).split([H * Dp, H * Dp, C], dim=2)
        return q.view(B, T, H, Dp).transpose(1, 2), k.view(B, T, H, Dp).transpose(1, 2)

    def zero_channel(w):  # the fold leaves the reserved rows zero
        keep = torch.ones(w.shape[0], 1, dtype=F64)
        keep[[h * Dp + Dp - 1 for h in range(2 * H)]] = 0
        return w * keep

    q1, k1 = heads(fold.add_bias_channel(torch.nn.functional.linear(x, zero_channel(w)), c, H, Dp, scale, kappa=kappa,
                                         q_channel=q_channel))
    q2, k2 = fold.add_bias_channel_heads(*heads(torch.nn.functional.linear(x, zero_channel(w))), c, scale, kappa=kappa,
                                         q_channel=q_channel)
    torch.testing.assert_close(q2, q1, rtol=0, atol=1e-15)
    torch.testing.assert_close(k2, k1, rtol=0, atol=1e-15)
    g1 = torch.autograd.grad((q1 * gq).sum() + (k1 * gk).sum(), [w, c])
    g2 = torch.autograd.grad((q2 * gq).sum() + (k2 * gk).sum(), [w, c])
    for a, b, name in zip(g2, g1, ("w", "col_bias")):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=name)
    with pytest.raises(ValueError, match=r"q and k must be \[B, H, T, width\]"):
        fold.add_bias_channel_heads(q2[..., :-1], k2, c, scale)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("preset", PRESETS)
def test_empty_batch_gives_empty_output(preset, backend):
    """B = 0 is a valid batch: every preset and backend returns [0, T, C]."""
    m = ReciprocalAttention.from_preset(preset, n_embd=32, n_head=2, block_size=16, backend=backend)
    y = m(torch.randn(0, 5, 32))
    assert y.shape == (0, 5, 32)
    q = torch.randn(0, 2, 5, 16)
    W = torch.randn(16, 4)
    g = torch.ones(2)
    out = reciprocal_attention(q, q, q, variant="same_flop", W=W, w_std=g, w_rec=g, backend=backend)
    assert out.shape == (0, 2, 5, 16)


@pytest.mark.parametrize("change, error, match", [
    (dict(q=torch.zeros(1, 2, 5, 16, dtype=torch.int64)), TypeError, "q must be a floating-point tensor"),
    (dict(k=torch.zeros(1, 2, 5, 16, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(W=torch.zeros(17, 4)), ValueError, r"W of shape \[D, R\] with D = 16"),
    (dict(W=torch.zeros(16, 20)), ValueError, r"1 <= R < D = 16"),
    (dict(w_std=torch.ones(3)), ValueError, r"w_std must have shape \[H\] = \[2\]"),
    (dict(col_bias=torch.zeros(2, 6)), ValueError, r"col_bias must have shape \[H, T\] = \[2, 5\]"),
    (dict(dropout_p=-0.5), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite positive float"),
])
def test_functional_names_bad_inputs(change, error, match):
    """Every bad input of the functional API is a named ValueError/TypeError, never a crash inside a kernel."""
    args = dict(q=torch.randn(1, 2, 5, 16), k=torch.randn(1, 2, 5, 16), v=torch.randn(1, 2, 5, 16),
                W=torch.randn(16, 4), w_std=torch.ones(2), w_rec=torch.ones(2), col_bias=None, dropout_p=0.0,
                scale=None)
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=match):
        reciprocal_attention(q, k, v, variant="same_flop", **args)


def test_plan_follows_device_and_dtype_changes():
    """The plan is chosen at construction and again on .to()/.double(), and setting backend or dropout re-plans."""
    m = ReciprocalAttention.from_preset("ra_disc", n_embd=32, n_head=2, block_size=16)
    assert (m.plan.qkv, m.plan.core, m.plan.bias) == ("fold", "sdpa", "feature")
    m.backend = "reference"
    assert (m.plan.qkv, m.plan.core, m.plan.bias) == ("linear", "reference", "logits")
    m.backend = "sdpa"
    m = m.double()
    assert m.plan.core == "sdpa" and m.explain_backend()[0] == "sdpa"
    with pytest.raises(ValueError, match="backend must be one of"):
        m.backend = "flash"
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        m.dropout = 1.5
