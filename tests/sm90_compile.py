"""Compile Triton kernels for sm_90 on a machine without a GPU (CPU CI): the interpreter never runs Triton's
compiler front end, so typing errors (e.g. one name bound to two types across branches) only show up here.

``run_sm90(body)`` runs ``body`` in a fresh interpreter (TRITON_INTERPRET unset) after installing a stand-in CUDA
driver that reports sm_90 and never launches anything; ``body`` calls ``kernel.warmup(..., grid=(1,))``.
Returns the completed process; stdout starting with ``SKIP`` means this Triton's driver internals differ.
"""
import os
import subprocess
import sys
import textwrap

PREAMBLE = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    try:
        from triton.backends.nvidia.driver import CudaDriver

        class FakeDriver(CudaDriver):  # compile for sm_90 without a GPU: nothing is ever launched
            def __init__(self):
                pass

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

            def get_active_torch_device(self):
                return torch.device("cpu")

            def is_active(self):
                return True

        driver.set_active(FakeDriver())
    except Exception as e:
        print("SKIP", repr(e))
        sys.exit(0)
""")


def run_sm90(body: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", PREAMBLE + textwrap.dedent(body), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
