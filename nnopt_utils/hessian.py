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


def hvp(f: Flat, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product ``H(theta) v`` by forward-over-reverse differentiation
    (Pearlmutter, 1994): the directional derivative of the gradient along ``v``."""
    from torch.func import grad, jvp

    _check_flat(theta)
    if v.shape != theta.shape:
        raise ValueError(f"v must have the shape of theta {tuple(theta.shape)}, got {tuple(v.shape)}")
    return jvp(grad(f), (theta,), (v,))[1]


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
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed),
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
