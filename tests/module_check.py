"""Shared test helper: a module's output and every gradient against a reference module's."""
import torch


def assert_module_matches(m, ref, x, g, rtol=1e-10, atol=1e-12, grad_rtol=None, grad_atol=None) -> None:
    """Run ``m`` and ``ref`` on copies of ``x`` with output gradient ``g``; compare the outputs, ``dx`` and every
    parameter gradient (a parameter the reference leaves without gradient must get none or zeros)."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = m(x1), ref(x2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y1, y2, rtol=rtol, atol=atol)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=atol)
    grad_rtol, grad_atol = grad_rtol or rtol, grad_atol or atol
    for (name, p1), (_, p2) in zip(m.named_parameters(), ref.named_parameters()):
        if p2.grad is None:
            assert p1.grad is None or p1.grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(p1.grad, p2.grad, rtol=grad_rtol, atol=grad_atol,
                                       msg=lambda s, n=name: f"{n}: {s}")
