"""Beyond first order: Hessian-vector products and conjugate gradient (Hessian-free), K-FAC,
Shampoo, and block coordinate descent.

* :func:`hvp` -- ``H v`` by forward-over-reverse differentiation (``torch.func.jvp`` of
  ``torch.func.grad``), never forming ``H``; :func:`gnvp` -- the Gauss-Newton product
  ``J^T H_out J v``; :func:`conjugate_gradient` -- CG on any ``v -> A v``; and
  :func:`hessian_free`, Martens' (2010) truncated Newton method built from the three.
* :class:`KFAC` -- Kronecker-factored approximate curvature for ``nn.Linear`` layers (Martens
  and Grosse, 2015): the Fisher block of a layer is approximated by ``G (x) A`` with
  ``A = E[a a^T]`` (inputs) and ``G = E[g g^T]`` (output gradients), so the natural-gradient
  step ``F^{-1} vec(dW)`` becomes ``G^{-1} dW A^{-1}``.
* :class:`Shampoo` -- Gupta, Koren and Singer (2018): for a matrix parameter, statistics
  ``L += G G^T``, ``R += G^T G`` and the update ``L^{-1/4} G R^{-1/4}``.
* :func:`block_coordinate_descent` -- exact minimization over one block of variables at a
  time.

Parameters are passed to the functional helpers as a tensor or a tuple of tensors; losses
as ``callable(params) -> scalar``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .hessian import _as_tuple, _same_shapes, hvp

__all__ = [
    "hvp",
    "gnvp",
    "CGResult",
    "conjugate_gradient",
    "HFResult",
    "hessian_free",
    "matrix_power",
    "kfac_factors",
    "kfac_precondition",
    "KFAC",
    "shampoo_direction",
    "Shampoo",
    "BCDResult",
    "block_coordinate_descent",
]


def _positive(name: str, v, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or (v < 0 if allow_zero else v <= 0):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} finite number, got {v!r}")
    return float(v)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------
# curvature-vector products

def gnvp(model_fn: Callable, out_loss_fn: Callable, params, v):
    """Generalized Gauss-Newton product ``J^T H_out J v`` (Schraudolph, 2002; Martens, 2010).

    ``model_fn(params) -> outputs`` and ``out_loss_fn(outputs) -> scalar``; ``J`` is the
    Jacobian of the outputs in the parameters and ``H_out`` the Hessian of the loss in the
    outputs. ``J v`` is a ``jvp``, ``H_out (J v)`` an ``hvp`` in output space and ``J^T (.)`` a
    ``vjp``. For convex ``out_loss_fn`` (squared error, cross-entropy) the product is positive
    semi-definite, which is what conjugate gradient needs.
    """
    from torch.func import jvp, vjp

    if not callable(model_fn) or not callable(out_loss_fn):
        raise ValueError("model_fn and out_loss_fn must be callables")
    single = isinstance(params, torch.Tensor)
    p, vv = _as_tuple(params, "params"), _as_tuple(v, "v")
    _same_shapes(p, vv, "params", "v")
    f = (lambda *ps: model_fn(ps[0])) if single else (lambda *ps: model_fn(ps))
    p = tuple(t.detach() for t in p)
    out, Jv = jvp(f, p, tuple(t.detach() for t in vv))
    HJv = hvp(out_loss_fn, out.detach(), Jv)
    _, pullback = vjp(f, *p)
    res = pullback(HJv)
    return res[0] if single else tuple(res)


# ---------------------------------------------------------------------------------------
# conjugate gradient

@dataclass
class CGResult:
    """Solution ``x``, the iterations used, the residual norms ``||b - A x_k||`` and whether
    the tolerance was met; ``negative_curvature`` is set when ``p^T A p <= 0`` stopped CG."""

    x: torch.Tensor
    iterations: int
    residuals: list[float]
    converged: bool
    negative_curvature: bool = False


def conjugate_gradient(Av: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
                       x0: torch.Tensor | None = None, max_iter: int | None = None,
                       tol: float = 1e-10) -> CGResult:
    """Solve ``A x = b`` for symmetric positive definite ``A`` given only ``v -> A v``.

    Hestenes and Stiefel (1952): with ``r_0 = b - A x_0`` and ``p_0 = r_0``,
    ``alpha_k = r_k^T r_k / p_k^T A p_k``, ``x_{k+1} = x_k + alpha_k p_k``,
    ``r_{k+1} = r_k - alpha_k A p_k``, ``p_{k+1} = r_{k+1} + (r_{k+1}^T r_{k+1} / r_k^T r_k) p_k``.
    In exact arithmetic it terminates in at most ``n`` steps (at most the number of distinct
    eigenvalues of ``A``), and ``||x_k - x*||_A`` shrinks at least like
    ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k``. Stops when
    ``||r_k|| <= tol * ||b||``, after ``max_iter`` steps (default ``n``), or when a direction
    of non-positive curvature appears (then ``x`` is the last iterate, as in truncated Newton).
    ``b = 0`` returns ``x = 0``, the solution, whatever ``x0``. ``b`` may have any shape; inner
    products are over all entries.
    """
    if not callable(Av):
        raise ValueError(f"Av must be callable(v) -> A v, got {type(Av).__name__}")
    if not isinstance(b, torch.Tensor):
        raise ValueError(f"b must be a tensor, got {type(b).__name__}")
    tol = _positive("tol", tol, allow_zero=True)
    n = b.numel()
    max_iter = n if max_iter is None else _positive_int("max_iter", max_iter)
    if x0 is not None and (not isinstance(x0, torch.Tensor) or x0.shape != b.shape):
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a tensor of b's shape {tuple(b.shape)}, got {shape}")
    bnorm = float(b.norm())
    if bnorm == 0:  # A x = 0 with A positive definite: x = 0 (a relative test cannot stop)
        return CGResult(torch.zeros_like(b), 0, [0.0], True)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - Av(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = (r * r).sum()
    residuals = [float(rr.sqrt())]
    if residuals[0] <= tol * bnorm:
        return CGResult(x, 0, residuals, True)
    for k in range(1, max_iter + 1):
        Ap = Av(p)
        if Ap.shape != p.shape:
            raise ValueError(f"Av returned shape {tuple(Ap.shape)}, expected {tuple(p.shape)}")
        pAp = (p * Ap).sum()
        if pAp <= 0:
            return CGResult(x, k - 1, residuals, False, negative_curvature=True)
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = (r * r).sum()
        residuals.append(float(rr_new.sqrt()))
        if residuals[-1] <= tol * bnorm:
            return CGResult(x, k, residuals, True)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return CGResult(x, max_iter, residuals, False)


# ---------------------------------------------------------------------------------------
# Hessian-free optimization

@dataclass
class HFResult:
    """The parameters after the last outer step of :func:`hessian_free`, the loss after each
    step (first: the initial loss), and per step: the CG iterations, the curvature-vector
    products actually evaluated (each costs about two gradients: CG's, the initial residual's
    when CG is warm-started, and the one in the reduction ratio ``rho``), and the damping."""

    params: torch.Tensor
    losses: list[float]
    cg_iterations: list[int]
    damping: list[float]
    step_products: list[int] = field(default_factory=list)

    @property
    def products(self) -> int:
        """Total curvature-vector products evaluated, counted at the operator."""
        return int(sum(self.step_products))


def hessian_free(loss_fn: Callable[[torch.Tensor], torch.Tensor], params: torch.Tensor, *,
                 steps: int = 20, cg_iters: int = 50, damping: float = 1.0,
                 curvature: str = "gauss_newton", model_fn: Callable | None = None,
                 out_loss_fn: Callable | None = None, cg_tol: float = 1e-6,
                 adapt_damping: bool = True) -> HFResult:
    """Hessian-free optimization (Martens, 2010) of a flat parameter vector.

    Each outer step solves ``(B + lambda I) d = -grad f`` approximately by
    :func:`conjugate_gradient` (at most ``cg_iters`` products, warm-started from the previous
    direction), where ``B`` is the Hessian (``curvature='hessian'``, via :func:`hvp`) or the
    Gauss-Newton matrix (``'gauss_newton'``, via :func:`gnvp`, needs ``model_fn`` and
    ``out_loss_fn`` with ``loss_fn(p) = out_loss_fn(model_fn(p))``). Then ``x <- x + d`` if it
    lowers the loss. Levenberg-Marquardt damping: with the reduction ratio
    ``rho = (f(x+d) - f(x)) / (g^T d + d^T B d / 2)``, ``lambda`` is multiplied by 2/3 when
    ``rho > 3/4`` and by 3/2 when ``rho < 1/4``. ``HFResult.products`` counts every curvature
    product evaluated (CG's, a warm start's initial residual, and the one in ``rho``).
    """
    from torch.func import grad

    curvatures = ("gauss_newton", "hessian")
    if curvature not in curvatures:
        raise ValueError(f"unknown curvature {curvature!r}; choose one of: {', '.join(curvatures)}")
    if curvature == "gauss_newton" and (model_fn is None or out_loss_fn is None):
        raise ValueError("curvature='gauss_newton' needs model_fn and out_loss_fn")
    if not isinstance(params, torch.Tensor) or params.dim() != 1:
        raise ValueError("params must be a flat (1-D) tensor")
    steps = _positive_int("steps", steps)
    cg_iters = _positive_int("cg_iters", cg_iters)
    lam = _positive("damping", damping, allow_zero=True)
    x = params.detach().clone()
    losses, iters, lams, counts = [float(loss_fn(x))], [], [], []
    d_prev = torch.zeros_like(x)
    for _ in range(steps):
        g = grad(loss_fn)(x)
        count = [0]

        def B(v, x=x, count=count):  # the curvature product, counted where it is evaluated
            count[0] += 1
            return hvp(loss_fn, x, v) if curvature == "hessian" else \
                gnvp(model_fn, out_loss_fn, x, v)

        warm = 0.95 * d_prev if bool(d_prev.any()) else None  # A 0 = 0 needs no product
        res = conjugate_gradient(lambda v: B(v) + lam * v, -g, x0=warm, max_iter=cg_iters,
                                 tol=cg_tol)
        d = res.x
        iters.append(res.iterations)
        new = float(loss_fn(x + d))
        model_red = float(g @ d + 0.5 * d @ B(d))
        counts.append(count[0])
        rho = (new - losses[-1]) / model_red if model_red < 0 else -1.0
        if adapt_damping:
            lam = lam * 2 / 3 if rho > 0.75 else (lam * 1.5 if rho < 0.25 else lam)
        lams.append(lam)
        if math.isfinite(new) and new < losses[-1]:
            x, d_prev = x + d, d
            losses.append(new)
        else:
            d_prev = torch.zeros_like(x)
            losses.append(losses[-1])
    return HFResult(x, losses, iters, lams, counts)


# ---------------------------------------------------------------------------------------
# matrix functions

def matrix_power(M: torch.Tensor, p: float, eps: float = 0.0) -> torch.Tensor:
    """``(M + eps I)^p`` of a symmetric positive semi-definite matrix via ``eigh``.

    ``Q diag((lambda_i + eps)^p) Q^T`` with the eigenvalues clamped at 0 first. With ``eps > 0``
    every direction gets ``(lambda_i + eps)^p``, so a negative power of a null direction is
    ``eps^p`` (large), as Shampoo's damping intends: ``matrix_power(diag(1e8, 0), -1/4, 1e-4)``
    is ``diag(0.01, 10)``. Only with ``eps = 0`` and ``p < 0`` is the power taken on the range of
    ``M`` alone (eigenvalues below ``n eps_mach lambda_max`` count as 0: a pseudo-inverse power).
    """
    if not isinstance(M, torch.Tensor) or M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape "
                         f"{tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
    eps = _positive("eps", eps, allow_zero=True)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
        raise ValueError(f"p must be a finite number, got {p!r}")
    lam, Q = torch.linalg.eigh(0.5 * (M + M.T))
    lam = lam.clamp_min(0) + eps
    if p < 0 and eps == 0:
        cutoff = lam.max() * M.shape[0] * torch.finfo(M.dtype).eps
        powered = torch.where(lam > cutoff, lam.clamp_min(cutoff) ** p, torch.zeros_like(lam))
    else:
        powered = lam**p
    return (Q * powered) @ Q.T


# ---------------------------------------------------------------------------------------
# K-FAC

def kfac_factors(a: torch.Tensor, g: torch.Tensor, bias: bool = True) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
    """Kronecker factors of one Linear layer from a batch (Martens and Grosse, 2015).

    ``a``: (n, in) layer inputs; ``g``: (m, n, out) or (n, out) gradients of the *per-example*
    loss (or log-likelihood) in the layer's outputs, one slice per backpropagated vector.
    Returns ``A = (1/n) sum_i a_i a_i^T`` (with ``a_i`` extended by a 1 when ``bias``) and
    ``G = (1/n) sum_i sum_k g_ik g_ik^T``. K-FAC approximates the layer's Fisher block,
    indexed like ``vec`` of the (out, in) weight in row-major order, by ``kron(G, A)``.
    """
    if a.dim() != 2:
        raise ValueError(f"a must be (n, in), got shape {tuple(a.shape)}")
    if g.dim() == 2:
        g = g.unsqueeze(0)
    if g.dim() != 3 or g.shape[1] != a.shape[0]:
        raise ValueError(f"g must be (n, out) or (m, n, out) with n={a.shape[0]}, got "
                         f"{tuple(g.shape)}")
    n = a.shape[0]
    if bias:
        a = torch.cat([a, torch.ones(n, 1, dtype=a.dtype, device=a.device)], 1)
    A = a.T @ a / n
    gg = g.reshape(-1, g.shape[-1])
    G = gg.T @ gg / n
    return A, G


def kfac_precondition(grad: torch.Tensor, A: torch.Tensor, G: torch.Tensor,
                      damping: float = 1e-3) -> torch.Tensor:
    """The K-FAC direction ``(G + sqrt(d) I)^{-1} grad (A + sqrt(d) I)^{-1}``.

    ``grad`` is the (out, in[+1]) gradient matrix (bias as the last column). Because
    ``(G (x) A)^{-1} vec(grad) = vec(G^{-1} grad A^{-1})``, this is the natural-gradient step
    for the Kronecker-factored Fisher; the damping ``d`` is split evenly between the factors
    (Tikhonov damping of each factor by ``sqrt(d)``, Martens and Grosse, 2015, Sec. 6.3).
    """
    damping = _positive("damping", damping, allow_zero=True)
    if grad.dim() != 2 or G.shape != (grad.shape[0],) * 2 or A.shape != (grad.shape[1],) * 2:
        raise ValueError(f"need grad (out, in), G (out, out), A (in, in); got "
                         f"{tuple(grad.shape)}, {tuple(G.shape)}, {tuple(A.shape)}")
    s = math.sqrt(damping)
    Gd = G + s * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    Ad = A + s * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    left = torch.linalg.solve(Gd, grad)            # G^{-1} grad
    return torch.linalg.solve(Ad, left.T).T        # ... A^{-1} (A symmetric)


KFAC_FISHERS = ("exact", "sampled", "empirical")
KFAC_LIKELIHOODS = ("gaussian", "categorical")


class KFAC(torch.optim.Optimizer):
    """K-FAC for the ``nn.Linear`` layers of a model (Martens and Grosse, 2015).

    Usage, per step::

        out = model(X)                          # hooks record each layer's input and output
        opt.update_curvature(out, y)            # A, G from extra backward passes
        opt.zero_grad(); loss_fn(out, y).backward(); opt.step()

    ``update_curvature`` backpropagates vectors ``v`` from the model output and records, per
    layer, ``A = E[a a^T]`` and ``G = E[g g^T]`` (``g`` the backpropagated output gradient),
    as exponential moving averages with weight ``ema`` (``ema = 0``: this batch only). The
    vectors come from the model's likelihood (``gaussian``: ``N(out, I)``, i.e. half squared
    error; ``categorical``: ``softmax(out)``):

    * ``fisher='exact'``: the columns of a square root of the output Hessian
      (``I`` resp. ``diag(p) - p p^T``), so ``E[g g^T]`` is the exact Gauss-Newton/Fisher
      factor (as in KFLR, Botev et al., 2017); costs ``out_dim`` backward passes;
    * ``'sampled'``: the gradient of ``-log p(y~|x)`` at one sampled ``y~`` (the paper's
      Monte-Carlo Fisher); ``'empirical'``: at the true targets ``y``.

    ``step`` replaces each layer's gradient ``[dW, db]`` by
    :func:`kfac_precondition` ``(G + sqrt(d) I)^{-1} [dW, db] (A + sqrt(d) I)^{-1}`` and takes
    ``p -= lr * direction``. Parameters outside Linear layers get a plain SGD step. For a single
    linear layer with squared error, ``fisher='exact'``, ``damping -> 0`` and ``lr = 1``, one
    step is Newton's step and lands on the least-squares solution. The factors live in
    ``state[layer.weight]`` (keys ``"A"``, ``"G"``), so ``state_dict`` and ``load_state_dict``
    carry them; :attr:`factors` reads them by layer.
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, damping: float = 1e-3,
                 ema: float = 0.0, fisher: str = "exact", likelihood: str = "gaussian"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not lr > 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        _positive("damping", damping, allow_zero=True)
        if not 0 <= ema < 1:
            raise ValueError(f"ema must lie in [0, 1), got {ema!r}")
        if fisher not in KFAC_FISHERS:
            raise ValueError(f"unknown fisher {fisher!r}; choose one of: {', '.join(KFAC_FISHERS)}")
        if likelihood not in KFAC_LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of: "
                             f"{', '.join(KFAC_LIKELIHOODS)}")
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not self.layers:
            raise ValueError("model has no nn.Linear layers for K-FAC")
        super().__init__(list(model.parameters()), dict(lr=lr, damping=damping))
        self.ema, self.fisher, self.likelihood = ema, fisher, likelihood
        self._io: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks = [m.register_forward_hook(self._record) for m in self.layers]

    @property
    def factors(self) -> dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (A, G)}`` for the layers whose curvature has been recorded."""
        return {m: (self.state[m.weight]["A"], self.state[m.weight]["G"])
                for m in self.layers if "A" in self.state[m.weight]}

    def _record(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            self._io[module] = (inputs[0].detach(), output)

    def _vectors(self, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """(m, n, out_dim) vectors to backpropagate from the outputs (see the class doc)."""
        out = out.detach()
        n, k = out.shape
        if self.likelihood == "gaussian":
            if self.fisher == "exact":
                return torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, n, k)
            target = out + torch.randn_like(out) if self.fisher == "sampled" else y.reshape(n, k)
            return (out - target).unsqueeze(0)
        p = out.softmax(-1)
        if self.fisher == "exact":
            sq = p.sqrt()
            # S = diag(sqrt p) - p sqrt(p)^T satisfies S S^T = diag(p) - p p^T; columns of S
            S = torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)
            return S.permute(2, 0, 1)
        label = torch.multinomial(p, 1).squeeze(1) if self.fisher == "sampled" else y
        return (p - nn.functional.one_hot(label, k).to(p.dtype)).unsqueeze(0)

    def update_curvature(self, out: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Update every layer's ``A`` and ``G`` from the forward pass that produced ``out``."""
        if out.dim() != 2:
            raise ValueError(f"out must be (n, out_dim), got shape {tuple(out.shape)}")
        if self.fisher == "empirical" and y is None:
            raise ValueError("fisher='empirical' needs the targets y")
        missing = [m for m in self.layers if m not in self._io]
        if missing:
            raise ValueError("no recorded forward pass for some Linear layers; call model(X) "
                             "with gradients enabled before update_curvature")
        V = self._vectors(out, y)
        outs = [self._io[m][1] for m in self.layers]
        grads = [torch.autograd.grad(out, outs, grad_outputs=v, retain_graph=True) for v in V]
        for i, m in enumerate(self.layers):
            g = torch.stack([gr[i] for gr in grads])
            A, G = kfac_factors(self._io[m][0].detach(), g.detach(), bias=m.bias is not None)
            st = self.state[m.weight]
            if "A" in st and self.ema > 0:
                A = self.ema * st["A"] + (1 - self.ema) * A
                G = self.ema * st["G"] + (1 - self.ema) * G
            st["A"], st["G"] = A, G

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, damping = group["lr"], group["damping"]
        done = set()
        for m in self.layers:
            if m.weight.grad is None:
                continue
            st = self.state[m.weight]
            if "A" not in st:
                raise ValueError("call update_curvature(out) before step()")
            A, G = st["A"], st["G"]
            grad = m.weight.grad
            if m.bias is not None:
                grad = torch.cat([grad, m.bias.grad.unsqueeze(1)], 1)
            d = kfac_precondition(grad, A, G, damping)
            m.weight.sub_(lr * d[:, : m.in_features])
            done.add(m.weight)
            if m.bias is not None:
                m.bias.sub_(lr * d[:, -1])
                done.add(m.bias)
        for p in group["params"]:
            if p.grad is not None and p not in done:
                p.sub_(lr * p.grad)
        return loss

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ---------------------------------------------------------------------------------------
# Shampoo

def shampoo_direction(G: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                      eps: float = 1e-4) -> torch.Tensor:
    """Shampoo's preconditioned gradient ``(L + eps I)^{-1/4} G (R + eps I)^{-1/4}``.

    Gupta, Koren and Singer (2018), Algorithm 1, for an (m, n) matrix ``G`` with statistics
    ``L = sum_t G_t G_t^T`` (m, m) and ``R = sum_t G_t^T G_t`` (n, n). With one step from zero
    statistics and ``eps -> 0``, ``L = U S^2 U^T`` and ``R = V S^2 V^T`` for ``G = U S V^T``, so
    the direction is ``U V^T``: every singular value becomes 1.
    """
    if G.dim() != 2 or L.shape != (G.shape[0],) * 2 or R.shape != (G.shape[1],) * 2:
        raise ValueError(f"need G (m, n), L (m, m), R (n, n); got {tuple(G.shape)}, "
                         f"{tuple(L.shape)}, {tuple(R.shape)}")
    return matrix_power(L, -0.25, eps) @ G @ matrix_power(R, -0.25, eps)


class Shampoo(torch.optim.Optimizer):
    """Shampoo (Gupta, Koren and Singer, 2018) for vector and matrix parameters.

    A matrix parameter (tensors of higher order are viewed as (size(0), -1)) keeps
    ``L <- L + G G^T`` and ``R <- R + G^T G`` and steps ``W <- W - lr L^{-1/4} G R^{-1/4}``
    (:func:`shampoo_direction`, with ``eps`` added to both statistics); a vector parameter keeps
    ``H <- H + g g^T`` and steps ``w <- w - lr H^{-1/2} g`` (order ``k = 1``: exponent
    ``-1/(2k)``, full-matrix AdaGrad). The inverse roots are recomputed every
    ``update_freq`` steps.
    """

    def __init__(self, params, lr: float = 0.1, eps: float = 1e-4, update_freq: int = 1):
        if not lr > 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        _positive("eps", eps, allow_zero=True)
        _positive_int("update_freq", update_freq)
        super().__init__(params, dict(lr=lr, eps=eps, update_freq=update_freq))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, freq = group["lr"], group["eps"], group["update_freq"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if p.dim() <= 1:
                    g = p.grad.reshape(-1, 1)
                    if not st:
                        st["step"], st["H"] = 0, torch.zeros(g.shape[0], g.shape[0], dtype=g.dtype,
                                                              device=g.device)
                    st["H"] += g @ g.T
                    if st["step"] % freq == 0:
                        st["H_root"] = matrix_power(st["H"], -0.5, eps)
                    p.sub_(lr * (st["H_root"] @ g).reshape(p.shape))
                else:
                    G = p.grad.reshape(p.shape[0], -1)
                    if not st:
                        st["step"] = 0
                        m, k = G.shape
                        st["L"] = torch.zeros(m, m, dtype=G.dtype, device=G.device)
                        st["R"] = torch.zeros(k, k, dtype=G.dtype, device=G.device)
                    st["L"] += G @ G.T
                    st["R"] += G.T @ G
                    if st["step"] % freq == 0:
                        st["L_root"] = matrix_power(st["L"], -0.25, eps)
                        st["R_root"] = matrix_power(st["R"], -0.25, eps)
                    p.sub_(lr * (st["L_root"] @ G @ st["R_root"]).reshape(p.shape))
                st["step"] += 1
        return loss


# ---------------------------------------------------------------------------------------
# block coordinate descent

@dataclass
class BCDResult:
    """Blocks after the last sweep and the loss after every block update (first: initial)."""

    blocks: list[torch.Tensor]
    losses: list[float] = field(default_factory=list)


def block_coordinate_descent(loss_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                             blocks: Sequence[torch.Tensor],
                             solvers: Sequence[Callable[[list[torch.Tensor]], torch.Tensor]],
                             sweeps: int = 10) -> BCDResult:
    """Exact block coordinate descent (Gauss-Seidel order).

    ``solvers[i](blocks)`` returns ``argmin_{x_i} f(x_1, .., x_i, .., x_B)`` with the other
    blocks fixed; each sweep updates blocks ``1 .. B`` in turn, always using the newest
    values. Because each update minimizes ``f`` over a set that contains the current point,
    ``f`` never increases: ``f(x^{k+1}) <= f(x^k)`` after every block (Bertsekas, 1999,
    Sec. 2.7; the survey's Sec. 5.6 on BCD/ADMM for neural nets). Records ``f`` after every
    block update.
    """
    if len(blocks) == 0 or len(blocks) != len(solvers):
        raise ValueError(f"need one solver per block and at least one block; got "
                         f"{len(blocks)} blocks, {len(solvers)} solvers")
    if not all(callable(s) for s in solvers):
        raise ValueError("every solver must be callable(blocks) -> new block")
    sweeps = _positive_int("sweeps", sweeps)
    xs = [b.detach().clone() for b in blocks]
    losses = [float(loss_fn(xs))]
    for _ in range(sweeps):
        for i, solve in enumerate(solvers):
            new = solve(list(xs))
            if new.shape != xs[i].shape:
                raise ValueError(f"solver {i} returned shape {tuple(new.shape)}, expected "
                                 f"{tuple(xs[i].shape)}")
            xs[i] = new.detach()
            losses.append(float(loss_fn(xs)))
    return BCDResult(xs, losses)
