"""Training: one loop that returns a :class:`History`, and vectorized sweeps.

``fit`` is the loop every chapter uses: whole-dataset tensors, mini-batches drawn by index,
an optional learning-rate schedule, periodic evaluation, and divergence detection -- a run
whose loss becomes NaN or infinite stops and records the step instead of crashing.

``sweep`` trains N copies of a small model at once (over seeds and any hyperparameter grid):
one batched forward pass of all copies per step (batched matrix products for a plain MLP,
``torch.func.functional_call`` + ``vmap`` for any other model) and one backward pass, instead
of N Python-level runs, and one step of the same :mod:`nnopt_utils.optim` optimizer ``fit``
uses, on the stacked parameters with one hyperparameter value per copy. It gives the same
numbers as N separate runs (unit tests pin this for every optimizer).
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .config import progress_enabled
from .data import Dataset
from .config import generator
from . import optim as _optim

__all__ = ["History", "fit", "sweep", "SweepResult", "LOSSES", "OPTIMIZERS", "batches",
           "evaluate", "resolve_loss", "as_dataset"]


# ---------------------------------------------------------------------------------------
# losses

def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # half the squared error of a sample, averaged over samples: 1/(2n) sum_i ||f(x_i) - y_i||^2
    if out.shape != y.shape:
        # (n,) against (n, 1) is the same data; anything else would broadcast to a wrong loss
        # (an (n,) output minus (n, 1) targets is an (n, n) matrix)
        if [s for s in out.shape if s != 1] != [s for s in y.shape if s != 1]:
            raise ValueError(f"mse: output shape {tuple(out.shape)} does not match target shape "
                             f"{tuple(y.shape)}; they may differ only by dimensions of size 1")
        out = out.reshape(y.shape)
    if y.dim() <= 1:
        return 0.5 * (out - y).pow(2).mean()
    return 0.5 * (out - y).pow(2).flatten(1).sum(1).mean()


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": _mse,
    "cross_entropy": _cross_entropy,
}


def resolve_loss(loss) -> Callable:
    r"""Resolve ``loss``: a name from :data:`LOSSES` or a ``callable(output, target)``.

    ``'mse'`` is half the mean squared error, :math:`\frac{1}{2n}\sum_i \|f(x_i) - y_i\|^2`;
    output and targets must have the same shape up to dimensions of size 1 (an ``(n,)``
    output against ``(n, 1)`` targets is reshaped, an ``(n, 2)`` one raises).
    ``'cross_entropy'`` is :func:`torch.nn.functional.cross_entropy` (mean over samples).
    """
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)} "
                         "or pass a callable(output, target)")
    return LOSSES[loss]


def as_dataset(data) -> Dataset:
    """``data`` as a :class:`~nnopt_utils.data.Dataset`: a Dataset or an ``(X, y)`` pair."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return Dataset(*data)
    raise ValueError(f"data must be a Dataset or an (X, y) pair, got {type(data).__name__}")


# ---------------------------------------------------------------------------------------
# history

@dataclass
class History:
    """What a run recorded: one row per logged step, plus divergence information.

    ``history["loss"]`` is a column as a NumPy array; ``history.to_frame()`` a DataFrame.
    """

    rows: list[dict] = field(default_factory=list)
    diverged: bool = False
    diverged_at: int | None = None
    meta: dict = field(default_factory=dict)

    def log(self, **row) -> None:
        self.rows.append(row)

    def to_frame(self):
        import pandas as pd

        df = pd.DataFrame(self.rows)
        for k, v in self.meta.items():
            df[k] = v
        return df

    def __getitem__(self, key: str) -> np.ndarray:
        values = [r[key] for r in self.rows if key in r]
        if not values and not any(key in r for r in self.rows):
            known = sorted({k for r in self.rows for k in r})
            raise KeyError(f"no column {key!r}; recorded: {', '.join(known)}")
        return np.asarray(values, dtype=float)

    def last(self, key: str) -> float:
        col = self[key]
        return float(col[-1]) if len(col) else math.nan

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        status = f"diverged at step {self.diverged_at}" if self.diverged else "finite"
        return f"History({len(self.rows)} rows, {status})"


# ---------------------------------------------------------------------------------------
# batches and evaluation

SAMPLING = ("reshuffle", "replacement", "cyclic")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def batches(n: int, batch_size: int | None, steps: int, *, sampling: str = "reshuffle",
            seed: int = 0, device=None) -> Iterator[torch.Tensor | None]:
    """Yield ``steps`` index tensors into a dataset of size ``n``.

    ``reshuffle``: a fresh permutation each epoch (random reshuffling; an epoch is
    ``n // batch_size`` batches, so each epoch leaves out ``n % batch_size`` samples, different
    ones each time); ``replacement``: i.i.d. uniform indices; ``cyclic``: one fixed random
    order, read as an endless cycle (batch ``t`` holds positions ``tB, ..., tB + B - 1``
    modulo ``n``), so every sample is visited once every ``n`` samples even when ``B`` does
    not divide ``n``. With ``batch_size=None`` (or ``>= n`` without replacement, full batch)
    it yields ``None``. Integer arguments may be Python or NumPy integers.
    """
    if sampling not in SAMPLING:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of: {', '.join(SAMPLING)}")
    if not _is_int(n) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    n, steps = int(n), int(steps)
    if batch_size is None or batch_size >= n and sampling != "replacement":
        for _ in range(steps):
            yield None
        return
    batch_size = int(batch_size)
    g = generator(seed)
    if sampling == "replacement":
        for _ in range(steps):
            yield torch.randint(0, n, (batch_size,), generator=g).to(device)
        return
    order = torch.randperm(n, generator=g)
    if sampling == "cyclic":
        order_d, offsets = order.to(device), torch.arange(batch_size, device=device)
        for t in range(steps):
            yield order_d[(t * batch_size + offsets) % n]
        return
    per_epoch = n // batch_size
    t = 0
    while t < steps:
        if sampling == "reshuffle" and t > 0:
            order = torch.randperm(n, generator=g)
        order_d = order.to(device)
        for b in range(per_epoch):
            if t >= steps:
                return
            yield order_d[b * batch_size : (b + 1) * batch_size]
            t += 1


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss="cross_entropy") -> dict:
    """Loss (and accuracy for classification) of ``model`` on ``(X, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    try:
        out = model(X)
    finally:  # the caller's mode is restored even when the forward pass raises
        model.train(was_training)
    result = {"loss": float(resolve_loss(loss)(out, y))}
    if y.dtype == torch.long and out.dim() == 2:
        result["acc"] = float((out.argmax(1) == y).float().mean())
    return result


# ---------------------------------------------------------------------------------------
# the loop

#: optimizer names :func:`fit` and :func:`sweep` accept: every class of
#: :mod:`nnopt_utils.optim` by its lower-case name, plus ``momentum`` and ``nesterov`` (SGD
#: with heavy-ball or Nesterov momentum, 0.9 unless ``momentum`` is given)
OPTIMIZERS = ("sgd", "momentum", "nesterov",
              *[name for name in _optim.OPTIMIZERS if name != "sgd"])


def _optimizer_class(optimizer, momentum) -> tuple[type, dict]:
    """The :mod:`nnopt_utils.optim` class for a name, or a class, and the keyword arguments
    the name implies (``momentum``/``nesterov``)."""
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer, ({} if momentum is None else {"momentum": momentum})
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
                         " or pass an optimizer class, a torch.optim.Optimizer or a "
                         "factory(params)")
    if optimizer in ("momentum", "nesterov"):
        m = 0.9 if momentum is None else momentum
        nesterov = optimizer == "nesterov"  # Nesterov needs m > 0
        ok = isinstance(m, numbers.Real) and not isinstance(m, bool) and (
            0 < m < 1 if nesterov else 0 <= m < 1)
        if not ok:
            raise ValueError(f"momentum must lie in {'(0, 1)' if nesterov else '[0, 1)'} for "
                             f"optimizer {optimizer!r}, got {momentum!r}")
        return _optim.SGD, {"momentum": float(m), "nesterov": nesterov}
    cls = _optim.OPTIMIZERS[optimizer]
    if momentum is not None and momentum != 0:
        takers = [n for n, c in _optim.OPTIMIZERS.items()
                  if n != "sgd" and "momentum" in _hyperparameters(c)]
        if optimizer not in takers:
            raise ValueError(f"momentum={momentum!r} is used only by optimizer 'momentum' or "
                             f"'nesterov' (or {', '.join(takers)}), got optimizer {optimizer!r}")
        return cls, {"momentum": momentum}
    return cls, {}


def _hyperparameters(cls: type) -> list[str]:
    """The keyword hyperparameters of an optimizer class (its constructor's, less params)."""
    import inspect

    return [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")]


def _make_optimizer(optimizer, params, lr: float, momentum: float | None, weight_decay: float):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer) and not isinstance(optimizer, type):
        return optimizer(params)
    cls, kw = _optimizer_class(optimizer, momentum)
    return cls(params, lr=lr, weight_decay=weight_decay, **kw)


def fit(
    model: nn.Module,
    data,
    *,
    loss="cross_entropy",
    optimizer="sgd",
    lr: float = 0.1,
    steps: int = 100,
    batch_size: int | None = None,
    momentum: float | None = None,
    weight_decay: float = 0.0,
    schedule: Callable[[int], float] | None = None,
    sampling: str = "reshuffle",
    eval_every: int | None = None,
    clip: float | None = None,
    diverge_above: float = math.inf,
    seed: int = 0,
    record_grad_norm: bool = False,
    callback: Callable[[int, nn.Module, dict], None] | None = None,
    progress: bool | None = None,
) -> History:
    """Train ``model`` on ``data`` and return its :class:`History`.

    Parameters
    ----------
    data: a :class:`~nnopt_utils.data.Dataset` (its test split, if any, is evaluated) or an
        ``(X, y)`` pair of whole-dataset tensors.
    loss: ``'cross_entropy'``, ``'mse'`` (half mean squared error) or ``callable(out, y)``.
    optimizer: a name from :data:`OPTIMIZERS` (a class of :mod:`nnopt_utils.optim`), such a
        class, a ``torch.optim.Optimizer`` object (``torch.optim``'s own are accepted) or a
        ``factory(params)``; ``lr``, ``momentum`` and ``weight_decay`` apply to names and
        classes only.
    momentum: for ``'momentum'`` and ``'nesterov'`` (``None``: 0.9; ``0.0`` is honoured) and
        the optimizers that take one (``rmsprop``, ``signsgd``, ``lars``); any other
        optimizer name raises when it is given and non-zero.
    batch_size: ``None`` for full-batch gradient descent.
    schedule: ``step -> multiplier`` of every group's initial learning rate,
        ``lr_t = initial_lr * schedule(t)``. As ``torch.optim.lr_scheduler``, a group's
        ``initial_lr`` is its ``lr`` when first scheduled and is kept in the group, so an
        optimizer object reused for a second run starts again from it (the schedule does not
        compound).
    eval_every: evaluate on the whole training set (and test set) every so many steps, and
        at the last step; ``None`` logs only the mini-batch loss.
    diverge_above: a loss above this (or NaN/inf) marks the run as diverged and stops it.

    Each logged row holds ``step``, ``loss`` (mini-batch, before the update), ``lr``, and when
    evaluated ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``.
    """
    data = as_dataset(data)
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    steps = int(steps)
    if eval_every is not None and (not _is_int(eval_every) or eval_every <= 0):
        raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}")
    if isinstance(optimizer, str) and not (lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")
    loss_fn = resolve_loss(loss)
    opt = _make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    if schedule is not None:
        base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in opt.param_groups]
    history = History()
    X, y = data.X, data.y
    from tqdm.auto import tqdm

    show = progress_enabled() if progress is None else progress
    bar = tqdm(total=steps, disable=not show, leave=False)
    model.train()
    for t, idx in enumerate(batches(len(X), batch_size, steps, sampling=sampling, seed=seed,
                                    device=X.device)):
        if schedule is not None:
            mult = schedule(t)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * mult
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        value = loss_fn(model(xb), yb)
        row = {"step": t, "loss": float(value.detach()), "lr": opt.param_groups[0]["lr"]}
        if not math.isfinite(row["loss"]) or row["loss"] > diverge_above:
            history.diverged, history.diverged_at = True, t
            history.log(**row)
            break
        value.backward()
        if clip is not None or record_grad_norm:
            norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf)
            row["grad_norm"] = float(norm)
        if eval_every is not None and (t % eval_every == 0):
            row.update(_eval_row(model, data, loss))
        if callback is not None:
            callback(t, model, row)
        history.log(**row)
        opt.step()
        bar.update()
    else:
        # the last update can diverge too: non-finite parameters, or (when evaluating) a
        # non-finite loss at the final state; sweep applies the same two tests
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            history.diverged, history.diverged_at = True, steps
        if eval_every is not None:  # final state, after the last update
            row = {"step": steps, "lr": opt.param_groups[0]["lr"], **_eval_row(model, data, loss)}
            if not math.isfinite(row["train_loss"]):
                history.diverged, history.diverged_at = True, steps
            history.log(**row)
    bar.close()
    return history


def _eval_row(model, data: Dataset, loss) -> dict:
    row = {f"train_{k}": v for k, v in evaluate(model, data.X, data.y, loss).items()}
    if data.X_test is not None:
        row.update({f"test_{k}": v for k, v in evaluate(model, data.X_test, data.y_test,
                                                          loss).items()})
    return row


# ---------------------------------------------------------------------------------------
# vectorized sweeps

def _learning_rates(lr) -> list[float]:
    """``lr`` (a number, a NumPy/tensor scalar, or a sequence of them) as a list of floats."""
    values = lr.tolist() if isinstance(lr, (torch.Tensor, np.ndarray)) else lr
    if isinstance(values, numbers.Real):
        values = [values]
    ok = isinstance(values, (list, tuple)) and len(values) > 0 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values)
    if not ok:
        raise ValueError(f"lr must be positive and finite (a number or a sequence of numbers), "
                         f"got {lr!r}")
    return [float(v) for v in values]


@dataclass
class SweepResult:
    """The outcome of :func:`sweep` for N configurations.

    ``loss``: (N, steps) mini-batch losses before each update (NaN after divergence);
    ``eval_steps`` and ``train_loss``/``train_acc``/``test_loss``/``test_acc``: (N, E);
    ``diverged``: (N,) bool; ``diverged_at``: (N,) step or -1; ``params``: final stacked
    parameters, name -> (N, ...).
    """

    configs: list[dict]
    loss: torch.Tensor
    eval_steps: list[int]
    metrics: dict[str, torch.Tensor]
    diverged: torch.Tensor
    diverged_at: torch.Tensor
    params: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.configs)

    def final(self, metric: str = "train_loss") -> torch.Tensor:
        """(N,) last value of ``metric``: ``loss`` (the last mini-batch loss, before the last
        update) or an evaluated metric (at the final state, after the last update)."""
        if metric == "loss":
            if self.loss.shape[1] == 0:
                raise ValueError("no 'loss' was recorded: the sweep ran steps=0; evaluate "
                                 "the initial state with eval_every")
            return self.loss[:, -1]
        if metric not in self.metrics:
            if not self.metrics:
                raise ValueError(f"no metric {metric!r}: the sweep ran without eval_every, so "
                                 "only 'loss' was recorded; pass eval_every to evaluate")
            raise ValueError(f"unknown metric {metric!r}; choose one of: loss, "
                             f"{', '.join(self.metrics)}")
        return self.metrics[metric][:, -1]

    def grid(self, metric: str, rows: str, cols: str):
        """A pivot table (DataFrame) of :meth:`final` ``metric`` over two config keys
        (``seed``, ``lr`` or any key of the sweep's ``grid``); a diverged configuration shows
        as NaN, never as a missing cell."""
        import pandas as pd

        values = self.final(metric)
        for key in (rows, cols):
            if key not in self.configs[0]:
                raise ValueError(f"unknown config key {key!r}; choose one of: "
                                 f"{', '.join(self.configs[0])}")
        df = pd.DataFrame([{**cfg, metric: float(v)} for cfg, v in zip(self.configs, values)])
        return df.pivot_table(index=rows, columns=cols, values=metric, dropna=False)

    def to_frame(self, final_only: bool = False):
        import pandas as pd

        recs = []
        for i, cfg in enumerate(self.configs):
            steps = self.eval_steps[-1:] if final_only else self.eval_steps
            offset = len(self.eval_steps) - len(steps)
            for j, s in enumerate(steps):
                rec = {**cfg, "step": s, "diverged": bool(self.diverged[i]),
                       "diverged_at": int(self.diverged_at[i])}
                for k, v in self.metrics.items():
                    rec[k] = float(v[i, j + offset])
                recs.append(rec)
        return pd.DataFrame(recs)


def _sweep_optimizer(optimizer, momentum):
    """Class and implied keywords for :func:`sweep`; as before, ``momentum`` is ignored by an
    optimizer name without momentum (``'sgd'``, ``'adam'``, ...) and 0.9 by default."""
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError("sweep builds its optimizer for the stacked copies: pass a name, an "
                         "nnopt_utils.optim class or a factory(params), not an optimizer object")
    if callable(optimizer) and not isinstance(optimizer, type):
        return None, {}
    if isinstance(optimizer, str) and optimizer in OPTIMIZERS and optimizer not in (
            "momentum", "nesterov") and "momentum" not in _hyperparameters(
            _optim.OPTIMIZERS[optimizer]) or optimizer == "sgd":
        momentum = None
    return _optimizer_class(optimizer, momentum)


def _grid_values(key: str, values) -> list:
    """A grid entry as a list of plain Python values (numbers, or pairs for ``betas``)."""
    vals = values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else values
    if isinstance(vals, (numbers.Real, tuple)) and not isinstance(vals, bool):
        vals = [vals]
    if not isinstance(vals, list) or not vals:
        raise ValueError(f"grid[{key!r}] must be a non-empty sequence of values, got {values!r}")

    def real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    out = []
    for v in vals:
        if isinstance(v, (tuple, list)) and len(v) == 2 and all(real(b) for b in v):
            out.append(tuple(float(b) for b in v))
        elif real(v):
            out.append(float(v))
        else:
            raise ValueError(f"grid[{key!r}] holds {v!r}: each value must be a finite number"
                             f"{' or a pair of them' if key == 'betas' else ''}")
    return out


#: parameter-free modules that act entry by entry (the batched MLP path of sweep)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU,
                        nn.Softplus, nn.Hardtanh, nn.Identity)


def _stacked_loss(loss_fn: Callable) -> Callable:
    """``losses(out, y)``: the N per-copy losses of stacked outputs ``out`` (N, batch, ...)
    against shared targets ``y``; the library's cross-entropy runs as one call on the
    flattened batch, any other loss as a ``vmap``."""
    from torch.func import vmap

    general = vmap(loss_fn, in_dims=(0, None))
    if loss_fn is not _cross_entropy:
        return general

    def losses(out, y):
        if out.dim() != 3 or y.dim() != 1:
            return general(out, y)
        n = out.shape[0]
        per = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.repeat(n),
                                          reduction="none")
        return per.view(n, -1).mean(1)

    return losses


def _stacked_forward(base: nn.Module, params: dict[str, torch.Tensor]) -> Callable:
    """``forward(p, x)``: the outputs ``(N, batch, ...)`` of N stacked copies of ``base``.

    A plain MLP (``nn.Sequential`` of Linear layers and parameter-free element-wise
    activations, as :func:`~nnopt_utils.models.mlp` builds it without normalization) runs as
    batched matrix products, one ``baddbmm`` per layer; any other model as a ``vmap`` of
    :func:`torch.func.functional_call`.
    """
    from torch.func import functional_call, vmap

    from .models import _Elementwise

    plan, names = [], None
    # a subclass of nn.Sequential may override forward (a skip connection): not a plain MLP
    if isinstance(base, nn.Sequential) and type(base).forward is nn.Sequential.forward:
        names = []
        for name, m in base.named_children():
            if type(m) is nn.Linear:
                w, b = f"{name}.weight", (f"{name}.bias" if m.bias is not None else None)
                plan.append((w, b))
                names += [w] + ([b] if b else [])
            elif isinstance(m, (_Elementwise, *_ELEMENTWISE_MODULES)) and not any(
                    True for _ in m.parameters()):
                plan.append(m)
            else:
                plan = None
                break
    general = vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))
    if plan is None or names is None or sorted(names) != sorted(params):
        return general

    def forward(p, x):
        if x.dim() != 2:  # Linear layers act on the last dimension: leave that to vmap
            return general(p, x)
        h = x.expand(len(p[names[0]]), *x.shape)
        for step in plan:
            if isinstance(step, tuple):
                w, b = p[step[0]].transpose(1, 2), step[1]
                h = torch.bmm(h, w) if b is None else torch.baddbmm(p[b].unsqueeze(1), h, w)
            else:
                h = step(h)
        return h

    return forward


def sweep(
    build: Callable[[int], nn.Module],
    data,
    *,
    seeds: Sequence[int] = (0,),
    lr: float | Sequence[float] | None = None,
    grid: dict[str, Sequence] | None = None,
    steps: int = 100,
    loss="cross_entropy",
    optimizer="sgd",
    momentum: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    weight_decay: float = 0.0,
    masks: dict[str, torch.Tensor] | None = None,
    batch_size: int | None = None,
    sampling: str = "reshuffle",
    data_seed: int = 0,
    schedule: Callable[[int], float] | None = None,
    eval_every: int | None = None,
    device=None,
) -> SweepResult:
    r"""Train one model per configuration (seed :math:`\times` hyperparameter grid) in one
    vectorized run: :func:`fit` for N models at once.

    The N copies are stacked (:func:`torch.func.stack_module_state`). Each step is one
    batched forward pass of all copies (batched matrix products for a plain MLP, a ``vmap``
    of :func:`torch.func.functional_call` otherwise), one backward pass of the summed losses
    (copies share nothing, so it yields every copy's own gradient), and one step of an
    :mod:`nnopt_utils.optim` optimizer over the stacked parameters, whose hyperparameters
    are tensors of one value per copy where the grid varies them. So copy ``i`` follows the
    iterates of ``fit(build(seed_i), data, optimizer=..., seed=data_seed, **config_i)``:
    every copy sees the same mini-batches, and per-tensor norms (LARS, LAMB) are taken per
    copy.

    A copy whose loss or gradient turns NaN/inf is frozen and flagged; the others go on (an
    update that overflows shows as a non-finite loss at the next step, as in :func:`fit`, and
    the copy keeps the parameters that update left). The
    last update is checked as :func:`fit` checks it: a copy with non-finite parameters, or
    (with ``eval_every``) a non-finite final training loss, is flagged as diverged at step
    ``steps``. ``configs[i]`` holds copy ``i``'s ``seed``, ``lr`` and grid values.

    Parameters
    ----------
    build
        ``build(seed)`` returns a freshly initialized model (without buffers: no BatchNorm).
    seeds
        Crossed with the grid (seeds vary slowest).
    lr
        A positive number or a sequence of them (Python, NumPy or tensor), the same as
        ``grid={"lr": lr}``; default 0.1 when the grid has no ``lr``.
    grid
        Hyperparameter -> sequence of values, crossed in the order given, e.g.
        ``{"lr": [1e-3, 1e-2], "weight_decay": [0, 0.1], "betas": [(0.9, 0.99)]}``; the
        keys are the optimizer's numeric hyperparameters (``lr``, ``weight_decay``,
        ``momentum``, ``betas``, ``eps``, ...).
    optimizer
        As :func:`fit`: a name from :data:`OPTIMIZERS`, an :mod:`nnopt_utils.optim` class,
        or a ``factory(params)`` (it receives one parameter group with ``"copies": N``;
        grid values are then written into the first group of the optimizer it returns,
        except a grid ``lr`` when the groups carry an ``lr_multiplier``, as
        :func:`nnopt_utils.mup.param_groups` makes them: every group then gets that base
        rate times its multiplier).
    momentum, betas, eps, weight_decay
        Fixed hyperparameters (``momentum`` is used by ``'momentum'``/``'nesterov'``, 0.9
        by default, and by optimizers that take one; it is ignored by the others).
    masks
        Parameter name -> 0/1 (or bool) tensor of shape ``(N, *shape)`` or ``shape``:
        masked entries are set to zero, get zero gradient and stay exactly zero (pruning).
    schedule, sampling, batch_size, eval_every, data_seed
        As :func:`fit` (``data_seed`` is fit's ``seed``).

    """
    from torch.func import stack_module_state

    data = as_dataset(data)
    cls, fixed = _sweep_optimizer(optimizer, momentum)
    factory = optimizer if cls is None else None
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    steps = int(steps)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every <= 0):
        raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}")
    loss_fn = resolve_loss(loss)
    grid = dict(grid or {})
    if not isinstance(grid, dict):
        raise ValueError(f"grid must be a dict hyperparameter -> values, got {grid!r}")
    if lr is not None and "lr" in grid:
        raise ValueError("give the learning rates once: lr= or grid['lr'], not both")
    grid = {"lr": _learning_rates(0.1 if lr is None else lr) if "lr" not in grid else
            _learning_rates(grid["lr"]), **{k: v for k, v in grid.items() if k != "lr"}}
    # fixed hyperparameters, given explicitly, go to the optimizer when it takes them
    fixed = dict(fixed)
    if cls is not None:
        allowed = [n for n in _hyperparameters(cls) if n not in ("nesterov", "centered")]
        for name, value in (("weight_decay", weight_decay), ("betas", betas), ("eps", eps)):
            if value is None or (name == "weight_decay" and value == 0 and name not in allowed):
                continue
            if name not in allowed:
                raise ValueError(f"{name}={value!r} is not a hyperparameter of {cls.__name__}; "
                                 f"it takes: {', '.join(allowed)}")
            fixed[name] = value
    for key in grid:
        if cls is not None and key not in allowed:
            raise ValueError(f"unknown grid key {key!r} for {cls.__name__}; choose among: "
                             f"{', '.join(allowed)}")
        grid[key] = _grid_values(key, grid[key])
        if cls is not None:  # each value checked by the optimizer, so its error names it
            for v in grid[key]:
                try:
                    cls([torch.zeros(1)], **{**fixed, "lr": grid["lr"][0], key: v})
                except ValueError as e:
                    raise ValueError(f"grid[{key!r}] value {v!r}: {e}") from None
    configs = [{"seed": s, **dict(zip(grid, combo))}
               for s, combo in itertools.product(seeds, itertools.product(*grid.values()))]
    models = [build(c["seed"]) for c in configs]
    if any(True for _ in models[0].buffers()):
        names = [n for n, _ in models[0].named_buffers()]
        raise ValueError(f"sweep supports models without buffers; this one has {names}")
    device = device if device is not None else data.X.device
    models = [m.to(device) for m in models]
    params, _ = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = models[0]
    N = len(configs)
    dtype = next(iter(params.values())).dtype

    def bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (like.dim() - 1)))

    keep = None
    if masks is not None:
        unknown = sorted(set(masks) - set(params)) if isinstance(masks, dict) else masks
        if not isinstance(masks, dict) or unknown:
            raise ValueError(f"masks must map parameter names to tensors; unknown names: "
                             f"{unknown!r}; choose among: {', '.join(params)}")
        keep = {}
        for k, m in masks.items():
            m = torch.as_tensor(m, device=device)
            if tuple(m.shape) == tuple(params[k].shape[1:]):
                m = m.expand_as(params[k])
            if m.shape != params[k].shape:
                raise ValueError(f"mask {k!r} has shape {tuple(m.shape)}; expected "
                                 f"{tuple(params[k].shape)} or {tuple(params[k].shape[1:])}")
            keep[k] = m != 0
            params[k].masked_fill_(~keep[k], 0)

    # the grid's varying hyperparameters become per-copy tensors; constant ones stay floats
    hyper = {}
    for key, values in grid.items():
        col = [c[key] for c in configs]
        if all(v == col[0] for v in col):
            hyper[key] = col[0]
        elif key == "betas":
            hyper[key] = tuple(torch.tensor([v[i] for v in col], dtype=dtype, device=device)
                               for i in range(2))
        else:
            hyper[key] = torch.tensor(col, dtype=dtype, device=device)
    group = {"params": list(params.values()), "copies": N}
    if factory is None:
        opt = cls([group], **{**fixed, **hyper})
    else:
        opt = factory([group])
        g0 = opt.param_groups[0]
        for key, value in hyper.items():
            if key not in g0:
                raise ValueError(f"unknown grid key {key!r} for the factory's optimizer; "
                                 f"choose among: {', '.join(k for k in g0 if k != 'params')}")
            # groups with per-layer rates (nnopt_utils.mup.param_groups): the grid's lr is
            # the base rate, and every group gets it times its own multiplier
            scaled = key == "lr" and any("lr_multiplier" in g for g in opt.param_groups)
            for g in opt.param_groups if scaled else [g0]:
                g[key] = value * g.get("lr_multiplier", 1.0) if scaled else value
                if key == "lr" and "initial_lr" in g:
                    g["initial_lr"] = g[key]
    if schedule is not None:
        base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in opt.param_groups]

    forward_all = _stacked_forward(base, params)
    losses_all = _stacked_loss(loss_fn)
    for p in params.values():
        p.requires_grad_(True)

    def grad_value(p, xb, yb):
        # copies share nothing, so the gradient of the summed losses is every copy's own
        # gradient: one batched forward and one backward, cheaper than a vmap of grad
        value = losses_all(forward_all(p, xb), yb)
        g = torch.autograd.grad(value.sum(), list(p.values()))
        return dict(zip(p, g)), value.detach()

    alive = torch.ones(N, dtype=torch.bool, device=device)
    all_alive = True
    diverged_at = torch.full((N,), -1, dtype=torch.long)
    losses = torch.full((N, steps), math.nan, dtype=dtype)
    eval_steps: list[int] = []
    metrics: dict[str, list[torch.Tensor]] = {}

    def record_eval(t: int) -> None:
        eval_steps.append(t)
        splits = [("train", data.X, data.y)]
        if data.X_test is not None:
            splits.append(("test", data.X_test, data.y_test))
        with torch.no_grad():
            for name, Xs, ys in splits:
                out = forward_all(params, Xs)
                per = torch.stack([loss_fn(o, ys) for o in out])
                per = torch.where(alive, per, torch.full_like(per, math.nan))
                metrics.setdefault(f"{name}_loss", []).append(per.cpu())
                if ys.dtype == torch.long and out.dim() == 3:
                    acc = (out.argmax(-1) == ys).float().mean(1)
                    acc = torch.where(alive, acc, torch.full_like(acc, math.nan))
                    metrics.setdefault(f"{name}_acc", []).append(acc.cpu())

    X, y = data.X, data.y
    for t, idx in enumerate(batches(len(X), batch_size, steps, sampling=sampling, seed=data_seed,
                                    device=X.device)):
        if eval_every is not None and t % eval_every == 0:
            record_eval(t)
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        g, value = grad_value(params, xb, yb)
        finite = torch.isfinite(  # reshape, not flatten(1): 0-d parameters
            torch.cat([value.view(N, 1), *(v.reshape(N, -1) for v in g.values())], 1)).all(1)
        if all_alive and bool(finite.all()):
            losses[:, t] = value.cpu()
        else:
            newly = alive & ~finite
            diverged_at[newly.cpu()] = t
            alive = alive & finite
            all_alive = False
            losses[:, t] = torch.where(alive, value, torch.full_like(value, math.nan)).cpu()
        if schedule is not None:
            mult = schedule(t)
            for gr, b in zip(opt.param_groups, base_lrs):
                gr["lr"] = b * mult
        for k, p in params.items():
            gk = g[k]
            if not all_alive:  # frozen copies: no NaN enters the step (they are restored below)
                gk = torch.where(bc(alive, gk), gk, torch.zeros_like(gk))
            if keep is not None and k in keep:
                gk = gk.masked_fill(~keep[k], 0)
            p.grad = gk
        before = None if all_alive else [p.clone() for p in params.values()]
        opt.step()
        with torch.no_grad():
            if before is not None:
                for p, b in zip(params.values(), before):
                    p.copy_(torch.where(bc(alive, p), p, b))
            if keep is not None:
                for k, m in keep.items():
                    params[k].masked_fill_(~m, 0)
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    # the last update, as fit checks it: non-finite parameters, or a non-finite final loss
    finite = torch.stack([torch.isfinite(v.reshape(N, -1)).all(1) for v in params.values()]).all(0)
    if eval_every is not None:
        record_eval(steps)
        finite = finite & torch.isfinite(metrics["train_loss"][-1]).to(finite.device)
    newly = alive & ~finite
    diverged_at[newly.cpu()] = steps
    return SweepResult(
        configs=configs,
        loss=losses,
        eval_steps=eval_steps,
        metrics={k: torch.stack(v, 1) for k, v in metrics.items()},
        diverged=diverged_at >= 0,
        diverged_at=diverged_at,
        params=params,
    )
