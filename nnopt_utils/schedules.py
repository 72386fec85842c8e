"""Learning-rate schedules as ``step -> multiplier`` functions, and the LR range test.

A schedule is a :class:`Schedule`: a callable that maps the step ``t = 0, 1, 2, ...`` to a
multiplier of the optimizer's base learning rate, so ``lr_t = lr * schedule(t)``. That is the
contract of :func:`nnopt_utils.fit` and :func:`nnopt_utils.sweep` (``schedule=...``).
Schedules compose:

* ``a * b`` multiplies two schedules pointwise (``a * 0.5`` scales one);
* :func:`warmup` puts a linear ramp in front of any schedule (Goyal et al., 2017);

and every constructor validates its arguments and states its formula in the docstring::

    sched = nu.schedules.warmup(nu.schedules.cosine(1000), steps=50)
    nu.fit(model, data, lr=0.5, steps=1050, schedule=sched)

:func:`lr_range_test` runs Smith's (2017) range test on a copy of a model: the learning rate
grows geometrically from ``lr_min`` to ``lr_max`` while the loss is recorded; the suggested
learning rate is where the smoothed loss falls fastest.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import optim as _optim

__all__ = [
    "Schedule",
    "constant",
    "step",
    "exponential",
    "inverse_time",
    "cosine",
    "linear",
    "warmup",
    "cyclical",
    "one_cycle",
    "sgdr",
    "SCHEDULES",
    "LRRangeResult",
    "lr_range_test",
]


# ---------------------------------------------------------------------------------------
# validation helpers

def _check_step(t) -> int:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise ValueError(f"step must be a non-negative int, got {t!r}")
    return int(t)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not v > 0 \
            or not math.isfinite(v):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def _in_range(name: str, v, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {v!r}")
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------------------
# the composable schedule

class Schedule:
    """A learning-rate multiplier ``t -> m(t)`` with a readable name.

    Calling it checks that ``t`` is a non-negative int. ``a * b`` is the pointwise product
    (``(a*b)(t) = a(t) b(t)``); a number ``c`` acts as the constant schedule ``c``.
    :meth:`values` evaluates the first ``n`` steps at once (for plots).
    """

    def __init__(self, fn: Callable[[int], float], name: str):
        if not callable(fn):
            raise ValueError(f"fn must be callable(step) -> float, got {type(fn).__name__}")
        self._fn = fn
        self.name = name

    def __call__(self, t: int) -> float:
        return float(self._fn(_check_step(t)))

    def values(self, n: int) -> np.ndarray:
        """The multipliers at steps ``0 .. n-1``."""
        n = _positive_int("n", n)
        return np.array([self(t) for t in range(n)])

    def __mul__(self, other) -> "Schedule":
        if isinstance(other, Schedule):
            return Schedule(lambda t: self._fn(t) * other._fn(t), f"{self.name} * {other.name}")
        if isinstance(other, (int, float)) and not isinstance(other, bool) and math.isfinite(other):
            return Schedule(lambda t: self._fn(t) * other, f"{other:g} * {self.name}")
        raise ValueError(f"can multiply a Schedule by a Schedule or a finite number, got "
                         f"{type(other).__name__}")

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Schedule({self.name})"


def constant(value: float = 1.0) -> Schedule:
    """``m(t) = value``: plain SGD with a fixed step."""
    value = _positive("value", value)
    return Schedule(lambda t: value, f"constant({value:g})")


def step(step_size: int, gamma: float = 0.1) -> Schedule:
    """Step decay: ``m(t) = gamma ** floor(t / step_size)`` (as ``torch.optim.lr_scheduler.StepLR``).

    The classic ImageNet recipe (He et al., 2016) divides the learning rate by 10 at fixed epochs.
    """
    step_size = _positive_int("step_size", step_size)
    gamma = _in_range("gamma", gamma, 0, 1, lo_open=True)
    return Schedule(lambda t: gamma ** (t // step_size), f"step({step_size}, {gamma:g})")


def exponential(gamma: float) -> Schedule:
    """Exponential decay: ``m(t) = gamma ** t`` with ``0 < gamma <= 1``."""
    gamma = _in_range("gamma", gamma, 0, 1, lo_open=True)
    return Schedule(lambda t: gamma**t, f"exponential({gamma:g})")


def inverse_time(t0: float, power: float = 1.0) -> Schedule:
    """Inverse-time decay: ``m(t) = (1 + t / t0) ** (-power)``.

    With ``power = 1`` and base learning rate ``lr`` this is the ``c / t`` step of Robbins and
    Monro (1951), ``lr_t = c / (t + t0)`` with ``c = lr * t0``: it satisfies
    ``sum lr_t = inf``, ``sum lr_t^2 < inf`` and gives SGD its ``O(1/t)`` rate on strongly
    convex problems (Bottou, Curtis and Nocedal, 2018). ``1/2 < power < 1`` are the slower
    decays that Polyak-Ruppert averaging pairs with (Moulines and Bach, 2011).
    """
    t0 = _positive("t0", t0)
    power = _in_range("power", power, 0, 1, lo_open=True)
    return Schedule(lambda t: (1.0 + t / t0) ** (-power), f"inverse_time({t0:g}, {power:g})")


def cosine(total_steps: int, min_mult: float = 0.0) -> Schedule:
    """Cosine annealing: ``m(t) = min + (1 - min) (1 + cos(pi t / T)) / 2`` for ``t <= T``,
    then ``min`` (Loshchilov and Hutter, 2017; ``CosineAnnealingLR`` in closed form)."""
    T = _positive_int("total_steps", total_steps)
    lo = _in_range("min_mult", min_mult, 0, 1)

    def fn(t: int) -> float:
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(t, T) / T))

    return Schedule(fn, f"cosine({T}, {lo:g})")


def linear(total_steps: int, end: float = 0.0) -> Schedule:
    """Linear decay: ``m(t) = 1 + (end - 1) min(t, T) / T``."""
    T = _positive_int("total_steps", total_steps)
    end = _in_range("end", end, 0, 1)
    return Schedule(lambda t: 1 + (end - 1) * min(t, T) / T, f"linear({T}, {end:g})")


def warmup(schedule: Schedule | Callable[[int], float] | None, steps: int,
           start: float = 0.0) -> Schedule:
    """Linear warmup in front of ``schedule`` (Goyal et al., 2017).

    ``m(t) = (start + (1 - start) t / w) * s(0)`` for ``t < w`` and ``m(t) = s(t - w)`` after,
    where ``w = steps``: the multiplier ramps linearly from ``start * s(0)`` to ``s(0)``, then
    ``schedule`` runs as if it started at step ``w``. ``schedule=None`` means constant 1.
    """
    w = _positive_int("steps", steps)
    start = _in_range("start", start, 0, 1)
    if schedule is None:
        schedule = constant(1.0)
    if not callable(schedule):
        raise ValueError(f"schedule must be a Schedule, a callable(step) or None, got "
                         f"{type(schedule).__name__}")
    inner = schedule if isinstance(schedule, Schedule) else Schedule(schedule, "custom")

    def fn(t: int) -> float:
        if t < w:
            return (start + (1 - start) * t / w) * inner(0)
        return inner(t - w)

    return Schedule(fn, f"warmup({w}) -> {inner.name}")


CYCLICAL_MODES = ("triangular", "triangular2", "exp_range")


def cyclical(step_size: int, low: float = 0.1, high: float = 1.0, mode: str = "triangular",
             gamma: float = 1.0) -> Schedule:
    """Cyclical learning rates (Smith, 2017), a triangle wave between ``low`` and ``high``.

    With half-period ``s = step_size``: ``cycle = floor(1 + t / (2 s))``,
    ``x = |t / s - 2 cycle + 1|`` and ``m(t) = low + (high - low) max(0, 1 - x) * scale``, where
    ``scale = 1`` (``triangular``), ``2 ** -(cycle - 1)`` (``triangular2``: the amplitude halves
    each cycle) or ``gamma ** t`` (``exp_range``). Same values as ``torch.optim.lr_scheduler.CyclicLR``
    with ``base_lr = low * lr`` and ``max_lr = high * lr``.
    """
    s = _positive_int("step_size", step_size)
    low = _positive("low", low)
    high = _positive("high", high)
    if high < low:
        raise ValueError(f"need low <= high, got low={low!r}, high={high!r}")
    if mode not in CYCLICAL_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(CYCLICAL_MODES)}")
    gamma = _in_range("gamma", gamma, 0, 1, lo_open=True)

    def fn(t: int) -> float:
        cycle = math.floor(1 + t / (2 * s))
        x = abs(t / s - 2 * cycle + 1)
        scale = {"triangular": 1.0, "triangular2": 2.0 ** -(cycle - 1),
                 "exp_range": gamma**t}[mode]
        return low + (high - low) * max(0.0, 1 - x) * scale

    return Schedule(fn, f"cyclical({s}, {low:g}, {high:g}, {mode})")


def one_cycle(total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4) -> Schedule:
    """The one-cycle policy (Smith and Topin, 2019), as ``torch.optim.lr_scheduler.OneCycleLR``.

    The multiplier of the peak learning rate rises from ``1/div`` to ``1`` by cosine over the
    first ``p = pct_start * T - 1`` steps, then falls by cosine to ``1/(div * final_div)`` at
    step ``T - 1``. The cosine ramp from ``a`` to ``b`` over ``k`` steps is
    ``b + (a - b)(1 + cos(pi t / k)) / 2``.
    """
    T = _positive_int("total_steps", total_steps)
    pct = _in_range("pct_start", pct_start, 0, 1, lo_open=True, hi_open=True)
    div = _positive("div_factor", div_factor)
    fdiv = _positive("final_div_factor", final_div_factor)
    start, peak, end = 1.0 / div, 1.0, 1.0 / (div * fdiv)
    up = float(pct * T) - 1
    down = T - 1 - up
    if up <= 0 or down <= 0:
        raise ValueError(f"total_steps={T} with pct_start={pct} leaves an empty phase; "
                         "use more steps")

    def cos_ramp(a: float, b: float, frac: float) -> float:
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * frac))

    def fn(t: int) -> float:
        if t <= up:
            return cos_ramp(start, peak, t / up)
        return cos_ramp(peak, end, min(t - up, down) / down)

    return Schedule(fn, f"one_cycle({T}, {pct:g})")


def sgdr(period: int, t_mult: int = 1, min_mult: float = 0.0) -> Schedule:
    """Cosine annealing with warm restarts, SGDR (Loshchilov and Hutter, 2017).

    Cycle ``i`` lasts ``T_i = period * t_mult**i`` steps; within it, at step ``t_cur``,
    ``m = min + (1 - min)(1 + cos(pi t_cur / T_i)) / 2``, and at the end of a cycle the
    multiplier jumps back to 1 (a restart). As ``CosineAnnealingWarmRestarts``.
    """
    T0 = _positive_int("period", period)
    t_mult = _positive_int("t_mult", t_mult)
    lo = _in_range("min_mult", min_mult, 0, 1)

    def fn(t: int) -> float:
        if t_mult == 1:
            t_cur, Ti = t % T0, T0
        else:
            i = int(math.floor(math.log(t / T0 * (t_mult - 1) + 1, t_mult)))
            start = T0 * (t_mult**i - 1) // (t_mult - 1)
            # guard against float rounding at cycle boundaries
            while start > t:
                i -= 1
                start = T0 * (t_mult**i - 1) // (t_mult - 1)
            while start + T0 * t_mult**i <= t:
                start += T0 * t_mult**i
                i += 1
            t_cur, Ti = t - start, T0 * t_mult**i
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t_cur / Ti))

    return Schedule(fn, f"sgdr({T0}, {t_mult}, {lo:g})")


#: name -> constructor, for sweeps over schedules
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant, "step": step, "exponential": exponential,
    "inverse_time": inverse_time, "cosine": cosine, "linear": linear,
    "cyclical": cyclical, "one_cycle": one_cycle, "sgdr": sgdr,
}


# ---------------------------------------------------------------------------------------
# the LR range test

@dataclass
class LRRangeResult:
    """Learning rates tried, the mini-batch losses, their smoothed version and a suggestion."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggested_lr: float
    diverged: bool


def lr_range_test(
    model: nn.Module,
    data,
    *,
    lr_min: float = 1e-4,
    lr_max: float = 10.0,
    steps: int = 100,
    batch_size: int | None = 64,
    loss="cross_entropy",
    optimizer: str | Callable = "sgd",
    momentum: float = 0.9,
    smoothing: float = 0.9,
    stop_factor: float = 4.0,
    seed: int = 0,
) -> LRRangeResult:
    """Smith's (2017) learning-rate range test.

    Trains a copy of ``model`` (the model itself is untouched) for ``steps`` mini-batch steps
    with ``lr_k = lr_min (lr_max / lr_min) ** (k / (steps - 1))`` and records the loss. The
    loss is smoothed by an exponential moving average with bias correction,
    ``s_k = (beta s_{k-1} + (1 - beta) l_k) / (1 - beta**(k+1))``; the test stops early once
    ``s_k > stop_factor * min_j s_j`` (divergence). The suggested learning rate is where the
    smoothed loss falls fastest per unit of ``log lr`` (the most negative ``d s / d log lr``, by
    central differences over 5% of the steps), looked for after the first 10% of the steps
    and before the minimum of ``s``: it never lies past that minimum (the window shrinks
    when the minimum comes early).

    ``optimizer``: ``'sgd'``, ``'momentum'``, ``'adam'`` or a ``factory(params, lr)``.
    """
    from .train import as_dataset, batches, resolve_loss

    lr_min = _positive("lr_min", lr_min)
    lr_max = _positive("lr_max", lr_max)
    if lr_max <= lr_min:
        raise ValueError(f"need lr_min < lr_max, got {lr_min!r}, {lr_max!r}")
    steps = _positive_int("steps", steps)
    if steps < 5:
        raise ValueError(f"steps must be >= 5 for a range test, got {steps}")
    smoothing = _in_range("smoothing", smoothing, 0, 1, hi_open=True)
    stop_factor = _positive("stop_factor", stop_factor)
    data = as_dataset(data)
    loss_fn = resolve_loss(loss)
    net = copy.deepcopy(model)
    params = list(net.parameters())
    if callable(optimizer):
        opt = optimizer(params, lr_min)
    elif optimizer == "sgd":
        opt = _optim.SGD(params, lr=lr_min)
    elif optimizer == "momentum":
        opt = _optim.SGD(params, lr=lr_min, momentum=momentum)
    elif optimizer == "adam":
        opt = _optim.Adam(params, lr=lr_min)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: sgd, momentum, adam "
                         "or pass a factory(params, lr)")
    ratio = lr_max / lr_min
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    net.train()
    for k, idx in enumerate(batches(len(data.X), batch_size, steps, seed=seed,
                                    device=data.X.device)):
        lr = lr_min * ratio ** (k / (steps - 1))
        for g in opt.param_groups:
            g["lr"] = lr
        xb, yb = (data.X, data.y) if idx is None else (data.X[idx], data.y[idx])
        opt.zero_grad(set_to_none=True)
        value = loss_fn(net(xb), yb)
        v = float(value.detach())
        if not math.isfinite(v):
            diverged = True
            break
        avg = smoothing * avg + (1 - smoothing) * v
        s = avg / (1 - smoothing ** (k + 1))
        lrs.append(lr)
        losses.append(v)
        smoothed.append(s)
        best = min(best, s)
        if s > stop_factor * best:
            diverged = True
            break
        value.backward()
        opt.step()
    lrs_a, sm = np.array(lrs), np.array(smoothed)
    if len(sm) < 3:
        raise ValueError(f"the loss diverged within {len(sm)} steps; lower lr_min (={lr_min})")
    suggested = _steepest_descent_lr(lrs_a, sm, steps)
    return LRRangeResult(lrs_a, np.array(losses), sm, suggested, diverged)


def _steepest_descent_lr(lrs: np.ndarray, sm: np.ndarray, steps: int) -> float:
    """The rate where the smoothed loss ``sm`` falls fastest per unit of ``log lr``, never
    past its minimum.

    Central differences over a window of ``w`` ~ 5% of the steps, ignoring the first
    ``skip`` ~ 10% (the moving average's transient), at steps ``k`` with
    ``skip + w <= k <= argmin(sm) - w``: both ends of every difference lie at or before the
    minimum. When the minimum comes early the window shrinks to fit; when it comes within
    the transient, the transient is used too; with no room at all (minimum at step 0 or 1)
    the rate at the minimum is returned.
    """
    stop = int(np.argmin(sm))
    log_lr = np.log(lrs)
    for skip in (max(1, steps // 10), 0):
        w = min(max(1, steps // 20), (stop - skip) // 2)
        if w >= 1:
            ks = np.arange(skip + w, stop - w + 1)
            slope = (sm[ks + w] - sm[ks - w]) / (log_lr[ks + w] - log_lr[ks - w])
            return float(lrs[ks[int(np.argmin(slope))]])
    return float(lrs[stop])
