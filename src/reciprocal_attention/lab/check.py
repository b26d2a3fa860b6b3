"""``ra check``: every RA preset on every available backend against the float64 reference, as a table.

Output and every gradient are compared with the float64 oracle: in float64 (exact paths agree to ~1e-15) and, on
CUDA, in float32 and bfloat16. A low-precision path is judged against the reference math run in the same precision
(as the FlashAttention tests do): its error may be at most three times the reference's own error, or the dtype's
bound. A gate's gradient is a sum over every logit, so in bfloat16 even the reference is 1-11% off on some of them,
and a fixed bound flags rounding, not a wrong kernel (``ra_disc`` ``d_w_std`` at the check's seed: 0.20). Three,
not FlashAttention's two: gate gradients have 4-12 entries, and over 8 seeds x 8 presets on a CPU the fast path's
error reached 2.04x the reference's where both were above the bound; a wrong kernel is off by O(1).
This is the quick, honest answer to "is this install computing RA correctly?".
"""

from __future__ import annotations

import argparse

import torch

from .. import PRESETS, ReciprocalAttention
from .errors import UserError


REFERENCE_FACTOR = 3.0  # how far past the same-precision reference's own error a fast path may be


class DeviceError(UserError):
    """A ``--device`` that does not parse or is not available on this machine."""


def resolve_device(name: str) -> str:
    """``name`` checked as a device this machine has (``cpu``, ``cuda``, ``cuda:N``); :class:`DeviceError` if not."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"--device {name!r} is not a device (expected cpu, cuda or cuda:N): {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name!r}: ra check runs on cpu or cuda; got device type {dev.type!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = b.norm().item()
    return (a.double() - b).norm().item() / (d if d > 0 else 1.0)


def _errors(module: ReciprocalAttention, ref: ReciprocalAttention, x: torch.Tensor, g: torch.Tensor,
            device: str, dtype: torch.dtype) -> dict[str, float]:
    """Relative error of ``module``'s output and gradients (run in ``dtype`` on ``device``) against ``ref``'s,
    whose gradients have been taken in float64 on the CPU; keys ``output``, ``d_x``, ``d_<parameter>``."""
    xm = x.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
    y = module(xm)
    (y * g.to(device=device, dtype=dtype)).sum().backward()
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    errs = {"output": _rel(y.detach().cpu(), yr.detach())}
    (yr * g).sum().backward()
    errs["d_x"] = _rel(xm.grad.cpu(), xr.grad)
    for (name, p), (_, pr) in zip(module.named_parameters(), ref.named_parameters()):
        if pr.grad is not None:
            errs["d_" + name] = _rel(p.grad.cpu(), pr.grad)
    return errs


def check_preset(preset: str, backend: str, device: str, dtype: torch.dtype, tol: float, *, n_embd: int = 64,
                 n_head: int = 4, B: int = 2, T: int = 33, seed: int = 0) -> dict:
    """Relative errors of one preset/backend against the float64 reference, beside the errors of the reference
    math itself run in ``dtype`` on ``device``. ``ok``: every error is at most ``tol`` or three times the
    reference's own error on that tensor; ``worst``: the tensor closest to (or furthest past) its bound."""
    gen = torch.Generator().manual_seed(seed)
    ref = ReciprocalAttention.from_preset(preset, n_embd=n_embd, n_head=n_head, block_size=64,
                                          backend="reference").double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("w_"):
                p.copy_(0.2 + torch.rand(p.shape, generator=gen, dtype=torch.float64))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(B, T, n_embd, generator=gen, dtype=torch.float64)
    g = torch.randn(B, T, n_embd, generator=gen, dtype=torch.float64)

    def copy(backend_name: str) -> ReciprocalAttention:
        m = ReciprocalAttention.from_preset(preset, n_embd=n_embd, n_head=n_head, block_size=64,
                                            backend=backend_name).to(device=device, dtype=dtype)
        m.load_state_dict(ref.state_dict())
        return m

    m = copy(backend)
    errs = _errors(m, ref, x, g, device, dtype)
    ref.zero_grad(set_to_none=True)
    floor = _errors(copy("reference"), ref, x, g, device, dtype)
    bound = {k: max(tol, REFERENCE_FACTOR * floor[k]) for k in errs}
    worst = max(errs, key=lambda k: errs[k] / bound[k])
    return {"preset": preset, "backend": m.explain_backend(device)[0], "device": device,
            "dtype": str(dtype).replace("torch.", ""), "max_rel_err": max(errs.values()), "worst": worst,
            "worst_err": errs[worst], "reference_err": floor[worst], "ok": errs[worst] <= bound[worst],
            "n_checked": len(errs)}


def build_parser() -> argparse.ArgumentParser:
    """The ``ra check`` argument parser (every option has help text)."""
    ap = argparse.ArgumentParser(prog="ra check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run the fast paths besides the float64 CPU check: cpu, cuda or cuda:N "
                         "(default: cuda if available, else cpu); on CUDA also float32 and bfloat16 are checked")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ra check``: the table of every preset and backend; exit code 1 if any is off."""
    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    combos = [("cpu", torch.float64, "sdpa"), ("cpu", torch.float64, "auto")]
    if args.device.startswith("cuda"):
        combos += [(args.device, torch.float32, "auto"), (args.device, torch.bfloat16, "auto")]
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}
    print(f"torch {torch.__version__}; checking presets {', '.join(PRESETS)} against the float64 reference")
    print(f"an error passes at most the dtype's bound or {REFERENCE_FACTOR:g}x the reference's own error in that "
          f"dtype ('ref err')")
    print(f"{'preset':<16} {'backend':<9} {'device':<6} {'dtype':<9} {'grads':>5} {'max rel err':>12}  "
          f"{'worst':<16} {'its err':>9} {'ref err':>9}  ok")
    failures = 0
    for device, dtype, backend in combos:
        for preset in PRESETS:
            r = check_preset(preset, backend, device, dtype, tol[dtype])
            ok = r["ok"]
            failures += not ok
            print(f"{r['preset']:<16} {r['backend']:<9} {r['device']:<6} {r['dtype']:<9} {r['n_checked']:>5} "
                  f"{r['max_rel_err']:>12.2e}  {r['worst']:<16} {r['worst_err']:>9.2e} {r['reference_err']:>9.2e}  "
                  f"{'yes' if ok else 'NO'}")
    print("all within tolerance" if not failures else f"{failures} combination(s) out of tolerance")
    return 1 if failures else 0
