"""Test configuration.

TRITON_INTERPRET must be set before any Triton kernel is decorated, so it is set here, before the package
is imported, whenever no CUDA device is present (CI is CPU-only). On the GPU machine the real compiler runs.
"""
import os

try:
    import torch as _torch

    _has_cuda = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests where no CUDA device is present (they run in scripts/gpu_suite.sh)."""
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs in scripts/gpu_suite.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one intra-op thread is much faster than two contending with other processes on 2 cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def pinned_popen(monkeypatch):
    """``subprocess.Popen`` replaced by a child that sleeps 1.5 s, recording the ``CUDA_VISIBLE_DEVICES`` each job
    was given (None: not pinned): the GPU spreading of the quality study and the MQAR grid, without GPUs."""
    import subprocess
    import sys

    pinned, real_popen = [], subprocess.Popen

    def fake_popen(cmd, stdout=None, stderr=None, env=None):
        pinned.append(env.get("CUDA_VISIBLE_DEVICES"))
        return real_popen([sys.executable, "-c", "import time; time.sleep(1.5)"])

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    return pinned
