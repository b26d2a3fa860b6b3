"""Triton kernels. Importing this package does not import Triton; each op module does, guarded.

``INTERPRET`` says whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``); Triton reads it when a kernel
is decorated, so it must be set before the op modules are imported (``tests/conftest.py`` does).
``settings`` holds the launch options (see :class:`OpsSettings`); they are read at each call.
"""

import functools
import importlib.util
import os

import torch

from .config import OpsSettings, settings

__all__ = ["INTERPRET", "TRITON_AVAILABLE", "OpsSettings", "settings", "eager_launch"]

#: Triton's interpreter is on (an environment variable because Triton itself reads it).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # an import hook refusing it, or a module entry without a spec
        return False


#: The ``triton`` package can be found (its kernels still need CUDA, or ``INTERPRET`` on CPU). Decided once at
#: import: ``forward`` passes read this constant, which torch.compile traces without a graph break (a
#: ``find_spec`` call inside ``forward`` is skipped by dynamo and splits the model's graph at every layer).
TRITON_AVAILABLE: bool = _find_triton()


def eager_launch(*tensors) -> bool:
    """True when an op runs eagerly on real tensors: launch the compiled kernels directly.

    ``torch.library.wrap_triton`` is what makes a launch traceable (torch.compile's AOT tracing runs the op body
    under a dispatch mode, on fake tensors); called eagerly it still routes every launch through a higher-order
    op, which costs host time on each call (H100, eager block fwd+bwd: 2.29 ms with wrap_triton, 2.07 ms with
    direct launches, baseline 1.39 ms; ``tools/eager_overhead.py``). The ops also skip the custom-op dispatch
    itself when this is True (an ``autograd.Function`` runs the same kernels).
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:  # dynamo folds is_compiling()
        return False
    fake = _fake_tensor_type()
    return not any(isinstance(t, fake) for t in tensors)


@functools.lru_cache(maxsize=None)
def _fake_tensor_type() -> type:
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor
