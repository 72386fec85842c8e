"""Signal propagation: mean-field theory of deep networks, and the measurements it predicts.

Theory (Poole et al., 2016; Schoenholz et al., 2017). In a wide fully connected network with
weights ``W_ij ~ N(0, sigma_w2 / n)`` and biases ``b_i ~ N(0, sigma_b2)``, the pre-activations
``h^l = W^l phi(h^{l-1}) + b^l`` of one input are Gaussian across units with variance ``q_l``,
and two inputs have pre-activation correlation ``c_l``. Layer to layer:

* the variance map ``q_{l+1} = V(q_l) = sigma_w2 E[phi(sqrt(q_l) z)^2] + sigma_b2``, with fixed
  point ``q*`` (:func:`variance_map`, :func:`fixed_point_q`);
* the correlation map ``c_{l+1} = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q*`` with
  ``(u1, u2)`` Gaussian of variance ``q*`` and correlation ``c`` (:func:`correlation_map`);
* its slope at ``c = 1``, ``chi_1 = sigma_w2 E[phi'(sqrt(q*) z)^2]`` (:func:`chi1`): ``chi_1 < 1``
  is the ordered phase (inputs collapse together), ``chi_1 > 1`` the chaotic phase (nearby
  inputs fly apart), ``chi_1 = 1`` the edge of chaos (:func:`order_chaos_boundary`);
* depth scales ``xi_q = -1/ln chi_q`` and ``xi_c = -1/ln chi_c`` over which ``q_l`` and ``c_l``
  approach their fixed points (:func:`mean_field`); at the edge of chaos ``xi_c`` diverges.

Gaussian expectations use Gauss-Hermite quadrature (probabilists' Hermite polynomials) in
float64, vectorized over any broadcastable grid of ``(sigma_w2, sigma_b2)``; the activation is a
name from :data:`nnopt_utils.models.ACTIVATIONS` or any elementwise callable on tensors
(derivatives come from autograd). For ReLU, :func:`relu_correlation_map` is the closed-form
arc-cosine kernel (Cho and Saul, 2009).

Measurement. :func:`layer_statistics` records per-layer activation and gradient statistics of a
model with forward hooks; :func:`jacobian_singular_values` computes input-output Jacobian
singular values batched over inputs with ``torch.func.vmap(jacrev(model))``;
:func:`mean_field_mlp` builds the networks the theory describes (Gaussian or orthogonal
weights, random biases).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
from torch import nn

from .init import orthogonal_matrix
from .models import ACTIVATIONS, MLP, mlp
from .config import generator

__all__ = [
    "gaussian_expectation",
    "variance_map",
    "variance_map_slope",
    "fixed_point_q",
    "correlation_map",
    "chi1",
    "fixed_point_c",
    "MeanField",
    "mean_field",
    "order_chaos_boundary",
    "arccos_kernel",
    "relu_correlation_map",
    "LayerStatistics",
    "layer_statistics",
    "jacobian_singular_values",
    "mean_field_mlp",
    "WEIGHTS",
]

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]
ArrayLike = Union[float, int, np.ndarray, torch.Tensor]
_F64 = torch.float64


# ---------------------------------------------------------------------------------------
# helpers: activations, grids, quadrature

def _activation(activation: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of: "
                         f"{', '.join(ACTIVATIONS)} or pass a callable")
    return ACTIVATIONS[activation]


def _derivative(phi: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """phi' by autograd, elementwise (phi must act elementwise)."""

    def dphi(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(phi(x).sum(), x, allow_unused=True)
        return torch.zeros_like(x) if g is None else g.detach()

    return dphi


def _t(x: ArrayLike, name: str, *, positive: bool = False) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=float) if not isinstance(x, torch.Tensor) else x,
                        dtype=_F64)
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    if (t < 0).any() or (positive and (t <= 0).any()):
        bad = t[(t <= 0) if positive else (t < 0)].flatten()[0].item()
        rule = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be {rule}, got {bad!r}")
    return t


def _correlations(c: ArrayLike) -> torch.Tensor:
    c = torch.as_tensor(np.asarray(c, dtype=float) if not isinstance(c, torch.Tensor) else c,
                        dtype=_F64)
    bad = torch.isnan(c) | (c.abs() > 1 + 1e-12)
    if bad.any():
        raise ValueError(f"correlations must lie in [-1, 1], got {c[bad].flatten()[0].item()!r}")
    return c.clamp(-1.0, 1.0)


def _nodes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"quadrature order n must be an int >= 2, got {n!r}")
    return _hermite(n)


@functools.lru_cache(maxsize=16)
def _hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # nodes and weights for the weight exp(-x^2/2), normalized to the standard normal density
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(x, dtype=_F64), torch.tensor(w / math.sqrt(2 * math.pi), dtype=_F64)


def gaussian_expectation(f: Callable[[torch.Tensor], torch.Tensor], q: ArrayLike = 1.0, *,
                         n: int = 64) -> torch.Tensor:
    """``E[f(sqrt(q) z)]`` for ``z ~ N(0, 1)``, by ``n``-point Gauss-Hermite quadrature.

    ``sum_i w_i f(sqrt(q) x_i)`` with the nodes ``x_i`` and weights ``w_i`` of the probabilists'
    Hermite polynomial of degree ``n`` (exact for polynomials of degree ``< 2n``). Vectorized over
    the shape of ``q``. An even ``n`` (the default) avoids a node at 0, where kinked activations
    such as ReLU have no derivative.
    """
    q = _t(q, "q")
    x, w = _nodes(n)
    return (f(q.sqrt().unsqueeze(-1) * x) * w).sum(-1)


def _grid(*arrays: ArrayLike, names: tuple[str, ...]) -> list[torch.Tensor]:
    ts = [_t(a, nm) for a, nm in zip(arrays, names)]
    return list(torch.broadcast_tensors(*ts))


# ---------------------------------------------------------------------------------------
# the variance map and its fixed point

def variance_map(q: ArrayLike, sigma_w2: ArrayLike, sigma_b2: ArrayLike = 0.0,
                 activation: Activation = "tanh", *, n: int = 64) -> torch.Tensor:
    """The length map ``V(q) = sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2`` (Poole et al., 2016).

    It sends the pre-activation variance of one layer to that of the next, in the limit of
    infinite width. Broadcasts over ``q``, ``sigma_w2`` and ``sigma_b2``.
    """
    phi = _activation(activation)
    q, sw, sb = _grid(q, sigma_w2, sigma_b2, names=("q", "sigma_w2", "sigma_b2"))
    return sw * gaussian_expectation(lambda u: phi(u) ** 2, q, n=n) + sb


def variance_map_slope(q: ArrayLike, sigma_w2: ArrayLike, activation: Activation = "tanh", *,
                       n: int = 64) -> torch.Tensor:
    """``chi_q = dV/dq = sigma_w2 E[z phi(sqrt(q) z) phi'(sqrt(q) z)] / sqrt(q)``.

    Gaussian integration by parts turns this into ``sigma_w2 E[phi'^2 + phi phi'']`` (Schoenholz
    et al., 2017, eq. 6); the form used here needs only ``phi'`` and so also holds for ReLU.
    ``q`` is clamped below at ``1e-12``.
    """
    phi = _activation(activation)
    dphi = _derivative(phi)
    q, sw = _grid(q, sigma_w2, names=("q", "sigma_w2"))
    q = q.clamp_min(1e-12)
    x, w = _nodes(n)
    u = q.sqrt().unsqueeze(-1) * x
    return sw * (x * phi(u) * dphi(u) * w).sum(-1) / q.sqrt()


def fixed_point_q(sigma_w2: ArrayLike, sigma_b2: ArrayLike = 0.0,
                  activation: Activation = "tanh", *, q0: float = 1.0, steps: int = 200,
                  tol: float = 1e-12, n: int = 64) -> torch.Tensor:
    """The fixed point ``q* = V(q*)`` of the variance map that the iteration from ``q0`` reaches.

    Safeguarded Newton iteration on ``g(q) = V(q) - q``: a Newton step is taken only where the
    map is contracting (``V'(q) < 1``, so the step heads for a stable fixed point, never for an
    unstable one such as ``q = 0`` of tanh with ``sigma_w2 > 1``) and lowers ``|g|``; otherwise
    the plain step ``q <- V(q)``. Entries that keep growing (e.g. ReLU with ``sigma_w2 >= 2`` and
    ``sigma_b2 > 0``) are ``inf``; entries that did not converge otherwise are ``nan``. Where the
    map is the identity (linear networks with ``sigma_w2 = 1, sigma_b2 = 0``; ReLU with
    ``sigma_w2 = 2, sigma_b2 = 0``) every ``q`` is a fixed point and ``q0`` is returned.
    """
    if not (isinstance(q0, (int, float)) and q0 > 0):
        raise ValueError(f"q0 must be a positive number, got {q0!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    sw, sb = _grid(sigma_w2, sigma_b2, names=("sigma_w2", "sigma_b2"))
    q = torch.full_like(sw, float(q0))

    def resid(qq):
        return variance_map(qq, sw, sb, activation, n=n) - qq

    g = resid(q)
    slope = variance_map_slope(q, sw, activation, n=n)
    for _ in range(steps):
        done = (g.abs() <= tol * q.clamp_min(1.0)) | torch.isinf(q)
        if bool(done.all()):
            break
        contracting = slope < 1 - 1e-9
        step = g / torch.where(contracting, 1 - slope, torch.ones_like(slope))
        newton = torch.where(contracting, q + step, q + g).clamp_min(0.0)
        g_newton = resid(newton)
        take = contracting & (g_newton.abs() < g.abs())
        plain = (q + g).clamp_min(0.0)
        q = torch.where(done, q, torch.where(take, newton, plain))
        q = torch.where(q > 1e200, torch.full_like(q, math.inf), q)
        finite = torch.isfinite(q)
        qq = torch.where(finite, q, torch.ones_like(q))
        g = torch.where(finite, resid(qq), torch.zeros_like(q))
        slope = variance_map_slope(qq, sw, activation, n=n)
    converged = (g.abs() <= 1e3 * tol * q.clamp_min(1.0)) | torch.isinf(q)
    growing = (g > 0) & (slope >= 1 - 1e-9)  # V(q) > q and not contracting: runs away
    out = torch.where(converged, q, torch.full_like(q, math.nan))
    return torch.where(~converged & growing, torch.full_like(q, math.inf), out)


# ---------------------------------------------------------------------------------------
# the correlation map and chi_1

def _pair_expectation(f: Callable, q: torch.Tensor, c: torch.Tensor, n: int) -> torch.Tensor:
    """``E[f(u1) g(u2)]``-type expectations: ``f(u1, u2)`` with ``(u1, u2)`` of variance ``q``
    and correlation ``c``, by a tensor-product Gauss-Hermite rule of ``n x n`` nodes."""
    x, w = _nodes(n)
    z1 = x.view(-1, 1).expand(n, n).reshape(-1)
    z2 = x.view(1, -1).expand(n, n).reshape(-1)
    ww = (w.view(-1, 1) * w.view(1, -1)).reshape(-1)
    s = q.sqrt().unsqueeze(-1)
    c_ = c.clamp(-1.0, 1.0).unsqueeze(-1)
    u1 = s * z1
    u2 = s * (c_ * z1 + (1 - c_**2).clamp_min(0).sqrt() * z2)
    return (f(u1, u2) * ww).sum(-1)


def correlation_map(c: ArrayLike, sigma_w2: ArrayLike, sigma_b2: ArrayLike = 0.0,
                    activation: Activation = "tanh", *, q: ArrayLike | None = None,
                    n: int = 48) -> torch.Tensor:
    """The correlation map of Poole et al. (2016, eq. 5) for two inputs of equal length:

    ``C(c) = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / V(q)``, ``u1 = sqrt(q) z1``,
    ``u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2)``.

    ``q`` is the pre-activation variance of the current layer, by default the fixed point ``q*``
    (then ``V(q) = q*``). ``C(1) = 1`` always. Broadcasts over all of its arguments.
    """
    phi = _activation(activation)
    c = _correlations(c)
    if q is None:
        q = fixed_point_q(sigma_w2, sigma_b2, activation)
    c, q, sw, sb = torch.broadcast_tensors(c, _t(q, "q"), *_grid(sigma_w2, sigma_b2,
                                                                 names=("sigma_w2", "sigma_b2")))
    cov = sw * _pair_expectation(lambda a, b: phi(a) * phi(b), q, c, n) + sb
    return cov / variance_map(q, sw, sb, activation)


def chi1(sigma_w2: ArrayLike, sigma_b2: ArrayLike = 0.0, activation: Activation = "tanh", *,
         q: ArrayLike | None = None, n: int = 64) -> torch.Tensor:
    """``chi_1 = sigma_w2 E[phi'(sqrt(q*) z)^2]``, the slope of the correlation map at ``c = 1``.

    It is also the factor by which one layer multiplies the mean squared singular value of the
    input-output Jacobian (Poole et al., 2016; Schoenholz et al., 2017). ``q`` defaults to ``q*``;
    where ``q*`` is infinite the result is ``nan``.
    """
    dphi = _derivative(_activation(activation))
    if q is None:
        q = fixed_point_q(sigma_w2, sigma_b2, activation)
    sw, _ = _grid(sigma_w2, sigma_b2, names=("sigma_w2", "sigma_b2"))
    q = torch.as_tensor(np.asarray(q, dtype=float) if not isinstance(q, torch.Tensor) else q,
                        dtype=_F64)
    if (q < 0).any():
        raise ValueError(f"q must be non-negative, got {q[q < 0].flatten()[0].item()!r}")
    q, sw = torch.broadcast_tensors(q, sw)
    finite = torch.isfinite(q)
    qq = torch.where(finite, q, torch.ones_like(q))
    out = sw * gaussian_expectation(lambda u: dphi(u) ** 2, qq, n=n)
    return torch.where(finite, out, torch.full_like(out, math.nan))


def fixed_point_c(sigma_w2: ArrayLike, sigma_b2: ArrayLike = 0.0,
                  activation: Activation = "tanh", *, steps: int = 100, tol: float = 1e-12,
                  n: int = 48) -> torch.Tensor:
    """The stable fixed point ``c*`` of the correlation map.

    ``c* = 1`` in the ordered phase (``chi_1 <= 1``); in the chaotic phase (``chi_1 > 1``) it is
    the attracting fixed point below 1, reached from ``c = 0`` by Newton steps where the map is
    contracting and plain steps ``c <- C(c)`` elsewhere.
    """
    sw, sb = _grid(sigma_w2, sigma_b2, names=("sigma_w2", "sigma_b2"))
    q = fixed_point_q(sw, sb, activation)
    x1 = chi1(sw, sb, activation, q=q)
    c = torch.zeros_like(sw)
    chaotic = x1 > 1
    if bool(chaotic.any()):
        dphi = _derivative(_activation(activation))
        qc, swc, sbc = q[chaotic], sw[chaotic], sb[chaotic]
        cc = torch.zeros_like(qc)
        for _ in range(steps):
            g = correlation_map(cc, swc, sbc, activation, q=qc, n=n) - cc
            if bool((g.abs() < tol).all()):
                break
            # slope of the map: C'(c) = sigma_w2 E[phi'(u1) phi'(u2)] (at q = q*)
            slope = swc * _pair_expectation(lambda u, v: dphi(u) * dphi(v), qc, cc, n)
            contracting = slope < 1 - 1e-9
            newton = cc + g / torch.where(contracting, 1 - slope, torch.ones_like(slope))
            nxt = torch.where(contracting & (newton <= 1) & (newton >= -1), newton, cc + g)
            cc = nxt.clamp(-1.0, 1.0)
        c[chaotic] = cc
    c = torch.where(chaotic, c, torch.ones_like(c))
    return torch.where(torch.isfinite(q), c, torch.full_like(c, math.nan))


# ---------------------------------------------------------------------------------------
# depth scales and the phase boundary

@dataclass
class MeanField:
    """Mean-field quantities at each grid point (tensors of the broadcast shape).

    ``q_star``, ``chi1``, ``chi_q`` (slope of the variance map at ``q*``), ``c_star``, ``chi_c``
    (slope of the correlation map at ``c*``), ``xi_q = -1/ln chi_q``, ``xi_c = -1/ln chi_c``.
    """

    q_star: torch.Tensor
    chi1: torch.Tensor
    chi_q: torch.Tensor
    c_star: torch.Tensor
    chi_c: torch.Tensor
    xi_q: torch.Tensor
    xi_c: torch.Tensor


def mean_field(sigma_w2: ArrayLike, sigma_b2: ArrayLike = 0.0, activation: Activation = "tanh",
               *, n: int = 48) -> MeanField:
    """``q*``, ``chi_1``, ``c*`` and the depth scales of Schoenholz et al. (2017, eqs. 6 and 9):

    ``xi_q^{-1} = -ln chi_q``, ``chi_q = sigma_w2 E[phi'(u)^2 + phi(u) phi''(u)]`` at ``q*``;
    ``xi_c^{-1} = -ln chi_c``, ``chi_c = sigma_w2 E[phi'(u1) phi'(u2)]`` with ``(u1, u2)`` of
    variance ``q*`` and correlation ``c*``. In the ordered phase ``c* = 1`` and ``chi_c = chi_1``;
    at the order-to-chaos boundary ``chi_c = 1`` and ``xi_c`` is infinite.
    """
    dphi = _derivative(_activation(activation))
    sw, sb = _grid(sigma_w2, sigma_b2, names=("sigma_w2", "sigma_b2"))
    q = fixed_point_q(sw, sb, activation)
    finite = torch.isfinite(q)
    qq = torch.where(finite, q, torch.ones_like(q))
    x1 = chi1(sw, sb, activation, q=q)
    xq = variance_map_slope(qq, sw, activation)
    cs = fixed_point_c(sw, sb, activation, n=n)
    cc = torch.where(torch.isfinite(cs), cs, torch.ones_like(cs))
    xc = sw * _pair_expectation(lambda a, b: dphi(a) * dphi(b), qq, cc, n)
    xc = torch.where(cs >= 1, x1, xc)  # at c* = 1 the 1-D rule is exact and cheaper
    nan = torch.full_like(q, math.nan)
    xq, xc = torch.where(finite, xq, nan), torch.where(finite, xc, nan)

    def scale(chi):  # -1/ln(chi), infinite at and beyond chi = 1
        return torch.where(chi >= 1, torch.full_like(chi, math.inf), -1.0 / torch.log(chi))

    return MeanField(q, x1, xq, cs, xc, torch.where(finite, scale(xq), nan),
                     torch.where(finite, scale(xc), nan))


def order_chaos_boundary(sigma_b2: ArrayLike, activation: Activation = "tanh", *,
                         q_max: float = 20.0, iters: int = 100, n: int = 128) -> torch.Tensor:
    """The critical ``sigma_w2(sigma_b2)`` where ``chi_1 = 1``: the order-to-chaos boundary.

    The boundary is parametrized by ``q*`` (Poole et al., 2016): ``chi_1 = 1`` and ``q* = V(q*)``
    give ``sigma_w2 = 1 / E[phi'(sqrt(q) z)^2]`` and
    ``sigma_b2 = q - sigma_w2 E[phi(sqrt(q) z)^2]``.
    For each requested ``sigma_b2`` the second equation is solved for ``q`` in ``(0, q_max]`` by
    bisection (vectorized), then the first gives ``sigma_w2``. For positively homogeneous
    activations (ReLU, linear), ``E[phi'^2]`` does not depend on ``q`` and the boundary is the
    constant ``1 / E[phi'(z)^2]`` (2 for ReLU: He et al., 2015). Where no ``q`` fits, ``nan``.
    Example: tanh with ``sigma_b2 = 0`` gives 1 (``q* = 0``, ``chi_1 = sigma_w2 tanh'(0)^2``).
    """
    if not q_max > 0:
        raise ValueError(f"q_max must be positive, got {q_max!r}")
    phi = _activation(activation)
    dphi = _derivative(phi)
    sb = _t(sigma_b2, "sigma_b2")

    def curve(q):  # (sigma_w2, sigma_b2) on the boundary with this q*
        sw = 1.0 / gaussian_expectation(lambda u: dphi(u) ** 2, q, n=n)
        return sw, q - sw * gaussian_expectation(lambda u: phi(u) ** 2, q, n=n)

    probe = curve(torch.tensor([1.0, 4.0], dtype=_F64))[0]
    if torch.isclose(probe[0], probe[1], rtol=1e-9, atol=0):
        return torch.full_like(sb, float(probe[0]))
    a, b = torch.zeros_like(sb), torch.full_like(sb, float(q_max))
    ok = (curve(b)[1] >= sb) & (curve(torch.full_like(sb, 1e-12))[1] <= sb + 1e-12)
    for _ in range(iters):
        m = 0.5 * (a + b)
        up = curve(m)[1] > sb
        a, b = torch.where(up, a, m), torch.where(up, m, b)
    sw = curve(0.5 * (a + b))[0]
    return torch.where(ok, sw, torch.full_like(sw, math.nan))


# ---------------------------------------------------------------------------------------
# ReLU in closed form

def arccos_kernel(c: ArrayLike) -> torch.Tensor:
    """The normalized degree-1 arc-cosine kernel (Cho and Saul, 2009):

    ``k(c) = (sqrt(1 - c^2) + (pi - arccos c) c) / pi = E[relu(u1) relu(u2)] / (q/2)``

    for ``(u1, u2)`` Gaussian of variance ``q`` and correlation ``c``. ``k(1) = 1``,
    ``k(0) = 1/pi``, ``k'(1) = 1``.
    """
    c = _correlations(c)
    c = c.clamp(-1.0, 1.0)
    return ((1 - c**2).clamp_min(0).sqrt() + (math.pi - torch.arccos(c)) * c) / math.pi


def relu_correlation_map(c: ArrayLike, sigma_w2: ArrayLike = 2.0, sigma_b2: ArrayLike = 0.0, *,
                         q: ArrayLike | None = None) -> torch.Tensor:
    """The ReLU correlation map in closed form:

    ``C(c) = (sigma_w2 (q/2) k(c) + sigma_b2) / (sigma_w2 q/2 + sigma_b2)`` with ``k`` the
    arc-cosine kernel. For ReLU ``q* = sigma_b2 / (1 - sigma_w2/2)`` (``sigma_w2 < 2``) and
    ``chi_1 = sigma_w2 / 2``; with ``sigma_b2 = 0`` the map is ``k(c)`` whatever ``q``.
    """
    sw, sb = _grid(sigma_w2, sigma_b2, names=("sigma_w2", "sigma_b2"))
    if q is None:
        if bool((sb > 0).any() & (sw >= 2).any()):
            raise ValueError("ReLU with sigma_b2 > 0 needs sigma_w2 < 2 for a finite q*; "
                             "pass q explicitly")
        q = torch.where(sb > 0, sb / (1 - sw / 2).clamp_min(1e-300), torch.ones_like(sw))
    q = _t(q, "q")
    k = arccos_kernel(c)
    return (sw * q / 2 * k + sb) / (sw * q / 2 + sb)


# ---------------------------------------------------------------------------------------
# measurement: networks of the theory, per-layer statistics, Jacobian spectra

WEIGHTS = ("gaussian", "orthogonal")


def mean_field_mlp(in_dim: int, width: int, depth: int, out_dim: int | None = None, *,
                   sigma_w2: float = 1.0, sigma_b2: float = 0.0, activation: str = "tanh",
                   weights: str = "gaussian", seed: int | None = None,
                   dtype: torch.dtype = torch.float32) -> MLP:
    """An :class:`~nnopt_utils.models.MLP` with ``depth`` hidden layers of ``width`` units, drawn
    as in the mean-field theory: ``W ~ N(0, sigma_w2 / fan_in)`` (``weights='gaussian'``) or
    ``sqrt(sigma_w2)`` times a Haar-random (semi-)orthogonal matrix (``'orthogonal'``, Saxe et
    al., 2014; Pennington et al., 2017), and biases ``b ~ N(0, sigma_b2)``.

    With ``out_dim=None`` the network ends at the last hidden activation (no read-out layer),
    which is the map whose Jacobian the theory of dynamical isometry describes.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of: {', '.join(WEIGHTS)}")
    for name, v in (("sigma_w2", sigma_w2), ("sigma_b2", sigma_b2)):
        if not (isinstance(v, (int, float)) and v >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {v!r}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    model = mlp(in_dim, [width] * depth, 1 if out_dim is None else out_dim,
                activation=activation, init="lecun", seed=seed)
    if out_dim is None:
        model = model[:-1]
    model = model.to(dtype)
    g = None if seed is None else generator(seed + 7919)  # None: a fresh draw every call
    with torch.no_grad():
        for lin in model.layers:
            o, i = lin.weight.shape
            if weights == "gaussian":
                w = torch.randn(o, i, generator=g, dtype=dtype) * math.sqrt(sigma_w2 / i)
            else:
                w = orthogonal_matrix(o, i, generator=g, dtype=dtype) * math.sqrt(sigma_w2)
            lin.weight.copy_(w)
            lin.bias.copy_(torch.randn(o, generator=g, dtype=dtype) * math.sqrt(sigma_b2))
    return model


@dataclass
class LayerStatistics:
    """Per-layer statistics of one forward (and backward) pass; one entry per Linear layer.

    ``act_var``: variance of the activations entering the layer (the network input for the
    first layer); ``preact_var``: variance of its outputs (the pre-activations ``h``), over batch
    and units; ``preact_q``: their mean square ``mean(h^2)`` (the mean-field ``q``);
    ``grad_norm``: ``||dL/dh||`` over the batch; ``weight_grad_norm``: ``||dL/dW||``
    (both ``nan`` without targets).
    """

    names: list[str]
    fan_in: list[int]
    fan_out: list[int]
    act_var: torch.Tensor
    preact_var: torch.Tensor
    preact_q: torch.Tensor
    grad_norm: torch.Tensor
    weight_grad_norm: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({
            "layer": self.names, "fan_in": self.fan_in, "fan_out": self.fan_out,
            "act_var": self.act_var.numpy(), "preact_var": self.preact_var.numpy(),
            "preact_q": self.preact_q.numpy(), "grad_norm": self.grad_norm.numpy(),
            "weight_grad_norm": self.weight_grad_norm.numpy(),
        })


def layer_statistics(model: nn.Module, X: torch.Tensor, y: torch.Tensor | None = None,
                     loss="cross_entropy") -> LayerStatistics:
    """Record activation and gradient statistics of every ``nn.Linear`` layer of ``model``.

    Forward hooks capture each layer's input ``a`` and output ``h = W a + b``; with targets ``y``
    the gradients ``dL/dh`` come from ``torch.autograd.grad`` (the parameters' ``.grad`` are left
    untouched) and ``dL/dW = (dL/dh)^T a``. Statistics are returned in float64, layers in the
    order in which they run. This is how one measures the variance recursions of Glorot and
    Bengio (2010) and He et al. (2015) in a real network.
    """
    from .train import resolve_loss  # the package's own loss table

    if not isinstance(X, torch.Tensor):
        raise ValueError(f"X must be a tensor, got {type(X).__name__}")
    loss_fn = resolve_loss(loss)
    names = {m: n for n, m in model.named_modules()}
    records: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []

    def hook(mod, inputs, output):
        records.append((mod, inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    if not handles:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear layers to record")
    try:
        with torch.set_grad_enabled(y is not None):
            out = model(X)
            grads = None
            if y is not None:
                value = loss_fn(out, y)
                grads = torch.autograd.grad(value, [h for _, _, h in records], allow_unused=True)
    finally:
        for h in handles:
            h.remove()

    def f64(t):
        return t.detach().to(_F64)

    act_var = torch.stack([f64(a).var(unbiased=False) for _, a, _ in records])
    pre_var = torch.stack([f64(h).var(unbiased=False) for _, _, h in records])
    pre_q = torch.stack([f64(h).pow(2).mean() for _, _, h in records])
    nan = torch.full((len(records),), math.nan, dtype=_F64)
    gnorm, wnorm = nan.clone(), nan.clone()
    if grads is not None:
        for i, ((_, a, _), g) in enumerate(zip(records, grads)):
            if g is None:
                continue
            gnorm[i] = f64(g).norm()
            wnorm[i] = (f64(g).reshape(-1, g.shape[-1]).T @ f64(a).reshape(-1, a.shape[-1])).norm()
    return LayerStatistics(
        names=[names.get(m, "?") for m, _, _ in records],
        fan_in=[m.in_features for m, _, _ in records],
        fan_out=[m.out_features for m, _, _ in records],
        act_var=act_var, preact_var=pre_var, preact_q=pre_q, grad_norm=gnorm,
        weight_grad_norm=wnorm,
    )


def jacobian_singular_values(model: Callable[[torch.Tensor], torch.Tensor],
                             X: torch.Tensor) -> torch.Tensor:
    """Singular values of the input-output Jacobian ``J(x) = d model(x)/dx`` at each row of ``X``.

    ``J`` is computed for all inputs at once with ``torch.func.vmap(torch.func.jacrev(model))``
    (the model must map one unbatched input vector to one output vector, as MLPs do), then
    ``torch.linalg.svdvals``. Returns a (batch, min(d_out, d_in)) tensor, each row in descending
    order. Dynamical isometry (Saxe et al., 2014; Pennington et al., 2017) means all of them
    are close to 1.
    """
    from torch.func import jacrev, vmap

    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"X must be a 2-D tensor (batch, features), got {shape}")
    J = vmap(jacrev(model))(X)
    if J.dim() != 3:
        raise ValueError(f"model must map a vector to a vector; its Jacobian has shape "
                         f"{tuple(J.shape[1:])}")
    return torch.linalg.svdvals(J.detach())
