"""Launch options of the Triton ops: one :class:`OpsSettings` instance, ``reciprocal_attention.ops.settings``.

Every field is read when an op runs (not at import), so a benchmark can compare both sides of an option in one
process; an assignment is checked at once and a bad value raises ``ValueError`` naming the field. The defaults
are the measured fastest settings. Example::

    from reciprocal_attention import ops
    ops.settings.flash_autotune = False   # one fixed config per attention kernel: quick to compile
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

__all__ = ["OpsSettings", "settings"]

_OVERLAP = ("capture", "always", "never")


def _tiles(name: str, value: Any) -> Optional[tuple[int, int, int]]:
    if value is None:
        return None
    ok = (isinstance(value, (tuple, list)) and len(value) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))
    if not ok or any(v & (v - 1) for v in value):
        raise ValueError(f"{name} must be None or (BLOCK_D, BLOCK_C, num_warps), three powers of two >= 1; "
                         f"got {value!r}")
    return tuple(value)


def _check(name: str, value: Any) -> Any:
    if name in ("direct_launch", "flash_autotune"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")
        return value
    if name in ("fold_bwd_tiles", "fold_bwd_tiles_16"):
        return _tiles(name, value)
    if name == "fold_overlap":
        if value not in _OVERLAP:
            raise ValueError(f"fold_overlap must be one of {_OVERLAP}; got {value!r}")
        return value
    if name == "fold_overlap_priority":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"fold_overlap_priority must be an int CUDA stream priority (e.g. -1 or 0); "
                             f"got {value!r}")
        return value
    raise AttributeError(f"OpsSettings has no field {name!r}; fields: {[f.name for f in fields(OpsSettings)]}")


@dataclass
class OpsSettings:
    """Options of the Triton ops (read at call time; validated on assignment).

    * ``direct_launch``: eager calls launch the compiled kernel's runner directly (``ops.launch.DirectLauncher``)
      instead of ``JITFunction.run``, which costs several times a PyTorch op in host time per launch.
    * ``flash_autotune``: autotune the three attention kernels over a few block/warp/stage configs (the first call
      per key compiles and benchmarks them all); False: one fixed, spill-free config per kernel (quick to
      compile, somewhat slower to run).
    * ``fold_bwd_tiles`` / ``fold_bwd_tiles_16``: ``(BLOCK_D, BLOCK_C, num_warps)`` of the fold backward when a dot
      operand is fp32 / when all are 16-bit; None: the defaults of ``ops.fold`` (the best of the GPU sweep in
      ``tests/test_gpu_fold.py``).
    * ``fold_overlap``: when ``folded_linear``'s backward forks the fold's backward onto a side stream:
      ``"capture"`` (while a CUDA graph is captured), ``"always"`` or ``"never"``.
    * ``fold_overlap_priority``: that side stream's priority (lower is higher; -1 lets the fold's programs take
      SMs first; -1 and 0 are within run-to-run noise of each other, ``benchmarks/results/h100/overlap_ab.json``).
    """

    direct_launch: bool = True
    flash_autotune: bool = True
    fold_bwd_tiles: Optional[tuple[int, int, int]] = None
    fold_bwd_tiles_16: Optional[tuple[int, int, int]] = None
    fold_overlap: str = "capture"
    fold_overlap_priority: int = -1

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, _check(name, value))

    def set_from_text(self, spec: str) -> None:
        """Set one field from ``"name=value"`` (for command-line flags of the tools and the lab): booleans as
        ``1/0/true/false``, tiles as ``"BLOCK_D,BLOCK_C,num_warps"`` or ``none``, the rest as written."""
        name, sep, text = spec.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or name not in {f.name for f in fields(self)}:
            raise ValueError(f"ops setting must be NAME=VALUE with NAME one of {[f.name for f in fields(self)]}; "
                             f"got {spec!r}")
        value: Any = text
        if name in ("direct_launch", "flash_autotune"):
            value = {"1": True, "true": True, "0": False, "false": False}.get(text.lower(), text)
        elif name in ("fold_bwd_tiles", "fold_bwd_tiles_16"):
            try:
                value = None if text.lower() in ("", "none") else tuple(int(v) for v in text.split(","))
            except ValueError:
                value = text
        elif name == "fold_overlap_priority":
            try:
                value = int(text)
            except ValueError:
                value = text
        setattr(self, name, value)


#: The settings every op reads.
settings = OpsSettings()
