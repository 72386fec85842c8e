r"""Pruning: magnitude masks, masks that stay applied during training, and iterative
magnitude pruning with rewinding -- the lottery-ticket procedure of Frankle and Carbin
(2019) and Frankle et al. (2020).

A *mask* is a dict ``parameter name -> 0/1 tensor`` (1 = kept). Masks act on the weights
of Linear and convolution layers; biases are not pruned unless asked. A mask may carry a
leading dimension of stacked copies (``stacked=True``), the layout of
:func:`nnopt_utils.train.sweep`, which trains N masked copies at once: that is how
:func:`imp` trains several seeds, and its controls, in one vectorized run.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import generator

__all__ = ["KINDS", "SCOPES", "prunable_names", "magnitude_masks", "random_masks",
           "Sparsity", "sparsity", "apply_masks", "remove_masks", "IMPResult", "imp",
           "CONTROLS"]

Masks = dict[str, torch.Tensor]

#: layer kinds whose weights can be pruned, and the module types behind each
KINDS: dict[str, tuple[type, ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
}

#: how :func:`magnitude_masks` ranks weights: all prunable weights together, or per layer
SCOPES = ("global", "layer")


# ---------------------------------------------------------------------------------------
# checks

def _check_kinds(kinds) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown layer kinds {bad or kinds!r}; choose among: "
                         f"{', '.join(KINDS)}")
    return kinds


def _check_fraction(name: str, v, *, upper_open: bool = True) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v and (
        v < 1 if upper_open else v <= 1)
    if not ok:
        raise ValueError(f"{name} must be a number in [0, {'1)' if upper_open else '1]'}, "
                         f"got {v!r}")
    return float(v)


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _tensors(source, names: Sequence[str] | None, kinds, bias: bool) -> Masks:
    """The tensors to prune: a module's prunable parameters (effective values, so an
    already masked model reports its zeros) or a dict's entries."""
    if isinstance(source, nn.Module):
        chosen = prunable_names(source, kinds, bias=bias) if names is None else list(names)
        params = _effective_params(source)
    elif isinstance(source, dict) and all(isinstance(v, torch.Tensor) for v in source.values()):
        params = source
        chosen = list(source) if names is None else list(names)
    else:
        raise ValueError(f"expected an nn.Module or a dict name -> tensor, got "
                         f"{type(source).__name__}")
    unknown = [n for n in chosen if n not in params]
    if unknown:
        raise ValueError(f"unknown parameter names {unknown}; choose among: "
                         f"{', '.join(params)}")
    if not chosen:
        raise ValueError("nothing to prune: no parameter was selected")
    return {n: params[n].detach() for n in chosen}


def _effective_params(model: nn.Module) -> Masks:
    """``name -> value`` for every parameter, masked ones (see :func:`apply_masks`) under
    their plain name and at their masked value."""
    out = {}
    for name, p in model.named_parameters():
        if ".parametrizations." in name:
            if not name.endswith(".original"):
                continue
            mod_name, _, rest = name.partition(".parametrizations.")
            attr = rest[: -len(".original")]
            module = model.get_submodule(mod_name) if mod_name else model
            name = f"{mod_name}.{attr}" if mod_name else attr
            p = getattr(module, attr)
        out[name] = p
    return out


def prunable_names(model: nn.Module, kinds: Sequence[str] = ("linear", "conv"), *,
                   bias: bool = False) -> list[str]:
    """Names (as in ``named_parameters()``) of the weights of ``model``'s layers of the
    given ``kinds`` (:data:`KINDS`: ``'linear'``, ``'conv'``), and their biases with
    ``bias=True``, in module order."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    types = tuple(t for k in _check_kinds(kinds) for t in KINDS[k])
    names = []
    for mod_name, m in model.named_modules():
        if isinstance(m, types):
            prefix = f"{mod_name}." if mod_name else ""
            names.append(prefix + "weight")
            if bias and getattr(m, "bias", None) is not None:
                names.append(prefix + "bias")
    return names


# ---------------------------------------------------------------------------------------
# masks

def _lowest(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Boolean (N, M): per row, True at the ``k`` smallest scores (ties: the lower index
    first)."""
    order = torch.sort(scores, dim=1, stable=True).indices
    k = torch.as_tensor(k, device=scores.device).reshape(-1, 1)
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    out = torch.zeros_like(scores, dtype=torch.bool)
    out.scatter_(1, order, ranks < k)
    return out


def magnitude_masks(source, amount: float, *, scope: str = "global",
                    previous: Masks | None = None, names: Sequence[str] | None = None,
                    kinds: Sequence[str] = ("linear", "conv"), bias: bool = False,
                    stacked: bool = False) -> Masks:
    r"""Magnitude pruning masks: remove the fraction ``amount`` of the still-unpruned
    weights with the smallest :math:`|w|` (Han et al., 2015; the pruning rule of Frankle and
    Carbin, 2019).

    With ``scope='global'`` all selected tensors are ranked together, so layers lose
    different fractions; with ``scope='layer'`` every tensor loses ``amount`` of its own
    unpruned weights. With ``previous`` masks, entries already pruned stay pruned and
    ``amount`` is a fraction of the survivors, so ``r`` rounds of ``amount = p`` leave
    :math:`(1 - p)^r` of the weights (up to rounding: :math:`\lfloor p\,n \rceil` of ``n``
    survivors are removed; ties go to the lower index).

    Parameters
    ----------
    source
        An ``nn.Module`` (its weights of layers of ``kinds``, biases with ``bias=True``, or
        the parameters ``names``), or a dict ``name -> tensor`` (every entry, or ``names``).
    stacked
        The tensors carry a leading dimension of N copies (as :func:`~nnopt_utils.train.sweep`
        stacks them): each copy is ranked on its own, and the masks are ``(N, *shape)``.

    Returns
    -------
    dict
        ``name -> 0/1 tensor`` in the tensors' dtype, 1 where a weight is kept.
    """
    _check_scope(scope)
    amount = _check_fraction("amount", amount)
    params = _tensors(source, names, kinds, bias)
    lead = next(iter(params.values())).shape[0] if stacked else 1
    flat = {n: (p.reshape(lead, -1) if stacked else p.reshape(1, -1)) for n, p in params.items()}
    alive = {}
    for n, f in flat.items():
        if previous is not None and n in previous:
            m = torch.as_tensor(previous[n], device=f.device)
            shape = tuple(params[n].shape)
            if tuple(m.shape) != shape and not (stacked and tuple(m.shape) == shape[1:]):
                raise ValueError(f"previous mask {n!r} has shape {tuple(m.shape)}; the tensor "
                                 f"has {shape}")
            alive[n] = (m != 0).reshape(-1, f.shape[1]).expand_as(f)
        else:
            alive[n] = torch.ones_like(f, dtype=torch.bool)
    masks = {}
    if scope == "layer":
        for n, f in flat.items():
            k = torch.round(amount * alive[n].sum(1))
            score = torch.where(alive[n], f.abs(), -math.inf)  # pruned ones rank first
            dead = ~alive[n] | _lowest(score, (~alive[n]).sum(1) + k)
            masks[n] = dead
    else:
        score = torch.cat([torch.where(alive[n], f.abs(), -math.inf) for n, f in flat.items()], 1)
        live = torch.cat(list(alive.values()), 1)
        k = torch.round(amount * live.sum(1))
        dead = ~live | _lowest(score, (~live).sum(1) + k)
        for n, part in zip(flat, torch.split(dead, [f.shape[1] for f in flat.values()], 1)):
            masks[n] = part
    return {n: (~masks[n]).to(params[n].dtype).reshape(params[n].shape) for n in params}


def random_masks(masks: Masks, seed: int = 0, *, stacked: bool = False) -> Masks:
    """Random masks with the same number of kept entries as ``masks`` in every tensor (and
    in every copy with ``stacked=True``), at uniformly random positions drawn from
    :func:`~nnopt_utils.config.generator` ``(seed)``: the random-pruning control of
    Frankle and Carbin (2019), with the layer-wise sparsity of the mask it imitates."""
    _check_masks(masks)
    gen = generator(seed)
    out = {}
    for n, m in masks.items():
        f = m.reshape(m.shape[0], -1) if stacked else m.reshape(1, -1)
        keep = (f != 0).sum(1)
        scores = torch.rand(f.shape, generator=gen, dtype=torch.float64).to(f.device)
        out[n] = (~_lowest(scores, f.shape[1] - keep)).to(m.dtype).reshape(m.shape)
    return out


def _check_masks(masks) -> None:
    if not isinstance(masks, dict) or not masks or not all(
            isinstance(v, torch.Tensor) for v in masks.values()):
        raise ValueError(f"masks must be a non-empty dict name -> tensor, got "
                         f"{type(masks).__name__}")


@dataclass
class Sparsity:
    """Fraction of zero entries: ``overall`` (over all counted tensors together) and
    ``per_layer`` (name -> fraction), with the counts ``zeros`` and ``total``."""

    overall: float
    per_layer: dict[str, float]
    zeros: int
    total: int


def sparsity(source, *, kinds: Sequence[str] = ("linear", "conv"),
             bias: bool = False) -> Sparsity:
    """The sparsity of a mask dict (zeros of every mask) or of a model (exact zeros of the
    weights of its layers of ``kinds``, and biases with ``bias=True``, at their masked
    values when :func:`apply_masks` was used).

    For stacked masks ``(N, *shape)`` the fractions are over all copies together.
    """
    if isinstance(source, nn.Module):
        tensors = _tensors(source, None, kinds, bias)
    else:
        _check_masks(source)
        tensors = source
    per, zeros, total = {}, 0, 0
    for n, t in tensors.items():
        z = int((t == 0).sum())
        per[n] = z / t.numel()
        zeros, total = zeros + z, total + t.numel()
    return Sparsity(zeros / total, per, zeros, total)


# ---------------------------------------------------------------------------------------
# masks in training

class _Mask(nn.Module):
    """The parametrization ``w -> w * mask``: the layer sees exactly zero where the mask is
    0, whatever an optimizer does to the stored tensor."""

    def __init__(self, mask: torch.Tensor, order: tuple[str, ...] = ()):
        super().__init__()
        self.register_buffer("mask", mask)
        self.order = order  # the module's parameter order, restored by remove_masks

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    r"""Apply ``masks`` to ``model`` in place so that pruned weights stay exactly zero through
    any training: each masked tensor becomes the parametrization :math:`w = v \odot m`
    (:mod:`torch.nn.utils.parametrize`), and the stored :math:`v` is zeroed where
    :math:`m = 0`.

    The forward pass sees :math:`v \odot m`, so the pruned entries are 0 whatever the
    optimizer does (weight decay, momentum, Adam's moments: the gradient of :math:`v` is 0
    there, and :math:`v` stays 0 under every update that maps zero gradient and zero
    weight to zero). Works with :func:`~nnopt_utils.train.fit` and any ``torch.optim``
    optimizer built after this call. ``module.weight`` still reads the masked weight;
    ``named_parameters()`` lists ``...parametrizations.weight.original``;
    :func:`remove_masks` bakes the masks in and restores plain parameters. A tensor already
    masked gets the product of its masks. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_masks(masks)
    params = _effective_params(model)
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"unknown parameter {name!r}; choose among: {', '.join(params)}")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}; the parameter has "
                             f"{tuple(params[name].shape)}")
    for name, m in masks.items():
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        mask = (m != 0).to(params[name].dtype).to(params[name].device)
        order = tuple(module._parameters) if not parametrize.is_parametrized(module, attr) \
            else ()
        parametrize.register_parametrization(module, attr, _Mask(mask, order))
        with torch.no_grad():
            module.parametrizations[attr].original.mul_(mask)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_masks`: every masked tensor becomes a plain parameter holding its
    masked value (pruned entries 0). Returns ``model``."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                order = [p.order for p in module.parametrizations[attr] if isinstance(p, _Mask)]
                if order:
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
                    rank = {n: i for i, n in enumerate(order[0])}
                    params = module._parameters
                    for n in sorted(params, key=lambda n: rank.get(n, len(rank))):
                        params[n] = params.pop(n)  # back in the order named_parameters() had
    return model


# ---------------------------------------------------------------------------------------
# iterative magnitude pruning

#: the controls :func:`imp` can train next to the tickets
CONTROLS = ("reinit", "random")


@dataclass
class IMPResult:
    """The outcome of :func:`imp` with S seeds and R rounds (round 0 is dense).

    ``sparsity``: (R + 1,) fraction of pruned weights, over the pruned tensors, at each
    round; ``masks``: per round, name -> ``(S, *shape)`` masks of the tickets; ``metrics``:
    variant (``'ticket'`` and each control) -> metric -> (R + 1, S) final values after
    retraining (``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` as the data
    has them); ``rewound``: name -> (S, ...) the parameters at the rewind step, the start of
    every retraining; ``seeds`` and ``rewind`` as given.
    """

    sparsity: torch.Tensor
    masks: list[Masks]
    metrics: dict[str, dict[str, torch.Tensor]]
    rewound: dict[str, torch.Tensor]
    seeds: list[int]
    rewind: int
    controls: list[str] = field(default_factory=list)

    def to_frame(self):
        """One row per (round, variant, seed): sparsity and every metric."""
        import pandas as pd

        rows = []
        for variant, metrics in self.metrics.items():
            for r in range(len(self.sparsity)):
                for i, s in enumerate(self.seeds):
                    rows.append({"round": r, "sparsity": float(self.sparsity[r]),
                                 "variant": variant, "seed": s,
                                 **{k: float(v[r, i]) for k, v in metrics.items()}})
        return pd.DataFrame(rows)


def _load(model: nn.Module, params: dict[str, torch.Tensor], i: int) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name][i])
    return model


def imp(build: Callable[[int], nn.Module], data, *, rounds: int, amount: float = 0.2,
        steps: int = 100, rewind: int = 0, seeds: Sequence[int] = (0,),
        scope: str = "global", kinds: Sequence[str] = ("linear", "conv"),
        bias: bool = False, controls: Sequence[str] = (), control_seed: int = 10_000,
        **train) -> IMPResult:
    r"""Iterative magnitude pruning with rewinding (Frankle and Carbin, 2019, "The lottery
    ticket hypothesis"; Frankle, Dziugaite, Roy and Carbin, 2020, "Linear mode connectivity
    and the lottery ticket hypothesis", for rewinding to step :math:`k > 0`).

    For each seed: train the dense network ``build(seed)`` for ``rewind`` steps to
    :math:`\theta_k` (nothing when ``rewind=0``: :math:`\theta_k = \theta_0`). Round 0
    trains :math:`\theta_k` for ``steps`` more steps with all weights; then each round
    :math:`r = 1, \dots,` ``rounds`` prunes the fraction ``amount`` of the surviving weights
    with the smallest magnitude after the last round's training (:func:`magnitude_masks`,
    ``scope``), resets the survivors to their values in :math:`\theta_k`, and trains
    ``steps`` steps with the mask held. After :math:`r` rounds a fraction
    :math:`1 - (1 - p)^r` is pruned. Every retraining starts a fresh optimizer at step
    :math:`k` (the dense round too, so all rounds are trained alike); a ``schedule`` is read
    from step :math:`k` on.

    All seeds, and the ``controls``, train together in one :func:`~nnopt_utils.train.sweep`
    per round, with the masks as its ``masks=``: ``'reinit'`` trains the ticket's mask from
    a fresh initialization ``build(control_seed + seed)`` (trained ``rewind`` steps when
    ``rewind > 0``); ``'random'`` trains a random mask with the ticket's layer-wise
    sparsity (:func:`random_masks`) from :math:`\theta_k`.

    Parameters
    ----------
    build
        ``build(seed)`` returns a freshly initialized model without buffers (as for
        :func:`~nnopt_utils.train.sweep`).
    rounds, amount
        Pruning rounds (>= 0) and the fraction of survivors pruned per round, in [0, 1).
    steps, rewind
        Training steps per round, and the rewind step :math:`k` (>= 0).
    seeds
        One ticket per seed, all trained together.
    scope
        ``'global'`` (all pruned tensors ranked together, as Frankle and Carbin for
        VGG-19 and ResNet-18) or ``'layer'`` (each tensor loses ``amount``, as they prune
        LeNet and the Conv-2/4/6 networks, there with the output layer at half the rate).
    controls, control_seed
        Controls trained next to the tickets, among :data:`CONTROLS`; the re-initialized
        control of seed ``s`` is ``build(control_seed + s)``, the random masks of round
        ``r`` come from seed ``control_seed + r``.
    kinds, bias
        Which tensors are pruned (:func:`prunable_names`): by default the weights of
        Linear and convolution layers, not the biases.
    train
        Passed to :func:`~nnopt_utils.train.sweep`: ``lr``, ``optimizer``, ``loss``,
        ``batch_size``, ``momentum``, ``weight_decay``, ``schedule``, ``data_seed``, ...
        (not ``seeds``, ``steps``, ``masks``, ``grid``, ``eval_every``).

    Returns
    -------
    IMPResult
        Sparsity, masks and final metrics of every round, variant and seed.
    """
    from .train import as_dataset, sweep

    for name, v in (("rounds", rounds), ("steps", steps), ("rewind", rewind)):
        if not _is_int(v) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    amount = _check_fraction("amount", amount)
    _check_scope(scope)
    seeds = list(seeds)
    if not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of non-negative ints, got {seeds!r}")
    controls = [controls] if isinstance(controls, str) else list(controls)
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise ValueError(f"unknown controls {bad}; choose among: {', '.join(CONTROLS)}")
    if len(set(controls)) < len(controls):
        raise ValueError(f"controls must not repeat, got {controls!r}")
    taken = sorted({"seeds", "steps", "masks", "grid", "eval_every"} & set(train))
    if taken:
        raise ValueError(f"imp sets {', '.join(taken)} itself; pass the others "
                         "(lr, optimizer, loss, batch_size, ...)")
    if "lr" in train and not isinstance(train["lr"], numbers.Real):
        raise ValueError(f"lr must be one number for imp, got {train['lr']!r}")
    data = as_dataset(data)
    template = build(seeds[0])
    names = prunable_names(template, kinds, bias=bias)
    if not names:
        raise ValueError(f"the model has no layer of kinds {list(kinds)} to prune")
    schedule = train.pop("schedule", None)

    def run(starts: list[dict[str, torch.Tensor]], n_steps: int, masks=None, offset=0):
        """Train the models with the given parameters (one per copy) together."""
        models = [_load(build(seeds[0]), _stack([s]), 0) for s in starts]
        shifted = None if schedule is None else (lambda t: schedule(t + offset))
        return sweep(lambda i: models[i], data, seeds=list(range(len(models))), steps=n_steps,
                     masks=masks, schedule=shifted, eval_every=max(n_steps, 1), **train)

    def split(params: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        n = len(next(iter(params.values())))
        return [{k: v[i] for k, v in params.items()} for i in range(n)]

    def dense_start(seed_list):
        starts = [{n: p.detach().clone() for n, p in build(s).named_parameters()}
                  for s in seed_list]
        if rewind > 0:
            starts = split(run(starts, rewind).params)
        return starts

    S = len(seeds)
    rewound = dense_start(seeds)
    reinit = dense_start([control_seed + s for s in seeds]) if "reinit" in controls else None
    variants = ["ticket", *controls]
    metrics: dict[str, dict[str, list]] = {v: {} for v in variants}
    masks_per_round: list[Masks] = []
    fractions = []
    mask = None
    for r in range(rounds + 1):
        if r > 0:
            final = {n: last.params[n][:S] for n in names}
            mask = magnitude_masks(final, amount, scope=scope, previous=mask, stacked=True)
        # the copies: the tickets, then each control in the order given (as ``variants``)
        starts, parts = list(rewound), [mask]
        for c in controls:
            starts += reinit if c == "reinit" else rewound
            if mask is not None:
                parts.append(mask if c == "reinit" else
                             random_masks(mask, seed=control_seed + r, stacked=True))
        stacked_masks = None if mask is None else {
            n: torch.cat([p[n] for p in parts]) for n in names}
        last = run(starts, steps, stacked_masks, offset=rewind)
        full = mask or {n: torch.ones_like(last.params[n][:S]) for n in names}
        masks_per_round.append({n: m.clone() for n, m in full.items()})
        fractions.append(sparsity(full).overall)
        for j, v in enumerate(variants):
            for key, values in last.metrics.items():
                metrics[v].setdefault(key, []).append(values[j * S:(j + 1) * S, -1])
    return IMPResult(
        sparsity=torch.tensor(fractions, dtype=torch.float64),
        masks=masks_per_round,
        metrics={v: {k: torch.stack(x) for k, x in m.items()} for v, m in metrics.items()},
        rewound=_stack(rewound),
        seeds=seeds,
        rewind=rewind,
        controls=controls,
    )


def _stack(params: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}
