"""``ops.folded_linear``: the ``c_attn`` GEMM on the fused fold as one autograd node, on CPU (interpreter).

Against ``F.linear(x, *fold.fold_qkv_weight(...))`` with the reference gate sides and routing in float64: the output
and the gradients of ``x``, ``weight``, ``bias``, ``W``, ``w_std``, ``w_rec``, over token counts 1 / odd / not a
multiple of any block, several heads and ranks. The side-stream overlap needs CUDA: tests/test_gpu_fold.py.
"""
import pytest
import torch
import torch.nn.functional as F

from reciprocal_attention import fold
from reciprocal_attention.fold import gate_sides, routed_heads
from reciprocal_attention.ops import TRITON_AVAILABLE, settings
from reciprocal_attention.ops import fold as kfold
from reciprocal_attention.ops import folded_linear as kfl

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs Triton (interpreter on CPU)")


def make(H, D, R, N, bias, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    C = H * D

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    x = rnd(N, C)
    weight = rnd(3 * C, C, scale=C ** -0.5)
    b = rnd(3 * C) if bias else None
    W = rnd(D, R, scale=0.5)
    w_std = (torch.rand(H, generator=g, dtype=torch.float64) * 1.5 - 0.3).to(dtype).requires_grad_()
    w_rec = (torch.rand(H, generator=g, dtype=torch.float64) * 1.5 - 0.3).to(dtype).requires_grad_()
    return x, weight, b, W, w_std, w_rec


def oracle(x, weight, b, W, w_std, w_rec, H, variant, gates, threshold, bias_channel=False):
    qs, ks = gate_sides(w_std, gates)
    qr, kr = gate_sides(w_rec, gates)
    wf, bf = fold.fold_qkv_weight(weight, b, W, qs, ks, qr, kr, routed_heads(w_rec, threshold), H, variant,
                                  bias_channel)
    return F.linear(x, wf, bf)


def grads_of(y, ins, seed=5):
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    return torch.autograd.grad(y, [t for t in ins if t is not None], gy)


CASES = [  # (H, D, R, N, variant, bias, gates, threshold, bias_channel)
    (1, 8, 1, 1, "same_flop", True, "signed", None, False),
    (2, 16, 3, 7, "same_flop", False, "seed", 0.3, False),
    (3, 8, 7, 13, "low_rank", True, "seed", None, False),
    (2, 8, 3, 5, "low_rank", False, "signed", 0.4, False),
    (3, 16, 3, 33, "same_flop", True, "signed", None, True),
    (2, 8, 5, 2, "same_flop", False, "seed", None, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "H{}D{}R{}N{}-{}-{}-{}-thr{}-ch{}".format(*c))
def test_matches_linear_on_oracle_fold_float64(case):
    H, D, R, N, variant, bias, gates, thr, channel = case
    x, weight, b, W, w_std, w_rec = make(H, D, R, N, bias, seed=N)
    ins = (x, weight, b, W, w_std, w_rec)
    y, (wf, bf) = kfl.fused_folded_linear(x, weight, b, W, w_std, w_rec, H, variant, gates=gates,
                                          routing_threshold=thr, bias_channel=channel)
    ref = oracle(*ins, H, variant, gates, thr, channel)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    assert not wf.requires_grad and (bf is None) == (b is None)
    names = [n for n, t in zip(("x", "weight", "bias", "W", "w_std", "w_rec"), ins) if t is not None]
    first = grads_of(y, ins)
    for name, got, want in zip(names, first, grads_of(ref, ins)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")
    # the fold handed back gives the same node without a forward kernel, and the same gradients bitwise
    launches = []
    real = kfold._fold_forward_impl
    try:
        kfold._fold_forward_impl = lambda *a, **k: launches.append(1) or real(*a, **k)
        y2, folded = kfl.fused_folded_linear(x, weight, b, W, w_std, w_rec, H, variant, gates=gates,
                                             routing_threshold=thr, bias_channel=channel, folded=(wf, bf))
    finally:
        kfold._fold_forward_impl = real
    assert not launches and folded[0] is wf
    assert torch.equal(y2, y)
    for got, again in zip(first, grads_of(y2, ins)):
        assert torch.equal(got, again)


def test_float32_params_bf16_fold_like_autocast():
    """fp32 parameters and input, fold in bf16 (what autocast asks for): ``x`` is cast as F.linear under autocast
    would; gradients come back in fp32 for every fp32 leaf."""
    H, D, R, N = 2, 16, 3, 9
    x, weight, b, W, w_std, w_rec = make(H, D, R, N, True, seed=2, dtype=torch.float32)
    y, (wf, _) = kfl.fused_folded_linear(x, weight, b, W, w_std, w_rec, H, "same_flop", out_dtype=torch.bfloat16)
    assert y.dtype == wf.dtype == torch.bfloat16
    ins = (x, weight, b, W, w_std, w_rec)
    leaves = [t.detach().double().requires_grad_() for t in ins]
    ref = oracle(*leaves, H, "same_flop", "signed", None)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    names = ("x", "weight", "bias", "W", "w_std", "w_rec")
    for name, t, gr, want in zip(names, ins, grads_of(y, ins), grads_of(ref, leaves)):
        assert gr.dtype == torch.float32 and gr.shape == t.shape, name
        err = (gr.double() - want).abs().max().item()  # bf16 GEMM operands: ~2^-8 of the largest term
        assert err <= 2e-2 * want.abs().max().item() + 1e-3, f"d{name}: {err:.3g} vs max {want.abs().max():.3g}"


def test_partial_requires_grad():
    """Frozen parameters: only ``dx`` (the fold's backward does not run); a frozen input: parameter gradients only."""
    H, D, R, N = 2, 8, 3, 5
    x, weight, b, W, w_std, w_rec = make(H, D, R, N, True, seed=3)
    calls = []
    real = kfold._fold_backward_impl
    kfold._fold_backward_impl = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        params = [p.detach() for p in (weight, b, W, w_std, w_rec)]
        y, _ = kfl.fused_folded_linear(x, *params, H, "same_flop")
        (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
        ref = oracle(x, *params, H, "same_flop", "signed", None)
        torch.testing.assert_close(dx, torch.autograd.grad(ref, [x], torch.ones_like(ref))[0], rtol=1e-10,
                                   atol=1e-12)
        assert not calls
        y, _ = kfl.fused_folded_linear(x.detach(), weight, b, W, w_std, w_rec, H, "same_flop")
        got = torch.autograd.grad(y, [weight, w_rec], torch.ones_like(y))
        ref = oracle(x.detach(), weight, b, W, w_std, w_rec, H, "same_flop", "signed", None)
        want = torch.autograd.grad(ref, [weight, w_rec], torch.ones_like(ref))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        assert calls == [1]
    finally:
        kfold._fold_backward_impl = real


def test_errors():
    H, D, R, N = 2, 8, 3, 4
    x, weight, b, W, w_std, w_rec = make(H, D, R, N, True)
    with pytest.raises(ValueError, match=r"x2d must be a floating-point \[N, C\] = \[N, 16\] tensor"):
        kfl.fused_folded_linear(x.view(2, 2, 16), weight, b, W, w_std, w_rec, H, "same_flop")
    with pytest.raises(ValueError, match=r"x2d must be a floating-point"):
        kfl.fused_folded_linear(x[:, :8], weight, b, W, w_std, w_rec, H, "same_flop")
    with pytest.raises(ValueError, match="gates must be 'signed' or 'seed'"):
        kfl.fused_folded_linear(x, weight, b, W, w_std, w_rec, H, "same_flop", gates="sides")
    with pytest.raises(ValueError, match=r"w_std must have shape \[n_head\]"):
        kfl.fused_folded_linear(x, weight, b, W, w_std[:1], w_rec, H, "same_flop")
    with pytest.raises(ValueError, match="bias_channel does not combine with routing"):
        kfl.fused_folded_linear(x, weight, b, W, w_std, w_rec, H, "same_flop", routing_threshold=0.1,
                                bias_channel=True)
    _, folded = kfl.fused_folded_linear(x, weight, b, W, w_std, w_rec, H, "same_flop")
    with pytest.raises(ValueError, match=r"folded\[0\] must be a torch.float64 tensor of shape \[48, 16\]"):
        kfl.fused_folded_linear(x, weight, b, W, w_std, w_rec, H, "same_flop", folded=(folded[0][1:], folded[1]))
    with pytest.raises(ValueError, match=r"folded\[1\] must be None when bias is None"):
        kfl.fused_folded_linear(x, weight, None, W, w_std, w_rec, H, "same_flop", folded=folded)


def test_side_stream_only_on_cuda(monkeypatch):
    """CPU tensors never fork, whatever ``settings.fold_overlap`` says (the overlap itself is a GPU test)."""
    x = torch.zeros(2, 2)
    for mode in ("capture", "always", "never"):
        monkeypatch.setattr(settings, "fold_overlap", mode)
        assert kfl._side_stream(x) is None


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_split_backward_launch_matches_one_launch(bias):
    """The overlap path's fold backward (weight column blocks first, then ``between()`` supplies ``db~``, then the
    bias column and the reduction; ``J0`` offsets the second launch) gives the one-launch gradients bitwise."""
    H, D, R = 3, 16, 3
    _, weight, b, W, w_std, w_rec = make(H, D, R, 1, bias, seed=8)
    C = H * D
    g = torch.Generator().manual_seed(1)
    gw = torch.randn(3 * C, C, generator=g, dtype=torch.float64)
    gb = torch.randn(3 * C, generator=g, dtype=torch.float64) if bias else None
    args = (weight, b, W, w_std, w_rec, H, "same_flop", kfold.GATE_MODES["seed"], None, False)
    one = kfold._fold_backward_impl(gw, gb, *args)
    calls = []
    split = kfold._fold_backward_impl(gw, None, *args, between=lambda: calls.append(1) or gb)
    assert calls == [1]
    for a, e in zip(one, split):
        assert (a is None and e is None) or torch.equal(a, e)


def test_module_compiles_without_graph_breaks_on_the_fused_path(monkeypatch):
    """Under torch.compile the module keeps the fold's custom op + F.linear (the folded-linear node is eager-only):
    fullgraph tracing of the fused path has no graph break, and forward and gradients match eager calls, which
    take the folded-linear node."""
    from reciprocal_attention import plan as attention_plan
    from reciprocal_attention.attention import ReciprocalAttention

    monkeypatch.setattr(attention_plan, "fused_fold_usable", lambda device, dtype: True)
    used = []
    real = kfl.fused_folded_linear
    monkeypatch.setattr(kfl, "fused_folded_linear", lambda *a, **k: used.append(1) or real(*a, **k))
    torch._dynamo.reset()
    m = ReciprocalAttention.from_preset("ra", n_embd=32, n_head=2, block_size=16).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert not used
    y.sum().backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    y2 = m(x)
    assert used
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-12)
    for n, p in m.named_parameters():
        if n in g:
            torch.testing.assert_close(g[n], p.grad, rtol=1e-10, atol=1e-12, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("gates,thr", [("signed", None), ("seed", 0.3)])
def test_double_backward_matches_oracle(gates, thr):
    """create_graph=True (Hessian-vector products, gradient penalties): the node's backward is then the PyTorch fold
    differentiated by autograd, so second derivatives match F.linear on the oracle fold (the Triton kernels have no
    backward of their own)."""
    H, D, R, N = 2, 8, 3, 5
    x, weight, b, W, w_std, w_rec = make(H, D, R, N, True, seed=12)
    ins = (x, weight, b, W, w_std, w_rec)

    def second_order(fn):
        y = fn()
        gx, gw = torch.autograd.grad(y.pow(2).sum(), [x, weight], create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gw.sum(), ins)

    got = second_order(lambda: kfl.fused_folded_linear(*ins, H, "same_flop", gates=gates, routing_threshold=thr)[0])
    want = second_order(lambda: oracle(*ins, H, "same_flop", gates, thr))
    for name, a, e in zip(("x", "weight", "bias", "W", "w_std", "w_rec"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d2 {n}: {m}")


def test_cast_input_is_saved_once():
    """A cast input (fp32 ``x``, bf16 fold: autocast) is kept by autograd once, in the fold's dtype: nothing of
    ``x``'s own size and dtype stays alive for the backward (the eager whole model's peak memory)."""
    H, D, R, N = 2, 16, 3, 9
    x, weight, b, W, w_std, w_rec = make(H, D, R, N, True, seed=2, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kfl.fused_folded_linear(x, weight, b, W, w_std, w_rec, H, "same_flop", out_dtype=torch.bfloat16)
    x_like = [dt for shape, dt in saved if shape == tuple(x.shape)]
    assert x_like == [torch.bfloat16], saved


def test_double_backward_through_cast_matches_oracle():
    """create_graph=True with a cast input (float64 ``x``, float32 fold): second derivatives reach ``x`` through
    the cast, as F.linear on a cast input would give them."""
    H, D, R, N = 2, 8, 3, 5
    x, weight, b, W, w_std, w_rec = make(H, D, R, N, True, seed=13)
    params = [t.detach().float().requires_grad_() for t in (weight, b, W, w_std, w_rec)]

    def second_order(y):
        (gx,) = torch.autograd.grad(y.pow(2).sum(), [x], create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [x, *params])

    got = second_order(kfl.fused_folded_linear(x, *params, H, "same_flop", out_dtype=torch.float32)[0])
    want = second_order(oracle(x.float(), *params, H, "same_flop", "signed", None))
    for name, a, e in zip(("x", "weight", "bias", "W", "w_std", "w_rec"), got, want):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d2 {n}: {m}")
