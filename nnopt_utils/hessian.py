"""Second derivatives: Hessian-vector products, dense Hessians, extreme eigenvalues
(Lanczos), traces (Hutchinson, exact), spectral densities (stochastic Lanczos
quadrature), and the finite-difference gradient used to check autograd.

Functions act on a *flat* parameter vector ``theta`` and a function ``f(theta) -> scalar``
written with ``torch.func`` in mind (no in-place updates, so ``vmap`` and double
differentiation work). :func:`flat_function` turns ``(model, loss)`` into such an ``f``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from .config import generator

__all__ = ["flat_function", "hvp", "hvp_operator", "dense_hessian", "finite_difference_gradient",
           "LanczosResult", "lanczos", "top_eigenvalue", "WHICH", "SharpnessTracker",
           "sharpness_callback", "TraceEstimate",
           "hutchinson_trace", "hvp_trace", "exact_trace", "TRACE_METHODS",
           "SpectralDensity", "spectral_density"]

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


def hvp_operator(f: Flat, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map ``v -> H v`` at ``theta`` for many products: the gradient's graph is built
    once, and each product is one backward pass through it (reverse-over-reverse,
    Pearlmutter, 1994), about the cost of one gradient where :func:`hvp` pays for a forward
    and a backward pass every time. ``v`` is one vector ``(P,)`` or a batch ``(B, P)``
    (the products of a batch in one call). :func:`lanczos`, :func:`hutchinson_trace`,
    :func:`hvp_trace` and :func:`spectral_density` use it; the graph is freed with the
    returned function."""
    _check_flat(theta)
    x = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)

    def apply(v: torch.Tensor) -> torch.Tensor:
        if v.shape[-1:] != x.shape or v.dim() > 2:
            raise ValueError(f"v must have shape ({x.numel()},) or (B, {x.numel()}), got "
                             f"{tuple(v.shape)}")
        if not g.requires_grad:  # f is linear in theta: H = 0
            return torch.zeros_like(v)
        (out,) = torch.autograd.grad(g, x, v.to(x), retain_graph=True,
                                     is_grads_batched=v.dim() == 2)
        return out

    return apply


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
    H = hvp_operator(f, theta)
    q = torch.randn(theta.shape, generator=generator(seed), dtype=theta.dtype).to(theta.device)
    Q = torch.empty(iters, P, dtype=theta.dtype, device=theta.device)
    Q[0] = q / q.norm()
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(iters):
        w = H(Q[j])
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


# --------------------------------------------------------------------------------------
# sharpness during training


@dataclass
class SharpnessTracker:
    r"""A ``callback(step, model, row)`` for :func:`nnopt_utils.train.fit` that measures the
    sharpness :math:`\lambda_{\max}(\nabla^2 L(\theta_t))` every ``every`` steps; build it with
    :func:`sharpness_callback`.

    ``steps`` and ``values`` hold what was measured (as lists; ``eigenvectors`` the unit top
    eigenvectors as flat ``(P,)`` tensors when ``keep_vectors``), and each measured value is
    also written into that step's row of the run's :class:`~nnopt_utils.train.History`, in
    the column ``sharpness``. ``fit`` calls its callback after the gradient of step ``t`` and
    before the update, so the value at step ``t`` is the sharpness at the iterate
    :math:`\theta_t` whose loss the row's ``loss`` reports."""

    X: torch.Tensor
    y: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    every: int
    iters: int | None = None
    tol: float | None = None
    seed: int = 0
    keep_vectors: bool = False
    steps: list[int] = field(default_factory=list, init=False)
    values: list[float] = field(default_factory=list, init=False)
    eigenvectors: list[torch.Tensor] = field(default_factory=list, init=False)

    def measure(self, model: nn.Module) -> LanczosResult:
        """Lanczos for the top Hessian eigenpair of the loss on ``(X, y)`` at ``model``.
        The model is left as it was: buffers a forward pass updates (BatchNorm's running
        statistics) are restored afterwards."""
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        try:
            f, theta = flat_function(model, self.loss, self.X, self.y)
            return lanczos(f, theta, 1, iters=self.iters, tol=self.tol, seed=self.seed)
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])

    def __call__(self, step: int, model: nn.Module, row: dict | None = None) -> None:
        if step % self.every:
            return
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"a SharpnessTracker records one run: step {step} after step "
                             f"{self.steps[-1]}; make a new one per run")
        result = self.measure(model)
        value = float(result.eigenvalues[0])
        self.steps.append(int(step))
        self.values.append(value)
        if self.keep_vectors:
            self.eigenvectors.append(result.eigenvectors[:, 0].detach().clone())
        if row is not None:
            row["sharpness"] = value


def sharpness_callback(X: torch.Tensor, y: torch.Tensor, *, loss="cross_entropy",
                       every: int = 10, iters: int | None = None, tol: float | None = None,
                       seed: int = 0, keep_vectors: bool = False) -> SharpnessTracker:
    r"""Track the sharpness during training: a callback for ``fit(..., callback=...)`` that
    records the top Hessian eigenvalue of the training loss every ``every`` steps.

    At steps :math:`t = 0, k, 2k, \dots` (``k = every``) it computes, by :func:`lanczos`
    with Hessian-vector products only (the Hessian is never formed),

    .. math::

        S(\theta_t) = \lambda_{\max}\big(\nabla^2 L(\theta_t)\big), \qquad
        L(\theta) = \ell\big(f(X; \theta), y\big),

    on the fixed data ``(X, y)`` given here: the full training set for the full-batch
    sharpness of Cohen et al. (2021), *Gradient descent on neural networks typically occurs
    at the edge of stability* (ICLR), or a fixed subset of it to save time. For gradient
    descent with step :math:`\eta`, :math:`S = 2/\eta` is the stability threshold of the
    local quadratic model; Cohen et al. found that full-batch GD drives :math:`S` up to it
    and then keeps it there. ``loss`` must be the loss the run minimizes (a name from
    :data:`nnopt_utils.train.LOSSES` or a ``callable(output, target)``), or the measured
    curvature is that of another function.

    Each measurement is one Lanczos run (typically 10-20 Hessian-vector products, each about
    the cost of a gradient on ``(X, y)``) from the start vector drawn from ``seed``, so it
    equals ``lanczos(*flat_function(model, loss, X, y), 1, iters=iters, tol=tol,
    seed=seed)`` at that step. The values go to the returned :class:`SharpnessTracker`
    (``steps``, ``values``, and ``eigenvectors`` with ``keep_vectors``) and to the column
    ``sharpness`` of the :class:`~nnopt_utils.train.History` that ``fit`` returns. The
    state after the last update is not measured (``fit`` makes no callback there); call
    ``tracker.measure(model)`` for it.
    """
    from .train import resolve_loss

    for name, t in (("X", X), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            what = "a 0-d tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor with a sample dimension, got {what}")
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X and y must hold the same positive number of samples, got "
                         f"{len(X)} and {len(y)}")
    _check_int("every", every)
    if iters is not None:
        _check_int("iters", iters)
    if tol is not None:
        _check_positive("tol", tol)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return SharpnessTracker(X, y, resolve_loss(loss), every, iters, tol, seed,
                            bool(keep_vectors))


# --------------------------------------------------------------------------------------
# traces


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_positive(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or not math.isfinite(value)
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@dataclass
class TraceEstimate:
    """A Monte Carlo trace: the ``estimate`` (the mean of the probe values), its
    standard error ``stderr = std(samples) / sqrt(probes)``, the number of ``probes``
    used, whether the target relative standard error was met (``converged``), and the
    probe values ``samples`` (``v^T H v``, one per probe)."""

    estimate: float
    stderr: float
    probes: int
    converged: bool
    samples: torch.Tensor


def hutchinson_trace(
    f: Flat,
    theta: torch.Tensor,
    *,
    rtol: float = 1e-2,
    max_probes: int = 1000,
    min_probes: int = 10,
    block: int = 10,
    seed: int = 0,
) -> TraceEstimate:
    r"""The Hessian trace of ``f`` at ``theta`` by Hutchinson's estimator (Hutchinson,
    1990; Avron and Toledo, 2011), stopped on a target relative standard error.

    For Rademacher probes ``v`` (entries ``+-1`` with probability 1/2), :math:`\mathbb
    E[v^\top H v] = \operatorname{tr} H` and :math:`\operatorname{Var}[v^\top H v] = 2
    \sum_{i \neq j} H_{ij}^2`, the smallest variance of any i.i.d. probe distribution
    (Gaussian probes add ``2 sum_i H_ii^2``). Probes are drawn ``block`` at a time (one
    batch of Hessian-vector products per block, :func:`hvp_operator`); after at least ``min_probes`` it
    stops as soon as the standard error of the mean, ``std(samples) / sqrt(m)``, is at
    most ``rtol |estimate|``, and after ``max_probes`` in any case (then ``converged``
    is False and a ``RuntimeWarning`` says so). ``seed`` goes through
    :func:`nnopt_utils.config.generator`. For a diagonal ``H`` every probe gives the
    trace exactly and the standard error is 0. The first block holds at least
    ``min_probes`` probes. A relative target cannot be met when the trace is 0 (a
    traceless ``H``): then all ``max_probes`` run and the warning says so.
    """
    _check_flat(theta)
    rtol = _check_positive("rtol", rtol)
    min_probes = _check_int("min_probes", min_probes, 2)
    max_probes = _check_int("max_probes", max_probes, min_probes)
    block = _check_int("block", block)
    gen = generator(seed)
    theta = theta.detach()
    P = theta.numel()
    batched = hvp_operator(f, theta)
    samples = torch.empty(0, dtype=torch.float64)
    while True:
        m = min(max(block, min_probes - len(samples)), max_probes - len(samples))
        V = (torch.randint(0, 2, (m, P), generator=gen) * 2 - 1).to(theta)
        new = (V * batched(V)).sum(1).to(torch.float64).cpu()
        samples = torch.cat([samples, new])
        n = len(samples)
        mean = float(samples.mean())
        stderr = float(samples.std()) / math.sqrt(n) if n > 1 else math.inf
        done = n >= min_probes and stderr <= rtol * abs(mean)
        if done or n >= max_probes:
            if not done:
                warnings.warn(
                    f"hutchinson_trace: {n} probes left a relative standard error "
                    f"{stderr / abs(mean) if mean else math.inf:.2e} > rtol = "
                    f"{rtol:g}; raise max_probes",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return TraceEstimate(mean, stderr, n, done, samples)


def hvp_trace(f: Flat, theta: torch.Tensor, *, chunk_size: int = 256) -> float:
    r"""The exact Hessian trace of any ``f``: :math:`\operatorname{tr} H = \sum_i
    e_i^\top H e_i`, from ``P`` Hessian-vector products with the coordinate vectors,
    ``chunk_size`` of them per batch (memory ``chunk_size * P``). The cost is ``P``
    Hessian-vector products, so this suits small models; for networks
    :func:`exact_trace` is far cheaper."""
    _check_flat(theta)
    chunk_size = _check_int("chunk_size", chunk_size)
    theta = theta.detach()
    P = theta.numel()
    batched = hvp_operator(f, theta)
    total = 0.0
    for start in range(0, P, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, P), device=theta.device)
        E = torch.zeros(len(idx), P, dtype=theta.dtype, device=theta.device)
        E[torch.arange(len(idx)), idx] = 1.0
        total += float(batched(E)[torch.arange(len(idx)), idx].sum())
    return total


TRACE_METHODS = ("auto", "gauss_newton", "preactivation")

# activations that are linear on each side of 0: their second derivative is 0 almost
# everywhere; torch.nn.functional's names for the book's own activation modules
_PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.ReLU6, nn.Hardtanh)
_SMOOTH = (
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Softsign,
)
_PIECEWISE_LINEAR_NAMES = ("linear", "relu", "leaky_relu")


def _trace_structure(model: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """The modules of ``model`` and their kinds: 'linear', 'pl' (piecewise-linear
    activation), 'smooth' (smooth elementwise activation) or 'reshape' (Flatten)."""
    from torch.nn.utils import parametrize

    from .models import ACTIVATIONS, _Elementwise

    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"exact_trace needs an nn.Sequential of Linear layers and elementwise "
            f"activations, got {type(model).__name__}"
        )
    mods, kinds = [], []
    for name, m in model.named_children():
        if isinstance(m, nn.Linear) and not parametrize.is_parametrized(m):
            kind = "linear"
        elif isinstance(m, _PIECEWISE_LINEAR):
            kind = "pl"
        elif isinstance(m, _SMOOTH):
            kind = "smooth"
        elif isinstance(m, _Elementwise) and ACTIVATIONS.get(m.name) is m.fn:
            kind = "pl" if m.name in _PIECEWISE_LINEAR_NAMES else "smooth"
        elif isinstance(m, nn.Flatten):
            kind = "reshape"
        else:
            supported = ", ".join(
                c.__name__
                for c in (nn.Linear, nn.Flatten, *_PIECEWISE_LINEAR, *_SMOOTH)
            )
            raise ValueError(
                f"exact_trace does not support module {name!r}: {m!r}; supported: "
                f"{supported} and nnopt_utils.models' named activations"
            )
        mods.append(m)
        kinds.append(kind)
    if "linear" not in kinds:
        raise ValueError("exact_trace needs at least one nn.Linear layer in the model")
    return mods, kinds


def exact_trace(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss="cross_entropy",
    *,
    method: str = "auto",
    chunk_size: int = 256,
) -> float:
    r"""The exact trace of the Hessian of ``L(theta) = loss(model_theta(X), y)`` with
    respect to all parameters, without probes and without forming ``H``.

    ``model``: an ``nn.Sequential`` of ``nn.Linear`` layers (no weight-norm
    parametrization), elementwise activations (``ReLU``, ``LeakyReLU``, ``Identity``,
    ``Tanh``, ``GELU``, ..., or :mod:`nnopt_utils.models`' named activations) and
    ``Flatten``; anything else raises a ``ValueError`` naming the module. ``loss``: a
    name from :data:`nnopt_utils.train.LOSSES` or a ``callable(output, target)`` that is
    a *mean* over samples, :math:`L = \frac1N \sum_n \ell_n` (checked; a sum raises).

    **Layer by layer.** A Linear layer maps its input ``a_n`` to ``z_n = W a_n + b``,
    and ``z_n`` is linear in ``(W, b)`` while ``a_n`` does not depend on ``(W, b)``.
    With :math:`H_z^{(n)} = \partial^2 \ell_n / \partial z_n^2` the exact Hessian of the
    rest of the network and the loss, the chain rule has no second term:

    .. math:: \frac{\partial^2 L}{\partial W_{ij}^2} = \frac1N \sum_n a_{nj}^2
              [H_z^{(n)}]_{ii}, \qquad \frac{\partial^2 L}{\partial b_i^2} = \frac1N
              \sum_n [H_z^{(n)}]_{ii},

    so :math:`\operatorname{tr} H = \frac1N \sum_{\text{layers}} \sum_n \sum_i
    [H_z^{(n)}]_{ii} (\|a_n\|^2 + 1)` (the ``+1`` only with a bias). Only the diagonal
    of each per-sample ``H_z`` is needed.

    **Piecewise-linear networks** (``method="gauss_newton"``, the default when every
    activation is ReLU, leaky ReLU or linear). Write
    :math:`J_n = \partial f_n / \partial z_n` (``C x width``) and ``H_f^{(n)}`` the
    Hessian of ``ell_n`` in the output ``f_n``. Then
    :math:`H_z^{(n)} = J_n^\top H_f^{(n)} J_n + \sum_m (\ldots) \phi''(z_m)`, and
    ``phi'' = 0`` almost everywhere, so ``H_z = J^T H_f J``: the trace is the trace of
    the Gauss-Newton matrix. (The full Hessian is *not* the Gauss-Newton matrix: its
    off-diagonal blocks between layers carry terms ``J^T g`` with the loss gradient
    ``g``, which give it negative eigenvalues; but a piecewise-linear network is linear
    in each single weight near almost every point, so those terms have no diagonal.)
    With ``H_f = V diag(lambda) V^T`` (``C x C`` per sample),
    :math:`[H_z]_{ii} = \sum_k \lambda_k (J^\top v_k)_i^2`: ``C`` vector-Jacobian
    products (one ``vmap``) give every layer's diagonal at once. Cost: about ``C``
    backward passes.

    **Any elementwise activation** (``method="preactivation"``, the default otherwise):
    each ``H_z^{(n)}`` is computed exactly with ``torch.func.hessian`` of the map from
    ``z_n`` to ``ell_n``, ``vmap``-ed over samples in chunks of ``chunk_size``. Cost:
    about ``width`` forward-over-reverse passes of the rest of the network per layer.

    For a general ``f(theta)`` use :func:`hvp_trace` (exact, ``P`` Hessian-vector
    products) or :func:`hutchinson_trace` (stochastic).
    """
    from torch.func import hessian as _hessian
    from torch.func import vjp, vmap

    from .train import resolve_loss

    if method not in TRACE_METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose one of: {', '.join(TRACE_METHODS)}"
        )
    chunk_size = _check_int("chunk_size", chunk_size)
    mods, kinds = _trace_structure(model)
    if (
        not isinstance(X, torch.Tensor)
        or not isinstance(y, torch.Tensor)
        or len(X) != len(y)
        or len(X) == 0
    ):
        raise ValueError(
            f"X and y must be tensors with the same (positive) number of samples, "
            f"got {getattr(X, 'shape', type(X).__name__)} and "
            f"{getattr(y, 'shape', type(y).__name__)}"
        )
    smooth = "smooth" in kinds
    if method == "auto":
        method = "preactivation" if smooth else "gauss_newton"
    if method == "gauss_newton" and smooth:
        bad = next(m for m, k in zip(mods, kinds) if k == "smooth")
        raise ValueError(
            f"method 'gauss_newton' is exact only for piecewise-linear "
            f"activations, got {bad!r}; use method='preactivation'"
        )
    lossfn = resolve_loss(loss)
    N = len(X)

    def sample_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return lossfn(o[None], t[None])

    def forward(eps, start: int = 0, a=None):
        # the network from module `start` on; eps[k] is added to the k-th Linear's
        # output
        a = X if a is None else a
        acts, pres, li = [], [], 0
        for m, kind in zip(mods[start:], kinds[start:]):
            if kind == "linear":
                acts.append(a)
                a = nn.functional.linear(
                    a, m.weight.detach(), None if m.bias is None else m.bias.detach()
                )
                a = a + eps[li] if eps is not None else a
                pres.append(a)
                li += 1
            else:
                a = m(a)
        return a, (acts, pres)

    linear_at = [i for i, k in enumerate(kinds) if k == "linear"]
    with torch.no_grad():
        out, (acts, pres) = forward(None)
    if out.dim() != 2:
        raise ValueError(
            f"exact_trace needs a (N, C) model output, got {tuple(out.shape)}"
        )
    per_sample = vmap(sample_loss)(out, y)
    total = float(lossfn(out, y))
    if not math.isclose(
        float(per_sample.mean()),
        total,
        rel_tol=1e-4,
        abs_tol=1e-6 * float(per_sample.abs().mean()),
    ):
        raise ValueError(
            f"loss must be a mean over samples: loss(output, y) = {total:.6g} "
            f"but the mean of the per-sample losses is "
            f"{float(per_sample.mean()):.6g}"
        )

    if method == "gauss_newton":
        H_f = vmap(_hessian(sample_loss))(out, y)  # (N, C, C)
        lam, V = torch.linalg.eigh(H_f)
        eps0 = [torch.zeros_like(z) for z in pres]
        _, pullback, _ = vjp(lambda *e: forward(e), *eps0, has_aux=True)
        G = vmap(pullback)(V.permute(2, 0, 1))  # per layer: (C, N, width) = J^T v_k
        diags = [torch.einsum("nk,kni->ni", lam, g * g) for g in G]
    else:
        diags = []
        for k, i in enumerate(linear_at):

            def rest_loss(z, t, i=i):
                return sample_loss(forward(None, i + 1, z[None])[0][0], t)

            def diag(z, t, rest_loss=rest_loss):
                return torch.diagonal(_hessian(rest_loss)(z, t))

            diags.append(vmap(diag, chunk_size=chunk_size)(pres[k], y))
    trace = 0.0
    for k, i in enumerate(linear_at):
        inputs = acts[k].reshape(N, -1).pow(2).sum(1) + (mods[i].bias is not None)
        trace += float((diags[k].sum(1) * inputs).sum()) / N
    return trace


# --------------------------------------------------------------------------------------
# spectral density


@dataclass
class SpectralDensity:
    """A stochastic Lanczos quadrature: the Gaussian-smoothed ``density`` on ``grid``
    (it integrates to 1), the smoothing width ``sigma``, and the raw quadrature:
    ``nodes`` and ``weights``, both ``(probes, steps)``; each probe's weights sum to 1
    (a probe whose Krylov space closed after ``j < steps`` steps has ``steps - j`` nodes
    of weight 0)."""

    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    nodes: torch.Tensor
    weights: torch.Tensor


def spectral_density(
    f: Flat,
    theta: torch.Tensor,
    *,
    steps: int = 80,
    probes: int = 1,
    grid: int | torch.Tensor = 1000,
    sigma: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    r"""The spectral density of the Hessian of ``f`` at ``theta`` by stochastic Lanczos
    quadrature (Golub and Welsch, 1969; Lin, Saad and Yang, 2016; Ghorbani, Krishnan and
    Xiao, 2019).

    The density :math:`\phi(t) = \frac1P \sum_i \delta(t - \lambda_i)` smoothed by a
    Gaussian :math:`g_\sigma` is :math:`\phi_\sigma(t) = \frac1P \operatorname{tr}
    g_\sigma(t - H) = \mathbb E_v[v^\top g_\sigma(t - H) v]` for a random unit ``v``
    (uniform on the sphere: normalized Gaussian). For each of ``probes`` such ``v``,
    ``steps`` Lanczos steps with full reorthogonalization from ``q_1 = v`` give the
    tridiagonal ``T = S diag(tau) S^T``, and Gauss quadrature :math:`v^\top g(H) v
    \approx \sum_j w_j g(\tau_j)` with nodes ``tau_j`` and weights ``w_j = S_{1j}^2``,
    exact for every polynomial ``g`` of degree ``< 2 steps``. So :math:`\sum_j w_j
    \tau_j^k = v^\top H^k v`, whose mean over ``v`` is ``tr(H^k) / P``. The result
    averages the probes: :math:`\phi_\sigma(t) \approx \frac{1}{n_v} \sum_v \sum_j w_j
    g_\sigma(t - \tau_j)`.

    ``grid``: a number of points (spanning the nodes plus ``5 sigma`` on each side) or a
    1-D tensor of points. ``sigma`` defaults to 1% of the span of the nodes. The probes
    run together (one batch of Hessian-vector products per step). ``seed`` goes
    through :func:`nnopt_utils.config.generator`.
    """
    _check_flat(theta)
    P = theta.numel()
    steps = _check_int("steps", steps)
    probes = _check_int("probes", probes)
    if steps > P:
        raise ValueError(
            f"steps must be at most the number of parameters {P}, got {steps}"
        )
    if sigma is not None:
        sigma = _check_positive("sigma", sigma)
    if isinstance(grid, torch.Tensor):
        if grid.dim() != 1 or len(grid) < 2:
            raise ValueError(
                f"grid must be an int >= 2 or a 1-D tensor of >= 2 points, got "
                f"shape {tuple(grid.shape)}"
            )
    else:
        _check_int("grid", grid, 2)
    theta = theta.detach()
    dtype, eps = theta.dtype, torch.finfo(theta.dtype).eps
    batched = hvp_operator(f, theta)
    v = torch.randn(probes, P, generator=generator(seed), dtype=dtype).to(theta.device)
    Q = torch.zeros(steps, probes, P, dtype=dtype, device=theta.device)
    Q[0] = v / v.norm(dim=1, keepdim=True)
    alpha = torch.zeros(probes, steps, dtype=torch.float64)
    beta = torch.zeros(probes, steps - 1, dtype=torch.float64)
    scale = torch.zeros(probes, dtype=torch.float64)
    for j in range(steps):
        w = batched(Q[j])
        a = (Q[j] * w).sum(1)
        alpha[:, j] = a.to(torch.float64).cpu()
        scale = torch.maximum(scale, a.abs().to(torch.float64).cpu())
        if j + 1 == steps:
            break
        for _ in range(2):  # full reorthogonalization, as in lanczos
            w = w - torch.einsum(
                "jp,jpk->pk", torch.einsum("jpk,pk->jp", Q[: j + 1], w), Q[: j + 1]
            )
        b = w.norm(dim=1)
        # a probe whose Krylov space is invariant stops: beta = 0 and q = 0 from there
        # on, which appends decoupled nodes of weight 0
        closed = b.to(torch.float64).cpu() <= 10 * eps * scale.clamp_min(
            1e-300
        ) * math.sqrt(j + 1)
        b = torch.where(closed.to(b.device), torch.zeros_like(b), b)
        beta[:, j] = b.to(torch.float64).cpu()
        Q[j + 1] = torch.where(b[:, None] > 0, w / b.clamp_min(1e-300)[:, None], 0.0)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    nodes, S = torch.linalg.eigh(T)
    weights = S[:, 0, :] ** 2
    if sigma is None:
        span = float(nodes.max() - nodes.min())
        sigma = 0.01 * span if span > 0 else 0.01 * max(float(nodes.abs().max()), 1.0)
    if not isinstance(grid, torch.Tensor):
        grid = torch.linspace(
            float(nodes.min()) - 5 * sigma,
            float(nodes.max()) + 5 * sigma,
            grid,
            dtype=torch.float64,
        )
    t = grid.to(torch.float64).cpu()
    kernel = torch.exp(-0.5 * ((t[:, None, None] - nodes) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    density = (kernel * weights).sum(2).mean(1)
    return SpectralDensity(t, density, sigma, nodes, weights)
