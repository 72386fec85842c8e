"""Normalization layers written from scratch, and measurements of what they do to training.

Survey section 4.3. Each layer standardizes a group of pre-activations to mean 0 and
variance 1 and then applies a learned affine map ``gamma * xhat + beta``. They differ only
in *which* entries form a group:

===============  ===========================================  ===============================
layer            statistics over                              reference
===============  ===========================================  ===============================
BatchNorm        the batch (and spatial dims), per feature     Ioffe and Szegedy (2015)
LayerNorm        the features of one example                   Ba, Kiros and Hinton (2016)
GroupNorm        groups of channels of one example             Wu and He (2018)
===============  ===========================================  ===============================

(WeightNorm, Salimans and Kingma (2016), normalizes weights instead of activations:
``w = g * v / ||v||``; the book uses ``torch.nn.utils.parametrizations.weight_norm``, see
:func:`nnopt_utils.models.mlp` with ``norm='weight'``.)

The functions :func:`batch_norm`, :func:`layer_norm` and :func:`group_norm` are the
formulas; :class:`BatchNorm`, :class:`LayerNorm` and :class:`GroupNorm` wrap them as modules
with the same parameters, buffers and defaults as ``torch.nn``'s layers, so that they can be
swapped in and compared number for number.

Two measurements go with them:

* :func:`loss_along_gradient` -- the loss and the gradient along the gradient direction
  (Santurkar et al., 2018: "loss landscape", "gradient predictiveness" and "effective
  beta-smoothness");
* :func:`bn_relu_gradient_norms` -- per-layer gradient norms of many deep BN-ReLU networks
  at initialization at once (Yang et al., 2019: gradient explosion under BatchNorm).

:class:`MLPStack` runs ``N`` copies of one MLP (with any of these normalizations, or
WeightNorm) at once with batched matrix products, so that an experiment can average over
seeds instead of trusting one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from .config import generator

__all__ = [
    "batch_norm",
    "layer_norm",
    "group_norm",
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "GradientProfile",
    "loss_along_gradient",
    "bn_relu_gradient_norms",
    "BN_RELU_EXPLOSION_RATE",
    "MLPStack",
]

#: Yang et al. (2019): squared-gradient growth per layer of a deep BatchNorm-ReLU network at
#: initialization, in the limit of a large batch and width
BN_RELU_EXPLOSION_RATE = math.pi / (math.pi - 1)


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def _affine(xhat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            shape: Sequence[int]) -> torch.Tensor:
    if weight is not None:
        xhat = xhat * weight.view(shape)
    if bias is not None:
        xhat = xhat + bias.view(shape)
    return xhat


# ---------------------------------------------------------------------------------------
# the formulas

def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization (Ioffe and Szegedy, 2015) of ``x`` of shape ``(B, C)`` or ``(B, C, *)``.

    In training mode, for each feature (channel) ``c`` with the ``m`` entries of the batch
    (and spatial positions) ``x_1, ..., x_m``:

    .. math::
        \\mu = \\frac1m \\sum_i x_i,\\quad \\sigma^2 = \\frac1m \\sum_i (x_i-\\mu)^2,\\quad
        y_i = \\gamma \\frac{x_i - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta,

    and the running statistics (updated in place when given) move towards the batch's:
    ``running_mean <- (1 - momentum) running_mean + momentum mu`` and
    ``running_var <- (1 - momentum) running_var + momentum sigma^2 m/(m-1)`` (the unbiased
    variance, as in ``torch.nn.BatchNorm1d``). In evaluation mode ``mu`` and ``sigma^2`` are
    the running statistics, so every example is normalized independently of the batch.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm needs input of shape (B, C, *), got {tuple(x.shape)}")
    _check_eps(eps)
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    if training:
        m = x.numel() // x.shape[1]
        if m < 2:
            raise ValueError(f"batch_norm in training mode needs more than one value per "
                             f"feature, got input of shape {tuple(x.shape)}")
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                running_var.mul_(1 - momentum).add_(momentum * var.detach() * m / (m - 1))
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in evaluation mode needs running_mean and running_var")
        mean, var = running_mean, running_var
    xhat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    return _affine(xhat, weight, bias, shape)


def layer_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalization (Ba, Kiros and Hinton, 2016) over the last dimensions of ``x``.

    For each example, with ``x_1, ..., x_d`` its entries in the trailing ``normalized_shape``:
    ``y_j = gamma_j (x_j - mu) / sqrt(sigma^2 + eps) + beta_j`` where ``mu`` and ``sigma^2``
    are the mean and (biased) variance of ``x_1, ..., x_d``. No batch statistics: training
    and evaluation compute the same function.
    """
    _check_eps(eps)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} must match the last dimensions of the input "
                         f"of shape {tuple(x.shape)}")
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    xhat = (x - mean) / torch.sqrt(var + eps)
    return _affine(xhat, weight, bias, shape)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group normalization (Wu and He, 2018) of ``x`` of shape ``(B, C)`` or ``(B, C, *)``.

    The ``C`` channels of each example are split into ``num_groups`` consecutive groups of
    ``C / G`` channels; each group (with its spatial positions) is standardized by its own
    mean and biased variance, then ``gamma_c xhat + beta_c`` per channel. ``G = 1`` is
    LayerNorm over ``(C, *)``; ``G = C`` is instance normalization.
    """
    _check_eps(eps)
    if x.dim() < 2:
        raise ValueError(f"group_norm needs input of shape (B, C, *), got {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the {C} channels, "
                         f"got {num_groups!r}")
    g = x.reshape(x.shape[0], num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = g.var(-1, unbiased=False, keepdim=True)
    xhat = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return _affine(xhat, weight, bias, [1, -1] + [1] * (x.dim() - 2))


# ---------------------------------------------------------------------------------------
# the modules

class BatchNorm(nn.Module):
    """:func:`batch_norm` as a module, a drop-in for ``nn.BatchNorm1d``/``nn.BatchNorm2d``.

    Parameters ``weight`` (gamma, ones) and ``bias`` (beta, zeros) when ``affine``; buffers
    ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``.
    ``eps=0`` makes the layer exactly invariant to rescaling its input, which the book uses
    to check the scale-invariance identities to machine precision.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True):
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        _check_eps(eps)
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked += 1
        return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                          training=self.training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class LayerNorm(nn.Module):
    """:func:`layer_norm` as a module, a drop-in for ``nn.LayerNorm``."""

    def __init__(self, normalized_shape: int | Sequence[int], *, eps: float = 1e-5,
                 elementwise_affine: bool = True):
        super().__init__()
        shape = ((normalized_shape,) if isinstance(normalized_shape, int)
                 else tuple(normalized_shape))
        if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
            raise ValueError(f"normalized_shape must be positive ints, got {normalized_shape!r}")
        _check_eps(eps)
        self.normalized_shape, self.eps = shape, eps
        self.weight = nn.Parameter(torch.ones(shape)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class GroupNorm(nn.Module):
    """:func:`group_norm` as a module, a drop-in for ``nn.GroupNorm``."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
                 affine: bool = True):
        super().__init__()
        if not isinstance(num_channels, int) or num_channels <= 0:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        if not isinstance(num_groups, int) or num_groups <= 0 or num_channels % num_groups:
            raise ValueError(f"num_groups must be a positive divisor of num_channels="
                             f"{num_channels}, got {num_groups!r}")
        _check_eps(eps)
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


# ---------------------------------------------------------------------------------------
# measurements

@dataclass
class GradientProfile:
    """The loss and gradient along the negative gradient direction from one point.

    ``step_sizes``: (K,) the ``s`` probed; ``loss``: (K,) ``L(theta - s g)``;
    ``grad_change``: (K,) ``||grad L(theta - s g) - g||``; ``grad_norm``: ``||g||``;
    ``loss0``: ``L(theta)``.
    """

    step_sizes: torch.Tensor
    loss: torch.Tensor
    grad_change: torch.Tensor
    grad_norm: float
    loss0: float

    @property
    def loss_range(self) -> float:
        """``max - min`` of the loss along the probed steps (Santurkar et al.'s Fig. 4a)."""
        return float(self.loss.max() - self.loss.min())

    @property
    def grad_change_max(self) -> float:
        """``max_s ||grad L(theta - s g) - g||`` ("gradient predictiveness", their Fig. 4b)."""
        return float(self.grad_change.max())

    @property
    def relative_loss_range(self) -> float:
        """``loss_range / (s_max ||g||^2)``: the loss range in units of the first-order decrease
        predicted at the longest step; scale-free, unlike :attr:`loss_range`. A loss that is
        linear along the step gives ``1 - s_min/s_max``; NaN at a stationary point."""
        if self.grad_norm == 0:
            return math.nan
        return self.loss_range / (float(self.step_sizes.max()) * self.grad_norm ** 2)

    @property
    def effective_smoothness(self) -> float:
        """``max_s ||grad L(theta - s g) - g|| / (s ||g||)``, a local Lipschitz constant of the
        gradient along the step ("effective beta-smoothness", their Fig. 4c); NaN at a
        stationary point."""
        if self.grad_norm == 0:
            return math.nan
        s = self.step_sizes.to(self.grad_change.dtype)
        return float((self.grad_change / (s * self.grad_norm)).max())


def loss_along_gradient(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    step_sizes: Sequence[float] | torch.Tensor,
    *,
    per_copy: bool = False,
) -> GradientProfile | list[GradientProfile]:
    """Probe the loss and the gradient at ``theta - s grad L(theta)`` for each step size ``s``.

    Santurkar, Tsipras, Ilyas and Madry (2018), "How does batch normalization help
    optimization?": at a point ``theta`` of training, with ``g = grad L(theta)`` on the batch
    ``(X, y)``, they measure how the loss ``L(theta - s g)`` and the gradient
    ``grad L(theta - s g)`` change over a range of ``s``. Raw ranges shrink with ``||g||``, so
    compare networks by the scale-free :attr:`GradientProfile.effective_smoothness` and
    :attr:`GradientProfile.relative_loss_range`.

    The model is evaluated in its current mode (training mode uses the batch's statistics);
    its parameters and buffers (e.g. BatchNorm running statistics) are left unchanged.

    ``per_copy=True`` probes ``N`` independent copies at once, for example an
    :class:`MLPStack`: every parameter has a leading dimension ``N``, ``loss_fn`` returns the
    ``N`` losses, each copy moves along its own gradient, and the result is a list of ``N``
    profiles, one per copy.
    """
    from torch.func import functional_call

    s = torch.as_tensor(step_sizes, dtype=torch.float64).flatten()
    if s.numel() == 0 or not bool((s > 0).all()):
        raise ValueError(f"step_sizes must be a non-empty sequence of positive numbers, "
                         f"got {step_sizes!r}")
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    n = next(iter(params.values())).shape[0] if per_copy else 1
    if per_copy and any(v.dim() == 0 or v.shape[0] != n for v in params.values()):
        shapes = {k: tuple(v.shape) for k, v in params.items()}
        raise ValueError(f"per_copy needs every parameter to lead with the number of copies; "
                         f"got shapes {shapes}")

    def sq_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:  # (n,) per copy
        return sum(t.reshape(n, -1).pow(2).sum(1) for t in tensors).double()

    def loss_and_grad(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        b = {k: v.clone() for k, v in buffers.items()}  # running stats update the copies
        value = loss_fn(functional_call(model, {**p, **b}, (X,)), y)
        if value.numel() != n:
            want = "one loss per copy" if per_copy else "a scalar"
            raise ValueError(f"loss_fn must return {want} ({n} values), "
                             f"got shape {tuple(value.shape)}")
        grads = torch.autograd.grad(value.sum(), list(p.values()))
        return value.detach().reshape(n).double(), [g.detach() for g in grads]

    def along(step: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # (n,) steps, broadcast
        return step.to(g.dtype).view(-1, *[1] * (g.dim() - 1)) if per_copy else step.to(g.dtype)

    loss0, g0 = loss_and_grad(params)
    gnorm = sq_norm(g0).sqrt()
    losses, changes = [], []
    for step in s:
        steps = step.expand(n)
        moved = {k: v - along(steps, g) * g for (k, v), g in zip(params.items(), g0)}
        value, g1 = loss_and_grad(moved)
        losses.append(value)
        changes.append(sq_norm([a - b for a, b in zip(g1, g0)]).sqrt())
    losses, changes = torch.stack(losses, 1), torch.stack(changes, 1)  # (n, K)
    profiles = [GradientProfile(s, losses[k], changes[k], float(gnorm[k]), float(loss0[k]))
                for k in range(n)]
    return profiles if per_copy else profiles[0]


def bn_relu_gradient_norms(
    depth: int,
    width: int,
    batch: int,
    *,
    n_nets: int = 1,
    eps: float = 1e-5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Squared gradient norms ``||dL/dW_l||_F^2`` of ``n_nets`` deep BN-ReLU nets at init.

    Each network is ``h_l = W_l x_{l-1}``, ``x_l = relu(BN(h_l))`` for ``l = 1..depth``,
    with ``W_l`` of entries ``N(0, 1/width)`` (BatchNorm makes the scale irrelevant), Gaussian
    inputs ``x_0`` of shape (batch, width) and the loss ``L = <v, x_depth>`` for a Gaussian
    ``v``. All networks run at once as batched matrix products.

    Yang, Pennington, Rao, Sohl-Dickstein and Schoenholz (2019), "A mean field theory of batch
    normalization": in the limit of large width and batch the gradient grows geometrically
    towards the input, ``||dL/dW_l||^2 / ||dL/dW_{l+1}||^2 -> pi/(pi - 1)`` (about 1.467)
    for ReLU (:data:`BN_RELU_EXPLOSION_RATE`). Returns a (n_nets, depth) tensor.
    """
    for name, v in (("depth", depth), ("width", width), ("n_nets", n_nets)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(batch, int) or batch < 2:
        raise ValueError(f"batch must be an int >= 2, got {batch!r}")
    g = generator(seed)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).to(device)  # noqa: E731
    weights = [(draw(n_nets, width, width) / math.sqrt(width)).requires_grad_(True)
               for _ in range(depth)]
    x = draw(n_nets, batch, width)
    for W in weights:
        h = torch.bmm(x, W.transpose(1, 2))
        # BatchNorm over the batch dimension of each network: dim 1 of (n_nets, batch, width)
        mean = h.mean(1, keepdim=True)
        var = h.var(1, unbiased=False, keepdim=True)
        x = torch.relu((h - mean) / torch.sqrt(var + eps))
    v = draw(n_nets, batch, width)
    (x * v).sum().backward()  # the nets are independent: each W_l.grad is its own net's
    return torch.stack([W.grad.pow(2).sum((1, 2)) for W in weights], 1).detach()


# ---------------------------------------------------------------------------------------
# many copies of one network at once

class _StackedLinear(nn.Module):
    def __init__(self, lins: Sequence[nn.Linear]):
        super().__init__()
        first = lins[0]
        # a Linear under torch's weight_norm keeps g (original0) and v (original1)
        self.weight_norm = hasattr(first, "parametrizations")
        with torch.no_grad():
            if self.weight_norm:
                plist = first.parametrizations.weight
                if len(plist) != 1 or type(plist[0]).__name__ != "_WeightNorm" or (
                        plist.original0.shape != (first.out_features, 1)):
                    raise ValueError("MLPStack supports torch.nn.utils.parametrizations."
                                     "weight_norm with dim=0 as the only parametrization")
                self.g = nn.Parameter(torch.stack([m.parametrizations.weight.original0
                                                   for m in lins]).clone())
                self.v = nn.Parameter(torch.stack([m.parametrizations.weight.original1
                                                   for m in lins]).clone())
            else:
                self.weight = nn.Parameter(torch.stack([m.weight for m in lins]).clone())
            self.bias = (nn.Parameter(torch.stack([m.bias for m in lins]).clone())
                         if first.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, B, in) or (B, in) -> (N, B, out)
        if self.weight_norm:  # w_j = g_j v_j / ||v_j||, row by row as weight_norm(dim=0)
            W = self.v * (self.g / self.v.norm(dim=2, keepdim=True))
        else:
            W = self.weight
        if x.dim() == 2:
            x = x.expand(W.shape[0], -1, -1)
        if self.bias is None:
            return torch.bmm(x, W.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, W.transpose(1, 2))


class _StackedNorm(nn.Module):
    def __init__(self, norms: Sequence[nn.Module]):
        super().__init__()
        first = norms[0]
        self.kind = type(first).__name__
        self.eps = first.eps

        def stack(name: str) -> nn.Parameter | None:
            if getattr(first, name, None) is None:
                return None
            return nn.Parameter(torch.stack([getattr(m, name) for m in norms]).clone())

        with torch.no_grad():
            self.weight, self.bias = stack("weight"), stack("bias")
            if isinstance(first, nn.BatchNorm1d):
                if first.running_mean is None or first.momentum is None:
                    raise ValueError("MLPStack needs BatchNorm1d with running statistics "
                                     "(track_running_stats=True) and a numeric momentum")
                self.momentum = first.momentum
                self.register_buffer("running_mean",
                                     torch.stack([m.running_mean for m in norms]).clone())
                self.register_buffer("running_var",
                                     torch.stack([m.running_var for m in norms]).clone())
            elif isinstance(first, nn.GroupNorm):
                self.num_groups = first.num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, B, C)
        # torch's fused kernels (equal to this module's formulas, see the tests) for speed
        F = nn.functional
        n, b, c = x.shape
        if self.kind == "BatchNorm1d":  # feature c of copy k is feature k*C + c of one BN
            flat = x.transpose(0, 1).reshape(b, n * c)
            xhat = F.batch_norm(flat, self.running_mean.view(-1), self.running_var.view(-1),
                                training=self.training, momentum=self.momentum, eps=self.eps)
            xhat = xhat.view(b, n, c).transpose(0, 1)
        elif self.kind == "LayerNorm":
            xhat = F.layer_norm(x, (c,), eps=self.eps)
        else:  # GroupNorm: LayerNorm over each group of C/G consecutive channels
            g = self.num_groups
            xhat = F.layer_norm(x.reshape(n, b, g, c // g), (c // g,), eps=self.eps)
            xhat = xhat.view(n, b, c)
        if self.weight is not None:
            xhat = xhat * self.weight.unsqueeze(1)
        if self.bias is not None:
            xhat = xhat + self.bias.unsqueeze(1)
        return xhat


_STACKABLE = (nn.Linear, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)
#: parameter-free elementwise layers that act on a stacked (N, B, C) tensor unchanged
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SELU, nn.ELU,
                nn.SiLU, nn.Softplus, nn.Identity)


def _layer_kind(m: nn.Module) -> tuple:
    for cls in _STACKABLE:  # (weight-normed Linears have a generated subclass of nn.Linear)
        if isinstance(m, cls):
            return (cls, hasattr(m, "parametrizations"), m.extra_repr())
    return (type(m), m.extra_repr())


def _is_elementwise(m: nn.Module) -> bool:
    from .models import _Elementwise  # the library's named activations

    return isinstance(m, (_Elementwise, *_ELEMENTWISE))


class MLPStack(nn.Module):
    """``N`` independent copies of one MLP architecture, evaluated at once by batched matmuls.

    ``models`` are ``N`` networks of the same architecture, each an ``nn.Sequential`` of
    ``nn.Linear`` (optionally under ``torch.nn.utils.parametrizations.weight_norm``),
    ``nn.BatchNorm1d``, ``nn.LayerNorm`` (over the last dimension), ``nn.GroupNorm`` and
    elementwise activations -- what :func:`nnopt_utils.models.mlp` builds. The
    stack copies their parameters and buffers into tensors with a leading dimension ``N``;
    the models themselves are left unchanged.

    ``stack(X)`` maps inputs ``X`` of shape (B, in) to outputs of shape (N, B, out): copy ``k``
    computes exactly what ``models[k]`` computes, in training mode (BatchNorm with the batch's
    statistics, updating copy ``k``'s running statistics) and in evaluation mode. Since the
    copies share no parameter, the gradient of ``losses.sum()`` is, copy by copy, the gradient
    of copy ``k``'s own loss: one optimizer step on the stack is one step of every copy.
    :meth:`losses` and :meth:`accuracy` give per-copy cross-entropies and accuracies.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, nn.Sequential) for m in models):
            raise ValueError("MLPStack needs a non-empty sequence of nn.Sequential models")
        n_layers = len(models[0])
        if any(len(m) != n_layers for m in models):
            raise ValueError("MLPStack needs models of one architecture (equal lengths)")
        layers: list[nn.Module] = []
        for i, first in enumerate(models[0]):
            column = [m[i] for m in models]
            if any(_layer_kind(c) != _layer_kind(first) for c in column):
                raise ValueError(f"layer {i} differs between the models")
            if isinstance(first, nn.Linear):
                layers.append(_StackedLinear(column))
            elif isinstance(first, (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)):
                if isinstance(first, nn.LayerNorm) and len(first.normalized_shape) != 1:
                    raise ValueError("MLPStack supports LayerNorm over the last dimension only")
                layers.append(_StackedNorm(column))
            elif _is_elementwise(first):  # shared by the copies, acts on any shape
                layers.append(copy.deepcopy(first))
            else:
                raise ValueError(f"MLPStack cannot stack layer {i} of type "
                                 f"{type(first).__name__}; it supports Linear, BatchNorm1d, "
                                 f"LayerNorm, GroupNorm and elementwise activations")
        self.layers = nn.ModuleList(layers)
        self.n_copies = len(models)
        self.train(models[0].training)

    def __len__(self) -> int:
        return self.n_copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    @property
    def linears(self) -> list[nn.Module]:
        """The stacked Linear layers in order; each holds ``weight`` (N, out, in) -- or, under
        WeightNorm, ``g`` (N, out, 1) and ``v`` (N, out, in) -- and ``bias`` (N, out)."""
        return [m for m in self.layers if isinstance(m, _StackedLinear)]

    @staticmethod
    def _matrix(lin: nn.Module, grad: bool) -> torch.Tensor | None:
        t = lin.v if lin.weight_norm else lin.weight
        return t.grad if grad else t

    def weight_norms(self) -> torch.Tensor:
        """(N, layers) squared Frobenius norms ``||W_l||^2`` of every copy's Linear weights
        (of the direction ``v`` under WeightNorm)."""
        with torch.no_grad():
            return torch.stack([self._matrix(m, False).pow(2).sum((1, 2))
                                for m in self.linears], 1)

    def weight_grad_norms(self) -> torch.Tensor:
        """(N, layers) squared norms ``||dL/dW_l||^2`` of the weight gradients left by the
        last ``backward`` (of ``dL/dv`` under WeightNorm)."""
        grads = [self._matrix(m, True) for m in self.linears]
        if any(g is None for g in grads):
            raise ValueError("weight_grad_norms needs gradients: call backward first")
        return torch.stack([g.pow(2).sum((1, 2)) for g in grads], 1)

    @staticmethod
    def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) mean cross-entropy of each copy, for outputs (N, B, classes), labels (B,)."""
        return nn.functional.cross_entropy(out.transpose(1, 2), y.expand(out.shape[0], -1),
                                           reduction="none").mean(1)

    def losses(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) cross-entropy of each copy on ``(X, y)`` in the current mode."""
        return self.cross_entropy(self(X), y)

    @torch.no_grad()
    def accuracy(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) accuracy of each copy on ``(X, y)`` in evaluation mode (the mode is restored)."""
        was = self.training
        self.eval()
        acc = (self(X).argmax(-1) == y).to(torch.get_default_dtype()).mean(1)
        self.train(was)
        return acc
