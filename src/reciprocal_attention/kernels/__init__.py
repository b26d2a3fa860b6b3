"""Triton kernels. Importing this package does not import Triton; each kernel module does, lazily.

``INTERPRET`` says whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``); Triton reads it when a kernel
is decorated, so it must be set before the kernel modules are imported (``tests/conftest.py`` does).
"""

import importlib.util
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (its kernels still need CUDA, or ``INTERPRET`` on CPU)."""
    return importlib.util.find_spec("triton") is not None
