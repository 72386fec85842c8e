r"""The neural tangent kernel: empirical kernels of finite networks, the analytic kernel of
infinitely wide ReLU networks, and linearized models.

For a network :math:`f(x; \theta) \in \mathbb{R}^K` the empirical NTK (Jacot, Gabriel and
Hongler, 2018) is the Gram matrix of its parameter Jacobians,

.. math:: \Theta_{kk'}(x, x') = \sum_p \frac{\partial f_k(x)}{\partial \theta_p}
          \frac{\partial f_{k'}(x')}{\partial \theta_p}.

Gradient flow on the squared loss moves the outputs by :math:`\dot f = -\Theta\,(f - y)`;
in the infinite-width limit of the NTK parametrization :math:`\Theta` is deterministic and
constant in training, and the network trains as its first-order Taylor model
(:func:`linearize`; Lee et al., 2019).

For the two-layer ReLU network of Du et al. (2019), whose first layer alone is trained, the
module has the limit kernel :math:`H^\infty` (:func:`h_infinity`), the finite-width kernel
(:func:`two_layer_ntk`), seeded initializations (:func:`two_layer_init`) and gradient descent
on many copies at once (:func:`two_layer_gd`).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .config import generator

__all__ = ["NTKLinear", "ntk_mlp", "empirical_ntk", "NTK_METHODS", "relu_ntk",
           "Linearized", "linearize", "h_infinity", "TWO_LAYER_ACTIVATIONS", "two_layer_init",
           "two_layer_ntk", "TwoLayerRun", "two_layer_gd"]


# ---------------------------------------------------------------------------------------
# checks

def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError("model has no parameters")


def _check_inputs(X, name: str) -> torch.Tensor:
    if not isinstance(X, torch.Tensor) or X.dim() < 1 or len(X) == 0:
        what = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"{name} must be a tensor of inputs (N, ...) with N >= 1, got {what}")
    return X


def _check_real(name: str, v, *, positive: bool = False) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and (
        v > 0 if positive else v >= 0)
    if not ok:
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} "
                         f"finite number, got {v!r}")
    return float(v)


def _positive_int(name: str, v) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


# ---------------------------------------------------------------------------------------
# networks in the NTK parametrization

class NTKLinear(nn.Linear):
    r"""A Linear layer in the NTK parametrization (Jacot et al., 2018):
    :math:`h = \frac{\sigma_w}{\sqrt{n_{in}}} W a + \sigma_b b` with :math:`W_{ij}, b_i \sim
    \mathcal{N}(0, 1)`.

    It computes the same functions as ``nn.Linear`` with weights
    :math:`\mathcal{N}(0, \sigma_w^2/n_{in})`, but the gradient with respect to ``W`` is
    scaled by :math:`\sigma_w/\sqrt{n_{in}}`, so the NTK has a finite limit as the width grows.
    ``sigma_b = 0`` builds the layer without a bias.
    """

    def __init__(self, in_features: int, out_features: int, sigma_w: float = math.sqrt(2),
                 sigma_b: float = 0.0, *, dtype=None, device=None):
        _check_real("sigma_w", sigma_w, positive=True)
        _check_real("sigma_b", sigma_b)
        super().__init__(in_features, out_features, bias=sigma_b > 0, dtype=dtype,
                         device=device)
        self.weight_scale = float(sigma_w) / math.sqrt(in_features)
        self.bias_scale = float(sigma_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias_scale * self.bias
        return nn.functional.linear(x, self.weight_scale * self.weight, b)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_scale={self.weight_scale:.4g}, "
                f"bias_scale={self.bias_scale:.4g}")


def ntk_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, *, activation="relu",
            sigma_w: float = math.sqrt(2), sigma_b: float = 0.0, seed: int = 0,
            dtype=torch.float64) -> nn.Sequential:
    r"""An MLP in the NTK parametrization: :class:`NTKLinear` layers (every weight and bias
    drawn i.i.d. :math:`\mathcal{N}(0, 1)` from :func:`~nnopt_utils.config.generator`
    ``(seed)``) with ``activation`` (any spec :func:`nnopt_utils.models.activation` accepts)
    between them.

    With ReLU and :math:`\sigma_w^2 = 2` its empirical NTK tends to :func:`relu_ntk` of the
    same ``depth = len(hidden)``, ``sigma_w`` and ``sigma_b`` as every hidden width grows
    (Jacot et al., 2018; Arora et al., 2019).
    """
    from .models import activation as make_activation

    _positive_int("in_dim", in_dim)
    _positive_int("out_dim", out_dim)
    for h in hidden:
        _positive_int("hidden width", h)
    dims = [in_dim, *hidden, out_dim]
    mods: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            mods.append(make_activation(activation))
        mods.append(NTKLinear(n_in, n_out, sigma_w, sigma_b, dtype=dtype))
    model = nn.Sequential(*mods)
    gen = generator(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


# ---------------------------------------------------------------------------------------
# the empirical NTK

#: how :func:`empirical_ntk` computes the kernel
NTK_METHODS = ("auto", "mlp", "jacobian")


def _mlp_plan(model: nn.Module):
    """``[(kind, module)]`` for a plain MLP -- an ``nn.Sequential`` of ``nn.Linear`` /
    :class:`NTKLinear` layers and parameter-free elementwise activations whose parameters are
    exactly those layers' -- or ``None`` for any other model."""
    from .models import _Elementwise
    from .train import _ELEMENTWISE_MODULES

    # a subclass of nn.Sequential may override forward (a skip connection, a scale)
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward \
            or any(True for _ in model.buffers()):
        return None
    plan = []
    for m in model.children():
        if type(m) in (nn.Linear, NTKLinear):
            plan.append(("linear", m))
        elif isinstance(m, (_Elementwise, *_ELEMENTWISE_MODULES)) and not any(
                True for _ in m.parameters()):
            plan.append(("act", m))
        else:
            return None
    return plan if any(k == "linear" for k, _ in plan) else None


def _mlp_ntk(plan, X1: torch.Tensor, X2: torch.Tensor | None, trace: bool) -> torch.Tensor:
    r"""The NTK of a plain MLP from its layer structure, without per-sample Jacobians.

    For a layer :math:`h = s_w W a + s_b b`, :math:`\partial f_k/\partial W = s_w \delta^k
    a^\top` with :math:`\delta^k = \partial f_k / \partial h`, so its share of the kernel is
    :math:`\langle \delta^k(x), \delta^{k'}(x') \rangle\,(s_w^2 \langle a(x), a(x')\rangle +
    s_b^2)`. The :math:`\delta^k` of all samples and outputs come from one backward sweep of
    the batch, starting from the identity at the output.
    """
    from torch.func import jvp

    def sweep(X):
        X = X.reshape(len(X), -1)
        inputs, h = [], X
        for kind, m in plan:  # forward: keep each module's input
            inputs.append(h)
            h = m(h.clone()) if kind == "act" else m(h)  # an in-place activation keeps h
        K = h.shape[1]
        cur = torch.eye(K, dtype=h.dtype, device=h.device).expand(len(X), K, K)
        layers = []
        for (kind, m), a in zip(reversed(plan), reversed(inputs)):
            if kind == "linear":
                sw = getattr(m, "weight_scale", 1.0)
                sb = getattr(m, "bias_scale", 1.0) if m.bias is not None else 0.0
                layers.append((cur, a, sw, sb))
                cur = cur @ (sw * m.weight)
            else:  # an elementwise activation: delta <- phi'(h) * delta
                deriv = jvp(m, (a.clone(),), (torch.ones_like(a),))[1]
                cur = cur * deriv.unsqueeze(1)
        return layers

    with torch.no_grad():
        one = sweep(X1)
        two = one if X2 is None else sweep(X2)
        out = None
        for (d1, a1, sw, sb), (d2, a2, _, _) in zip(one, two):
            act = sw ** 2 * (a1 @ a2.T) + sb ** 2
            if trace:
                part = torch.einsum("ikn,jkn->ij", d1, d2) * act
            else:
                part = torch.einsum("ikn,jmn->ijkm", d1, d2) * act[:, :, None, None]
            out = part if out is None else out + part
    return out


def _jacobian_ntk(model: nn.Module, X1: torch.Tensor, X2: torch.Tensor | None, trace: bool,
                  chunk_size: int | None) -> torch.Tensor:
    """The NTK by contraction of per-sample Jacobians: ``vmap(jacrev)`` of
    ``functional_call``."""
    from torch.func import functional_call, jacrev, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).reshape(-1)

    def jac(X):
        J = vmap(jacrev(f), in_dims=(None, 0), chunk_size=chunk_size)(params, X)
        return [j.flatten(2) for j in J.values()]  # each (N, K, P_layer)

    with torch.no_grad():
        J1 = jac(X1)
        J2 = J1 if X2 is None else jac(X2)
        eq = "ikp,jkp->ij" if trace else "ikp,jmp->ijkm"
        return sum(torch.einsum(eq, a, b) for a, b in zip(J1, J2))


def empirical_ntk(model: nn.Module, X1: torch.Tensor, X2: torch.Tensor | None = None, *,
                  trace: bool = False, method: str = "auto",
                  chunk_size: int | None = None) -> torch.Tensor:
    r"""The empirical neural tangent kernel of ``model`` at its current parameters (Jacot,
    Gabriel and Hongler, 2018):

    .. math:: \Theta_{kk'}(x_i, x'_j) = \sum_p \frac{\partial f_k(x_i)}{\partial \theta_p}
              \frac{\partial f_{k'}(x'_j)}{\partial \theta_p},

    for every parameter of the model and every output :math:`k = 1, \dots, K` (the model's
    output for one sample, flattened).

    Parameters
    ----------
    model
        Any ``nn.Module`` mapping a batch of inputs to a batch of outputs; it is evaluated in
        eval mode with its own buffers, and left as it was.
    X1, X2
        Inputs of shape ``(N1, ...)`` and ``(N2, ...)``; ``X2=None`` means ``X2 = X1`` (and
        reuses the Jacobians).
    trace
        ``False``: the full kernel, shape ``(N1, N2, K, K)``. ``True``: its trace over
        outputs, :math:`\sum_k \Theta_{kk}(x_i, x'_j)`, shape ``(N1, N2)`` (for a network
        whose outputs are independent in the wide limit, ``K`` times the per-output kernel).
    method
        ``'mlp'``: for a plain MLP (``nn.Sequential`` of ``nn.Linear`` or :class:`NTKLinear`
        layers and parameter-free elementwise activations), the layer structure: for
        :math:`h_l = s_w W_l a_{l-1} + s_b b_l`, :math:`\Theta = \sum_l
        \langle\delta_l^k(x), \delta_l^{k'}(x')\rangle \odot (s_w^2\langle a_{l-1}(x),
        a_{l-1}(x')\rangle + s_b^2)` with :math:`\delta_l^k = \partial f_k/\partial h_l`,
        from one forward and one backward sweep of the batch (no per-sample Jacobian is
        formed). ``'jacobian'``: any model, by contraction of the per-sample Jacobians
        (``vmap(jacrev)`` of :func:`torch.func.functional_call`; memory ``N K P``).
        ``'auto'``: ``'mlp'`` when the model qualifies, else ``'jacobian'``.
    chunk_size
        Samples per ``vmap`` chunk of the Jacobian path (``None``: all at once).

    The kernel has the model's dtype; use a float64 model for exact comparisons.
    """
    _check_model(model)
    X1 = _check_inputs(X1, "X1")
    if X2 is not None:
        X2 = _check_inputs(X2, "X2")
        if X2.shape[1:] != X1.shape[1:]:
            raise ValueError(f"X2 samples have shape {tuple(X2.shape[1:])}, X1 samples "
                             f"{tuple(X1.shape[1:])}; they must match")
    if method not in NTK_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(NTK_METHODS)}")
    if not isinstance(trace, bool):
        raise ValueError(f"trace must be True or False, got {trace!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(
            chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    plan = _mlp_plan(model) if method != "jacobian" else None
    if method == "mlp" and plan is None:
        raise ValueError("method='mlp' needs a plain MLP: an nn.Sequential of nn.Linear or "
                         "NTKLinear layers and parameter-free elementwise activations, got "
                         f"{type(model).__name__}; use method='jacobian' or 'auto'")
    flat = X1.dim() == 2 and (X2 is None or X2.dim() == 2)
    if method == "mlp" and not flat:
        raise ValueError(f"method='mlp' needs inputs of shape (N, d), got "
                         f"{tuple(X1.shape)}{'' if X2 is None else ' and ' + str(tuple(X2.shape))}"
                         f"; use method='jacobian' or 'auto'")
    if not flat:  # nn.Linear acts on the last dimension of (N, ..., d): leave that to jacobian
        plan = None
    was_training = model.training
    model.eval()
    try:
        if plan is not None:
            return _mlp_ntk(plan, X1, X2, trace)
        return _jacobian_ntk(model, X1, X2, trace, chunk_size)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# the analytic kernel of infinitely wide ReLU networks

def relu_ntk(X1: torch.Tensor, X2: torch.Tensor | None = None, depth: int = 1, *,
             sigma_w: float = math.sqrt(2), sigma_b: float = 0.0) -> torch.Tensor:
    r"""The infinite-width NTK of a ReLU MLP with ``depth`` hidden layers in the NTK
    parametrization (Jacot, Gabriel and Hongler, 2018), by the arc-cosine recursion of
    Arora et al. (2019), "On exact computation with an infinitely wide neural net".

    The network is :func:`ntk_mlp`: :math:`h^1 = \frac{\sigma_w}{\sqrt{d}} W^1 x + \sigma_b
    b^1`, :math:`h^{l+1} = \frac{\sigma_w}{\sqrt{n_l}} W^{l+1} \mathrm{relu}(h^l) + \sigma_b
    b^{l+1}` for :math:`l = 1, \dots, L` (:math:`L` = ``depth``), every entry of every
    :math:`W, b` i.i.d. :math:`\mathcal{N}(0, 1)`; ``sigma_b = 0`` is the network without
    biases, and :math:`\sigma_w^2 = 2` (the default) keeps the pre-activation variance
    constant across layers. With :math:`\Sigma^1(x, x') = \sigma_w^2\, x \cdot x'/d +
    \sigma_b^2`, :math:`\rho` the correlation and :math:`\vartheta = \arccos\rho`:

    .. math::
        \Sigma^{l+1} = \frac{\sigma_w^2}{2\pi} \sqrt{\Sigma^l(x,x)\Sigma^l(x',x')}
        \big(\sin\vartheta + (\pi - \vartheta)\cos\vartheta\big) + \sigma_b^2,\qquad
        \dot\Sigma^{l+1} = \sigma_w^2\, \frac{\pi - \vartheta}{2\pi},

        \Theta^1 = \Sigma^1,\qquad \Theta^{l+1} = \Theta^l\, \dot\Sigma^{l+1} + \Sigma^{l+1},

    and the kernel of every output is :math:`\Theta^{L+1}` (outputs are independent: the
    full kernel is :math:`\Theta^{L+1} \otimes I_K`). For ``depth=1``, no bias and
    :math:`\sigma_w^2 = 2` this is :math:`\frac{2}{d}\big(x\cdot x'\,\kappa_0 + \|x\|\|x'\|
    \kappa_1\big)` with :math:`\kappa_0 = (\pi - \vartheta)/\pi` and :math:`\kappa_1 =
    (\sin\vartheta + (\pi-\vartheta)\cos\vartheta)/\pi`.

    ``X1`` (N1, d), ``X2`` (N2, d) or ``None`` (``X1``); returns (N1, N2) in their dtype.
    """
    X1 = _check_inputs(X1, "X1")
    same = X2 is None or X2 is X1
    X2 = X1 if X2 is None else _check_inputs(X2, "X2")
    if X1.dim() != 2 or X2.dim() != 2 or X1.shape[1] != X2.shape[1]:
        raise ValueError(f"X1 and X2 must be 2-D with the same number of columns, got "
                         f"{tuple(X1.shape)} and {tuple(X2.shape)}")
    if not isinstance(depth, numbers.Integral) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be a positive int (hidden layers), got {depth!r}")
    sw2 = _check_real("sigma_w", sigma_w, positive=True) ** 2
    sb2 = _check_real("sigma_b", sigma_b) ** 2
    d = X1.shape[1]
    cross = sw2 * (X1 @ X2.T) / d + sb2
    diag1 = sw2 * (X1 * X1).sum(1) / d + sb2
    diag2 = sw2 * (X2 * X2).sum(1) / d + sb2
    theta = cross
    for _ in range(int(depth)):
        norm = torch.sqrt(diag1[:, None] * diag2[None, :])
        if bool((diag1 > 0).all()) and bool((diag2 > 0).all()):
            rho = (cross / norm).clamp_(-1, 1)
        else:  # a zero input: correlation 0 by convention (its kernel row is sigma_b^2)
            rho = torch.where(norm > 0, cross / torch.where(norm > 0, norm, 1), 0).clamp(-1, 1)
        if same:  # a point with itself: exactly 1, where arccos would turn the rounding
            rho.diagonal().copy_((diag1 > 0).to(rho.dtype))  # of 1 - eps into 1e-8
        rest = math.pi - torch.arccos(rho)  # pi - angle
        # sin(angle) = sqrt(1 - rho^2): the arc-cosine kernel of degree 1, times pi
        k1 = (1 - rho * rho).clamp_(min=0).sqrt_().addcmul_(rest, rho)
        cross = k1.mul_(norm).mul_(sw2 / (2 * math.pi)).add_(sb2)
        theta = theta.mul(rest.mul_(sw2 / (2 * math.pi))).add_(cross)  # dot Sigma = sw2 rest/2pi
        diag1, diag2 = sw2 / 2 * diag1 + sb2, sw2 / 2 * diag2 + sb2  # angle 0 on the diagonal
    return theta


# ---------------------------------------------------------------------------------------
# linearized models

class Linearized(nn.Module):
    r"""The first-order Taylor model of a network around its parameters :math:`\theta_0`:

    .. math:: f^{lin}(x; \delta) = f(x; \theta_0) + J_\theta f(x; \theta_0)\, \delta,

    whose parameters are the offsets :math:`\delta` (one per parameter of the network, zero
    at construction). The Jacobian-vector product is a :func:`torch.func.jvp` of
    :func:`torch.func.functional_call`: one forward pass with tangents, never the Jacobian.
    Build it with :func:`linearize`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        base = copy.deepcopy(model).requires_grad_(False)
        # held outside the module tree, so that parameters() are the offsets alone
        self._base = (base,)
        self.names = [n for n, _ in base.named_parameters()]
        self.theta0 = {n: p.detach() for n, p in base.named_parameters()}
        self.offsets = nn.ParameterList(
            [nn.Parameter(torch.zeros_like(p)) for p in self.theta0.values()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, jvp

        def f(p):
            return functional_call(self._base[0], p, (x,))

        tangents = dict(zip(self.names, self.offsets))
        out, change = jvp(f, (self.theta0,), (tangents,))
        return out + change

    def delta(self) -> dict[str, torch.Tensor]:
        """The offsets :math:`\\delta`, keyed like the network's ``named_parameters()``."""
        return {n: d.detach() for n, d in zip(self.names, self.offsets)}

    def params(self) -> dict[str, torch.Tensor]:
        """The parameters :math:`\\theta_0 + \\delta` of the network the offsets point to."""
        return {n: self.theta0[n] + d.detach() for n, d in zip(self.names, self.offsets)}


def linearize(model: nn.Module) -> Linearized:
    r"""The linearized model of ``model`` around its current parameters (Lee et al., 2019,
    "Wide neural networks of any depth evolve as linear models under gradient descent"):
    :math:`f^{lin}(x; \delta) = f(x; \theta_0) + J(x)\,\delta`, a :class:`Linearized` module
    whose trainable parameters are the offsets :math:`\delta` (start: 0), so any torch
    optimizer or :func:`~nnopt_utils.train.fit` trains it.

    ``model`` is copied: later changes to it do not move :math:`\theta_0`. The copy runs in
    the mode ``model`` had (call ``.eval()`` first for a model with dropout or BatchNorm) and
    stays on its device and dtype.
    """
    _check_model(model)
    return Linearized(model)


# ---------------------------------------------------------------------------------------
# the two-layer ReLU network of Du et al., first layer trained

def _relu_derivative(t: torch.Tensor) -> torch.Tensor:
    return (t > 0).to(t.dtype)  # 0 at t = 0, as autograd's relu


def _tanh_derivative(t: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(t) ** 2


# name -> (phi, phi')
_TWO_LAYER_PAIRS = {
    "relu": (torch.relu, _relu_derivative),
    "tanh": (torch.tanh, _tanh_derivative),
}

#: the activations of :func:`two_layer_gd` and :func:`two_layer_ntk`
TWO_LAYER_ACTIVATIONS = tuple(_TWO_LAYER_PAIRS)


def _activation_pair(act) -> tuple:
    if not isinstance(act, str) or act not in _TWO_LAYER_PAIRS:
        raise ValueError(f"unknown activation {act!r}; choose one of: "
                         f"{', '.join(TWO_LAYER_ACTIVATIONS)}")
    return _TWO_LAYER_PAIRS[act]


def _first_layers(W) -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or W.dim() != 3 or 0 in W.shape \
            or not W.is_floating_point():
        what = f"{tuple(W.shape)} {W.dtype}" if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be a floating tensor of first layers (S, m, d), one per copy, "
                         f"got {what}")
    return W


def _inputs_for(W: torch.Tensor, X) -> torch.Tensor:
    if not isinstance(X, torch.Tensor) or X.dim() != 2 or len(X) == 0 \
            or X.shape[1] != W.shape[2] or not X.is_floating_point():
        what = f"{tuple(X.shape)} {X.dtype}" if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"X must be a floating tensor of inputs (n, d) with d = {W.shape[2]} "
                         f"(W's last dimension), got {what}")
    return X


def h_infinity(X1: torch.Tensor, X2: torch.Tensor | None = None) -> torch.Tensor:
    r"""The Gram matrix :math:`H^\infty` of Du, Zhai, Póczos and Singh (2019), "Gradient
    descent provably optimizes over-parameterized neural networks": the infinite-width
    kernel of the first layer of :math:`f(x) = \frac{1}{\sqrt m} \sum_r a_r\,
    \mathrm{relu}(w_r \cdot x)` with :math:`w_r \sim \mathcal{N}(0, I)`,

    .. math:: H^\infty_{ij} = \mathbb{E}_w\big[x_i \cdot x_j\,
              \mathbb{1}\{w \cdot x_i > 0,\, w \cdot x_j > 0\}\big]
              = x_i \cdot x_j\, \frac{\pi - \theta_{ij}}{2\pi},

    with :math:`\theta_{ij}` the angle between :math:`x_i` and :math:`x_j`: the limit of
    :func:`two_layer_ntk` (``act='relu'``) as :math:`m \to \infty`. Du et al. take unit
    inputs, where orthogonal inputs give 0 and equal ones :math:`1/2`; the formula holds for
    any inputs (a zero row gives a zero row). The smallest eigenvalue
    :math:`\lambda_0 = \lambda_{\min}(H^\infty)`, positive when no two inputs are
    parallel, sets Du et al.'s rate :math:`1 - \eta\lambda_0/2`.

    ``X1`` (N1, d), ``X2`` (N2, d) or ``None`` (``X1``), of one floating dtype; returns
    (N1, N2) in it. The angle is computed as :math:`2\operatorname{atan2}(\|\hat x_i -
    \hat x_j\|, \|\hat x_i + \hat x_j\|)` from the normalized rows, accurate near 0 and
    :math:`\pi` (exactly 0 on the diagonal), where :math:`\arccos(\hat x_i \cdot \hat x_j)`
    loses half the digits.
    """
    X1 = _check_inputs(X1, "X1")
    X2 = X1 if X2 is None else _check_inputs(X2, "X2")
    if X1.dim() != 2 or X2.dim() != 2 or X1.shape[1] != X2.shape[1]:
        raise ValueError(f"X1 and X2 must be 2-D with the same number of columns, got "
                         f"{tuple(X1.shape)} and {tuple(X2.shape)}")
    for name, X in (("X1", X1), ("X2", X2)):
        if not X.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {X.dtype}")
    if X1.dtype != X2.dtype or X1.device != X2.device:
        raise ValueError(f"X1 and X2 must have one dtype and device, got {X1.dtype} on "
                         f"{X1.device} and {X2.dtype} on {X2.device}")
    U1 = X1 / X1.norm(dim=1, keepdim=True).clamp_min(torch.finfo(X1.dtype).tiny)
    U2 = X2 / X2.norm(dim=1, keepdim=True).clamp_min(torch.finfo(X2.dtype).tiny)
    exact = "donot_use_mm_for_euclid_dist"  # direct differences: no cancellation
    theta = 2 * torch.atan2(torch.cdist(U1, U2, compute_mode=exact),
                            torch.cdist(U1, -U2, compute_mode=exact))
    return (X1 @ X2.T) * (math.pi - theta) / (2 * math.pi)


def two_layer_init(m: int, d: int, seeds: Sequence[int], *, symmetric: bool = False,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    r"""S initializations of Du et al.'s two-layer network :math:`f(x) = \frac{1}{\sqrt m}
    \sum_{r=1}^m a_r\,\phi(w_r \cdot x)`, one per seed: first layers :math:`w_r \sim
    \mathcal{N}(0, I_d)` and output signs :math:`a_r` uniform on :math:`\{-1, +1\}`, drawn
    from :func:`~nnopt_utils.config.generator` ``(seed)``.

    ``symmetric=True`` draws :math:`m/2` units and pairs each :math:`(w_r, a_r)` with
    :math:`(w_r, -a_r)` (units :math:`r` and :math:`r + m/2`): the output is 0 at
    initialization (up to the rounding of the sum over units), and the kernel is distributed
    as that of a network of width :math:`m/2` (Chizat, Oyallon and Bach, 2019).

    Returns ``W`` (S, m, d) and ``a`` (S, m) in ``dtype``, for :func:`two_layer_gd`.
    """
    m, d = _positive_int("m", m), _positive_int("d", d)
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be True or False, got {symmetric!r}")
    if symmetric and m % 2:
        raise ValueError(f"symmetric=True pairs the units, so m must be even, got {m}")
    try:
        seeds = list(seeds)
    except TypeError:
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}") from None
    if not seeds or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                            for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if symmetric:  # units in pairs (w, a), (w, -a): the output is 0 at initialization
        W, a = two_layer_init(m // 2, d, seeds, dtype=dtype)
        return torch.cat([W, W], 1), torch.cat([a, -a], 1)
    gens = [generator(s) for s in seeds]
    W = torch.stack([torch.randn(m, d, generator=g, dtype=dtype) for g in gens])
    a = torch.stack([(torch.randint(2, (m,), generator=g) * 2 - 1).to(dtype) for g in gens])
    return W, a


def two_layer_ntk(W: torch.Tensor, X: torch.Tensor, act: str = "relu") -> torch.Tensor:
    r"""The empirical kernel of the first layer of :math:`f(x) = \frac{1}{\sqrt m}\sum_r a_r\,
    \phi(w_r \cdot x)` with signs :math:`a_r = \pm 1` (Du et al.'s :math:`H(W)`):

    .. math:: H(W)_{ij} = \Big\langle \frac{\partial f(x_i)}{\partial W},
              \frac{\partial f(x_j)}{\partial W} \Big\rangle
              = \frac{x_i \cdot x_j}{m} \sum_{r=1}^m \phi'(w_r \cdot x_i)\,\phi'(w_r \cdot x_j),

    one matrix per copy. With ReLU and :math:`w_r \sim \mathcal{N}(0, I)` it tends to
    :func:`h_infinity` as :math:`m \to \infty`, with fluctuations of order
    :math:`m^{-1/2}`. For an output scale :math:`c` in place of :math:`1/\sqrt m` (as in
    :func:`two_layer_gd`), the kernel is :math:`c^2 m\, H(W)`.

    ``W`` (S, m, d), ``X`` (n, d); ``act`` a name of :data:`TWO_LAYER_ACTIVATIONS`.
    Returns (S, n, n), computed in the wider of the two dtypes.
    """
    W = _first_layers(W)
    X = _inputs_for(W, X)
    _, dphi = _activation_pair(act)
    dtype = torch.promote_types(W.dtype, X.dtype)
    W, X = W.to(dtype), X.to(dtype)
    A = dphi(W @ X.T)  # (S, m, n): phi'(w_r . x_i)
    return (A.transpose(1, 2) @ A) * (X @ X.T) / W.shape[1]


@dataclass
class TwoLayerRun:
    r"""The outcome of :func:`two_layer_gd` for S copies.

    ``W``: (S, m, d) final first layers; a diverged copy keeps its last finite iterate: the
    weights of step ``diverged_at`` when the loss turned NaN/inf, of step
    ``diverged_at - 1`` when the update overflowed. ``loss``: (S, steps + 1), the loss
    :math:`\frac12\|u(k) - y\|^2` at steps :math:`k = 0, \dots,` ``steps``, NaN from a
    copy's divergence on. ``diverged``: (S,) bool; ``diverged_at``: (S,) the first step whose
    loss is NaN/inf (for an update that overflows, or a gradient that does, the step after
    it, where :func:`~nnopt_utils.train.sweep` would see the non-finite loss), or -1.
    """

    W: torch.Tensor
    loss: torch.Tensor
    diverged: torch.Tensor
    diverged_at: torch.Tensor


def _per_copy(name: str, value, S: int, like: torch.Tensor) -> torch.Tensor:
    """A positive number, or one per copy, as a tensor of ``like``'s dtype and device."""
    try:
        t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or isinstance(value, bool) or t.dim() > 1 or t.numel() not in (1, S) \
            or not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError(f"{name} must be a positive finite number ({like.dtype}), or one per "
                         f"copy (S = {S}), got {value!r}")
    return t


def two_layer_gd(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                 lr: float | Sequence[float] | torch.Tensor, steps: int, *,
                 scale: float | Sequence[float] | torch.Tensor | None = None, act: str = "relu",
                 center: bool = False) -> TwoLayerRun:
    r"""Full-batch gradient descent on the first layer of :math:`S` two-layer networks at
    once, as in Du, Zhai, Póczos and Singh (2019): for copy :math:`s`,

    .. math:: u(x) = c_s \sum_{r=1}^m a_r\,\phi(w_r \cdot x),\qquad
              W \leftarrow W - \eta_s \nabla_W \tfrac12 \|u - y\|^2,\qquad
              \nabla_{w_r} = c_s\, a_r \sum_i (u_i - y_i)\, \phi'(w_r \cdot x_i)\, x_i,

    with the signs :math:`a_r` fixed. The default scale :math:`c = 1/\sqrt m` is Du et al.'s
    (the NTK parametrization); :math:`c = \alpha/m` is the lazy-training family of Chizat,
    Oyallon and Bach (2019), with :math:`\alpha = 1` the mean-field scaling.

    A copy whose loss or update turns NaN/inf is frozen and flagged, as in
    :func:`~nnopt_utils.train.sweep`; the others go on.

    Parameters
    ----------
    W, a
        First layers (S, m, d) and output weights (S, m), e.g. from :func:`two_layer_init`;
        ``W`` is not modified.
    X, y
        Inputs (n, d) and targets (n,) (or (S, n), one set per copy), in ``W``'s dtype.
    lr, scale
        The step :math:`\eta` and the output scale :math:`c`: a positive number, or one per
        copy (a sequence or tensor of length S); ``scale=None`` is :math:`1/\sqrt m`.
    steps
        Number of updates (0: only the loss at initialization).
    act
        A name of :data:`TWO_LAYER_ACTIVATIONS` (``'relu'``, ``'tanh'``).
    center
        Subtract the output at initialization, :math:`u(x) - u_0(x)`, so that training starts
        from :math:`u = 0` (Chizat et al.'s centering; the gradient is unchanged).

    Returns
    -------
    TwoLayerRun
        The final weights, the loss at every step, and the divergence flags.
    """
    W, a, X, y, lr, scale = _two_layer_args(W, a, X, y, lr, steps, scale, center)
    phi, dphi = _activation_pair(act)
    with torch.no_grad():  # explicit gradients: no graph through the steps
        s = a[..., None] * scale.reshape(-1, 1, 1)  # c_s a_r, (S, m, 1)
        lr = lr.reshape(-1, 1, 1)
        u0 = (phi(W @ X.T) * s).sum(1) if center else 0
        alive = torch.ones(len(W), dtype=torch.bool, device=W.device)
        diverged_at = torch.full((len(W),), -1, dtype=torch.long, device=W.device)
        losses = []
        for k in range(steps + 1):
            pre = W @ X.T  # (S, m, n)
            r = (phi(pre) * s).sum(1) - u0 - y  # residuals (S, n)
            loss = 0.5 * (r * r).sum(1)
            diverged_at = torch.where(alive & ~torch.isfinite(loss), k, diverged_at)
            alive &= torch.isfinite(loss)
            losses.append(torch.where(alive, loss, math.nan))
            if k == steps:
                break
            new = W - lr * s * ((dphi(pre) * r[:, None]) @ X)
            # an update that overflows gives a non-finite loss at step k + 1, as in sweep;
            # the copy keeps W_k, its last finite iterate
            finite = torch.isfinite(new.abs().amax((1, 2)))  # amax keeps a NaN
            diverged_at = torch.where(alive & ~finite, k + 1, diverged_at)
            alive &= finite
            W = torch.where(alive[:, None, None], new, W)
    return TwoLayerRun(W, torch.stack(losses, 1), diverged_at >= 0, diverged_at)


def _two_layer_args(W, a, X, y, lr, steps, scale, center):
    """:func:`two_layer_gd`'s arguments, checked; ``lr`` and ``scale`` as tensors."""
    W = _first_layers(W)
    S, m, _ = W.shape
    X = _inputs_for(W, X)
    if not isinstance(a, torch.Tensor) or a.shape != (S, m):
        what = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"a must be a tensor of output weights (S, m) = {(S, m)}, got {what}")
    if not isinstance(y, torch.Tensor) or y.shape not in ((len(X),), (S, len(X))):
        what = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a tensor of targets (n,) = {(len(X),)} or (S, n) = "
                         f"{(S, len(X))}, got {what}")
    for name, t in (("X", X), ("a", a), ("y", y)):
        if t.dtype != W.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, W {W.dtype}; they must match "
                             f"(cast with .to(W.dtype))")
        if t.device != W.device:
            raise ValueError(f"{name} is on {t.device}, W on {W.device}; they must match "
                             f"(move with .to(W.device))")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not isinstance(center, bool):
        raise ValueError(f"center must be True or False, got {center!r}")
    lr = _per_copy("lr", lr, S, W)
    scale = _per_copy("scale", m ** -0.5 if scale is None else scale, S, W)
    return W, a, X, y, lr, scale
