"""Second derivatives: Hessian-vector products, dense Hessians, top eigenvalues, and the
finite-difference gradient used to check autograd.

Functions act on a *flat* parameter vector ``theta`` and a function ``f(theta) -> scalar``
written with ``torch.func`` in mind (no in-place updates, so ``vmap`` and double
differentiation work). :func:`flat_function` turns ``(model, loss)`` into such an ``f``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from .config import generator

__all__ = ["flat_function", "hvp", "dense_hessian", "finite_difference_gradient",
           "top_eigenvalue"]

Flat = Callable[[torch.Tensor], torch.Tensor]


def flat_function(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor] | Callable,
                  X: torch.Tensor, y: torch.Tensor) -> tuple[Flat, torch.Tensor]:
    """Return ``(f, theta0)`` with ``f(theta) = loss(model_theta(X), y)`` on flat parameters."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return loss(functional_call(model, params, (X,)), y)

    return f, theta0


def _check_flat(theta: torch.Tensor) -> None:
    if not isinstance(theta, torch.Tensor) or theta.dim() != 1:
        shape = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ValueError(f"theta must be a 1-D tensor, got {shape}")


def _as_tuple(x, name: str) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    raise ValueError(f"{name} must be a tensor or a non-empty tuple of tensors, got "
                     f"{type(x).__name__}")


def _same_shapes(a, b, na: str, nb: str) -> None:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError(f"{nb} must match {na} in structure and shapes; got "
                         f"{[tuple(x.shape) for x in b]} vs {[tuple(x.shape) for x in a]}")


def hvp(loss_fn: Callable, params, v):
    """Hessian-vector product ``H v`` with ``H = d^2 loss / d params^2`` at ``params``.

    Forward-over-reverse (Pearlmutter, 1994): ``H v = d/de grad f(params + e v) |_{e=0}``,
    computed as ``torch.func.jvp(torch.func.grad(f), (params,), (v,))``: the cost of about two
    gradients, and ``H`` is never formed. ``params`` and ``v`` are a tensor or matching tuples
    of tensors; the result has the same structure as ``v``.
    """
    from torch.func import grad, jvp

    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable(params) -> scalar, got {type(loss_fn).__name__}")
    single = isinstance(params, torch.Tensor)
    p, vv = _as_tuple(params, "params"), _as_tuple(v, "v")
    _same_shapes(p, vv, "params", "v")
    f = (lambda *ps: loss_fn(ps[0])) if single else (lambda *ps: loss_fn(ps))
    g = grad(f, argnums=tuple(range(len(p))))
    _, out = jvp(g, tuple(t.detach() for t in p), tuple(t.detach() for t in vv))
    return out[0] if single else tuple(out)


def dense_hessian(f: Flat, theta: torch.Tensor) -> torch.Tensor:
    """The full (P, P) Hessian of ``f`` at ``theta`` (small models only)."""
    from torch.func import hessian

    _check_flat(theta)
    return hessian(f)(theta)


def finite_difference_gradient(f: Flat, theta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Central differences :math:`(f(\theta + \epsilon e_i) - f(\theta - \epsilon e_i)) / 2\epsilon`
    for every coordinate at once (``vmap`` over the 2P perturbed points); error O(eps^2)."""
    from torch.func import vmap

    _check_flat(theta)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    E = eps * torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    values = vmap(f)(torch.cat([theta + E, theta - E]))
    plus, minus = values.split(theta.numel())
    return (plus - minus) / (2 * eps)


def top_eigenvalue(f: Flat, theta: torch.Tensor, *, iters: int = 100, tol: float = 1e-8,
                   seed: int = 0) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration on :func:`hvp`."""
    _check_flat(theta)
    v = torch.randn(theta.shape, generator=generator(seed),
                    dtype=theta.dtype).to(theta.device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = hvp(f, theta, v)
        new = float(v @ w)
        v = w / w.norm().clamp_min(1e-30)
        if abs(new - lam) <= tol * max(abs(new), 1.0):
            return new
        lam = new
    return lam
