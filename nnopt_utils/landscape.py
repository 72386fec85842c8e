"""The loss landscape seen through low-dimensional slices: the segment between two
networks (Goodfellow, Vinyals and Saxe, 2015) and 2-D surfaces along filter-normalized
random directions (Li et al., 2018).

Every slice is evaluated in one batched pass: the parameters of each point are built
inside a ``torch.func.vmap`` over the slice's coordinates and the model is run with
``torch.func.functional_call``, in chunks of points so that memory stays bounded. Models
are evaluated in eval mode with their own buffers; only parameters move along a slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import generator

__all__ = [
    "Slice",
    "interpolate",
    "filter_normalized_direction",
    "Surface",
    "surface",
    "grid_axis",
]

Direction = dict[str, torch.Tensor]


def _check_model(model, name: str = "model") -> dict[str, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} must be an nn.Module, got {type(model).__name__}")
    params = {n: p.detach() for n, p in model.named_parameters()}
    if not params:
        raise ValueError(f"{name} has no parameters")
    return params


def _check_data(data) -> tuple[torch.Tensor, torch.Tensor]:
    from .train import as_dataset

    ds = as_dataset(data)
    return ds.X, ds.y


def _check_chunk(chunk_size, n_data: int) -> int:
    if chunk_size is None:  # about 2^16 sample evaluations per chunk
        return max(1, 65536 // max(n_data, 1))
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be a positive int or None, got {chunk_size!r}"
        )
    return chunk_size


def _evaluate(
    model: nn.Module,
    point_params: Callable,
    coords: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    loss,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss and accuracy of ``model`` with parameters ``point_params(c)`` for every row
    ``c`` of ``coords``: one ``vmap`` over the rows, ``chunk_size`` rows at a time."""
    from torch.func import functional_call, vmap

    from .train import resolve_loss

    lossfn = resolve_loss(loss)
    classify = [y.dtype == torch.long]  # and (N, C) outputs: set on the first call

    def one(c: torch.Tensor):
        out = functional_call(model, point_params(c), (X,))
        classify[0] = classify[0] and out.dim() == 2
        acc = (
            (out.argmax(-1) == y).to(out.dtype).mean()
            if classify[0]
            else torch.zeros((), dtype=out.dtype)
        )
        return lossfn(out, y), acc

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses, accs = vmap(one, chunk_size=_check_chunk(chunk_size, len(X)))(
                coords
            )
    finally:  # the caller's mode is restored even when the forward pass raises
        model.train(was_training)
    return losses, (accs if classify[0] else None)


@dataclass
class Slice:
    """A 1-D slice: the coordinates ``alphas`` (n,), the ``loss`` (n,) at each, and the
    accuracy ``acc`` (n,) for classification (``None`` otherwise)."""

    alphas: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor | None


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    data,
    alphas=21,
    loss="cross_entropy",
    *,
    chunk_size: int | None = None,
) -> Slice:
    r"""Loss and accuracy along the line through two networks with the same architecture
    (Goodfellow, Vinyals and Saxe, 2015):
    :math:`\theta(\alpha) = (1 - \alpha)\,\theta_a + \alpha\,\theta_b`.

    ``alphas``: a 1-D tensor (or sequence) of coefficients, or a number ``n`` of equally
    spaced ones on ``[0, 1]`` (then ``alpha = i / (n - 1)``, so both ends are exact).
    Coefficients outside ``[0, 1]`` extrapolate. ``alpha = 0`` gives exactly ``theta_a``
    and ``alpha = 1`` exactly ``theta_b``. ``data``: a
    :class:`~nnopt_utils.data.Dataset` or an ``(X, y)`` pair; ``loss``: a name from
    :data:`nnopt_utils.train.LOSSES` or a callable. Every point is evaluated with
    ``model_a``'s buffers (BatchNorm statistics are not interpolated) in eval mode, all
    in one ``vmap`` (``chunk_size`` points at a time; by default about ``65536 /
    len(X)``).
    """
    pa, pb = _check_model(model_a, "model_a"), _check_model(model_b, "model_b")
    if list(pa) != list(pb) or any(pa[n].shape != pb[n].shape for n in pa):
        raise ValueError(
            "model_a and model_b must have the same parameter names and shapes; "
            f"got {[(n, tuple(p.shape)) for n, p in pa.items()]} and "
            f"{[(n, tuple(p.shape)) for n, p in pb.items()]}"
        )
    X, y = _check_data(data)
    dtype = next(iter(pa.values())).dtype
    if isinstance(alphas, bool):
        raise ValueError(
            f"alphas must be an int >= 2 or a 1-D sequence, got {alphas!r}"
        )
    if isinstance(alphas, int):
        if alphas < 2:
            raise ValueError(
                f"alphas must be an int >= 2 or a 1-D sequence, got {alphas!r}"
            )
        alphas = torch.arange(alphas, dtype=dtype) / (alphas - 1)
    alphas = torch.as_tensor(alphas, dtype=dtype).to(X.device)
    if alphas.dim() != 1 or len(alphas) == 0 or not torch.isfinite(alphas).all():
        raise ValueError(
            f"alphas must be a non-empty 1-D sequence of finite numbers, got "
            f"shape {tuple(alphas.shape)}"
        )

    def point(a: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: (1 - a) * pa[n] + a * pb[n] for n in pa}

    losses, accs = _evaluate(model_a, point, alphas, X, y, loss, chunk_size)
    return Slice(alphas, losses, accs)


FILTER_1D = ("zero", "copy")


def filter_normalized_direction(
    model: nn.Module, seed: int = 0, *, one_d: str = "zero"
) -> Direction:
    r"""A random direction with filter normalization (Li et al., 2018), as a dict of
    tensors keyed like ``model.named_parameters()``.

    Draw ``d`` with i.i.d. standard normal entries (one
    :func:`nnopt_utils.config.generator` ``(seed)``, parameters in order), then rescale
    each *filter* to the norm of the corresponding filter of the model: :math:`d_{i}
    \leftarrow d_{i} \|\theta_{i}\| / \|d_{i}\|`, where a filter is a row of a Linear
    weight (one output unit) or an output channel of a convolution kernel (the slice
    along the first dimension). A random direction is blind to the scale of each unit;
    this one moves each unit in proportion to its size, so that networks equal up to a
    rescaling (such as ``(alpha, 1/alpha)`` on two consecutive ReLU layers, Dinh et al.,
    2017) get the same surface from the same seed.

    Parameters with one dimension (biases, normalization scales and shifts) get a zero
    direction with ``one_d="zero"`` (the ``ignore='biasbn'`` option of Li et al.'s code:
    the surface moves only the filters), or the parameter itself with ``one_d="copy"``
    (the other option of their code).
    """
    params = _check_model(model)
    if one_d not in FILTER_1D:
        raise ValueError(
            f"unknown one_d {one_d!r}; choose one of: {', '.join(FILTER_1D)}"
        )
    gen = generator(seed)
    direction = {}
    for name, p in params.items():
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
        if p.dim() <= 1:
            d = torch.zeros_like(p) if one_d == "zero" else p.clone()
        else:
            dims = tuple(range(1, p.dim()))
            norm = torch.linalg.vector_norm
            d = d * (norm(p, dim=dims, keepdim=True) / norm(d, dim=dims, keepdim=True))
        direction[name] = d
    return direction


def grid_axis(n: int = 21, span: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """``n`` (odd) equally spaced coordinates on ``[-span, span]``, symmetric, with the
    middle one exactly 0: ``span * k / m`` for ``k = -m, ..., m``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n % 2 == 0:
        raise ValueError(
            f"n must be an odd positive int (so that 0 is on the grid), got {n!r}"
        )
    if (
        isinstance(span, bool)
        or not isinstance(span, (int, float))
        or not span > 0
        or not math.isfinite(span)
    ):
        raise ValueError(f"span must be a positive number, got {span!r}")
    m = (n - 1) // 2
    return span * torch.arange(-m, m + 1, dtype=dtype) / max(m, 1)


@dataclass
class Surface:
    """A 2-D slice: coordinates ``xs`` (n,) and ``ys`` (m,), ``loss[i, j]`` at
    ``theta + xs[i] d_1 + ys[j] d_2`` (``'ij'`` indexing), and ``acc`` likewise for
    classification (``None`` otherwise)."""

    xs: torch.Tensor
    ys: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor | None


def surface(
    model: nn.Module,
    data,
    directions: tuple[Direction, Direction],
    grid=21,
    loss="cross_entropy",
    *,
    chunk_size: int | None = None,
) -> Surface:
    r"""The loss (and accuracy) on the plane through the model spanned by two directions
    (Li et al., 2018): :math:`L(\theta + x\, d_1 + y\, d_2)` on a grid of ``(x, y)``.

    ``directions``: two dicts keyed like ``model.named_parameters()`` (for example from
    :func:`filter_normalized_direction` with two seeds). ``grid``: an odd number ``n``
    of points per axis (:func:`grid_axis` ``(n)``: ``[-1, 1]`` with 0 in the middle), a
    1-D tensor used for both axes, or a pair ``(xs, ys)``. At ``(0, 0)`` the parameters
    are exactly ``theta`` (``theta + 0 d``), so the centre of the grid is the model's
    own loss. All grid points are evaluated in one ``vmap`` over the points
    (``chunk_size`` at a time; by default about ``65536 / len(X)``), in eval mode.
    """
    params = _check_model(model)
    X, y = _check_data(data)
    dtype = next(iter(params.values())).dtype
    if not (
        isinstance(directions, (tuple, list))
        and len(directions) == 2
        and all(isinstance(d, dict) for d in directions)
    ):
        raise ValueError(
            f"directions must be a pair of dicts keyed like named_parameters(), "
            f"got {type(directions).__name__}"
        )
    for k, d in enumerate(directions):
        if set(d) != set(params) or any(d[n].shape != params[n].shape for n in params):
            raise ValueError(
                f"directions[{k}] must have the model's parameter names and "
                f"shapes {[(n, tuple(p.shape)) for n, p in params.items()]}"
            )
    d1, d2 = directions
    if isinstance(grid, int) and not isinstance(grid, bool):
        xs = ys = grid_axis(grid, dtype=dtype)
    elif isinstance(grid, torch.Tensor):
        xs = ys = grid
    elif isinstance(grid, (tuple, list)) and len(grid) == 2:
        xs, ys = (torch.as_tensor(g, dtype=dtype) for g in grid)
    else:
        raise ValueError(
            f"grid must be an odd int, a 1-D tensor or a pair (xs, ys), got {grid!r}"
        )
    xs, ys = xs.to(dtype).to(X.device), ys.to(dtype).to(X.device)
    for name, g in (("xs", xs), ("ys", ys)):
        if g.dim() != 1 or len(g) == 0 or not torch.isfinite(g).all():
            raise ValueError(
                f"grid {name} must be a non-empty 1-D tensor of finite numbers, "
                f"got shape {tuple(g.shape)}"
            )
    coords = torch.cartesian_prod(xs, ys).reshape(len(xs) * len(ys), 2)

    def point(c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: params[n] + c[0] * d1[n].to(params[n]) + c[1] * d2[n].to(params[n])
            for n in params
        }

    losses, accs = _evaluate(model, point, coords, X, y, loss, chunk_size)
    shape = (len(xs), len(ys))
    return Surface(
        xs, ys, losses.reshape(shape), None if accs is None else accs.reshape(shape)
    )
