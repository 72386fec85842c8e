"""nnopt_utils.optim: equality with torch.optim, transcriptions of the papers, conventions,
argument checks and state_dict round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nnopt_utils import optim as O

DT = torch.float64
STEPS = 100


def problem(seed: int = 0):
    """A random smooth non-quadratic problem with two parameter tensors (weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 6, generator=g, dtype=DT)
    y = torch.randn(32, 3, generator=g, dtype=DT)
    W0 = 0.5 * torch.randn(3, 6, generator=g, dtype=DT)
    b0 = 0.1 * torch.randn(3, generator=g, dtype=DT)

    def loss(W, b):
        return (torch.tanh(X @ W.T + b) - y).pow(2).mean() + 0.01 * W.pow(4).sum()

    return loss, W0, b0


def run(make, steps: int = STEPS, seed: int = 0, groups: bool = False):
    """Train with ``make(params)`` for ``steps`` steps; return the final parameters."""
    loss, W0, b0 = problem(seed)
    W, b = W0.clone().requires_grad_(), b0.clone().requires_grad_()
    params = [{"params": [W]}, {"params": [b], "lr": 0.003}] if groups else [W, b]
    opt = make(params)
    for _ in range(steps):
        opt.zero_grad()
        loss(W, b).backward()
        opt.step()
    return torch.cat([W.detach().flatten(), b.detach().flatten()])


def assert_same(make_ours, make_torch, groups: bool = False, tol: float = 1e-6, seed: int = 0):
    ours, ref = run(make_ours, seed=seed, groups=groups), run(make_torch, seed=seed, groups=groups)
    assert torch.isfinite(ref).all()
    assert (ours - ref).abs().max().item() < tol, (ours - ref).abs().max().item()
    # the runs moved: equality is not the trivial one of two optimizers that did nothing
    _, W0, b0 = problem(seed)
    assert (ref - torch.cat([W0.flatten(), b0])).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# equality with torch.optim (float64, 100 steps, 1e-6)

@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False),
                                                         (0.9, 0.5, False), (0.5, 0.0, True),
                                                         (0.99, 0.0, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_equals_torch(momentum, dampening, nesterov, weight_decay):
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov,
              weight_decay=weight_decay)
    assert_same(lambda p: O.SGD(p, **kw), lambda p: torch.optim.SGD(p, **kw))


@pytest.mark.parametrize("lr_decay", [0.0, 0.05])
@pytest.mark.parametrize("initial_accumulator_value", [0.0, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adagrad_equals_torch(lr_decay, initial_accumulator_value, weight_decay):
    kw = dict(lr=0.3, lr_decay=lr_decay, initial_accumulator_value=initial_accumulator_value,
              weight_decay=weight_decay)
    assert_same(lambda p: O.AdaGrad(p, **kw), lambda p: torch.optim.Adagrad(p, **kw))


@pytest.mark.parametrize("lr,alpha", [(1e-2, 0.9), (1e-3, 0.99)])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_rmsprop_equals_torch(lr, alpha, momentum, centered, weight_decay):
    kw = dict(lr=lr, alpha=alpha, momentum=momentum, centered=centered, weight_decay=weight_decay)
    assert_same(lambda p: O.RMSProp(p, **kw), lambda p: torch.optim.RMSprop(p, **kw))


ADAM_GRID = [dict(lr=lr, betas=betas, eps=eps, weight_decay=wd)
             for lr in (3e-2,) for betas in ((0.9, 0.999), (0.0, 0.5), (0.5, 0.9))
             for eps in (1e-8, 1e-3) for wd in (0.0, 0.1)]


@pytest.mark.parametrize("kw", ADAM_GRID, ids=str)
def test_adam_equals_torch(kw):
    assert_same(lambda p: O.Adam(p, **kw), lambda p: torch.optim.Adam(p, **kw))


@pytest.mark.parametrize("kw", ADAM_GRID, ids=str)
def test_amsgrad_equals_torch_adam_amsgrad(kw):
    assert_same(lambda p: O.AMSGrad(p, **kw), lambda p: torch.optim.Adam(p, amsgrad=True, **kw))


@pytest.mark.parametrize("kw", ADAM_GRID, ids=str)
def test_adamw_equals_torch(kw):
    assert_same(lambda p: O.AdamW(p, **kw), lambda p: torch.optim.AdamW(p, **kw))


def test_param_groups_with_their_own_lr():
    assert_same(lambda p: O.Adam(p, lr=0.02), lambda p: torch.optim.Adam(p, lr=0.02), groups=True)
    assert_same(lambda p: O.SGD(p, lr=0.1, momentum=0.9),
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), groups=True)


def test_amsgrad_differs_from_adam_and_keeps_a_running_max():
    a = run(lambda p: O.Adam(p, lr=0.03, betas=(0.5, 0.9)))
    b = run(lambda p: O.AMSGrad(p, lr=0.03, betas=(0.5, 0.9)))
    assert (a - b).abs().max() > 1e-4


def test_works_with_lr_scheduler():
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))  # noqa: E731
    results = []
    for cls in (O.Adam, torch.optim.Adam):
        loss, W0, b0 = problem()
        W, b = W0.clone().requires_grad_(), b0.clone().requires_grad_()
        opt = cls([W, b], lr=0.05)
        s = sched(opt)
        for _ in range(30):
            opt.zero_grad()
            loss(W, b).backward()
            opt.step()
            s.step()
        results.append(W.detach().clone())
    assert (results[0] - results[1]).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------
# conventions that differ from a paper or a library, pinned

def test_heavy_ball_is_polyaks_recursion():
    """torch-style buffer b = m b + g, x -= lr b  ==  x_{t+1} = x_t - a g_t + m (x_t - x_{t-1})."""
    loss, W0, b0 = problem()
    grad = lambda x: torch.func.grad(lambda v: loss(v[:18].view(3, 6), v[18:]))(x)  # noqa: E731
    x0 = torch.cat([W0.flatten(), b0])
    ours = run(lambda p: O.SGD(p, lr=0.05, momentum=0.8), steps=50)
    prev, x = x0.clone(), x0.clone()
    for _ in range(50):
        prev, x = x, x - 0.05 * grad(x) + 0.8 * (x - prev)
    assert (ours - x).abs().max() < 1e-10


def test_nesterov_iterates_are_nesterov_lookahead_points():
    """nesterov=True gives y_t of x_{t+1} = y_t - a grad(y_t), y_{t+1} = x_{t+1} + m(x_{t+1}-x_t)."""
    loss, W0, b0 = problem()
    grad = lambda x: torch.func.grad(lambda v: loss(v[:18].view(3, 6), v[18:]))(x)  # noqa: E731
    y = torch.cat([W0.flatten(), b0])
    x = y.clone()
    for _ in range(50):
        x_new = y - 0.05 * grad(y)
        y, x = x_new + 0.8 * (x_new - x), x_new
    ours = run(lambda p: O.SGD(p, lr=0.05, momentum=0.8, nesterov=True), steps=50)
    assert (ours - y).abs().max() < 1e-10


def test_amsgrad_bias_correction_convention():
    """Ours (= torch) bias-corrects; Reddi et al.'s Algorithm 2 does not. First step with b1=0:
    ours moves by lr*sign(g); the paper's by lr*(1-b1)/sqrt(1-b2)*sign(g)."""
    b2 = 0.1
    x = torch.tensor([0.0], dtype=DT, requires_grad=True)
    opt = O.AMSGrad([x], lr=0.01, betas=(0.0, b2), eps=0.0)
    x.grad = torch.tensor([3.0], dtype=DT)
    opt.step()
    assert math.isclose(x.item(), -0.01, rel_tol=1e-12)
    paper = -0.01 * 3.0 / math.sqrt((1 - b2) * 9.0)
    assert not math.isclose(x.item(), paper, rel_tol=1e-3)


def test_adamw_decay_is_decoupled_and_differs_from_adam_l2():
    a = run(lambda p: O.Adam(p, lr=0.01, weight_decay=0.5))
    w = run(lambda p: O.AdamW(p, lr=0.01, weight_decay=0.5))
    assert (a - w).abs().max() > 1e-3
    # with a zero gradient AdamW shrinks x by exactly (1 - lr wd) per step; Adam+L2 does not
    x = torch.ones(3, dtype=DT, requires_grad=True)
    opt = O.AdamW([x], lr=0.1, weight_decay=0.5)
    x.grad = torch.zeros(3, dtype=DT)
    opt.step()
    assert torch.allclose(x.detach(), torch.full((3,), 0.95, dtype=DT))


# ---------------------------------------------------------------------------------------
# transcriptions of the papers

def grads_of(seed=0):
    loss, W0, b0 = problem(seed)

    def grads(W, b):
        return torch.func.grad(loss, argnums=(0, 1))(W, b)

    return grads, W0, b0


@pytest.mark.parametrize("momentum,wd,eta", [(0.9, 0.0, 0.001), (0.9, 5e-4, 0.02), (0.0, 0.01, 0.1)])
def test_lars_equals_you_2017_algorithm_1(momentum, wd, eta):
    lr, eps = 2.0, 1e-8
    grads, W, b = grads_of()
    v = [torch.zeros_like(W), torch.zeros_like(b)]
    w = [W.clone(), b.clone()]
    for _ in range(STEPS):
        g = grads(*w)
        for i in range(2):
            local = eta * w[i].norm() / (g[i].norm() + wd * w[i].norm() + eps)
            v[i] = momentum * v[i] + lr * local * (g[i] + wd * w[i])
            w[i] = w[i] - v[i]
    ours = run(lambda p: O.LARS(p, lr=lr, momentum=momentum, weight_decay=wd,
                                trust_coefficient=eta, eps=eps))
    assert (ours - torch.cat([w[0].flatten(), w[1]])).abs().max() < 1e-10


@pytest.mark.parametrize("betas,wd", [((0.9, 0.999), 0.0), ((0.9, 0.999), 0.01), ((0.5, 0.9), 0.1)])
def test_lamb_equals_you_2020_algorithm_2(betas, wd):
    lr, eps = 0.01, 1e-6
    b1, b2 = betas
    grads, W, b = grads_of()
    w = [W.clone(), b.clone()]
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    for t in range(1, STEPS + 1):
        g = grads(*w)
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            r = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            u = r + wd * w[i]
            w[i] = w[i] - lr * w[i].norm() / u.norm() * u
    ours = run(lambda p: O.LAMB(p, lr=lr, betas=betas, eps=eps, weight_decay=wd))
    # float64 round-off (sqrt(v)/sqrt(1-b2^t) vs sqrt(v/(1-b2^t))) is amplified by the
    # per-tensor normalization over 100 steps to ~1e-8; an algorithmic difference is >1e-4
    assert (ours - torch.cat([w[0].flatten(), w[1]])).abs().max() < 1e-7


def test_lars_and_lamb_zero_norm_convention():
    """Trust ratio 1 when ||w|| = 0: a zero-initialized tensor still moves."""
    for make, expected in ((lambda p: O.LARS(p, lr=0.1, momentum=0.0), -0.1 * 2.0),
                           (lambda p: O.LAMB(p, lr=0.1), -0.1)):
        x = torch.zeros(4, dtype=DT, requires_grad=True)
        opt = make([x])
        x.grad = torch.full((4,), 2.0, dtype=DT)
        opt.step()
        assert torch.allclose(x.detach(), torch.full((4,), expected, dtype=DT), atol=1e-6)
    # zero gradient: LARS's ratio is 1 too, and nothing moves
    x = torch.ones(4, dtype=DT, requires_grad=True)
    opt = O.LARS([x], lr=0.1)
    x.grad = torch.zeros(4, dtype=DT)
    opt.step()
    assert torch.equal(x.detach(), torch.ones(4, dtype=DT))


def test_adabound_equals_the_authors_code():
    """Transcription of Luo et al.'s released AdaBound step (bias-corrected, clipped)."""
    lr, b1, b2, final_lr, gamma, eps = 0.01, 0.9, 0.999, 0.1, 1e-3, 1e-8
    grads, W, b = grads_of()
    w = [W.clone(), b.clone()]
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    for t in range(1, STEPS + 1):
        g = grads(*w)
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            lo, hi = final_lr * (1 - 1 / (gamma * t + 1)), final_lr * (1 + 1 / (gamma * t))
            w[i] = w[i] - (step / (v[i].sqrt() + eps)).clamp(lo, hi) * m[i]
    ours = run(lambda p: O.AdaBound(p, lr=lr, final_lr=final_lr, gamma=gamma))
    assert (ours - torch.cat([w[0].flatten(), w[1]])).abs().max() < 1e-10


def test_lion_equals_chen_2023_program_1():
    lr, b1, b2, wd = 1e-3, 0.9, 0.99, 0.1
    grads, W, b = grads_of()
    w = [W.clone(), b.clone()]
    m = [torch.zeros_like(t) for t in w]
    for _ in range(STEPS):
        g = grads(*w)
        for i in range(2):
            c = b1 * m[i] + (1 - b1) * g[i]
            w[i] = w[i] - lr * (torch.sign(c) + wd * w[i])
            m[i] = b2 * m[i] + (1 - b2) * g[i]
    ours = run(lambda p: O.Lion(p, lr=lr, betas=(b1, b2), weight_decay=wd))
    assert (ours - torch.cat([w[0].flatten(), w[1]])).abs().max() < 1e-10


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_signsgd_and_signum(momentum):
    """Bernstein et al.: x -= lr sign(m_t), m_t = b m_{t-1} + (1-b) g_t (m_0 = 0)."""
    lr = 1e-3
    grads, W, b = grads_of()
    w = [W.clone(), b.clone()]
    m = [torch.zeros_like(t) for t in w]
    for _ in range(STEPS):
        g = grads(*w)
        for i in range(2):
            m[i] = momentum * m[i] + (1 - momentum) * g[i]
            w[i] = w[i] - lr * torch.sign(m[i])
    ours = run(lambda p: O.SignSGD(p, lr=lr, momentum=momentum))
    assert (ours - torch.cat([w[0].flatten(), w[1]])).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------
# argument checks

BAD = [
    (lambda p: O.SGD(p, lr=-0.1), "Invalid learning rate: -0.1"),
    (lambda p: O.SGD(p, lr=0.1, momentum=-0.5), "Invalid momentum value: -0.5"),
    (lambda p: O.SGD(p, lr=0.1, weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    (lambda p: O.SGD(p, lr=0.1, nesterov=True), "Nesterov momentum requires"),
    (lambda p: O.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     "Nesterov momentum requires a momentum > 0 and zero dampening, got momentum=0.9, "
     "dampening=0.1"),
    (lambda p: O.AdaGrad(p, lr_decay=-0.01), "Invalid lr_decay value: -0.01"),
    (lambda p: O.AdaGrad(p, initial_accumulator_value=-1.0),
     "Invalid initial_accumulator_value value: -1.0"),
    (lambda p: O.RMSProp(p, alpha=1.5), "Invalid alpha value: 1.5"),
    (lambda p: O.Adam(p, betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (lambda p: O.Adam(p, betas=(-0.1, 0.9)), "Invalid beta parameter at index 0: -0.1"),
    (lambda p: O.Adam(p, eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (lambda p: O.AdamW(p, lr=-1.0), "Invalid learning rate: -1.0"),
    (lambda p: O.AdaBound(p, gamma=0.0), "Invalid gamma value: 0.0"),
    (lambda p: O.Lion(p, betas=(0.9,)), "Invalid betas: (0.9,)"),
    (lambda p: O.LARS(p, lr=0.1, trust_coefficient=-1.0), "Invalid trust_coefficient value: -1.0"),
    (lambda p: O.LAMB(p, lr=-0.5), "Invalid learning rate: -0.5"),
    (lambda p: O.SignSGD(p, lr=0.1, momentum=1.0), "Invalid momentum value: 1.0"),
]


@pytest.mark.parametrize("make,message", BAD, ids=[m for _, m in BAD])
def test_invalid_hyperparameters_raise(make, message):
    with pytest.raises(ValueError, match="^" + __import__("re").escape(message)):
        make([torch.zeros(2, requires_grad=True)])


# ---------------------------------------------------------------------------------------
# the torch.optim contract: state_dict, closure

ALL = {
    "sgd": lambda p: O.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adagrad": lambda p: O.AdaGrad(p, lr=0.1, lr_decay=0.01),
    "rmsprop": lambda p: O.RMSProp(p, lr=0.01, momentum=0.5, centered=True),
    "adam": lambda p: O.Adam(p, lr=0.01),
    "amsgrad": lambda p: O.AMSGrad(p, lr=0.01),
    "adamw": lambda p: O.AdamW(p, lr=0.01),
    "adabound": lambda p: O.AdaBound(p, lr=0.01),
    "signsgd": lambda p: O.SignSGD(p, lr=1e-3, momentum=0.9),
    "lion": lambda p: O.Lion(p, lr=1e-3, weight_decay=0.1),
    "lars": lambda p: O.LARS(p, lr=1.0, weight_decay=1e-3),
    "lamb": lambda p: O.LAMB(p, lr=0.01, weight_decay=0.01),
    "muon": lambda p: O.Muon(p, lr=0.02, weight_decay=0.01, adamw_lr=0.01),
}


def test_registry_lists_every_optimizer():
    assert set(O.OPTIMIZERS) == set(ALL)


@pytest.mark.parametrize("name", list(ALL))
def test_state_dict_round_trip(name, tmp_path):
    """Save after 20 steps, load into a fresh optimizer (and fresh tensors), continue 20:
    identical to 40 uninterrupted steps."""
    make = ALL[name]
    loss, W0, b0 = problem(3)

    def steps(opt, W, b, n):
        for _ in range(n):
            opt.zero_grad()
            loss(W, b).backward()
            opt.step()

    W, b = W0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = make([W, b])
    steps(opt, W, b, 40)
    straight = torch.cat([W.detach().flatten(), b.detach()])

    W, b = W0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = make([W, b])
    steps(opt, W, b, 20)
    torch.save({"opt": opt.state_dict(), "W": W.detach(), "b": b.detach()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    W2, b2 = ckpt["W"].clone().requires_grad_(), ckpt["b"].clone().requires_grad_()
    opt2 = make([W2, b2])
    opt2.load_state_dict(copy.deepcopy(ckpt["opt"]))
    steps(opt2, W2, b2, 20)
    resumed = torch.cat([W2.detach().flatten(), b2.detach()])
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("name", list(ALL))
def test_closure_returns_loss_and_seeded_runs_repeat(name):
    loss, W0, b0 = problem(4)
    W = W0.clone().requires_grad_()
    opt = ALL[name]([W])

    def closure():
        opt.zero_grad()
        value = loss(W, b0)
        value.backward()
        return value

    first = opt.step(closure)
    assert torch.isclose(first, loss(W0, b0))
    assert torch.equal(run(ALL[name]), run(ALL[name]))


def test_parameters_without_grad_are_skipped():
    x = torch.ones(2, requires_grad=True)
    y = torch.ones(2, requires_grad=True)
    opt = O.Adam([x, y], lr=0.1)
    x.grad = torch.ones(2)
    opt.step()
    assert torch.equal(y.detach(), torch.ones(2)) and len(opt.state[y]) == 0


def test_where_the_learning_rate_sits_lars_vs_sgd():
    """LARS (as You et al.) keeps lr inside the buffer, v = m v + lr * local * g; SGD (as torch)
    outside, x -= lr * b. With lr set to 0 after one step, LARS still coasts, SGD stops."""
    for cls, moves in ((O.LARS, True), (O.SGD, False)):
        x = torch.ones(3, dtype=DT, requires_grad=True)
        opt = cls([x], lr=0.5, momentum=0.9)
        x.grad = torch.ones(3, dtype=DT)
        opt.step()
        before = x.detach().clone()
        opt.param_groups[0]["lr"] = 0.0
        opt.step()
        assert (not torch.equal(x.detach(), before)) == moves


# ---------------------------------------------------------------------------------------
# unknown keywords, complex parameters, groups added later

@pytest.mark.parametrize("cls", [O.Adam, O.AMSGrad, O.AdamW, O.AdaBound, O.LAMB])
@pytest.mark.parametrize("kw", [dict(maximize=True), dict(amsgrad=True),
                                dict(weight_decya=0.1)], ids=str)
def test_unknown_keywords_raise_like_torch(cls, kw):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(TypeError, match=next(iter(kw))):
        cls(p, **kw)


COMPLEX = [(O.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
           (O.AdaGrad, torch.optim.Adagrad, dict(lr=0.3, weight_decay=0.1)),
           (O.RMSProp, torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True)),
           (O.Adam, torch.optim.Adam, dict(lr=3e-2, weight_decay=0.1)),
           (O.AMSGrad, lambda p, **kw: torch.optim.Adam(p, amsgrad=True, **kw), dict(lr=3e-2)),
           (O.AdamW, torch.optim.AdamW, dict(lr=3e-2, weight_decay=0.1))]


@pytest.mark.parametrize("ours,theirs,kw", COMPLEX, ids=[c[0].__name__ for c in COMPLEX])
def test_complex_parameters_equal_torch(ours, theirs, kw):
    """A complex parameter is optimized as its real view, as torch.optim does: the second
    moment accumulates (Re g)^2 and (Im g)^2, not the complex square g*g."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 4, generator=g, dtype=torch.complex128)
    b = torch.randn(5, generator=g, dtype=torch.complex128)
    z0 = torch.randn(4, generator=g, dtype=torch.complex128)
    finals = []
    for make in (ours, theirs):
        z = z0.clone().requires_grad_()
        opt = make([z], **kw)
        for _ in range(50):
            opt.zero_grad()
            ((A @ z - b).abs() ** 2).sum().backward()
            opt.step()
        finals.append(z.detach())
    assert (finals[0] - z0).abs().max() > 1e-2
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-9, atol=1e-10)


def test_complex_state_round_trip():
    z = torch.tensor([1 + 2j, -0.5 + 0.3j], dtype=torch.complex128, requires_grad=True)
    opt = O.Adam([z], lr=0.1)
    (z.abs() ** 2).sum().backward()
    opt.step()
    state = opt.state[z]
    assert state["exp_avg_sq"].dtype == torch.float64 and state["exp_avg_sq"].shape == (2, 2)
    clone = O.Adam([z], lr=0.1)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.testing.assert_close(clone.state[z]["exp_avg_sq"], state["exp_avg_sq"])


def test_adabound_group_added_later_steps():
    loss, W0, b0 = problem()
    W, b = W0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = O.AdaBound([W], lr=1e-2, final_lr=0.1)
    opt.add_param_group({"params": [b], "lr": 3e-3})
    assert opt.param_groups[1]["initial_lr"] == 3e-3
    loss(W, b).backward()
    opt.step()
    assert (b.detach() - b0).abs().max() > 0
    # the same as a group given to the constructor
    W2, b2 = W0.clone().requires_grad_(), b0.clone().requires_grad_()
    ref = O.AdaBound([{"params": [W2]}, {"params": [b2], "lr": 3e-3}], lr=1e-2, final_lr=0.1)
    loss(W2, b2).backward()
    ref.step()
    torch.testing.assert_close(b.detach(), b2.detach())
    with pytest.raises(ValueError, match="Invalid gamma value: -1"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "gamma": -1})
