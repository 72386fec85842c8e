"""Second derivatives: Hessian-vector products, dense Hessians, extreme eigenvalues (Lanczos),
and the finite-difference gradient used to check autograd.

Functions act on a *flat* parameter vector ``theta`` and a function ``f(theta) -> scalar``
written with ``torch.func`` in mind (no in-place updates, so ``vmap`` and double
differentiation work). :func:`flat_function` turns ``(model, loss)`` into such an ``f``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from .config import generator

__all__ = ["flat_function", "hvp", "dense_hessian", "finite_difference_gradient",
           "LanczosResult", "lanczos", "top_eigenvalue", "WHICH"]

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
        raise ValueError(f"loss_fn must be callable(params) -> scalar, got "
                         f"{type(loss_fn).__name__}")
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


def finite_difference_gradient(f: Flat, theta: torch.Tensor,
                               eps: float | None = None) -> torch.Tensor:
    r"""Central differences :math:`(f(\theta + h_i e_i) - f(\theta - h_i e_i)) / 2 h_i` for every
    coordinate at once (``vmap`` over the 2P perturbed points).

    The error is ``h^2 |f'''| / 6`` (truncation) plus about ``eps_mach |f| / h`` (rounding),
    smallest near ``h ~ eps_mach^(1/3)``. So by default ``h_i = eps_mach^(1/3) max(1, |theta_i|)``
    with ``eps_mach`` of the dtype of ``theta``: ``6e-6`` in float64, ``5e-3`` in float32, where
    a fixed ``1e-6`` would leave mostly rounding noise. An explicit ``eps`` is used as the same
    ``h`` for every coordinate. The divisor is the step actually represented,
    ``(theta_i + h_i) - (theta_i - h_i)``, not ``2 h_i``.
    """
    from torch.func import vmap

    _check_flat(theta)
    if eps is None:
        h = torch.finfo(theta.dtype).eps ** (1 / 3) * theta.detach().abs().clamp_min(1.0)
    else:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 \
                or not math.isfinite(eps):
            raise ValueError(f"eps must be a positive number or None, got {eps!r}")
        h = torch.full_like(theta, float(eps))
    plus, minus = theta + h, theta - h
    P = theta.numel()
    eye = torch.eye(P, dtype=torch.bool, device=theta.device)
    points = torch.cat([torch.where(eye, plus, theta), torch.where(eye, minus, theta)])
    values = vmap(f)(points)
    return (values[:P] - values[P:]) / (plus - minus)


WHICH = ("largest", "smallest", "magnitude")


@dataclass
class LanczosResult:
    """``eigenvalues`` (k,) in the order asked for and ``eigenvectors`` (P, k) (unit columns),
    the Lanczos ``iterations`` (= Hessian-vector products), the residual norms
    ``||H v - lambda v||`` of the returned pairs, and whether every one met the tolerance."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    iterations: int
    residuals: torch.Tensor
    converged: bool


def _order(vals: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of Ritz values, best first: largest / smallest algebraic, or largest ``|value|``
    (``|value|`` equal to 1e-9 of the largest, such as ``+-lambda``: the positive one first)."""
    if which == "largest":
        return torch.argsort(vals, descending=True)
    if which == "smallest":
        return torch.argsort(vals)
    bin_ = 1e-9 * float(vals.abs().max()) or 1.0
    v = vals.tolist()
    return torch.tensor(sorted(range(len(v)), key=lambda i: (-round(abs(v[i]) / bin_), -v[i])))


def lanczos(f: Flat, theta: torch.Tensor, k: int = 1, *, which: str = "largest",
            iters: int | None = None, tol: float | None = None, seed: int = 0) -> LanczosResult:
    """The ``k`` extreme eigenpairs of the Hessian of ``f`` at ``theta``, by the Lanczos method
    with full reorthogonalization (Lanczos, 1950; Golub and Van Loan, *Matrix Computations*,
    Sec. 10.1), from Hessian-vector products only.

    From a random unit ``q_1``: ``w = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}`` with
    ``alpha_j = q_j^T H q_j``; ``w`` is then orthogonalized against every ``q_i`` (twice, so that
    rounding never lets a converged eigenvalue come back as a ghost copy); ``beta_j = ||w||``,
    ``q_{j+1} = w / beta_j``. The eigenpairs ``(theta_i, s_i)`` of the tridiagonal ``T_j`` give
    Ritz pairs ``(theta_i, Q_j s_i)`` with residual ``||H y_i - theta_i y_i|| = beta_j |s_i[j]|``.
    It stops when the ``k`` wanted Ritz pairs all have residual ``<= tol |theta_i|``: then each
    Ritz value lies within ``tol |theta_i|`` of an eigenvalue of ``H``, a *relative* accuracy
    whatever the scale of ``H`` (and within ``residual^2 / gap`` when the eigenvalue is
    separated from the rest of the spectrum by ``gap``). ``tol`` defaults to ``sqrt(eps_mach)``
    of the dtype of ``theta``. It also stops, exactly, when ``beta_j`` vanishes (the Krylov
    space is invariant).

    ``which``: ``"largest"`` (algebraic: the sharpness ``lambda_max``), ``"smallest"``, or
    ``"magnitude"`` (largest ``|lambda|``; of ``+-lambda`` the positive one first). Unlike power
    iteration, which converges to no eigenvalue at all when ``lambda`` and ``-lambda`` dominate
    (it returns a mixture), every value returned is a Ritz value with a certified residual. If
    ``iters`` (default ``min(P, max(4 k + 40, 80))``) run out first, a ``RuntimeWarning`` says so
    and ``converged`` is False. Cost: one Hessian-vector product per iteration, plus
    ``O(iters^2 P)`` for the reorthogonalization.
    """
    _check_flat(theta)
    P = theta.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P:
        raise ValueError(f"k must be an int in [1, {P}] (the number of parameters), got {k!r}")
    if which not in WHICH:
        raise ValueError(f"unknown which {which!r}; choose one of: {', '.join(WHICH)}")
    iters = min(P, max(4 * k + 40, 80)) if iters is None else iters
    if isinstance(iters, bool) or not isinstance(iters, int) or not k <= iters:
        raise ValueError(f"iters must be an int >= k = {k}, got {iters!r}")
    iters = min(iters, P)
    eps = torch.finfo(theta.dtype).eps
    tol = math.sqrt(eps) if tol is None else tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    theta = theta.detach()
    q = torch.randn(theta.shape, generator=generator(seed), dtype=theta.dtype).to(theta.device)
    Q = torch.empty(iters, P, dtype=theta.dtype, device=theta.device)
    Q[0] = q / q.norm()
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(iters):
        w = hvp(f, theta, Q[j])
        alpha.append(float(Q[j] @ w))
        w = w - alpha[-1] * Q[j] - (beta[-1] * Q[j - 1] if j else 0.0)
        for _ in range(2):  # full reorthogonalization: "twice is enough"
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(w.norm())
        T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
        if j:
            off = torch.tensor(beta, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        vals, S = torch.linalg.eigh(T)
        scale = float(vals.abs().max())
        # beta_j ~ rounding: the Krylov space is invariant and its Ritz pairs are exact
        invariant = b <= 10 * eps * max(scale, 1e-300) * math.sqrt(j + 1) or j + 1 == P
        if j + 1 >= k:
            idx = _order(vals, which)[:k]
            res = torch.zeros(k, dtype=torch.float64) if invariant else b * S[-1, idx].abs()
            rel = res / vals[idx].abs().clamp_min(eps * max(scale, 1e-300))
            ok = bool((rel <= tol).all())
            if ok or invariant or j + 1 == iters:
                if not ok:
                    warnings.warn(f"lanczos: {iters} iterations did not reach the relative "
                                  f"tolerance {tol:g} (largest relative residual "
                                  f"{float(rel.max()):.2e}); raise iters", RuntimeWarning,
                                  stacklevel=2)
                vecs = (S[:, idx].to(theta.dtype).T @ Q[: j + 1]).T
                return LanczosResult(vals[idx].to(theta.dtype), vecs, j + 1,
                                     res.to(theta.dtype), ok)
        if invariant:  # fewer than k directions reachable from q_1 (a degenerate spectrum)
            raise RuntimeError(f"lanczos: the Krylov space from the start vector has dimension "
                               f"{j + 1} < k = {k}; try another seed")
        beta.append(b)
        Q[j + 1] = w / b
    raise AssertionError("unreachable")


def top_eigenvalue(f: Flat, theta: torch.Tensor, *, which: str = "largest",
                   iters: int | None = None, tol: float | None = None, seed: int = 0) -> float:
    """The largest Hessian eigenvalue ``lambda_max`` (the sharpness) of ``f`` at ``theta``; with
    ``which="magnitude"`` the one of largest ``|lambda|``, with ``"smallest"`` the smallest.

    ``lanczos(f, theta, 1, ...)``: a relative tolerance, full reorthogonalization, and a
    ``RuntimeWarning`` if ``iters`` do not suffice (see :func:`lanczos`).
    """
    return float(lanczos(f, theta, 1, which=which, iters=iters, tol=tol,
                         seed=seed).eigenvalues[0])
