"""Fused weight-space fold (ops/fold.py) vs the readable oracle ``fold.fold_qkv_weight``, on CPU.

Runs the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, set by conftest.py). The interpreter's
``tl.dot`` handles float64, so the exactness checks are float64 against float64 autograd through the oracle (fed
``fold.gate_sides`` / ``fold.routed_heads`` of the raw gates), covering the folded weight and bias and the gradient
of every input; a float32 run and a bf16-output run check the production dtypes with float32/bf16 tolerances.
The GPU suite (tests/test_gpu_fold.py) repeats the checks with the compiled kernels.
"""
import pytest
import torch

from module_check import assert_module_matches
from reciprocal_attention import fold
from reciprocal_attention.ops import TRITON_AVAILABLE, registry, settings
from reciprocal_attention.ops import fold as kfold
from reciprocal_attention.ops.fold import fused_fold_gated

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs Triton (interpreter on CPU)")

VARIANTS = ("same_flop", "low_rank")
# (H, D, R): H in 1..3, D in 8/16/32, R in 1/3/8 (< D), C = H*D both a multiple of the interpreter's BLOCK_C=16
# and not (C = 8, 24), and the edge R = D - 1 (Ds = 1).
SHAPES = [(1, 8, 1), (2, 16, 3), (3, 32, 8), (3, 8, 3), (2, 8, 7)]
# routing threshold on w_rec (see make_inputs): no routing, heads 1 (and 2) of 3 routed, every head routed
ROUTINGS = {"none": None, "some": 0.35, "all": 2.0}


def make_inputs(H, D, R, bias, dtype=torch.float64, seed=0, device="cpu"):
    """``(weight, bias, W, w_std, w_rec)``: signed gates of both signs (the kernels must not assume positive ones);
    ``w_rec`` is 0.9 on head 0 and below 0.35 elsewhere, so the "some" threshold routes every head but the first."""
    g = torch.Generator().manual_seed(seed)
    C = H * D

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    weight = rnd(3 * C, C, scale=C ** -0.5).requires_grad_()
    b = rnd(3 * C).requires_grad_() if bias else None
    W = rnd(D, R, scale=0.5).requires_grad_()
    w_std = (torch.rand(H, generator=g, dtype=torch.float64) * 2 - 0.5).to(dtype).to(device).requires_grad_()
    w_rec = torch.tensor([0.9, 0.2, -0.3][:H], dtype=torch.float64).to(dtype).to(device).requires_grad_()
    return weight, b, W, w_std, w_rec


def run(fn, weight, b, W, w_std, w_rec, H, variant, grad_seed=1, grad_dtype=None, **kw):
    """Folded (weight, bias) and the gradients of every differentiable input for fixed random output grads
    (drawn in float64, rounded to ``grad_dtype``, default the output's dtype)."""
    ow, ob = fn(weight, b, W, w_std, w_rec, H, variant, **kw)
    g = torch.Generator().manual_seed(grad_seed)

    def grad_like(t):
        x = torch.randn(t.shape, generator=g, dtype=torch.float64)
        return x.to(grad_dtype or t.dtype).to(t.dtype)

    outs, grads, ins = [ow], [grad_like(ow)], [weight, W, w_std, w_rec]
    if b is not None:
        outs.append(ob)
        grads.append(grad_like(ob))
        ins.insert(1, b)
    return ow, ob, torch.autograd.grad(outs, ins, grads)


def oracle_fold(weight, b, W, w_std, w_rec, H, variant, gates="signed", routing_threshold=None, bias_channel=False,
                out_dtype=None):
    qs, ks = fold.gate_sides(w_std, gates)
    qr, kr = fold.gate_sides(w_rec, gates)
    return fold.fold_qkv_weight(weight, b, W, qs, ks, qr, kr, fold.routed_heads(w_rec, routing_threshold), H,
                                variant, bias_channel=bias_channel)


def oracle(weight, b, W, w_std, w_rec, H, variant, grad_seed=1, grad_dtype=None, **kw):
    """The oracle fold in float64 on float64 copies of the leaves, fed the same output gradients."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (weight, b, W, w_std, w_rec)]
    kw.pop("out_dtype", None)
    return run(oracle_fold, *leaves, H, variant, grad_seed=grad_seed, grad_dtype=grad_dtype, **kw)


NAMES_BIAS = ("weight", "bias", "W", "w_std", "w_rec")
NAMES = ("weight", "W", "w_std", "w_rec")


def assert_matches(got, ref, rtol, atol, bias):
    ow, ob, grads = got
    rw, rb, rgrads = ref
    torch.testing.assert_close(ow.double(), rw, rtol=rtol, atol=atol, msg=lambda m: f"folded weight: {m}")
    if bias:
        torch.testing.assert_close(ob.double(), rb, rtol=rtol, atol=atol, msg=lambda m: f"folded bias: {m}")
    else:
        assert ob is None
    for name, a, r in zip(NAMES_BIAS if bias else NAMES, grads, rgrads):
        torch.testing.assert_close(a.double(), r, rtol=rtol, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}D{}R{}".format(*s))
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_oracle_float64(variant, bias, routing, shape):
    """Signed gates, every routing mode: the folded weight and bias and every gradient equal the oracle's."""
    H, D, R = shape
    inputs = make_inputs(H, D, R, bias)
    kw = dict(routing_threshold=ROUTINGS[routing])
    got = run(fused_fold_gated, *inputs, H, variant, **kw)
    ref = oracle(*inputs, H, variant, **kw)
    assert got[0].shape == (2 * H * fold.folded_width(variant, D, R) + H * D, H * D)
    assert got[0].dtype == torch.float64 and got[0].is_contiguous()
    assert_matches(got, ref, rtol=1e-10, atol=1e-11, bias=bias)


@pytest.mark.parametrize("threshold", [None, 0.3], ids=["noroute", "route"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(3, 16, 3), (2, 8, 7)], ids=lambda s: "H{}D{}R{}".format(*s))
def test_seed_gates_match_oracle_float64(shape, variant, bias, threshold):
    """Seed gates (every side ``sqrt(max(w, 1e-8))``): same values and gradients as the oracle, in float64; a
    non-positive ``w`` sits on the clamp floor and gets zero gradient."""
    H, D, R = shape
    weight, b, W, _, _ = make_inputs(H, D, R, bias, seed=7)
    w_std = torch.tensor([0.9, -0.2, 0.5][:H], dtype=torch.float64, requires_grad=True)
    w_rec = torch.tensor([0.1, 0.7, -0.4][:H], dtype=torch.float64, requires_grad=True)
    kw = dict(gates="seed", routing_threshold=threshold)
    got = run(fused_fold_gated, weight, b, W, w_std, w_rec, H, variant, **kw)
    ref = oracle(weight, b, W, w_std, w_rec, H, variant, **kw)
    assert_matches(got, ref, rtol=1e-10, atol=1e-11, bias=bias)
    assert got[2][-2][1] == 0  # w_std[1] = -0.2
    if H > 2:
        assert got[2][-1][2] == 0  # w_rec[2] = -0.4
    assert got[2][-2][0] != 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_params(variant):
    """Production dtype: fp32 params, fp32 output; fp32 tolerances against the float64 oracle."""
    H, D, R = 3, 16, 3
    inputs = make_inputs(H, D, R, True, dtype=torch.float32, seed=3)
    got = run(fused_fold_gated, *inputs, H, variant, routing_threshold=0.35)
    ref = oracle(*inputs, H, variant, routing_threshold=0.35)
    assert got[0].dtype == torch.float32
    for t, name in zip(got[2], NAMES_BIAS):
        assert t.dtype == torch.float32, name
    assert_matches(got, ref, rtol=1e-5, atol=2e-6, bias=True)


def test_bf16_output():
    """out_dtype=bfloat16 (the autocast path): outputs rounded once from fp32; bf16 output grads upcast exactly."""
    H, D, R = 2, 16, 3
    inputs = make_inputs(H, D, R, True, dtype=torch.float32, seed=4)
    ow, ob, grads = run(fused_fold_gated, *inputs, H, "same_flop", out_dtype=torch.bfloat16)
    assert ow.dtype == torch.bfloat16 and ob.dtype == torch.bfloat16
    rw, rb, rgrads = oracle(*inputs, H, "same_flop", grad_dtype=torch.bfloat16)
    # One bf16 rounding of the fp32 result: 2^-8 relative on the GPU (round to nearest); the interpreter's
    # fp32 -> bf16 conversion truncates, so allow 2^-7 here. The GPU suite checks bitwise equality with
    # ``fp32_result.to(bfloat16)``.
    torch.testing.assert_close(ow.double(), rw, rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(ob.double(), rb, rtol=2 ** -7, atol=1e-6)
    for name, a, r in zip(NAMES_BIAS, grads, rgrads):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=2e-6, msg=lambda m, n=name: f"d{n}: {m}")


def test_unused_bias_output():
    """A loss that ignores the folded bias gives a zero bias gradient (and the oracle's other gradients)."""
    H, D, R = 2, 8, 3
    weight, b, W, w_std, w_rec = make_inputs(H, D, R, True)
    ow, _ = fused_fold_gated(weight, b, W, w_std, w_rec, H, "same_flop")
    gw = torch.randn_like(ow)
    got = torch.autograd.grad([ow], [weight, b, W, w_std, w_rec], [gw])
    leaves = [t.detach().clone().requires_grad_() for t in (weight, b, W, w_std, w_rec)]
    rw, _ = oracle_fold(*leaves, H, "same_flop")
    ref = torch.autograd.grad([rw], leaves, [gw], allow_unused=True)
    torch.testing.assert_close(got[1], torch.zeros_like(b))
    for name, a, e in zip(NAMES_BIAS, got, ref):
        e = torch.zeros_like(a) if e is None else e
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11, msg=lambda m, n=name: f"d{n}: {m}")


def test_deterministic():
    """No atomics: two runs give bitwise-equal outputs and gradients."""
    H, D, R = 3, 16, 8
    inputs = make_inputs(H, D, R, True, dtype=torch.float32, seed=5)
    a = run(fused_fold_gated, *inputs, H, "same_flop", out_dtype=torch.bfloat16, routing_threshold=0.35)
    b = run(fused_fold_gated, *inputs, H, "same_flop", out_dtype=torch.bfloat16, routing_threshold=0.35)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)


def test_torch_compile_fullgraph():
    """No graph breaks through the wrapper, the custom op and its autograd (aot_eager: the CPU stand-in for
    inductor; the GPU suite compiles with inductor)."""
    H, D, R = 2, 8, 3
    ins = list(make_inputs(H, D, R, True, dtype=torch.float32))

    def f(weight, b, W, w_std, w_rec):
        ow, ob = fused_fold_gated(weight, b, W, w_std, w_rec, H, "same_flop", gates="seed", routing_threshold=0.3)
        return (ow.sin().sum() + ob.cos().sum())

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = cf(*ins)
    got = torch.autograd.grad(y, ins)
    y_ref = f(*ins)
    ref = torch.autograd.grad(y_ref, ins)
    torch.testing.assert_close(y, y_ref)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e)


def _valid(H=2, D=8, R=3):
    weight, b, W, w_std, w_rec = make_inputs(H, D, R, True, dtype=torch.float32)
    return dict(weight=weight, bias=b, W=W, w_std=w_std, w_rec=w_rec, n_head=H, variant="same_flop")


@pytest.mark.parametrize("change,match", [
    (dict(weight=torch.zeros(48, 17)), r"shape \[3C, C\]"),
    (dict(weight=torch.zeros(48)), r"2-D tensor"),
    (dict(n_head=3), r"n_head=3 must divide C=16"),
    (dict(n_head=0), r"n_head must be a positive int"),
    (dict(variant="full"), r"variant must be one of"),
    (dict(W=torch.zeros(4, 3)), r"W must have shape \[D, R\] with D = C / n_head = 8"),
    (dict(W=torch.zeros(8, 8)), r"R = W.shape\[1\] must be in \[1, D-1\] = \[1, 7\]; got 8"),
    (dict(W=torch.zeros(8, 0)), r"must be in \[1, D-1\]"),
    (dict(bias=torch.zeros(47)), r"bias must have shape \[3C\] = \[48\]"),
    (dict(w_std=torch.zeros(3)), r"w_std must have shape \[n_head\] = \[2\]"),
    (dict(w_rec=torch.zeros(2, dtype=torch.int64)), r"w_rec must be float32/bfloat16/float16/float64"),
    (dict(weight=torch.zeros(16, 48).t()), r"weight must be contiguous"),
    (dict(W=torch.zeros(3, 8).t()), r"W must be contiguous"),
    (dict(bias=torch.zeros(96)[::2]), r"bias must be contiguous"),
    (dict(w_std=torch.zeros(2, 1)), r"w_std must have shape \[n_head\]"),
    (dict(w_rec=[1.0, 1.0]), r"w_rec must be a tensor; got list"),
    (dict(weight=torch.zeros(48, 16, dtype=torch.int32)), r"weight must be float32"),
    (dict(weight=torch.zeros(48, 16, device="meta")), r"W is on cpu but weight is on meta"),
    (dict(gates="sides"), r"gates must be 'signed' or 'seed'"),
    (dict(routing_threshold="0.1"), r"routing_threshold must be a float"),
    (dict(out_dtype=torch.int8), r"out_dtype must be"),
])
def test_errors(change, match):
    kw = _valid()
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        fused_fold_gated(**kw)


def test_error_without_triton(monkeypatch):
    monkeypatch.setattr(registry, "TRITON_ERROR", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match=r"needs Triton"):
        fused_fold_gated(**_valid())


def test_error_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(kfold, "INTERPRET", False)
    with pytest.raises(ValueError, match=r"runs on CUDA tensors"):
        fused_fold_gated(**_valid())


def test_partial_requires_grad():
    """A detached weight gives no weight grad, the others match the oracle; no_grad gives no graph."""
    H, D, R = 2, 16, 3
    weight, b, W, w_std, w_rec = make_inputs(H, D, R, True)
    ow, ob = fused_fold_gated(weight.detach(), b, W, w_std, w_rec, H, "low_rank", routing_threshold=0.35)
    rw, rb = oracle_fold(weight.detach(), b, W, w_std, w_rec, H, "low_rank", routing_threshold=0.35)
    gw, gb = torch.randn_like(rw), torch.randn_like(rb)
    got = torch.autograd.grad([ow, ob], [b, W, w_std, w_rec], [gw, gb])
    ref = torch.autograd.grad([rw, rb], [b, W, w_std, w_rec], [gw, gb])
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11)
    with torch.no_grad():
        ow2, _ = fused_fold_gated(weight, b, W, w_std, w_rec, H, "low_rank")
    assert not ow2.requires_grad


def test_eager_function_and_custom_op_paths_agree(monkeypatch):
    """Eager calls take the op's autograd.Function (no custom-op dispatch cost; also the torch < 2.6 path), the
    custom op is taken while tracing: both run the same kernels and give bitwise-equal results."""
    H, D, R = 2, 16, 3
    inputs = make_inputs(H, D, R, True)
    calls = []
    real_apply = kfold._FOLD.function.apply
    monkeypatch.setattr(kfold._FOLD.function, "apply", lambda *a: calls.append(1) or real_apply(*a))
    a = run(fused_fold_gated, *inputs, H, "same_flop", routing_threshold=0.35)
    assert calls == [1]  # eager: the Function
    monkeypatch.setattr(registry, "eager_launch", lambda *t: False)  # as while tracing: the custom op
    b = run(fused_fold_gated, *inputs, H, "same_flop", routing_threshold=0.35)
    assert calls == [1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)


def test_eager_functions_bind_no_signature(monkeypatch):
    """The eager autograd.Functions set up their context inside forward: a Function with a ``setup_context``
    staticmethod binds its arguments through ``inspect.signature`` on every call (tens of microseconds of host time
    per call, several calls per layer and step)."""
    import inspect

    from reciprocal_attention.ops import channel, flash, folded_linear

    for op in (kfold._FOLD, channel._CHANNEL, flash._FLASH, folded_linear._FOLDED_LINEAR):
        assert not torch.autograd.function._is_setup_context_defined(op.function.setup_context), op.name
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: pytest.fail("inspect.signature in an eager call"))
    inputs = make_inputs(2, 16, 3, True)
    out = run(fused_fold_gated, *inputs, 2, "same_flop", routing_threshold=0.35)
    assert out[0] is not None


def test_host_grid_arithmetic_matches_math():
    """``launch.cdiv`` / ``launch.next_pow2``, the host's replacements for Triton's constexpr functions."""
    import math

    from reciprocal_attention.ops.launch import cdiv, next_pow2

    for n in range(0, 2100):
        assert next_pow2(n) == (1 if n <= 1 else 2 ** math.ceil(math.log2(n)))
        for b in (1, 7, 16, 64):
            assert cdiv(n, b) == math.ceil(n / b)


def test_eager_launch_detects_tracing():
    """eager_launch: True for real tensors with no dispatch mode; False on fake tensors / under a mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from reciprocal_attention.ops import eager_launch

    t = torch.ones(2)
    assert eager_launch(t)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(t)
        assert not eager_launch(fake)
    assert not eager_launch(fake)  # a fake tensor outside its mode still counts as tracing


def test_import_without_triton():
    """Importing the module never needs Triton; calling the fold then raises a clear RuntimeError."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from reciprocal_attention.ops import fold as k, registry\n"
        "assert registry.TRITON_ERROR is not None\n"
        "try:\n"
        "    k.fused_fold_gated(torch.zeros(6, 2), None, torch.zeros(2, 1), torch.ones(1), torch.ones(1), 1,"
        " 'same_flop')\n"
        "except RuntimeError as e:\n"
        "    assert 'needs Triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_reduction_loops(monkeypatch):
    """The partial-sum reduction with several loop iterations (on the GPU sizes one iteration usually suffices)."""
    monkeypatch.setattr(kfold, "_REDUCE_MAX_S", 4)
    monkeypatch.setattr(kfold, "_REDUCE_MAX_J", 4)
    H, D, R = 3, 32, 3  # C = 96: 6 column blocks + bias = 7 per head, 21 slots: both loops iterate
    inputs = make_inputs(H, D, R, True)
    kw = dict(gates="seed", routing_threshold=0.35)
    assert_matches(run(fused_fold_gated, *inputs, H, "same_flop", grad_seed=2, **kw),
                   oracle(*inputs, H, "same_flop", grad_seed=2, **kw), rtol=1e-10, atol=1e-11, bias=True)


def test_strided_gates():
    """The gates may be strided views (they are made contiguous); results match the oracle."""
    H, D, R = 2, 8, 3
    weight, b, W, _, _ = make_inputs(H, D, R, True)
    base = torch.rand(2, 2 * H, dtype=torch.float64, requires_grad=True)
    got = run(fused_fold_gated, weight, b, W, base[0, ::2], base[1, ::2], H, "same_flop")
    ref = run(oracle_fold, weight, b, W, base[0, ::2], base[1, ::2], H, "same_flop")
    assert_matches(got, ref, rtol=1e-10, atol=1e-11, bias=True)


@pytest.mark.parametrize("preset", ["ra", "seed", "low_rank", "ra_disc_channel"])
def test_module_fast_path_uses_gated_fold(monkeypatch, preset):
    """The module's fast path (what runs on CUDA) through the interpreter: the folded linear (GEMM + fused fold as
    one node) with the module's gate form and routing gives the reference backend's output and every gradient
    (float64)."""
    from reciprocal_attention import plan as attention_plan
    from reciprocal_attention.attention import ReciprocalAttention
    from reciprocal_attention.ops import folded_linear as kfl

    calls = []
    real = kfl.fused_folded_linear

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gates"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_plan, "fused_fold_usable", lambda device, dtype: True)
    monkeypatch.setattr(kfl, "fused_folded_linear", spy)
    gen = torch.Generator().manual_seed(3)
    kw = dict(n_embd=32, n_head=2, block_size=16)
    m = ReciprocalAttention.from_preset(preset, backend="sdpa", **kw).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
        if preset == "seed":  # one head under the routing threshold (0.1), one above
            m.w_rec.copy_(torch.tensor([0.05, 0.6], dtype=torch.float64))
            m.w_std.copy_(torch.tensor([0.8, 0.4], dtype=torch.float64))
    ref = ReciprocalAttention.from_preset(preset, backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
    assert_module_matches(m, ref, x, g)
    assert calls == [m.gates]


@pytest.mark.parametrize("gates", ["signed", "seed"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(2, 16, 3), (3, 8, 6)], ids=lambda s: "H{}D{}R{}".format(*s))
def test_bias_channel_matches_oracle(shape, bias, gates):
    """bias_channel: standard rows Ds = D - R - 1, reciprocal rows, then a zero row per head (Q~ and K~); the
    gradients ignore the zero rows. Float64 against the oracle."""
    H, D, R = shape
    inputs = make_inputs(H, D, R, bias, seed=9)
    got = run(fused_fold_gated, *inputs, H, "same_flop", gates=gates, bias_channel=True)
    ref = oracle(*inputs, H, "same_flop", gates=gates, bias_channel=True)
    assert_matches(got, ref, rtol=1e-10, atol=1e-11, bias=bias)
    rows = got[0][: 2 * H * D].view(2, H, D, H * D)
    assert torch.count_nonzero(rows[:, :, D - 1]) == 0
    weight, b, W, w_std, w_rec = inputs
    with pytest.raises(ValueError, match="bias_channel needs"):
        fused_fold_gated(weight, b, W, w_std, w_rec, H, "low_rank", bias_channel=True)
    with pytest.raises(ValueError, match="does not combine with routing"):
        fused_fold_gated(weight, b, W, w_std, w_rec, H, "same_flop", routing_threshold=0.1, bias_channel=True)


FOLD_COMPILE_CHECK = """
from reciprocal_attention.ops import fold as K
from reciprocal_attention.ops import fold_kernels as KK

H, D, R = 12, 64, 8
C = H * D
n = 0
for dtype, ieee in ((torch.bfloat16, False), (torch.float32, True)):
    w = torch.zeros(3 * C, C, dtype=dtype)
    b = torch.zeros(3 * C, dtype=dtype)
    W = torch.zeros(D, R, dtype=dtype)
    g = torch.zeros(H, dtype=dtype)
    out = torch.zeros(2 * H * D + C, C, dtype=torch.bfloat16)
    ob = torch.zeros(2 * H * D + C, dtype=torch.bfloat16)
    pw = torch.zeros(64, D, R)
    ps = torch.zeros(64, 4)
    fcfg = K._config(D, R, C)
    bcfg = K._config(D, R, C, bwd=True, wide=ieee)
    for seed in (False, True):
        for route in (False, True):
            KK._fold_fwd_kernel.warmup(w, b, W, g, g, 0.5, out, ob, C, H, D, R, D - R, D,
                                       HAS_BIAS=True, SEED=seed, ROUTE=route, LOW_RANK=False, FP64=False,
                                       IEEE=ieee, BLOCK_D=fcfg["BLOCK_D"], BLOCK_R=fcfg["BLOCK_R"],
                                       BLOCK_C=fcfg["BLOCK_C"], BLOCK_CB=16, num_warps=fcfg["num_warps"], grid=(1,))
            KK._fold_bwd_kernel.warmup(out, ob, w, b, W, g, g, 0.5, w, b, pw, ps, C, H, D, R, D - R, D,
                                       12, HAS_BIAS=True, SEED=seed, ROUTE=route, FP64=False, IEEE=ieee,
                                       BLOCK_D=bcfg["BLOCK_D"], BLOCK_R=bcfg["BLOCK_R"], BLOCK_C=bcfg["BLOCK_C"],
                                       BLOCK_CB=16, num_warps=bcfg["num_warps"], grid=(1,))
            n += 2
        KK._fold_bwd_reduce_kernel.warmup(pw, ps, W, g, g, g, g, 64, 16, H, D * R, SEED=seed, BLOCK_E=32,
                                          BLOCK_S=64, BLOCK_H=16, BLOCK_J=16, num_warps=4, grid=(1,))
        n += 1
print("OK", n)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every gate form x routing mode x operand width of the three fold kernels goes through Triton's real
    compiler for sm_90 (the interpreter skips its front end and type checks), no GPU needed."""
    from sm90_compile import run_sm90

    res = run_sm90(FOLD_COMPILE_CHECK)
    out = res.stdout.strip()
    if res.returncode == 0 and out.startswith("SKIP"):
        pytest.skip(f"cannot stand in for the CUDA driver on this Triton: {out}")
    assert res.returncode == 0 and out.endswith("OK 20"), res.stdout[-3000:] + res.stderr[-3000:]


def _fused_module(monkeypatch, preset="ra", seed=21):
    from reciprocal_attention import plan as attention_plan
    from reciprocal_attention.attention import ReciprocalAttention

    monkeypatch.setattr(attention_plan, "fused_fold_usable", lambda device, dtype: True)
    gen = torch.Generator().manual_seed(seed)
    kw = dict(n_embd=32, n_head=2, block_size=16)
    m = ReciprocalAttention.from_preset(preset, backend="sdpa", **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    ref = ReciprocalAttention.from_preset(preset, backend="reference", **kw).double()
    return m, ref, gen


def _grads(mod, x, g):
    mod.zero_grad(set_to_none=True)
    (mod(x) * g).sum().backward()
    return {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["ra", "ra_disc_channel"])
def test_training_fold_cache_skips_forward_kernel_keeps_gradients(monkeypatch, preset):
    """With autograd on, a second call with unchanged parameters reuses the fold (no forward kernel) and still
    gives every gradient of the reference; gradient accumulation over two such calls sums them; an optimizer step
    (fused or not) or an in-place write makes the next call fold again."""
    m, ref, gen = _fused_module(monkeypatch, preset)
    launches = []
    real = kfold._fold_forward_impl
    monkeypatch.setattr(kfold, "_fold_forward_impl", lambda *a, **k: launches.append(1) or real(*a, **k))
    x = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)

    def check():
        ref.load_state_dict(m.state_dict())
        want = _grads(ref, x, g)
        got = _grads(m, x, g)
        for name, w in want.items():
            torch.testing.assert_close(got.get(name, torch.zeros_like(w)), w, rtol=1e-10, atol=1e-12,
                                       msg=lambda s, n=name: f"{n}: {s}")
        return got

    m.train()
    first = check()
    assert len(launches) == 1
    again = check()
    assert len(launches) == 1, "unchanged parameters: the fold forward must not run again"
    for name in first:
        assert torch.equal(first[name], again[name]), name
    m.zero_grad(set_to_none=True)  # two micro-batches, one fold
    for _ in range(2):
        (m(x) * g).sum().backward()
    assert len(launches) == 1
    for name, w in first.items():
        torch.testing.assert_close(dict(m.named_parameters())[name].grad, 2 * w, rtol=1e-12, atol=1e-13)
    torch.optim.AdamW(m.parameters(), lr=0.05, foreach=False).step()
    check()
    assert len(launches) == 2, "an optimizer step must rebuild the fold"
    with torch.no_grad():
        m.W_recip.mul_(1.5)  # bumps the version counter
    check()
    assert len(launches) == 3


def test_training_fold_cache_not_used_while_capturing(monkeypatch):
    """A CUDA graph captured with autograd must contain the fold (a replay after a step rebuilds it)."""
    m, _, gen = _fused_module(monkeypatch)
    launches = []
    real = kfold._fold_forward_impl
    monkeypatch.setattr(kfold, "_fold_forward_impl", lambda *a, **k: launches.append(1) or real(*a, **k))
    x = torch.randn(1, 5, 32, generator=gen, dtype=torch.float64)
    m(x).sum().backward()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(settings, "fold_overlap", "never")  # the fake "CUDA" tensors have no streams
    m(x).sum().backward()
    assert len(launches) == 2


def test_fold_reuse_is_checked():
    H, D, R = 2, 8, 3
    weight, b, W, w_std, w_rec = make_inputs(H, D, R, True, seed=4)
    w, bb = fused_fold_gated(weight, b, W, w_std, w_rec, H, "same_flop")
    with pytest.raises(ValueError, match=r"reuse\[0\] must be a torch.float64 tensor of shape \[48, 16\]"):
        fused_fold_gated(weight, b, W, w_std, w_rec, H, "same_flop", reuse=(w[1:], bb))
    with pytest.raises(ValueError, match=r"reuse\[1\] must be None when bias is None"):
        fused_fold_gated(weight, None, W, w_std, w_rec, H, "same_flop", reuse=(w, bb))
    with pytest.raises(ValueError, match="reuse must be a tuple"):
        fused_fold_gated(weight, b, W, w_std, w_rec, H, "same_flop", reuse=w)
    w2, b2 = fused_fold_gated(weight, b, W, w_std, w_rec, H, "same_flop", reuse=(w.detach(), bb.detach()))
    assert torch.equal(w2, w) and torch.equal(b2, bb)
    grads = torch.autograd.grad([w2, b2], [weight, b, W, w_std, w_rec], [torch.ones_like(w2), torch.ones_like(b2)])
    want = torch.autograd.grad([w, bb], [weight, b, W, w_std, w_rec], [torch.ones_like(w), torch.ones_like(bb)])
    for x, y in zip(grads, want):  # a reused fold still maps the gradient back
        assert torch.equal(x, y)


def test_ops_settings_validated_and_read_at_call_time(monkeypatch):
    """ops.settings: a bad value raises at assignment naming the field; fold_bwd_tiles reaches the backward's
    tiles when the op runs (the interpreter keeps its own small tiles, so the compiled path is read here)."""
    with pytest.raises(ValueError, match="fold_overlap must be one of"):
        settings.fold_overlap = "sometimes"
    with pytest.raises(ValueError, match="fold_bwd_tiles must be None or"):
        settings.fold_bwd_tiles = (64, 48, 4)
    with pytest.raises(ValueError, match="direct_launch must be True or False"):
        settings.direct_launch = 1
    with pytest.raises(ValueError, match="fold_overlap_priority must be an int"):
        settings.set_from_text("fold_overlap_priority=high")
    with pytest.raises(ValueError, match="ops setting must be NAME=VALUE"):
        settings.set_from_text("no_such_knob=1")
    with pytest.raises(AttributeError, match="no field 'fold_tiles'"):
        settings.fold_tiles = None
    assert settings.fold_overlap == "capture" and settings.fold_bwd_tiles is None
    monkeypatch.setattr(kfold, "INTERPRET", False)
    assert kfold._config(64, 8, 768, bwd=True)["BLOCK_D"] == 64
    monkeypatch.setattr(settings, "fold_bwd_tiles", None)
    settings.set_from_text("fold_bwd_tiles=32,128,8")
    cfg = kfold._config(64, 8, 768, bwd=True)
    assert (cfg["BLOCK_D"], cfg["BLOCK_C"], cfg["num_warps"]) == (32, 128, 8)
    assert kfold._config(64, 8, 768, bwd=True, wide=False)["BLOCK_D"] == 16  # fold_bwd_tiles_16 unset
    monkeypatch.setattr(settings, "flash_autotune", True)
    settings.set_from_text("flash_autotune=0")
    assert settings.flash_autotune is False
