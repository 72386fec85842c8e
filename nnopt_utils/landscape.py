"""The loss landscape seen through low-dimensional slices: the segment between two
networks (Goodfellow, Vinyals and Saxe, 2015) and 2-D surfaces along filter-normalized
random directions (Li et al., 2018); and mode connectivity: the loss barrier on the segment
(Entezari et al., 2022), trained Bezier curves that remove it (Garipov et al., 2018), and
permutation alignment of hidden units by weight matching (Ainsworth et al., 2023).

Every slice is evaluated in one batched pass: the parameters of each point are built
inside a ``torch.func.vmap`` over the slice's coordinates and the model is run with
``torch.func.functional_call``, in chunks of points so that memory stays bounded. Models
are evaluated in eval mode with their own buffers; only parameters move along a slice.
"""

from __future__ import annotations

import copy
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
    "Barrier",
    "barrier",
    "BARRIER_METRICS",
    "BezierCurve",
    "fit_bezier",
    "align",
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
    if chunk_size is None:  # about 2^13 sample evaluations per chunk: larger batches of
        return max(1, 8192 // max(n_data, 1))  # activations run slower on a CPU, not faster
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
    in one ``vmap`` (``chunk_size`` points at a time; by default about ``8192 /
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
    (``chunk_size`` at a time; by default about ``8192 / len(X)``), in eval mode.
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


# ---------------------------------------------------------------------------------------
# mode connectivity: barriers, Bezier curves, permutation alignment

BARRIER_METRICS = ("loss", "error")


@dataclass
class Barrier:
    """The barrier along a segment: ``alphas`` (n,), ``loss`` (n,) and ``acc`` (n,) or
    ``None`` at each point, the ``metric`` the barrier is measured on (``'loss'`` or
    ``'error'``), its ``values`` (n,), the ``excess`` (n,) of each value over the straight
    line between the endpoint values, the barrier ``height`` (the largest excess) and
    ``argmax``, the coefficient where it is reached."""

    alphas: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor | None
    metric: str
    values: torch.Tensor
    excess: torch.Tensor
    height: float
    argmax: float


def barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    data,
    alphas=21,
    loss="cross_entropy",
    *,
    metric: str = "loss",
    chunk_size: int | None = None,
) -> Barrier:
    r"""The loss barrier between two networks along the segment joining them, as defined by
    Entezari, Sedghi, Saukh and Neyshabur (2022):

    .. math:: B(\theta_a, \theta_b) = \max_{\alpha \in [0, 1]} \;
              L\big((1-\alpha)\theta_a + \alpha\theta_b\big)
              - \big((1-\alpha) L(\theta_a) + \alpha L(\theta_b)\big),

    the largest rise of the loss above the straight line between the endpoint losses,
    maximized over the grid ``alphas`` (an int ``n``: ``n`` equally spaced points on
    ``[0, 1]``; or a sequence, to which 0 and 1 are added when missing). ``metric='error'``
    measures the test error (1 - accuracy, classification only) instead: the "error
    barrier height" of Frankle, Dziugaite, Roy and Carbin (2020), who subtract the mean of
    the endpoint errors; against the straight line, as here, both agree when the endpoints
    have equal error. The segment is evaluated by :func:`interpolate` (one ``vmap``); the
    height is 0 when the curve stays below the line (the endpoints have zero excess).
    """
    if metric not in BARRIER_METRICS:
        raise ValueError(
            f"unknown metric {metric!r}; choose one of: {', '.join(BARRIER_METRICS)}"
        )
    if not (isinstance(alphas, int) and not isinstance(alphas, bool)):
        grid = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
        if not ((grid >= 0) & (grid <= 1)).all():
            raise ValueError(
                f"alphas of a barrier must lie in [0, 1], got {grid.tolist()}"
            )
        alphas = torch.unique(torch.cat([grid, torch.tensor([0.0, 1.0], dtype=grid.dtype)]))
    s = interpolate(model_a, model_b, data, alphas, loss, chunk_size=chunk_size)
    if metric == "error":
        if s.acc is None:
            raise ValueError(
                "metric='error' needs classification data (long targets, (N, C) outputs); "
                "use metric='loss'"
            )
        values = 1 - s.acc
    else:
        values = s.loss
    a = s.alphas
    first, last = int(torch.argmin(a)), int(torch.argmax(a))
    line = (1 - a) * values[first] + a * values[last]
    excess = values - line
    k = int(torch.argmax(excess))
    return Barrier(a, s.loss, s.acc, metric, values, excess, float(excess[k]), float(a[k]))


def _check_pair(model_a, model_b) -> tuple[dict, dict]:
    pa, pb = _check_model(model_a, "model_a"), _check_model(model_b, "model_b")
    if list(pa) != list(pb) or any(pa[n].shape != pb[n].shape for n in pa):
        raise ValueError(
            "model_a and model_b must have the same parameter names and shapes; "
            f"got {[(n, tuple(p.shape)) for n, p in pa.items()]} and "
            f"{[(n, tuple(p.shape)) for n, p in pb.items()]}"
        )
    return pa, pb


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


@dataclass
class BezierCurve:
    r"""A quadratic Bezier curve between two networks (Garipov et al., 2018):
    :math:`\phi(t) = (1-t)^2\,\theta_a + 2t(1-t)\,\theta_c + t^2\,\theta_b`, with the
    endpoints ``start`` and ``end``, the trained ``control`` point (dicts keyed like
    ``named_parameters()``), the ``model`` whose architecture and buffers evaluate it, and
    ``history``: the training loss at every step (mean over the step's ``t``)."""

    model: nn.Module
    start: Direction
    control: Direction
    end: Direction
    history: torch.Tensor

    def params(self, t) -> Direction:
        """The parameters :math:`\\phi(t)` for one coefficient ``t``."""
        t = torch.as_tensor(t, dtype=next(iter(self.start.values())).dtype)
        return {
            n: (1 - t) ** 2 * self.start[n] + 2 * t * (1 - t) * self.control[n]
            + t ** 2 * self.end[n]
            for n in self.start
        }

    def evaluate(self, data, ts=21, loss="cross_entropy", *,
                 chunk_size: int | None = None) -> Slice:
        """Loss and accuracy along the curve: a :class:`Slice` whose ``alphas`` are the
        curve coefficients ``ts`` (an int ``n``: ``n`` equally spaced on ``[0, 1]``, or a
        1-D sequence), evaluated in one ``vmap`` as :func:`interpolate` does."""
        X, y = _check_data(data)
        dtype = next(iter(self.start.values())).dtype
        if isinstance(ts, int) and not isinstance(ts, bool):
            if ts < 2:
                raise ValueError(f"ts must be an int >= 2 or a 1-D sequence, got {ts!r}")
            ts = torch.arange(ts, dtype=dtype) / (ts - 1)
        ts = torch.as_tensor(ts, dtype=dtype).to(X.device)
        if ts.dim() != 1 or len(ts) == 0 or not torch.isfinite(ts).all():
            raise ValueError(
                f"ts must be a non-empty 1-D sequence of finite numbers, got shape "
                f"{tuple(ts.shape)}"
            )
        losses, accs = _evaluate(self.model, self.params, ts, X, y, loss, chunk_size)
        return Slice(ts, losses, accs)

    def to_model(self, t) -> nn.Module:
        """A copy of :attr:`model` with the parameters :math:`\\phi(t)`."""
        import copy

        out = copy.deepcopy(self.model)
        point = self.params(t)
        with torch.no_grad():
            for n, p in out.named_parameters():
                p.copy_(point[n])
        return out


def fit_bezier(
    model_a: nn.Module,
    model_b: nn.Module,
    data,
    *,
    steps: int = 200,
    lr: float = 0.01,
    optimizer="adam",
    batch_size: int | None = None,
    ts_per_step: int = 1,
    loss="cross_entropy",
    seed: int = 0,
) -> BezierCurve:
    r"""Train the control point of a quadratic Bezier curve between two networks so that
    the loss stays low all along it (Garipov, Izmailov, Podoprikhin, Vetrov and Wilson,
    2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs"):

    .. math:: \phi_\theta(t) = (1-t)^2\,\theta_a + 2t(1-t)\,\theta + t^2\,\theta_b,\qquad
              \min_\theta\; \mathbb{E}_{t \sim U(0, 1)}\, L(\phi_\theta(t)).

    The endpoints stay fixed; the control point starts at the midpoint
    :math:`(\theta_a + \theta_b)/2` (the straight segment) and takes ``steps`` optimizer
    steps, each on a fresh sample of ``ts_per_step`` values of :math:`t \sim U(0, 1)` (their
    losses averaged, evaluated together by a ``vmap`` of
    :func:`torch.func.functional_call`) and a mini-batch of ``batch_size`` samples (``None``:
    the whole data set). ``optimizer``: a name from :data:`nnopt_utils.train.OPTIMIZERS`, a
    class or a ``factory(params)``, as for :func:`~nnopt_utils.train.fit`. The ``t`` values
    and batches come from :func:`~nnopt_utils.config.generator` ``(seed)``. The curve is
    evaluated with ``model_a``'s buffers in eval mode (BatchNorm statistics are not
    recomputed along the curve).

    Returns a :class:`BezierCurve`; its :meth:`~BezierCurve.evaluate` gives the loss along
    :math:`t`.
    """
    from torch.func import functional_call, vmap

    from .train import _make_optimizer, batches, resolve_loss

    pa, pb = _check_pair(model_a, model_b)
    X, y = _check_data(data)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    _check_positive_int("ts_per_step", ts_per_step)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not \
            math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            "optimizer must be a name, an optimizer class or a factory(params) -> "
            "Optimizer (the control point's parameters are made here), got an "
            f"instance of {type(optimizer).__name__}"
        )
    lossfn = resolve_loss(loss)
    dtype = next(iter(pa.values())).dtype
    pa = {n: p.clone() for n, p in pa.items()}  # the curve keeps its own endpoints
    pb = {n: p.clone() for n, p in pb.items()}
    control = {n: ((pa[n] + pb[n]) / 2).clone().requires_grad_(True) for n in pa}
    opt = _make_optimizer(optimizer, list(control.values()), lr, None, 0.0)
    gen = generator(seed)
    model = copy.deepcopy(model_a)

    def one(t, xb, yb):
        point = {
            n: (1 - t) ** 2 * pa[n] + 2 * t * (1 - t) * control[n] + t ** 2 * pb[n]
            for n in pa
        }
        return lossfn(functional_call(model, point, (xb,)), yb)

    batched = vmap(one, in_dims=(0, None, None))
    history = torch.empty(steps, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        for k, idx in enumerate(
            batches(len(X), batch_size, steps, seed=seed, device=X.device)
        ):
            xb, yb = (X, y) if idx is None else (X[idx], y[idx])
            ts = torch.rand(ts_per_step, generator=gen, dtype=dtype).to(X.device)
            value = batched(ts, xb, yb).mean()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            history[k] = value.detach()
    finally:
        model.train(was_training)
    return BezierCurve(
        model=model,
        start=dict(pa),
        control={n: c.detach() for n, c in control.items()},
        end=dict(pb),
        history=history,
    )


def _mlp_layers(model: nn.Module, name: str) -> list[str]:
    """The prefixes of the Linear layers of an MLP that weight matching can permute: an
    ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free elementwise activations."""
    from .models import _Elementwise
    from .train import _ELEMENTWISE_MODULES

    # a subclass of nn.Sequential may override forward (a skip connection): not an MLP
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise ValueError(
            f"{name}: align supports MLPs (an nn.Sequential of nn.Linear layers and "
            f"parameter-free elementwise activations), got {type(model).__name__}"
        )
    layers = []
    for child, m in model.named_children():
        if type(m) is nn.Linear:
            layers.append(child)
        elif isinstance(m, (_Elementwise, *_ELEMENTWISE_MODULES)) and not any(
            True for _ in m.parameters()
        ):
            continue
        else:
            raise ValueError(
                f"{name}: align supports nn.Linear layers and parameter-free elementwise "
                f"activations only; layer {child!r} is {type(m).__name__}, which it "
                "cannot permute (normalization layers, convolutions and other modules "
                "are not supported)"
            )
    if any(True for _ in model.buffers()):
        raise ValueError(f"{name}: align supports models without buffers")
    if len(layers) < 2:
        raise ValueError(f"{name}: align needs at least two Linear layers (one hidden layer)")
    return layers


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> nn.Module:
    r"""Permute the hidden units of ``model_b`` to match ``model_a`` by weight matching
    (Ainsworth, Hayase and Srinivasa, 2023, "Git Re-Basin", Algorithm 2), for MLPs.

    Permuting the units of a hidden layer (rows of its weight and bias, columns of the next
    weight) leaves the network's function unchanged. Weight matching looks for the
    permutations :math:`P_1, \dots, P_{L-1}` of the hidden layers that maximize

    .. math:: \sum_{l=1}^{L} \langle W_l^a,\; P_l W_l^b P_{l-1}^\top \rangle
              + \langle b_l^a,\; P_l b_l^b \rangle \qquad (P_0 = P_L = I),

    by coordinate ascent: with the others fixed, each :math:`P_l` is the solution of one
    linear assignment problem (:func:`scipy.optimize.linear_sum_assignment`) with the
    similarity :math:`W_l^a P_{l-1} W_l^{b\top} + b_l^a b_l^{b\top} + W_{l+1}^{a\top}
    P_{l+1} W_{l+1}^b`. Layers are visited in a random order (NumPy generator seeded from
    :func:`~nnopt_utils.config.derived_seed` ``(seed)``) in every sweep, until a sweep
    changes no permutation (or after ``max_iter`` sweeps).

    Only MLPs are supported: an ``nn.Sequential`` of ``nn.Linear`` layers and
    parameter-free elementwise activations (normalization layers, convolutions and other
    modules raise a ``ValueError`` naming them). Returns a permuted copy of ``model_b``
    (``model_b`` is untouched); it computes the same function as ``model_b``.
    """
    import copy

    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from .config import derived_seed

    pa, pb = _check_pair(model_a, model_b)
    layers = _mlp_layers(model_a, "model_a")
    _mlp_layers(model_b, "model_b")
    _check_positive_int("max_iter", max_iter)
    rng = np.random.default_rng(derived_seed(seed))
    Wa = [pa[f"{l}.weight"].double().cpu() for l in layers]
    Wb = [pb[f"{l}.weight"].double().cpu() for l in layers]
    ba = [pa.get(f"{l}.bias") for l in layers]
    bb = [pb.get(f"{l}.bias") for l in layers]
    ba = [None if b is None else b.double().cpu() for b in ba]
    bb = [None if b is None else b.double().cpu() for b in bb]
    L = len(layers)
    perms = [torch.arange(W.shape[0]) for W in Wb[:-1]]  # one per hidden layer

    def similarity(l: int) -> torch.Tensor:
        # hidden layer l (0-based) is the output of Linear l and the input of Linear l + 1
        inp = Wb[l] if l == 0 else Wb[l][:, perms[l - 1]]  # columns permuted by P_{l-1}
        S = Wa[l] @ inp.T
        if ba[l] is not None and bb[l] is not None:
            S = S + torch.outer(ba[l], bb[l])
        nxt = Wb[l + 1] if l + 1 == L - 1 else Wb[l + 1][perms[l + 1]]  # rows by P_{l+1}
        return S + Wa[l + 1].T @ nxt

    for _ in range(max_iter):
        changed = False
        for l in rng.permutation(L - 1):
            _, cols = linear_sum_assignment(similarity(int(l)).numpy(), maximize=True)
            cols = torch.as_tensor(cols)
            if not torch.equal(cols, perms[l]):
                perms[l], changed = cols, True
        if not changed:
            break
    out = copy.deepcopy(model_b)
    with torch.no_grad():
        for l, name in enumerate(layers):
            lin = out.get_submodule(name)
            W = lin.weight
            if l < L - 1:  # rows: this layer's units
                W.copy_(W[perms[l].to(W.device)])
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias[perms[l].to(W.device)])
            if l > 0:  # columns: the previous layer's units
                W.copy_(W[:, perms[l - 1].to(W.device)])
    return out
