"""Model builders: MLPs, residual MLPs, small CNNs and deep linear networks.

Every builder takes the same options -- ``activation``, ``norm``, ``init`` (a scheme of
:mod:`nnopt_utils.init`) and ``seed`` -- so an experiment changes one thing at a time.
Models are plain ``nn.Module`` s; ``torch.func.functional_call`` works on all of them, which is
how :func:`nnopt_utils.train.sweep` trains many copies at once.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Callable, Sequence, Union

import torch
from torch import nn

from .init import initialize
from .config import generator

__all__ = ["ACTIVATIONS", "DERIVATIVES", "NORMS", "ActivationSpec", "activation", "identity",
           "MLP", "mlp", "ResidualMLP", "residual_mlp", "backprop", "DeepLinear", "small_cnn"]


class _Elementwise(nn.Module):
    """An elementwise function as a module. It holds the function itself, so the module
    pickles whenever the function does (a function defined at module level, not a lambda)."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.name, self.fn = name, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def identity(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = x``, the activation of a linear network (a named function: it pickles)."""
    return x


#: elementwise nonlinearities by name; each maps a tensor to a tensor
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": identity,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "erf": torch.erf,
    "gelu": nn.functional.gelu,
    "selu": nn.functional.selu,
    "softplus": nn.functional.softplus,
    "leaky_relu": nn.functional.leaky_relu,
}

NORMS = ("none", "batch", "layer", "group", "weight")


#: what the builders accept as ``activation``
ActivationSpec = Union[str, type, nn.Module, Callable]


def _is_factory(fn: Callable) -> bool:
    """True when ``fn`` can be called without arguments (a module factory), False when it
    needs one (an elementwise function of a tensor)."""
    try:
        inspect.signature(fn).bind()
    except (TypeError, ValueError):  # needs an argument, or a builtin without a signature
        return False
    return True


def activation(spec: ActivationSpec) -> nn.Module:
    """A fresh activation module from ``spec``, for one layer.

    ``spec`` is one of:

    * a name from :data:`ACTIVATIONS` (``'relu'``, ``'tanh'``, ``'linear'``, ...);
    * an ``nn.Module`` subclass constructible without arguments (``nn.SiLU``), instantiated;
    * an ``nn.Module`` instance (``nn.LeakyReLU(0.2)``), copied, so no two layers share one;
    * a factory without arguments returning a module (``functools.partial(nn.LeakyReLU,
      0.2)``), called;
    * an elementwise function of a tensor (``torch.sin``, a ``def``), wrapped.

    A model built from a function defined at module level (or a module class) pickles; one
    built from a lambda does not.
    """
    if isinstance(spec, str):
        if spec not in ACTIVATIONS:
            raise ValueError(f"unknown activation {spec!r}; choose one of: "
                             f"{', '.join(ACTIVATIONS)}, an nn.Module (class or instance) or "
                             "an elementwise function")
        return _Elementwise(spec, ACTIVATIONS[spec])
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise ValueError(f"activation class {spec.__name__} is not an nn.Module")
        try:
            return spec()
        except TypeError as e:
            raise ValueError(f"activation class {spec.__name__} needs arguments ({e}); pass an "
                             f"instance such as {spec.__name__}(...)") from e
    if callable(spec):
        if _is_factory(spec):
            module = spec()
            if not isinstance(module, nn.Module):
                raise ValueError(f"activation factory {spec!r} returned "
                                 f"{type(module).__name__}, not an nn.Module")
            return module
        return _Elementwise(getattr(spec, "__name__", type(spec).__name__), spec)
    raise ValueError(f"activation must be a name ({', '.join(ACTIVATIONS)}), an nn.Module "
                     f"class or instance, a module factory or an elementwise function; "
                     f"got {spec!r}")


# builders take an argument called ``activation``; this alias keeps the function reachable
_make_activation = activation


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")


def _norm_layer(norm: str, width: int, groups: int = 8) -> nn.Module | None:
    if norm == "batch":
        return nn.BatchNorm1d(width)
    if norm == "layer":
        return nn.LayerNorm(width)
    if norm == "group":
        g = math.gcd(groups, width)
        return nn.GroupNorm(g, width)
    return None


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


class MLP(nn.Sequential):
    """A fully connected network: ``[Linear -> norm -> activation] * depth -> Linear``.

    ``layers`` lists its Linear layers in order (the hooks of :mod:`nnopt_utils.signal` use it).
    """

    @property
    def layers(self) -> list[nn.Linear]:
        return [m for m in self.modules() if isinstance(m, nn.Linear)]


def mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    *,
    activation: ActivationSpec = "relu",
    norm: str = "none",
    bias: bool = True,
    init: str = "kaiming",
    std: float | None = None,
    gain: float = 1.0,
    seed: int | None = None,
) -> MLP:
    """Build an :class:`MLP` with hidden widths ``hidden`` (``depth = len(hidden)``).

    ``activation``: a name from :data:`ACTIVATIONS` or any spec :func:`activation` accepts,
    for example ``nn.LeakyReLU(0.2)`` or ``torch.sin``; every hidden layer gets its own copy.
    ``norm='weight'`` reparametrizes every Linear layer as ``g * v / ||v||`` (Salimans and
    Kingma, 2016); the other norms insert a normalization layer after each hidden Linear.
    """
    _positive_int("in_dim", in_dim)
    _positive_int("out_dim", out_dim)
    for h in hidden:
        _positive_int("hidden width", h)
    _check_norm(norm)
    _make_activation(activation)  # validate the spec before building
    dims = [in_dim, *hidden]
    mods: list[nn.Module] = []
    for i, o in zip(dims[:-1], dims[1:]):
        mods.append(nn.Linear(i, o, bias=bias))
        layer = _norm_layer(norm, o)
        if layer is not None:
            mods.append(layer)
        mods.append(_make_activation(activation))
    mods.append(nn.Linear(dims[-1], out_dim, bias=bias))
    model = MLP(*mods)
    initialize(model, init, std=std, gain=gain, seed=seed)
    if norm == "weight":
        for idx, m in enumerate(model):
            if isinstance(m, nn.Linear):
                model[idx] = nn.utils.parametrizations.weight_norm(m)
    return model


class ResidualBlock(nn.Module):
    """``x -> x + alpha * branch(x)`` with a pre-activation branch of ``branch_depth`` layers."""

    def __init__(self, width: int, branch_depth: int, activation_name: ActivationSpec,
                 norm: str, alpha: float, bias: bool):
        super().__init__()
        mods: list[nn.Module] = []
        for _ in range(branch_depth):
            layer = _norm_layer(norm, width)
            if layer is not None:
                mods.append(layer)
            mods += [_make_activation(activation_name), nn.Linear(width, width, bias=bias)]
        self.branch = nn.Sequential(*mods)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.branch(x)


class ResidualMLP(nn.Module):
    """``Linear(in, width) -> n_blocks residual blocks -> activation -> Linear(width, out)``."""

    def __init__(self, in_dim: int, width: int, n_blocks: int, out_dim: int, *,
                 branch_depth: int = 2, activation: ActivationSpec = "relu",
                 norm: str = "none", alpha: float = 1.0, bias: bool = True):
        super().__init__()
        self.stem = nn.Linear(in_dim, width, bias=bias)
        self.blocks = nn.ModuleList(
            ResidualBlock(width, branch_depth, activation, norm, alpha, bias)
            for _ in range(n_blocks)
        )
        self.head_act = _make_activation(activation)
        self.head = nn.Linear(width, out_dim, bias=bias)
        self.branch_depth = branch_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.head_act(x))


def residual_mlp(
    in_dim: int,
    width: int,
    n_blocks: int,
    out_dim: int,
    *,
    branch_depth: int = 2,
    activation: ActivationSpec = "relu",
    norm: str = "none",
    alpha: float | str = 1.0,
    bias: bool = True,
    init: str = "kaiming",
    zero_init_branches: bool = False,
    seed: int | None = None,
) -> ResidualMLP:
    """Build a :class:`ResidualMLP`.

    ``alpha`` scales every branch; ``alpha='1/sqrt(L)'`` uses ``1/sqrt(n_blocks)``, which
    keeps the forward variance bounded (it grows like ``(1 + alpha^2)^L``).
    ``activation``: a name or any spec :func:`activation` accepts.
    ``zero_init_branches`` zeroes the last layer of every branch ("ReZero"/"SkipInit"-style);
    ``init='fixup'`` applies the full Fixup rule (:func:`nnopt_utils.init.fixup_`).
    """
    for name, v in (("in_dim", in_dim), ("width", width), ("out_dim", out_dim),
                    ("branch_depth", branch_depth)):
        _positive_int(name, v)
    if not isinstance(n_blocks, int) or n_blocks < 0:
        raise ValueError(f"n_blocks must be a non-negative int, got {n_blocks!r}")
    _check_norm(norm)
    if norm == "weight":
        raise ValueError("norm 'weight' is not supported in residual_mlp; choose one of: "
                         "none, batch, layer, group")
    _make_activation(activation)  # validate the spec before building
    if isinstance(alpha, str):
        if alpha != "1/sqrt(L)":
            raise ValueError(f"unknown alpha {alpha!r}; give a number or '1/sqrt(L)'")
        alpha = 1.0 / math.sqrt(max(n_blocks, 1))
    model = ResidualMLP(in_dim, width, n_blocks, out_dim, branch_depth=branch_depth,
                        activation=activation, norm=norm, alpha=float(alpha), bias=bias)
    initialize(model, init, seed=seed)
    if zero_init_branches:
        with torch.no_grad():
            for block in model.blocks:
                [m for m in block.branch if isinstance(m, nn.Linear)][-1].weight.zero_()
    return model


class DeepLinear(nn.Module):
    """A deep linear network ``x -> W_N ... W_1 x`` with ``dims = [d_0, d_1, ..., d_N]``.

    ``init``: ``normal`` (entries ``N(0, std^2)``), ``orthogonal`` (scaled by ``gain``) or
    ``balanced`` (Arora et al., 2019: ``W_{j+1}^T W_{j+1} = W_j W_j^T`` at initialization).
    Balanced: with ``A = U S V^T`` a random (d_N, d_0) matrix of i.i.d. ``N(0, std^2)`` entries
    and ``k = min(dims)``, ``W_1 = S_k^{1/N} V_k^T``, ``W_N = U_k S_k^{1/N}`` and the layers
    between carry ``S_k^{1/N}``, so the product is ``U_k S_k V_k^T``, the best rank-``k``
    approximation of ``A`` (``A`` itself when no inner width is below ``min(d_0, d_N)``; with
    one layer, ``W_1 = A``).
    """

    INITS = ("normal", "orthogonal", "balanced")

    def __init__(self, dims: Sequence[int], *, init: str = "normal", std: float = 0.1,
                 gain: float = 1.0, seed: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"dims needs at least 2 entries, got {list(dims)!r}")
        for d in dims:
            _positive_int("dimension", d)
        if init not in self.INITS:
            raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(self.INITS)}")
        g = None if seed is None else generator(seed)
        from .init import orthogonal_matrix

        mats = []
        if init == "balanced":
            N, k = len(dims) - 1, min(dims)
            A = torch.randn(dims[-1], dims[0], generator=g, dtype=torch.float64) * std
            U, S, Vh = torch.linalg.svd(A, full_matrices=False)
            U, S, Vh = U[:, :k], S[:k], Vh[:k]
            root = torch.diag(S ** (1.0 / N))
            for j in range(N):
                o, i = dims[j + 1], dims[j]
                W = torch.zeros(o, i, dtype=torch.float64)
                if N == 1:  # one layer: the end-to-end matrix itself, U S Vh
                    W = U @ root @ Vh
                elif j == 0:
                    W[:k] = root @ Vh
                elif j == N - 1:
                    W[:, :k] = U @ root
                else:
                    W[:k, :k] = root
                mats.append(W.to(dtype))
        else:
            for i, o in zip(dims[:-1], dims[1:]):
                if init == "normal":
                    mats.append(torch.randn(o, i, generator=g, dtype=dtype) * std)
                else:
                    mats.append(orthogonal_matrix(o, i, generator=g, dtype=dtype) * gain)
        self.weights = nn.ParameterList(nn.Parameter(W) for W in mats)
        self.dims = list(dims)

    def product(self) -> torch.Tensor:
        """The end-to-end matrix ``W_N ... W_1`` of shape (d_N, d_0)."""
        P = self.weights[0]
        for W in self.weights[1:]:
            P = W @ P
        return P

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for W in self.weights:
            x = x @ W.T
        return x


def small_cnn(
    in_channels: int = 1,
    n_classes: int = 10,
    *,
    width: int = 16,
    depth: int = 2,
    activation: ActivationSpec = "relu",
    norm: str = "none",
    init: str = "kaiming",
    seed: int | None = None,
) -> nn.Sequential:
    """``depth`` 3x3 conv layers (``width`` channels) -> global average pool -> Linear."""
    _positive_int("width", width)
    _positive_int("depth", depth)
    _check_norm(norm)
    mods: list[nn.Module] = []
    c = in_channels
    for _ in range(depth):
        mods.append(nn.Conv2d(c, width, 3, padding=1))
        if norm == "batch":
            mods.append(nn.BatchNorm2d(width))
        elif norm in ("group", "layer"):
            mods.append(nn.GroupNorm(1 if norm == "layer" else math.gcd(8, width), width))
        elif norm == "weight":
            raise ValueError("norm 'weight' is not supported in small_cnn; choose one of: "
                             "none, batch, layer, group")
        mods.append(_make_activation(activation))
        c = width
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n_classes)]
    model = nn.Sequential(*mods)
    initialize(model, init, seed=seed)
    return model


# ---------------------------------------------------------------------------------------
# Backpropagation written out, for checking autograd against the textbook recursion.

#: derivatives of the activations, as functions of the pre-activation h
DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": torch.ones_like,
    "relu": lambda h: (h > 0).to(h.dtype),
    "tanh": lambda h: 1 - torch.tanh(h) ** 2,
    "sigmoid": lambda h: torch.sigmoid(h) * (1 - torch.sigmoid(h)),
    "erf": lambda h: 2 / math.sqrt(math.pi) * torch.exp(-h * h),
    "softplus": torch.sigmoid,
}


@torch.no_grad()
def backprop(model: MLP, X: torch.Tensor, Y: torch.Tensor) -> list[torch.Tensor]:
    r"""Gradients of the half mean squared error by the backpropagation recursion.

    For ``h_l = W_l a_{l-1} + b_l``, ``a_l = phi(h_l)`` (``a_0 = x``) and the loss
    ``F = 1/(2n) sum_i ||h_L(x_i) - y_i||^2`` (Rumelhart, Hinton and Williams, 1986):

    .. math:: \delta_L = (h_L - y)/n,\quad \delta_l = \phi'(h_l) \odot W_{l+1}^\top \delta_{l+1},
              \quad \nabla_{W_l} F = \sum_i \delta_l a_{l-1}^\top,\quad \nabla_{b_l} F = \sum_i \delta_l.

    ``model`` must be an :class:`MLP` without normalization (Linear and activations only).
    Returns the gradients in the order of ``model.parameters()``.
    """
    linears, derivs = [], []
    for m in model:
        if isinstance(m, nn.Linear):
            linears.append(m)
        elif isinstance(m, _Elementwise) and m.name in DERIVATIVES \
                and m.fn is ACTIVATIONS[m.name]:  # a named one, not a custom function
            derivs.append(DERIVATIVES[m.name])
        else:
            raise ValueError(f"backprop supports Linear layers and the activations "
                             f"{', '.join(DERIVATIVES)}; got {m!r}")
    if len(derivs) != len(linears) - 1:
        raise ValueError("backprop expects Linear and activation layers to alternate")
    Y = Y.reshape(len(X), -1)
    acts, pres = [X], []
    for l, lin in enumerate(linears):  # forward pass, keeping what the backward pass needs
        h = acts[-1] @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
        pres.append(h)
        if l < len(derivs):
            acts.append(model[2 * l + 1](h))
    delta = (pres[-1] - Y) / len(X)
    grads: list[torch.Tensor] = []
    for l in range(len(linears) - 1, -1, -1):  # backward pass
        lin = linears[l]
        layer = [delta.T @ acts[l]] + ([delta.sum(0)] if lin.bias is not None else [])
        grads = layer + grads
        if l > 0:
            delta = derivs[l - 1](pres[l - 1]) * (delta @ lin.weight)
    return grads
