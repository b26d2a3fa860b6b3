"""Low-overhead eager launches of ``@triton.jit`` kernels.

``kernel[grid](*args)`` runs Triton's ``JITFunction.run`` on every call: argument binding, specialisation, cache
key, option and hook handling. On the H100 host that Python costs several times a PyTorch op (measured on the
CI CPU with the driver call stubbed out: 12 us per launch of the fold kernel, against 1.8 us for the compiled
kernel's own runner and 0.9 us for ``torch.empty``), and the RA fast path launches three fold kernels per
training step. :class:`DirectLauncher` keeps the compiled kernel of the first launch per specialisation key and
calls its runner directly afterwards.

The key is at least as fine as Triton's specialisation (so a kept kernel is never used where Triton would have
compiled another): the argument types, per tensor its dtype and address modulo 16, every other argument by value,
the launch options and the current device. Anything else goes through ``JITFunction.run``.
``ops.settings.direct_launch = False`` switches the direct path off (read at each launch, so a benchmark can
compare both in one process); if Triton's internals do not match what this module expects, it logs why once and
launches through ``JITFunction.run`` from then on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .config import settings

log = logging.getLogger(__name__)

_BROKEN: list[str] = []
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


class DirectLauncher:
    """``DirectLauncher(kernel)[grid](*args, **kwargs)`` behaves like ``kernel[grid](*args, **kwargs)``.

    Key: the argument types, then per tensor argument its dtype and address modulo 16, every other argument by
    value (ints by value are finer than Triton's ``== 1`` / ``% 16`` / 32-bit specialisation), the launch options
    and the current device. Only keyword arguments that are kernel parameters or launch options are accepted on
    the direct path.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.names = tuple(kernel.arg_names)
        self.accepted = frozenset(self.names) | frozenset(_OPTIONS)
        self.layouts: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.compiled: dict[tuple, Any] = {}

    def __getitem__(self, grid) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def _jit(self, grid, args: tuple, kwargs: dict, key: tuple | None) -> Any:
        compiled = self.kernel[grid](*args, **kwargs)
        if key is not None and compiled is not None and hasattr(compiled, "__getitem__"):
            self.compiled[key] = compiled
        return compiled

    def run(self, grid, args: tuple, kwargs: dict) -> Any:
        if not settings.direct_launch or _BROKEN:
            return self.kernel[grid](*args, **kwargs)
        try:
            vals = args + tuple([kwargs[n] for n in self.names[len(args):]])
        except KeyError:  # a parameter left to its default: let Triton bind it
            return self.kernel[grid](*args, **kwargs)
        types = tuple(map(type, vals))
        layout = self.layouts.get(types)
        if layout is None:
            if not self.accepted.issuperset(kwargs):
                return self.kernel[grid](*args, **kwargs)
            layout = self.layouts[types] = (
                tuple(i for i, v in enumerate(vals) if isinstance(v, torch.Tensor)),
                tuple(i for i, v in enumerate(vals) if not isinstance(v, torch.Tensor)))
        tpos, opos = layout
        try:
            key = (types, tuple([(vals[i].dtype, vals[i].data_ptr() & 15) for i in tpos]),
                   tuple([vals[i] for i in opos]), tuple([kwargs.get(k) for k in _OPTIONS]),
                   torch.cuda.current_device())
            compiled = self.compiled.get(key)
        except TypeError:  # an unhashable constexpr
            return self.kernel[grid](*args, **kwargs)
        if compiled is None:
            return self._jit(grid, args, kwargs, key)
        try:
            compiled[tuple(grid) + (1,) * (3 - len(grid))](*vals)
        except (AttributeError, TypeError) as e:  # Triton internals differ from what this module expects
            _BROKEN.append(repr(e))
            log.warning("direct Triton launches disabled (%r); using JITFunction.run", e)
            return self.kernel[grid](*args, **kwargs)
        return compiled


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for grid sizes. Host code uses these two instead of ``triton.cdiv`` /
    ``triton.next_power_of_2``, which are ``constexpr_function`` objects in Triton 3.x: ~10 us of argument
    unwrapping per call from the host, several calls per layer and step."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()


_LAUNCHERS: dict[int, DirectLauncher] = {}


def direct(kernel) -> DirectLauncher:
    """The (one) :class:`DirectLauncher` of ``kernel``."""
    launcher = _LAUNCHERS.get(id(kernel))
    if launcher is None or launcher.kernel is not kernel:
        launcher = _LAUNCHERS[id(kernel)] = DirectLauncher(kernel)
    return launcher
