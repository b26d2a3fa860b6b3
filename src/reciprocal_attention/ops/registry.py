"""One way to turn Triton launch functions into a differentiable PyTorch op: :class:`TritonOp`.

An op file states its kernels, its shapes and two launch functions, ``forward(*inputs) -> outputs`` and
``backward(*args) -> grads``, each allocating its outputs and launching kernels through :func:`launcher`, plus
the autograd formula (``setup_context`` and ``grads``). :class:`TritonOp` then provides, from that one
description (the FlashAttention interface / Triton fused-attention tutorial shape: one op, one
``autograd.Function``, shapes checked by the caller at the boundary):

* for torch.compile: the custom ops ``reciprocal_attention::<name>`` and ``<name>_backward``, registered with
  ``torch.library.triton_op`` (the launches go through ``wrap_triton``, so inductor sees the kernels and the
  graph has no break) and the autograd formula through ``register_autograd``. Under Triton's interpreter
  (``TRITON_INTERPRET=1``, the CPU tests) ``wrap_triton`` cannot trace the kernels, so the ops are
  ``torch.library.custom_op`` s instead; either way the fake (meta) implementation is the launch function itself,
  run on fake tensors with the launches skipped, so fake and real outputs cannot disagree in shape or strides;
* for eager calls (and CUDA-graph capture): one ``autograd.Function`` with the same formula around the same
  launch functions, whose launches go straight to the compiled kernels (no custom-op dispatch, no
  ``wrap_triton``: both cost host time on every call, see :func:`reciprocal_attention.ops.eager_launch`).

``TritonOp(..., traceable=False)`` registers no custom op: the eager ``autograd.Function`` only, for ops whose
callers keep a PyTorch form under torch.compile (an in-place op, a side-stream backward). On a torch without
``torch.library.triton_op`` (< 2.6) every call takes the ``autograd.Function``; that fallback is logged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import INTERPRET, eager_launch
from .launch import direct

log = logging.getLogger(__name__)

NAMESPACE = "reciprocal_attention"

try:  # guarded: the ops import without Triton; calling one then raises require_triton's RuntimeError
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    TRITON_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None
    JITFunction = None
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["TritonOp", "launcher", "require_triton", "triton", "tl", "NAMESPACE"]


def require_triton(what: str, instead: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` and the alternative ``instead`` when Triton failed to import."""
    if TRITON_ERROR is not None:
        raise RuntimeError(f"{what} needs Triton, which failed to import ({TRITON_ERROR}); {instead}")


class _SkipOnFake:
    """An interpreter kernel that launches on real tensors and does nothing on fake ones: the launch function
    is then its own fake implementation (shape propagation needs only the allocations)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid) -> Callable[..., Any]:
        def run(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake

            if any(isinstance(a, Tensor) and is_fake(a) for a in args):
                return None
            return self.kernel[grid](*args, **kwargs)

        return run


def launcher(kernel, *tensors: Tensor):
    """How to launch ``kernel`` for a call on ``tensors``: ``launcher(k, x)[grid](*args)``.

    Eagerly: the compiled kernel's runner (:class:`~reciprocal_attention.ops.launch.DirectLauncher`) for a plain
    ``@triton.jit`` kernel, the kernel itself otherwise (an autotuned kernel picks its config per key; an
    interpreter kernel runs in numpy). While tracing: ``wrap_triton(kernel)``, so torch.compile sees the launch;
    under the interpreter, the kernel with launches on fake tensors skipped.
    """
    if eager_launch(*tensors):
        return direct(kernel) if JITFunction is not None and isinstance(kernel, JITFunction) else kernel
    if INTERPRET:
        return _SkipOnFake(kernel)
    return torch.library.wrap_triton(kernel)


def _can_register() -> Optional[str]:
    """None when this torch can register the ops, else why not."""
    lib = torch.library
    if INTERPRET:
        return None if hasattr(lib, "custom_op") else f"torch {torch.__version__} has no torch.library.custom_op"
    if hasattr(lib, "triton_op") and hasattr(lib, "wrap_triton"):
        return None
    return f"torch {torch.__version__} has no torch.library.triton_op/wrap_triton (torch >= 2.6)"


def _register(qualname: str, fn: Callable) -> Any:
    """``fn`` as the custom op ``qualname`` (an existing registration, e.g. after a module reload, is reused)."""
    ns, name = qualname.split("::")
    try:
        return getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        pass
    if INTERPRET:
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(fn)  # the launches are skipped on fake tensors (see launcher)
        return op
    return torch.library.triton_op(qualname, mutates_args=())(fn)  # derives its fake from fn itself


class TritonOp:
    """A Triton-backed differentiable op (see the module docstring).

    Args:
        name: the op's name; the custom ops are ``reciprocal_attention::<name>`` and ``..._backward``.
        forward: ``forward(*inputs) -> tuple of tensors``; the inputs are tensors, optional tensors and scalars
            (type-annotated: the custom op's schema is read from the annotations).
        backward: ``backward(*args) -> tuple of tensors``, annotated likewise; None when ``grads`` calls no
            launch function of its own.
        setup_context: ``setup_context(ctx, inputs, output)``: what the backward needs (``ctx.save_for_backward``
            and attributes; may call ``ctx.mark_dirty`` / ``ctx.mark_non_differentiable``).
        grads: ``grads(ctx, backward, *grad_outputs) -> one gradient (or None) per input``; ``backward`` is the
            backward custom op while tracing and the launch function itself eagerly. Eagerly, the gradient of an
            output that was not used is None (not a zero-filled tensor).
        traceable: register the custom ops (False: eager ``autograd.Function`` only).
        differentiable_grads: ``differentiable_grads(ctx, *grad_outputs)``, used instead of ``grads`` when the
            backward itself records a graph (``create_graph=True``); None: a double backward raises (the
            kernels have no backward of their own).
    """

    def __init__(self, name: str, forward: Callable[..., tuple], backward: Optional[Callable[..., tuple]],
                 setup_context: Callable[[Any, tuple, Any], None], grads: Callable[..., tuple], *,
                 traceable: bool = True, differentiable_grads: Optional[Callable[..., tuple]] = None) -> None:
        self.name = name
        self.forward = forward
        self.backward = backward
        self.function = self._function(setup_context, grads, differentiable_grads)
        self.fwd_op = self.bwd_op = None
        #: How traced calls run: "triton_op", "custom_op" (interpreter), or "autograd.Function" (no custom op).
        self.mode = "autograd.Function"
        if traceable and triton is not None:
            self._register_ops(setup_context, grads)

    def _function(self, setup_context, grads, differentiable_grads) -> type:
        forward, backward = self.forward, self.backward

        # The context is set up inside forward (the ``forward(ctx, ...)`` form), not in a ``setup_context``
        # staticmethod: with one, every ``Function.apply`` binds its arguments through ``inspect.signature``
        # (37 us of host time per call on the development CPU, more than the rest of the call).
        def fn_forward(ctx, *inputs):
            *inputs, precomputed = inputs
            if precomputed is not None:  # outputs made earlier for these exact inputs: launch nothing
                output = tuple(t.view_as(t) for t in precomputed)
            else:
                output = forward(*inputs)
            ctx.set_materialize_grads(False)  # no zero-filled gradient of an unused output: grads takes None
            setup_context(ctx, tuple(inputs), output)
            return output

        def fn_backward(ctx, *grad_outputs):
            if differentiable_grads is not None and torch.is_grad_enabled():
                return (*differentiable_grads(ctx, *grad_outputs), None)
            return (*grads(ctx, backward, *grad_outputs), None)

        if differentiable_grads is None:  # a double backward raises instead of silently returning zeros
            fn_backward = once_differentiable(fn_backward)
        return type(f"{self.name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(fn_forward), "backward": staticmethod(fn_backward)})

    def _register_ops(self, setup_context, grads) -> None:
        why = _can_register()
        if why is None:
            try:
                bwd = _register(f"{NAMESPACE}::{self.name}_backward", self.backward) if self.backward else None
                fwd = _register(f"{NAMESPACE}::{self.name}", self.forward)
                fwd.register_autograd(lambda ctx, *g: grads(ctx, bwd, *g), setup_context=setup_context)
            except Exception as e:  # pragma: no cover - depends on the torch build
                why = f"registering the torch.library ops failed ({e!r})"
            else:
                self.fwd_op, self.bwd_op = fwd, bwd
                self.mode = "custom_op" if INTERPRET else "triton_op"
                return
        log.warning("%s: %s; using a plain autograd.Function (works eagerly, graph-breaks under torch.compile)",
                    self.name, why)

    def __call__(self, *inputs, precomputed: Optional[Sequence[Tensor]] = None) -> tuple:
        """Run the op: the custom op while tracing, the ``autograd.Function`` eagerly.

        ``precomputed``: the outputs of an earlier eager call with these exact input values (the caller owns
        that promise); the forward then returns views of them and launches nothing, the backward still runs.
        """
        if self.fwd_op is not None and not eager_launch(inputs[0]):  # the first input is a tensor
            if precomputed is not None:
                raise ValueError(f"{self.name}: precomputed outputs are for eager calls (a traced graph "
                                 "recomputes them)")
            return self.fwd_op(*inputs)
        return self.function.apply(*inputs, precomputed)
