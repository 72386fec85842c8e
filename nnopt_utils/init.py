"""Named initialization schemes (survey section 4.2).

For a weight matrix ``W`` of shape (fan_out, fan_in):

========================  ===============================================  ==========================
scheme                    distribution                                     reference
========================  ===============================================  ==========================
``normal``                N(0, std^2) -- the "naive" init, e.g. std=0.01
``lecun``                 N(0, gain^2 / fan_in)                            LeCun et al. (1998)
``xavier``                N(0, gain^2 * 2 / (fan_in + fan_out))            Glorot and Bengio (2010)
``kaiming``               N(0, gain^2 * 2 / fan_in)                        He et al. (2015)
``orthogonal``            gain * Haar-random (semi-)orthogonal matrix      Saxe et al. (2014)
``delta_orthogonal``      conv kernel zero except an orthogonal centre     Xiao et al. (2018)
``zero``                  all zeros                                        (last layers of branches)
``fixup``                 residual-network rule, see :func:`fixup_`        Zhang et al. (2019)
========================  ===============================================  ==========================

``initialize(model, scheme)`` applies a scheme to every ``Linear``/``Conv`` weight of a model
and sets biases to a constant. Sampling uses an explicit ``torch.Generator`` when ``seed`` is
given, so an initialization can be reproduced without touching the global generator.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from .config import generator

__all__ = ["SCHEMES", "init_tensor_", "initialize", "fixup_", "orthogonal_matrix"]

SCHEMES = ("normal", "lecun", "xavier", "kaiming", "orthogonal", "delta_orthogonal", "zero",
           "fixup")


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; choose one of: {', '.join(SCHEMES)}")


def _fans(w: torch.Tensor) -> tuple[int, int]:
    if w.dim() < 2:
        raise ValueError(f"weights need >= 2 dimensions, got shape {tuple(w.shape)}")
    receptive = w[0, 0].numel()
    return w.shape[1] * receptive, w.shape[0] * receptive


def orthogonal_matrix(rows: int, cols: int, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-random matrix with orthonormal rows (rows <= cols) or columns (rows >= cols)."""
    flip = rows < cols
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # makes the distribution Haar, not QR-biased
    q = q.T if flip else q
    return q.to(dtype)


@torch.no_grad()
def init_tensor_(
    w: torch.Tensor,
    scheme: str,
    *,
    std: float | None = None,
    gain: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill weight tensor ``w`` of shape ``(fan_out, fan_in, *kernel)`` in place with ``scheme``.

    ``fan_in = w.shape[1] * prod(kernel)``, ``fan_out = w.shape[0] * prod(kernel)``. Gaussian
    schemes draw ``N(0, v)`` with ``v = std^2`` (``normal``), ``gain^2 / fan_in`` (``lecun``,
    LeCun et al., 1998), ``2 gain^2 / (fan_in + fan_out)`` (``xavier``, Glorot and Bengio,
    2010) or ``2 gain^2 / fan_in`` (``kaiming``, He et al., 2015); ``orthogonal`` (Saxe et
    al., 2014) and ``delta_orthogonal`` (Xiao et al., 2018) are described in the module table.
    """
    _check_scheme(scheme)
    if scheme == "fixup":
        raise ValueError("init 'fixup' is a rule for whole residual networks; "
                         "use initialize(model, 'fixup') on a ResidualMLP")
    if not (isinstance(gain, (int, float)) and gain >= 0):
        raise ValueError(f"gain must be a non-negative number, got {gain!r}")
    if std is not None and scheme != "normal":
        raise ValueError(f"std is only used by init 'normal', got std={std!r} with {scheme!r}")
    fan_in, fan_out = _fans(w)
    if scheme == "zero":
        return w.zero_()
    if scheme in ("orthogonal", "delta_orthogonal"):
        q = orthogonal_matrix(w.shape[0], w.shape[1], generator=generator, dtype=w.dtype) * gain
        if w.dim() == 2:
            return w.copy_(q)
        if scheme == "orthogonal":  # flatten the kernel into the fan-in
            q = orthogonal_matrix(w.shape[0], fan_in, generator=generator, dtype=w.dtype) * gain
            return w.copy_(q.view_as(w))
        w.zero_()
        centre = tuple(k // 2 for k in w.shape[2:])
        w[(slice(None), slice(None)) + centre] = q
        return w
    variance = {
        "normal": (1.0 if std is None else std) ** 2,
        "lecun": gain**2 / fan_in,
        "xavier": gain**2 * 2.0 / (fan_in + fan_out),
        "kaiming": gain**2 * 2.0 / fan_in,
    }[scheme]
    sample = torch.randn(w.shape, generator=generator, dtype=w.dtype)
    return w.copy_(sample * math.sqrt(variance))


def _weighted(model: nn.Module):
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            yield m


@torch.no_grad()
def initialize(
    model: nn.Module,
    scheme: str,
    *,
    std: float | None = None,
    gain: float = 1.0,
    bias: float = 0.0,
    seed: int | None = None,
) -> nn.Module:
    """Apply ``scheme`` to every Linear/Conv weight of ``model``; set biases to ``bias``.

    Returns the model. ``seed`` makes the draw independent of the global generator.
    """
    _check_scheme(scheme)
    if scheme == "fixup":
        return fixup_(model, seed=seed)
    g = None if seed is None else generator(seed)
    for m in _weighted(model):
        init_tensor_(m.weight, scheme, std=std, gain=gain, generator=g)
        if m.bias is not None:
            m.bias.fill_(bias)
    return model


@torch.no_grad()
def fixup_(model: nn.Module, *, seed: int | None = None) -> nn.Module:
    """Fixup initialization (Zhang, Dauphin and Ma, 2019) of a :class:`ResidualMLP`.

    With ``L`` residual branches of ``m`` layers each: Kaiming-init every layer, rescale the
    branch layers except the last by ``L^(-1/(2m-2))``, and set the last layer of every branch
    and the network's output layer to zero. Biases are zero. The network is then the identity
    map on its residual stream at initialization, yet every weight receives gradient after the
    first step.
    """
    from .models import ResidualMLP

    if not isinstance(model, ResidualMLP):
        raise ValueError(f"init 'fixup' needs a ResidualMLP, got {type(model).__name__}")
    initialize(model, "kaiming", seed=seed)
    L, m = len(model.blocks), model.branch_depth
    factor = L ** (-1.0 / (2 * m - 2)) if m > 1 else 0.0
    for block in model.blocks:
        linears = [mod for mod in block.branch if isinstance(mod, nn.Linear)]
        for lin in linears[:-1]:
            lin.weight.mul_(factor)
        linears[-1].weight.zero_()
    model.head.weight.zero_()
    return model
