"""Fused bias-channel kernels (ops/channel.py) in the Triton interpreter against the PyTorch form
(``fold.add_bias_channel``, itself pinned to the float64 reference in test_fold.py) and, through the module, against
the reference backend: output and every gradient, float64 and float32, T = 1, odd T, T not a multiple of the block.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from module_check import assert_module_matches
from reciprocal_attention import fold
from reciprocal_attention.ops import channel

F64 = torch.float64


def _case(B, T, H, width, extra, dtype, seed, per_batch=False, L=None):
    gen = torch.Generator().manual_seed(seed)
    N = 2 * H * width + extra
    qkv = torch.randn(B * T, N, generator=gen, dtype=dtype)
    col = torch.randn((B, H, T) if per_batch else (H, T), generator=gen, dtype=dtype)
    w = torch.randn(H, generator=gen, dtype=dtype)
    d = torch.randn(H, L or T, generator=gen, dtype=dtype)
    gy = torch.randn(B * T, N, generator=gen, dtype=dtype)
    return qkv, col, w, d, gy


def _run(fn, qkv, gy, *params):
    leaf = qkv.clone().requires_grad_()
    ps = [p.clone().requires_grad_() for p in params]
    out = fn(leaf.clone(), *ps)  # in place on a non-leaf copy, as on the GEMM output
    (out * gy).sum().backward()
    return out.detach(), leaf.grad, [p.grad for p in ps]


SHAPES = [(1, 1, 2, 4, 8), (2, 7, 3, 8, 24), (3, 33, 2, 8, 16), (2, 16, 12, 4, 48), (9, 5, 5, 6, 30)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}w{}".format(*s[:4]))
@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per_batch"])
@pytest.mark.parametrize("q_channel,kappa", [(True, 1.0), (False, 1.0), (True, 2.5)])
def test_fused_matches_torch_form(shape, per_batch, q_channel, kappa):
    B, T, H, width, extra = shape
    qkv, col, _, _, gy = _case(B, T, H, width, extra, F64, seed=T + H, per_batch=per_batch)
    kw = dict(n_head=H, width=width, scale=0.37, kappa=kappa, q_channel=q_channel)
    got = _run(lambda q, c: channel.add_bias_channel_fused(q, c, **kw), qkv, gy, col)
    want = _run(lambda q, c: fold.add_bias_channel(q, c, **kw), qkv, gy, col)
    torch.testing.assert_close(got[0], want[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2][0], want[2][0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}w{}".format(*s[:4]))
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 2e-5)], ids=["f64", "f32"])
def test_positional_fused_matches_torch_form(shape, dtype, tol):
    """c = w_disc[h] d_bias[h, t] formed in the kernel; d_bias longer than T (zero gradient past T)."""
    B, T, H, width, extra = shape
    qkv, _, w, d, gy = _case(B, T, H, width, extra, dtype, seed=3 * T + H, L=T + 19)
    kw = dict(n_head=H, width=width, scale=0.125, q_channel=False)
    got = _run(lambda q, w_, d_: channel.add_positional_bias_channel_fused(q, w_, d_, T, **kw), qkv, gy, w, d)
    want = _run(lambda q, w_, d_: fold.add_bias_channel(q, w_.view(-1, 1) * d_[:, :T], **kw), qkv, gy, w, d)
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert torch.count_nonzero(got[2][1][:, T:]) == 0


def _channel_pair(gen, scale, **kw):
    """A float64 ``ra_disc_channel`` module on the sdpa backend with random parameters, and its reference twin."""
    from reciprocal_attention.attention import ReciprocalAttention

    m = ReciprocalAttention.from_preset("ra_disc_channel", backend="sdpa", **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * scale)
    ref = ReciprocalAttention.from_preset("ra_disc_channel", backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    return m, ref


def test_errors_name_the_parameter():
    qkv, col, w, d, _ = _case(2, 5, 2, 4, 8, F64, seed=0)
    with pytest.raises(ValueError, match="qkv must be the 2-D"):
        channel.add_bias_channel_fused(qkv.view(2, 5, -1), col, 2, 4, 0.5)
    with pytest.raises(ValueError, match="qkv must be the 2-D"):
        channel.add_bias_channel_fused(qkv[:, :20], col, 2, 4, 0.5)
    with pytest.raises(ValueError, match=r"col_bias must be a floating-point tensor of shape \[2, 5\]"):
        channel.add_bias_channel_fused(qkv, col[:1], 2, 4, 0.5)
    with pytest.raises(ValueError, match="T must be a positive int dividing"):
        channel.add_bias_channel_fused(qkv, torch.zeros(2, 3, dtype=F64), 2, 4, 0.5)
    with pytest.raises(ValueError, match=r"2 \* n_head \* width <= qkv.shape\[1\]"):
        channel.add_bias_channel_fused(qkv, col, 2, 8, 0.5)
    with pytest.raises(ValueError, match="d_bias covers 5 positions"):
        channel.add_positional_bias_channel_fused(qkv.repeat(2, 1), w, d, 10, 2, 4, 0.5)
    with pytest.raises(ValueError, match=r"w_disc must be a floating-point tensor of shape \[2\]"):
        channel.add_positional_bias_channel_fused(qkv, w[:1], d, 5, 2, 4, 0.5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        channel.add_bias_channel_fused(qkv, col, 2, 4, 0.0)


@pytest.mark.parametrize("disc,bias", [("positional", True), ("positional", False), ("content", True)])
@pytest.mark.parametrize("T", [1, 7, 19])
def test_module_channel_kernels_match_reference(monkeypatch, disc, bias, T):
    """ra_disc_channel's eager CUDA path (fused fold + fused channel) through the interpreter, float64: output
    and every gradient equal the reference backend's."""
    from reciprocal_attention import plan as attention_plan

    calls = []
    real = channel._CHANNEL.function.apply
    monkeypatch.setattr(channel._CHANNEL.function, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(attention_plan, "fused_fold_usable", lambda device, dtype: True)
    monkeypatch.setattr(attention_plan, "fused_channel_usable", lambda device: True)
    gen = torch.Generator().manual_seed(T)
    m, ref = _channel_pair(gen, 0.4, n_embd=24, n_head=3, block_size=32, bias=bias, discoverability=disc, rank=4)
    x = torch.randn(2, T, 24, generator=gen, dtype=F64)
    g = torch.randn(2, T, 24, generator=gen, dtype=F64)
    assert_module_matches(m, ref, x, g, grad_rtol=1e-9, grad_atol=1e-11)
    assert calls, "the fused channel did not run"


CHANNEL_COMPILE_CHECK = """
from reciprocal_attention.ops import channel as K

n = 0
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    qkv = torch.zeros(64, 2 * 12 * 64 + 768, dtype=dtype)
    c = torch.zeros(12, 64, dtype=dtype)
    w = torch.zeros(12, dtype=dtype)
    pw = torch.zeros(12, 4)
    for pos in (False, True):
        for qc in (False, True):
            K._channel_fwd_kernel.warmup(qkv, 1, 1, 64, 12, 63, 12 * 64 + 63, 64, c, 0, 1, 1, w, 0.5, 1.0, qkv,
                                         POSITIONAL=pos, Q_CHANNEL=qc, FP64=False, BLOCK_T=16, BLOCK_H=16,
                                         num_warps=4, grid=(1,))
            n += 1
        for shared in (False, True):
            K._channel_bwd_kernel.warmup(qkv, 1, 1, 2, 32, 12, 12 * 64 + 63, 64, 0.5, qkv, c, 1, 1, w, c, 0, 1, 1,
                                         64, pw, 4, POSITIONAL=pos, SHARED=shared, FP64=False, BLOCK_B=2,
                                         BLOCK_T=16, BLOCK_H=16, num_warps=4, grid=(1,))
            n += 1
print("OK", n)
"""


@pytest.mark.slow
def test_channel_kernels_compile_for_sm90():
    """Every variant of the two channel kernels goes through Triton's real compiler for sm_90 (no GPU)."""
    from sm90_compile import run_sm90

    res = run_sm90(CHANNEL_COMPILE_CHECK)
    out = res.stdout.strip()
    if res.returncode == 0 and out.startswith("SKIP"):
        pytest.skip(f"cannot stand in for the CUDA driver on this Triton: {out}")
    assert res.returncode == 0 and out.endswith("OK 24"), res.stdout[-3000:] + res.stderr[-3000:]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), T=st.integers(1, 21), H=st.integers(1, 3), D=st.sampled_from([4, 8, 16]),
       disc=st.sampled_from(["positional", "content"]), bias=st.booleans(), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_property_eager_cuda_path_matches_reference(B, T, H, D, disc, bias, data, seed):
    """The module's eager CUDA path for ra_disc_channel (fused fold, fused channel, the fold reused from the cache
    on a second call) through the interpreter on random shapes: output and every gradient equal the reference
    backend's, on both calls (float64)."""
    from reciprocal_attention import plan as attention_plan

    R = data.draw(st.integers(1, D - 2))
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(attention_plan, "fused_fold_usable", lambda device, dtype: True)
        mp.setattr(attention_plan, "fused_channel_usable", lambda device: True)
        gen = torch.Generator().manual_seed(seed)
        m, ref = _channel_pair(gen, 0.5, n_embd=H * D, n_head=H, block_size=24, bias=bias, discoverability=disc,
                               rank=R)
        x = torch.randn(B, T, H * D, generator=gen, dtype=F64)
        g = torch.randn(B, T, H * D, generator=gen, dtype=F64)
        for _ in range(2):  # the second call reuses the cached fold
            m.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            assert_module_matches(m, ref, x, g, grad_rtol=1e-9, grad_atol=1e-11)
    finally:
        mp.undo()
