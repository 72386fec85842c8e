r"""The maximal-update parametrization, µP (Yang et al., 2022, *Tensor Programs V*).

A parametrization says, for every kind of parameter, how its initial variance, a constant
multiplier in the forward pass and its learning rate scale with the width :math:`n` of the
hidden layers. Here they are written relative to a *base width* :math:`n_0`, with the width
ratio :math:`m = n / n_0`, so that at :math:`n = n_0` µP and the standard parametrization
(SP) coincide and a learning rate tuned at the base width has the same meaning at every width.

Table 3 of Yang et al. (2022), relative to the base width (``s2`` is SP's variance,
``gain**2 / fan_in``; biases start at zero in both):

========================  =======================  ==================  ==================
µP, Table 3               input weights and         output weights      hidden weights
                          hidden biases
========================  =======================  ==================  ==================
initial variance          ``s2``                   ``s2 / m``          ``s2``
multiplier                1                        1                   1
SGD learning rate         ``lr * m``               ``lr / m``          ``lr``
Adam learning rate        ``lr``                   ``lr / m``          ``lr / m``
========================  =======================  ==================  ==================

The paper's "all biases" column has the learning rate :math:`\eta\cdot\text{fan\_out}`
(SGD); the output bias has a fixed fan-out (the number of classes), so its multiplier is 1
here, for SGD and Adam alike. SP uses ``s2`` and ``lr`` everywhere.

Table 8 of the paper is the same parametrization with the output layer written as the
``mup`` package writes it: a width-independent initial variance (here ``1 / base_width``,
SP's at the base width), a forward multiplier :math:`1/m` on the output layer's input
(the bias is not scaled), and learning rates ``lr * m`` (SGD) and ``lr`` (Adam) for the
output weights. Both forms give the same function at every step (the effective
output weights :math:`W/m` follow the same trajectory; for Adam up to its ``eps``, which
is not rescaled by :math:`m`); :func:`mlp` builds the first by
default and the second with ``output_multiplier=True``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .config import generator
from .models import _make_activation

__all__ = ["PARAMETRIZATIONS", "ROLES", "Multiplier", "MuMLP", "mlp", "lr_multiplier",
           "init_variance_multiplier", "param_groups"]

PARAMETRIZATIONS = ("mup", "sp")
#: the kinds of parameter the tables distinguish
ROLES = ("input", "hidden", "output", "bias", "output_bias")
_OPTIMIZERS = ("adam", "sgd")


def _check(parametrization: str, optimizer: str | None = None) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; choose one of: "
                         f"{', '.join(PARAMETRIZATIONS)}")
    if optimizer is not None and optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer family {optimizer!r}; choose one of: "
                         f"{', '.join(_OPTIMIZERS)} (Adam-like: adam, adamw, lion, ...; "
                         "SGD-like: sgd with or without momentum)")


def _ratio(width: int, base_width: int) -> float:
    for name, v in (("width", width), ("base_width", base_width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return width / base_width


def lr_multiplier(role: str, width: int, base_width: int, *, parametrization: str = "mup",
                  optimizer: str = "adam", output_multiplier: bool = False) -> float:
    r"""The factor by which the learning rate :math:`\eta` is multiplied for a parameter of
    kind ``role`` (one of :data:`ROLES`), at ``width`` relative to ``base_width``.

    µP, Table 3 of Yang et al. (2022), :math:`m` = ``width / base_width``: SGD row
    :math:`(m, 1/m, 1)` for (input weights and hidden biases, output weights, hidden
    weights); Adam row :math:`(1, 1/m, 1/m)`; the output bias 1. With
    ``output_multiplier=True`` the output weights follow Table 8 instead: :math:`m` (SGD),
    1 (Adam). SP: 1 for every role.
    """
    _check(parametrization, optimizer)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of: {', '.join(ROLES)}")
    m = _ratio(width, base_width)
    if parametrization == "sp" or role == "output_bias":
        return 1.0
    if optimizer == "sgd":
        if role == "output":
            return m if output_multiplier else 1 / m
        return {"input": m, "bias": m, "hidden": 1.0}[role]
    if role == "output":
        return 1.0 if output_multiplier else 1 / m
    return {"input": 1.0, "bias": 1.0, "hidden": 1 / m}[role]


def init_variance_multiplier(role: str, width: int, base_width: int, *,
                             parametrization: str = "mup",
                             output_multiplier: bool = False) -> float:
    r"""The initial variance of a weight of kind ``role`` divided by SP's
    ``gain**2 / fan_in`` (biases start at zero in both parametrizations).

    µP, Table 3: :math:`1/m` for the output weights (variance :math:`\propto 1/n^2`), 1 for
    the others. Table 8 (``output_multiplier=True``): the output weights have the
    width-independent variance ``gain**2 / base_width``, that is :math:`m` times SP's.
    """
    _check(parametrization)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of: {', '.join(ROLES)}")
    m = _ratio(width, base_width)
    if parametrization == "sp" or role != "output":
        return 1.0
    return m if output_multiplier else 1 / m


class Multiplier(nn.Module):
    """A fixed scalar multiplier in the forward pass (no parameter): ``x * scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class MuMLP(nn.Sequential):
    """An MLP built by :func:`mlp`: ``[Linear -> activation] * depth -> Linear`` (in
    Table 8's form a :class:`Multiplier` before the last Linear). ``roles`` maps each
    parameter name to its kind (:data:`ROLES`); ``width``, ``base_width``,
    ``parametrization`` and ``output_multiplier`` record how it was built, for
    :func:`param_groups`."""

    roles: dict[str, str]
    width: int
    base_width: int
    parametrization: str
    output_multiplier: bool

    @property
    def layers(self) -> list[nn.Linear]:
        return [m for m in self.modules() if isinstance(m, nn.Linear)]


def mlp(in_dim: int, width: int, out_dim: int, depth: int = 2, *,
        parametrization: str = "mup", base_width: int = 64, activation="relu",
        gain: float | None = None, bias: bool = True, output_multiplier: bool = False,
        seed: int | None = None) -> MuMLP:
    r"""An MLP with ``depth`` hidden layers of ``width`` units in µP or SP.

    Weights are drawn from :math:`N(0, v\,\mathrm{gain}^2/\mathrm{fan\_in})` with the variance
    multiplier :math:`v` of :func:`init_variance_multiplier` (Table 3 of Yang et al., 2022:
    :math:`v = n_0/n` for the output weights in µP, else 1); biases start at zero.
    ``gain`` defaults to :math:`\sqrt 2` for ReLU (Kaiming) and 1 otherwise, for the input
    and hidden weights; the output weights use gain 1. With ``output_multiplier=True`` the
    output layer follows Table 8: variance ``1 / base_width`` and a forward multiplier
    ``base_width / width`` on its input (the bias is not scaled). At ``width == base_width`` both µP forms equal SP.
    """
    _check(parametrization)
    m = _ratio(width, base_width)
    for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("depth", depth)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if gain is None:
        gain = math.sqrt(2.0) if activation == "relu" else 1.0
    g = generator(seed) if seed is not None else None
    dims = [in_dim] + [width] * depth
    mods: list[nn.Module] = []
    roles: dict[str, str] = {}
    for k, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        idx = len(mods)
        mods.append(nn.Linear(i, o, bias=bias))
        roles[f"{idx}.weight"] = "input" if k == 0 else "hidden"
        if bias:
            roles[f"{idx}.bias"] = "bias"
        mods.append(_make_activation(activation))
    if output_multiplier and parametrization == "mup":
        # on the readout's input, as the mup package's MuReadout: the bias is not scaled
        mods.append(Multiplier(1 / m))
    idx = len(mods)
    mods.append(nn.Linear(width, out_dim, bias=bias))
    roles[f"{idx}.weight"] = "output"
    if bias:
        roles[f"{idx}.bias"] = "output_bias"
    model = MuMLP(*mods)
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = roles[name]
            if role in ("bias", "output_bias"):
                p.zero_()
                continue
            v = init_variance_multiplier(role, width, base_width,
                                         parametrization=parametrization,
                                         output_multiplier=output_multiplier)
            std = (1.0 if role == "output" else gain) * math.sqrt(v / p.shape[1])
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    model.roles = roles
    model.width, model.base_width = width, base_width
    model.parametrization = parametrization
    model.output_multiplier = bool(output_multiplier and parametrization == "mup")
    return model


def param_groups(model: MuMLP, lr, optimizer: str = "adam", *,
                 params: Sequence[torch.Tensor] | None = None, **options) -> list[dict]:
    r"""Parameter groups of ``model`` (built by :func:`mlp`) with the per-layer learning rate
    ``lr * lr_multiplier(role, ...)`` of :func:`lr_multiplier` (Table 3 of Yang et al.,
    2022, or Table 8 for a model built with ``output_multiplier=True``).

    ``optimizer`` names the family whose column applies: ``'adam'`` for Adam-like updates
    (Adam, AdamW, Lion, ...: the update's size does not scale with the gradient's),
    ``'sgd'`` for SGD-like ones. The groups go to any optimizer of
    :mod:`nnopt_utils.optim` or :mod:`torch.optim`; each also records its ``role`` and
    ``lr_multiplier``. ``lr`` may be a tensor of one value per stacked copy (with
    ``copies=N`` in ``options``, which are copied into every group); ``params``, a list of
    tensors in the order of ``model.named_parameters()``, replaces the model's own (for
    example the stacked copies :func:`nnopt_utils.train.sweep` hands to a factory; a grid
    ``lr`` of ``sweep`` is then the base rate :math:`\eta`, which every group gets times
    its multiplier). Groups with multiplier 1 come first.
    """
    if not isinstance(model, MuMLP):
        raise ValueError(f"model must be built by nnopt_utils.mup.mlp, got "
                         f"{type(model).__name__}")
    _check(model.parametrization, optimizer)
    names = [n for n, _ in model.named_parameters()]
    if params is None:
        params = [p for _, p in model.named_parameters()]
    params = list(params)
    if len(params) != len(names):
        raise ValueError(f"params must hold {len(names)} tensors (one per parameter of the "
                         f"model, in order), got {len(params)}")
    groups: dict[str, dict] = {}
    for name, p in zip(names, params):
        role = model.roles[name]
        if role not in groups:
            mult = lr_multiplier(role, model.width, model.base_width,
                                 parametrization=model.parametrization, optimizer=optimizer,
                                 output_multiplier=model.output_multiplier)
            groups[role] = {"params": [], "lr": lr * mult, "role": role,
                            "lr_multiplier": mult, **options}
        groups[role]["params"].append(p)
    return sorted(groups.values(), key=lambda g: g["lr_multiplier"] != 1.0)
