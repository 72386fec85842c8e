"""Optimizers written from scratch, as ``torch.optim.Optimizer`` subclasses.

Each algorithm is short enough to read next to its paper. The base class :class:`Optimizer`
owns the loop over parameter groups, the per-parameter state and the closure; an algorithm
overrides two small methods::

    init_state(state, group, p)        # fill a fresh state dict for parameter p
    step_param(state, group, grad, p)  # update p in place, given its gradient

and a variant is its parent plus what differs: :class:`AMSGrad` is :class:`Adam` with a
running maximum of the second moment, :class:`AdamW` is :class:`Adam` with decoupled weight
decay, :class:`LAMB` is :class:`Adam` with a per-tensor trust ratio.

The classes take ``torch.optim``'s argument names and honour its contract (``param_groups``,
``state``, ``state_dict``/``load_state_dict``, closures, schedulers, argument checks), so they
plug into any training loop. Where ``torch.optim`` has the algorithm, the unit tests prove the
iterates are equal; where a convention differs from a library or a paper, the docstring says
so and a test pins the difference. We trade ``torch.optim``'s ``foreach``/``fused`` speed for
clarity, and win it back by vectorizing whole experiments: a parameter group with
``"copies": N`` holds N stacked models (:func:`torch.func.stack_module_state`), every float
hyperparameter may then be a tensor of N values, and per-tensor norms are taken per copy, so
:func:`nnopt_utils.train.sweep` trains N configurations with one optimizer step.

Papers: Polyak (1964), Nesterov (1983), Sutskever et al. (2013), Duchi et al. (2011),
Tieleman and Hinton (2012), Kingma and Ba (2015), Reddi et al. (2018), Loshchilov and Hutter
(2019), Luo et al. (2019), Bernstein et al. (2018), Chen et al. (2023), You et al. (2017, 2020),
Jordan et al. (2024).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

__all__ = [
    "Optimizer",
    "SGD",
    "AdaGrad",
    "RMSProp",
    "Adam",
    "AMSGrad",
    "AdamW",
    "AdaBound",
    "SignSGD",
    "Lion",
    "Muon",
    "newton_schulz",
    "LARS",
    "LAMB",
    "OPTIMIZERS",
]

Params = Iterable[torch.Tensor] | Iterable[dict]


# ---------------------------------------------------------------------------------------
# argument checks, worded like torch.optim's ("Invalid learning rate: -0.1")

def _require(ok: bool, what: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {what}: {value!r} (must be {allowed})")


def _values(v) -> list[float] | None:
    """A hyperparameter's values: ``[v]`` for a real number, the entries of a 0-d or 1-d
    real tensor (one per stacked copy), ``None`` for anything else."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)]
    if isinstance(v, torch.Tensor) and v.dim() <= 1 and v.numel() > 0 and (
            v.dtype.is_floating_point or v.dtype in (torch.int32, torch.int64)):
        return [float(x) for x in v.reshape(-1).tolist()]
    return None


def _check(what: str, value, ok: Callable[[float], bool], allowed: str) -> None:
    vals = _values(value)
    _require(vals is not None and all(ok(x) for x in vals), what, value,
             f"{allowed}, a number or a tensor of one value per copy")


def _check_lr(lr) -> None:
    _check("learning rate", lr, lambda x: x >= 0, "a number >= 0")


def _check_nonneg(what: str, value) -> None:
    _check(what, value, lambda x: x >= 0, ">= 0")


def _check_unit(what: str, value) -> None:
    _check(what, value, lambda x: 0 <= x < 1, "in [0, 1)")


def _check_betas(betas) -> None:
    _require(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", betas,
             "a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        _check(f"beta parameter at index {i}", b, lambda x: 0 <= x < 1, "in [0, 1)")


def _any(v) -> bool:
    """Whether a hyperparameter is non-zero for some copy (``if group['weight_decay']``)."""
    return bool((v != 0).any()) if isinstance(v, torch.Tensor) else bool(v)


# in-place updates that take a float (torch.optim's exact kernels) or a per-copy tensor
# already broadcast against the parameter (see Optimizer.hyper)

def _add_(x: torch.Tensor, y: torch.Tensor, a) -> torch.Tensor:
    """``x += a * y``."""
    return x.add_(y * a) if isinstance(a, torch.Tensor) else x.add_(y, alpha=a)


def _addcmul_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, a) -> torch.Tensor:
    """``x += a * y * z``."""
    return x.add_(y * z * a) if isinstance(a, torch.Tensor) else x.addcmul_(y, z, value=a)


def _addcdiv_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, a) -> torch.Tensor:
    """``x += a * y / z``."""
    return x.add_(y / z * a) if isinstance(a, torch.Tensor) else x.addcdiv_(y, z, value=a)


def _sqrt(v):
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


# ---------------------------------------------------------------------------------------
# the base class

class Optimizer(torch.optim.Optimizer):
    r"""Base class: the loop over parameter groups and parameters, state and closure.

    Subclasses implement :meth:`init_state` and :meth:`step_param`; ``step`` calls them for
    every parameter that has a gradient, under ``torch.no_grad()``. A complex parameter is
    handed to both as its real view (``torch.view_as_real``, shape ``(..., 2)``), as
    ``torch.optim`` does: the algorithms run on :math:`\mathbb{R}^{2n}`, so a squared gradient
    is :math:`(\mathrm{Re}\,g)^2` and :math:`(\mathrm{Im}\,g)^2` per coordinate, never the
    complex :math:`g^2`, and the state tensors are real.

    **Stacked copies.** A parameter group with ``"copies": N`` holds stacked parameters, a
    leading dimension of N independent copies of one model (as
    :func:`torch.func.stack_module_state` makes them). Every hyperparameter that takes a float
    then also takes a tensor of N values, one per copy, and per-tensor norms (LARS, LAMB) are
    taken per copy, so one step updates N models exactly as N separate optimizers would. With
    floats and no ``copies`` the arithmetic is the single-model one, unchanged.
    """

    def __init__(self, params: Params, defaults: dict) -> None:
        super().__init__(params, defaults)

    def hyper(self, group: dict, name: str, p: torch.Tensor):
        """Hyperparameter ``name`` of ``group`` ready to combine with ``p``: a float as it is,
        a per-copy tensor of N values reshaped to ``(N, 1, ..., 1)`` so it broadcasts over
        the stacked copies (a pair such as ``betas`` comes back as a pair)."""
        v = group[name]
        if isinstance(v, (tuple, list)):
            return tuple(self._broadcast(group, name, b, p) for b in v)
        return self._broadcast(group, name, v, p)

    @staticmethod
    def _broadcast(group: dict, name: str, v, p: torch.Tensor):
        if not isinstance(v, torch.Tensor):
            return v
        if v.numel() == 1 and group.get("copies") is None:
            return float(v)
        n = group.get("copies")
        if n is None or v.numel() != n or p.dim() == 0 or p.shape[0] != n:
            raise ValueError(f"per-copy {name} of shape {tuple(v.shape)} needs a parameter group "
                             f"of stacked copies with 'copies' equal to its length; got "
                             f"copies={n!r} and a parameter of shape {tuple(p.shape)}")
        return v.to(device=p.device, dtype=p.dtype).reshape(-1, *([1] * (p.dim() - 1)))

    def norm(self, group: dict, x: torch.Tensor) -> torch.Tensor:
        """The Frobenius norm of a parameter-shaped tensor: of the whole tensor, or per copy
        (shape ``(N, 1, ..., 1)``) in a group of stacked copies."""
        n = group.get("copies")
        if n is None:
            return x.norm()
        return x.reshape(n, -1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))

    def init_state(self, state: dict, group: dict, p: torch.Tensor) -> None:
        """Fill the (empty) state of parameter ``p``; called before its first update."""

    def step_param(self, state: dict, group: dict, grad: torch.Tensor, p: torch.Tensor) -> None:
        """Update ``p`` in place from its gradient ``grad`` (the algorithm's one step)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                x, grad = p, p.grad
                if torch.is_complex(p):
                    # C^n is R^{2n}: every algorithm sees (Re, Im) as two real coordinates, so
                    # squares are (Re g)^2 and (Im g)^2, never the complex g*g (as torch.optim)
                    x, grad = torch.view_as_real(p), torch.view_as_real(grad)
                if len(state) == 0:
                    self.init_state(state, group, x)
                self.step_param(state, group, grad, x)
        return loss


# ---------------------------------------------------------------------------------------
# SGD and its sign-based relative

class SGD(Optimizer):
    r"""Stochastic gradient descent with heavy-ball or Nesterov momentum (torch.optim.SGD).

    With :math:`d_t = g_t + \lambda x_t` (``weight_decay`` :math:`\lambda`)::

        b_t = d_t                         (first step)
        b_t = m b_{t-1} + (1 - tau) d_t   (momentum m, dampening tau)
        x_{t+1} = x_t - lr * b_t                   (heavy ball, Polyak 1964)
        x_{t+1} = x_t - lr * (d_t + m b_t)         (nesterov=True)

    With constant ``lr`` and ``dampening=0`` the heavy-ball form is exactly Polyak's
    :math:`x_{t+1} = x_t - \alpha g_t + m (x_t - x_{t-1})`, and the Nesterov form gives the
    lookahead points :math:`y_t` of Nesterov's (1983) method
    :math:`x_{t+1} = y_t - \alpha\nabla f(y_t),\ y_{t+1} = x_{t+1} + m(x_{t+1} - x_t)`
    (Sutskever et al., 2013). Note the convention: the buffer sums gradients, so the learning
    rate multiplies it; some texts use :math:`v_t = m v_{t-1} + \alpha g_t`, which is the same
    only while ``lr`` is constant.
    """

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        _check_lr(lr)
        _check_nonneg("momentum value", momentum)
        _check_nonneg("dampening value", dampening)
        _check_nonneg("weight_decay value", weight_decay)
        if nesterov and (min(_values(momentum)) <= 0 or _any(dampening)):
            raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening, "
                             f"got momentum={momentum!r}, dampening={dampening!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def direction(self, state: dict, group: dict, grad: torch.Tensor,
                  p: torch.Tensor) -> torch.Tensor:
        """The step direction: gradient, plus L2 decay, passed through the momentum buffer."""
        wd = self.hyper(group, "weight_decay", p)
        d = _add_(grad.clone(), p, wd) if _any(wd) else grad
        m = self.hyper(group, "momentum", p)
        if not _any(m):
            return d
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = d.clone()
        else:
            _add_(buf.mul_(m), d, 1 - self.hyper(group, "dampening", p))
        return _add_(d.clone(), buf, m) if group["nesterov"] else buf

    def step_param(self, state, group, grad, p):
        _add_(p, self.direction(state, group, grad, p), -self.hyper(group, "lr", p))


class SignSGD(SGD):
    r"""signSGD and Signum (Bernstein et al., 2018): SGD that steps along the sign.

    ``x_{t+1} = x_t - lr * sign(b_t)`` with ``b_t`` the :class:`SGD` momentum buffer
    (``momentum=0``: signSGD; ``momentum>0``: Signum). Signum's buffer
    :math:`m_t = \beta m_{t-1} + (1-\beta) g_t` (from :math:`m_0=0`) is a positive multiple
    of the undamped heavy-ball buffer, so its sign is the same. ``weight_decay`` is L2
    (added to the gradient before the sign).
    """

    def __init__(self, params: Params, lr: float = 1e-4, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        _check_unit("momentum value", momentum)
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def step_param(self, state, group, grad, p):
        _add_(p, self.direction(state, group, grad, p).sign(), -self.hyper(group, "lr", p))


# ---------------------------------------------------------------------------------------
# diagonal adaptive methods

class AdaGrad(Optimizer):
    r"""AdaGrad (Duchi et al., 2011), as torch.optim.Adagrad.

    ``s_t = s_{t-1} + g_t^2`` (from ``initial_accumulator_value``),
    ``x_{t+1} = x_t - lr_t g_t / (sqrt(s_t) + eps)`` with
    ``lr_t = lr / (1 + (t-1) lr_decay)``; ``g_t`` includes L2 ``weight_decay``.
    """

    def __init__(self, params: Params, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10) -> None:
        _check_lr(lr)
        _check_nonneg("lr_decay value", lr_decay)
        _check_nonneg("weight_decay value", weight_decay)
        _check_nonneg("initial_accumulator_value value", initial_accumulator_value)
        _check_nonneg("epsilon value", eps)
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps))

    def init_state(self, state, group, p):
        state["step"] = 0
        state["sum"] = torch.zeros_like(p).add_(
            self.hyper(group, "initial_accumulator_value", p))

    def step_param(self, state, group, grad, p):
        state["step"] += 1
        h = lambda name: self.hyper(group, name, p)  # noqa: E731
        if _any(h("weight_decay")):
            grad = _add_(grad.clone(), p, h("weight_decay"))
        lr = h("lr") / (1 + (state["step"] - 1) * h("lr_decay"))
        state["sum"].addcmul_(grad, grad)
        _addcdiv_(p, grad, state["sum"].sqrt().add_(h("eps")), -lr)


class RMSProp(Optimizer):
    r"""RMSProp (Tieleman and Hinton, 2012), as torch.optim.RMSprop.

    ``v_t = alpha v_{t-1} + (1-alpha) g_t^2``; denominator ``r_t = sqrt(v_t) + eps``, or with
    ``centered=True`` ``sqrt(v_t - gbar_t^2) + eps`` where ``gbar_t`` averages ``g`` alike.
    Without momentum ``x_{t+1} = x_t - lr g_t / r_t``; with momentum ``m``:
    ``b_t = m b_{t-1} + g_t / r_t`` and ``x_{t+1} = x_t - lr b_t``.
    """

    def __init__(self, params: Params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        _check_lr(lr)
        _check_unit("alpha value", alpha)
        _check_nonneg("epsilon value", eps)
        _check_nonneg("weight_decay value", weight_decay)
        _check_nonneg("momentum value", momentum)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered))

    def init_state(self, state, group, p):
        state["step"] = 0
        state["square_avg"] = torch.zeros_like(p)
        if _any(group["momentum"]):
            state["momentum_buffer"] = torch.zeros_like(p)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p)

    def step_param(self, state, group, grad, p):
        state["step"] += 1
        h = lambda name: self.hyper(group, name, p)  # noqa: E731
        if _any(h("weight_decay")):
            grad = _add_(grad.clone(), p, h("weight_decay"))
        a = h("alpha")
        v = _addcmul_(state["square_avg"].mul_(a), grad, grad, 1 - a)
        if group["centered"]:
            gbar = state["grad_avg"].lerp_(grad, 1 - a)
            v = v.addcmul(gbar, gbar, value=-1)
        denom = v.sqrt().add_(h("eps"))
        if "momentum_buffer" in state:
            buf = state["momentum_buffer"].mul_(h("momentum")).addcdiv_(grad, denom)
            _add_(p, buf, -h("lr"))
        else:
            _addcdiv_(p, grad, denom, -h("lr"))


def _adam_defaults(lr, betas, eps, weight_decay, **more) -> dict:
    """The checked hyperparameters shared by Adam and its variants, plus a variant's own."""
    _check_lr(lr)
    _check_betas(betas)
    _check_nonneg("epsilon value", eps)
    _check_nonneg("weight_decay value", weight_decay)
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **more)


class Adam(Optimizer):
    r"""Adam (Kingma and Ba, 2015), as torch.optim.Adam.

    With ``g_t`` including L2 ``weight_decay``::

        m_t = b1 m_{t-1} + (1-b1) g_t,      v_t = b2 v_{t-1} + (1-b2) g_t^2
        x_{t+1} = x_t - lr * m_hat / (sqrt(v_hat) + eps),
        m_hat = m_t / (1-b1^t),  v_hat = v_t / (1-b2^t)

    Variants override one method each: :meth:`regularize` (AdamW: decoupled decay),
    :meth:`update_moments` and :meth:`second_moment` (AMSGrad: running max),
    :meth:`update` (AdaBound: clipped step sizes; LAMB: trust ratio).
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, _adam_defaults(lr, betas, eps, weight_decay))

    def init_state(self, state, group, p):
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)

    def regularize(self, group: dict, grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """L2 regularization: the decay enters the gradient (and so the moments)."""
        wd = self.hyper(group, "weight_decay", p)
        return _add_(grad.clone(), p, wd) if _any(wd) else grad

    def update_moments(self, state: dict, group: dict, grad: torch.Tensor) -> None:
        """Exponential moving averages of the gradient and of its square."""
        b1, b2 = self.hyper(group, "betas", grad)
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - b1)
        _addcmul_(state["exp_avg_sq"].mul_(b2), grad, grad, 1 - b2)

    def second_moment(self, state: dict) -> torch.Tensor:
        """The second-moment estimate the step divides by."""
        return state["exp_avg_sq"]

    def direction(self, state: dict, group: dict) -> torch.Tensor:
        """``m_hat / (sqrt(v_hat) + eps)``, with bias-corrected moments."""
        v = self.second_moment(state)
        b1, b2 = self.hyper(group, "betas", v)
        t = state["step"]
        denom = (v.sqrt() / _sqrt(1 - b2**t)).add_(self.hyper(group, "eps", v))
        return state["exp_avg"] / (1 - b1**t) / denom

    def update(self, state: dict, group: dict, p: torch.Tensor) -> torch.Tensor:
        """What is subtracted from ``p``: ``lr * direction``."""
        return self.direction(state, group).mul_(self.hyper(group, "lr", p))

    def step_param(self, state, group, grad, p):
        grad = self.regularize(group, grad, p)
        self.update_moments(state, group, grad)
        p.sub_(self.update(state, group, p))


class AMSGrad(Adam):
    r"""AMSGrad (Reddi et al., 2018): Adam dividing by the running maximum of ``v``.

    ``v_max_t = max(v_max_{t-1}, v_t)`` and the step uses ``v_max_t`` in place of ``v_t``,
    so the effective per-coordinate step ``lr / sqrt(v_max)`` never increases; this repairs
    Adam's non-convergence on Reddi et al.'s counterexample.

    Convention: as ``torch.optim.Adam(amsgrad=True)`` (which it equals), the maximum is taken
    of the raw ``v_t`` and divided by the current bias correction ``1 - b2^t``. Reddi et al.'s
    Algorithm 2 uses no bias correction; the two differ only while ``b2^t`` is not small.
    """

    def init_state(self, state, group, p):
        super().init_state(state, group, p)
        state["max_exp_avg_sq"] = torch.zeros_like(p)

    def update_moments(self, state, group, grad):
        super().update_moments(state, group, grad)
        torch.maximum(state["max_exp_avg_sq"], state["exp_avg_sq"],
                      out=state["max_exp_avg_sq"])

    def second_moment(self, state):
        return state["max_exp_avg_sq"]


class AdamW(Adam):
    r"""AdamW (Loshchilov and Hutter, 2019): Adam with decoupled weight decay.

    Before the Adam step, ``x <- (1 - lr * weight_decay) x``; the decay never enters the
    moments, so it is not rescaled by ``1/sqrt(v)``. As torch.optim.AdamW, the decay is
    multiplied by ``lr`` (the paper writes ``eta_t * lambda`` with a separate schedule
    multiplier ``eta_t``). Default ``weight_decay=1e-2`` as torch.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def regularize(self, group, grad, p):
        p.mul_(1 - self.hyper(group, "lr", p) * self.hyper(group, "weight_decay", p))
        return grad


class AdaBound(Adam):
    r"""AdaBound (Luo et al., 2019): Adam whose per-coordinate step sizes are clipped.

    The step size ``lr sqrt(1-b2^t)/(1-b1^t) / (sqrt(v_t) + eps)`` is clipped to
    ``[eta_l(t), eta_u(t)]`` with ``eta_l = final_lr (1 - 1/(gamma t + 1))`` and
    ``eta_u = final_lr (1 + 1/(gamma t))``, then multiplies ``m_t``: early on it is Adam, in
    the limit SGD with step ``final_lr``. As the authors' code, ``final_lr`` follows the
    schedule: it is scaled by ``lr / initial_lr``. (The paper's Algorithm 2 also divides by
    ``sqrt(t)`` and has no bias correction; the released code, followed here, does neither.)
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 final_lr: float = 0.1, gamma: float = 1e-3, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        _check_nonneg("final learning rate", final_lr)
        _check("gamma value", gamma, lambda x: x > 0, "> 0")
        # Optimizer.__init__ directly: Adam's signature takes no extra hyperparameters
        Optimizer.__init__(self, params, _adam_defaults(lr, betas, eps, weight_decay,
                                                        final_lr=final_lr, gamma=gamma))

    def add_param_group(self, param_group: dict) -> None:
        """Add a group, remembering its starting ``lr`` as ``initial_lr`` (the reference
        ``final_lr`` is scaled against), as the constructor does for the first groups."""
        if "final_lr" in param_group:
            _check_nonneg("final learning rate", param_group["final_lr"])
        if "gamma" in param_group:
            _check("gamma value", param_group["gamma"], lambda x: x > 0, "> 0")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"].clone() if isinstance(group["lr"], torch.Tensor)
                         else group["lr"])

    def update(self, state, group, p):
        h = lambda name: self.hyper(group, name, p)  # noqa: E731
        b1, b2 = h("betas")
        t, lr, lr0 = state["step"], h("lr"), h("initial_lr")
        if isinstance(lr0, torch.Tensor):  # per copy: a zero initial lr gives final_lr 0
            final_lr = torch.where(lr0 != 0, h("final_lr") * lr / lr0, torch.zeros_like(lr0))
        else:
            final_lr = h("final_lr") * lr / lr0 if lr0 else 0.0
        lower = final_lr * (1 - 1 / (h("gamma") * t + 1))
        upper = final_lr * (1 + 1 / (h("gamma") * t))
        step_size = lr * _sqrt(1 - b2**t) / (1 - b1**t)
        rate = step_size / self.second_moment(state).sqrt().add_(h("eps"))
        if isinstance(lower, torch.Tensor) or isinstance(upper, torch.Tensor):
            lower, upper = torch.as_tensor(lower).to(rate), torch.as_tensor(upper).to(rate)
            return torch.minimum(torch.maximum(rate, lower), upper).mul_(state["exp_avg"])
        return rate.clamp_(lower, upper).mul_(state["exp_avg"])


class LAMB(Adam):
    r"""LAMB (You et al., 2020): Adam's direction with decoupled decay, scaled per tensor.

    With ``r_t = m_hat / (sqrt(v_hat) + eps)`` (bias-corrected, as :class:`Adam`) and
    ``u_t = r_t + weight_decay * x_t``::

        x_{t+1} = x_t - lr * (||x_t|| / ||u_t||) * u_t

    the norms taken over the whole parameter tensor (a layer's weight or bias); the trust
    ratio is 1 when either norm is 0 (so zero-initialized tensors still move). The paper's
    scaling function ``phi`` is the identity here.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def regularize(self, group, grad, p):
        return grad  # the decay is decoupled: it enters u_t in update()

    def update(self, state, group, p):
        u = _add_(self.direction(state, group), p, self.hyper(group, "weight_decay", p))
        w_norm, u_norm = self.norm(group, p), self.norm(group, u)
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        return u.mul_(ratio * self.hyper(group, "lr", p))


# ---------------------------------------------------------------------------------------
# large-batch momentum and sign-based discovery

class LARS(Optimizer):
    r"""LARS, layer-wise adaptive rate scaling (You et al., 2017, Algorithm 1).

    Per parameter tensor, with ``eta`` the ``trust_coefficient`` and ``beta`` the
    ``weight_decay``::

        local_lr = eta * ||w|| / (||g|| + beta ||w|| + eps)
        v_{t+1}  = momentum * v_t + lr * local_lr * (g + beta w)
        w_{t+1}  = w_t - v_{t+1}

    ``local_lr`` is 1 when ``||w||`` or ``||g||`` is 0 (as common implementations do, so
    zero-initialized biases still train). As in the paper the global ``lr`` sits inside the
    buffer; torch.optim.SGD puts it outside (equal while ``lr`` is constant).
    """

    def __init__(self, params: Params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8) -> None:
        _check_lr(lr)
        _check_nonneg("momentum value", momentum)
        _check_nonneg("weight_decay value", weight_decay)
        _check_nonneg("trust_coefficient value", trust_coefficient)
        _check_nonneg("epsilon value", eps)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    def init_state(self, state, group, p):
        state["momentum_buffer"] = torch.zeros_like(p)

    def step_param(self, state, group, grad, p):
        h = lambda name: self.hyper(group, name, p)  # noqa: E731
        wd = h("weight_decay")
        w_norm, g_norm = self.norm(group, p), self.norm(group, grad)
        local = h("trust_coefficient") * w_norm / (g_norm + wd * w_norm + h("eps"))
        local = torch.where((w_norm > 0) & (g_norm > 0), local, torch.ones_like(local))
        d = _add_(grad.clone(), p, wd) if _any(wd) else grad
        buf = state["momentum_buffer"].mul_(h("momentum")).add_(d * (local * h("lr")))
        p.sub_(buf)


class Lion(Optimizer):
    r"""Lion, evolved sign momentum (Chen et al., 2023, Program 1).

    ::

        c_t = b1 m_{t-1} + (1-b1) g_t
        x_{t+1} = x_t - lr (sign(c_t) + weight_decay x_t)      (decoupled decay)
        m_t = b2 m_{t-1} + (1-b2) g_t

    Two betas: the sign is taken of a fast interpolation (``b1``), the memory is slow (``b2``).
    """

    def __init__(self, params: Params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        _check_lr(lr)
        _check_betas(betas)
        _check_nonneg("weight_decay value", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def init_state(self, state, group, p):
        state["exp_avg"] = torch.zeros_like(p)

    def step_param(self, state, group, grad, p):
        b1, b2 = self.hyper(group, "betas", p)
        lr, wd = self.hyper(group, "lr", p), self.hyper(group, "weight_decay", p)
        m = state["exp_avg"]
        c = m.lerp(grad, 1 - b1)
        if _any(wd):
            p.mul_(1 - lr * wd)
        _add_(p, c.sign_(), -lr)
        m.lerp_(grad, 1 - b2)


# ---------------------------------------------------------------------------------------
# orthogonalized updates

#: the quintic Newton-Schulz coefficients of Jordan et al. (2024)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    r"""Approximate orthogonalization of ``G`` (``(..., m, n)``) by the quintic Newton-Schulz
    iteration of Muon (Jordan et al., 2024).

    With :math:`X_0 = G/(\lVert G\rVert_F + \epsilon)` (so every singular value is at most 1)
    and :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`,

    .. math:: X_{k+1} = a X_k + (b A_k + c A_k^2) X_k, \qquad A_k = X_k X_k^\top,

    which maps each singular value :math:`\sigma` of :math:`X_k` to
    :math:`p(\sigma) = a\sigma + b\sigma^3 + c\sigma^5` and keeps the singular vectors: the
    result approximates :math:`UV^\top` for :math:`G = USV^\top`. The coefficients trade
    exactness for speed: :math:`p'(0) = a` is large, so small singular values grow fast, and
    :math:`p` maps :math:`[0.68, 1.14]` into itself instead of converging to 1; after five steps
    every :math:`\sigma/\lVert G\rVert_F \ge 0.006` lands in that band. A tall ``G`` is
    iterated transposed, so that :math:`A_k` is the smaller Gram matrix. Leading dimensions
    are a batch (stacked copies). The reference implementation runs the iteration in
    bfloat16 on GPUs; this one keeps ``G``'s dtype.
    """
    if not isinstance(G, torch.Tensor) or G.dim() < 2:
        what = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(f"G must be a tensor of at least 2 dimensions (..., m, n), got {what}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    a, b, c = NS_COEFFICIENTS
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(AdamW):
    r"""Muon (Jordan et al., 2024): momentum, orthogonalized by Newton-Schulz, for matrices;
    :class:`AdamW` for every other parameter, as the reference implementation
    (``MuonWithAuxAdam``) does.

    For a weight matrix :math:`W \in \mathbb{R}^{m\times n}` with gradient :math:`G_t`::

        B_t = mu B_{t-1} + (1 - mu) G_t                    (momentum buffer, B_0 = 0)
        U_t = (1 - mu) G_t + mu B_t    (nesterov=True),  else  U_t = B_t
        W  <- (1 - lr * weight_decay) W - lr * sqrt(max(1, m/n)) * newton_schulz(U_t)

    :func:`newton_schulz` sets every singular value of the update near 1, so the step has the
    same size in every direction of the matrix, whatever the gradient's conditioning.

    A parameter is a matrix when it has 2 dimensions or more (one more in a group of stacked
    ``copies``, the first being the copy); a convolution's filters ``(out, in, *k)`` are
    flattened to ``(out, in * prod(k))``, and the scale :math:`\sqrt{\max(1, m/n)}` is that
    of the flattened matrix (the reference takes the ratio of the filters' last two
    dimensions, :math:`k_h/k_w`, which is 1 for square kernels; for 2-D weights the two
    agree). Every parameter group is split in two: its matrices
    take the Muon step with ``lr``, everything else (biases, gains) an AdamW step with
    ``adamw_lr``, ``betas``, ``eps`` and the same decoupled ``weight_decay``. So
    ``param_groups`` holds groups flagged ``use_muon`` True or False, each with its own
    ``lr``, and a learning-rate scheduler scales both. A group given with ``use_muon`` is not
    split: ``use_muon=False`` makes it an AdamW group whose ``lr``, if given, is the AdamW
    rate (the reference leaves embeddings and the output layer to AdamW this way).
    Defaults are the reference's: ``lr=0.02``, ``momentum=0.95``, ``nesterov=True``, five
    Newton-Schulz steps, and for AdamW ``adamw_lr=3e-4``, ``betas=(0.9, 0.95)``,
    ``eps=1e-10``.
    """

    def __init__(self, params: Params, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0,
                 adamw_lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-10) -> None:
        _check_lr(lr)
        _check_lr(adamw_lr)
        _check_unit("momentum value", momentum)
        _require(isinstance(ns_steps, int) and not isinstance(ns_steps, bool) and ns_steps >= 1,
                 "ns_steps", ns_steps, "a positive int")
        defaults = _adam_defaults(lr, betas, eps, weight_decay, adamw_lr=adamw_lr,
                                  momentum=momentum, nesterov=bool(nesterov),
                                  ns_steps=ns_steps, use_muon=None)
        Optimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group, split into its matrices (Muon) and the rest (AdamW); see above."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        use = param_group.get("use_muon")
        if use is None:
            lead = 1 if param_group.get("copies") is not None else 0
            parts = [(True, [p for p in params if p.dim() - lead >= 2]),
                     (False, [p for p in params if p.dim() - lead < 2])]
        else:
            parts = [(bool(use), params)]
        for use_muon, ps in parts:
            if not ps and len(parts) > 1:
                continue
            group = {**param_group, "params": ps, "use_muon": use_muon}
            if not use_muon and (use is None or "lr" not in param_group):
                group["lr"] = param_group.get("adamw_lr", self.defaults["adamw_lr"])
            super().add_param_group(group)

    def init_state(self, state, group, p):
        if group["use_muon"]:
            state["momentum_buffer"] = torch.zeros_like(p)
        else:
            super().init_state(state, group, p)

    def step_param(self, state, group, grad, p):
        if not group["use_muon"]:
            super().step_param(state, group, grad, p)  # AdamW
            return
        mu, lr = self.hyper(group, "momentum", p), self.hyper(group, "lr", p)
        buf = state["momentum_buffer"].lerp_(grad, 1 - mu)
        update = grad.lerp(buf, mu) if group["nesterov"] else buf
        lead = 1 if group.get("copies") is not None else 0
        matrix = update.reshape(*update.shape[: lead + 1], -1)  # filters: (out, in * k)
        rows, cols = matrix.shape[-2:]
        ortho = newton_schulz(matrix, group["ns_steps"]).reshape(p.shape)
        wd = self.hyper(group, "weight_decay", p)
        if _any(wd):
            p.mul_(1 - lr * wd)
        _add_(p, ortho, -lr * max(1.0, rows / cols) ** 0.5)


#: name -> class, for loops over all of them
OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.__name__.lower(): cls
    for cls in (SGD, AdaGrad, RMSProp, Adam, AMSGrad, AdamW, AdaBound, SignSGD, Lion, LARS, LAMB,
                Muon)
}
