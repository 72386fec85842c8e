"""nnopt_utils.schedules: closed forms, torch.optim.lr_scheduler equivalence, composition,
the LR range test and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nnopt_utils as nu
from nnopt_utils import schedules as S


def torch_multipliers(make_scheduler, n: int) -> np.ndarray:
    """The lr / base_lr sequence a torch scheduler produces over n steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def test_closed_forms():
    assert S.constant(0.3)(17) == pytest.approx(0.3)
    st = S.step(10, 0.5)
    assert [st(t) for t in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.5, 0.25])
    assert S.exponential(0.9)(3) == pytest.approx(0.729)
    it = S.inverse_time(10)
    assert it(0) == 1 and it(10) == pytest.approx(0.5) and it(90) == pytest.approx(0.1)
    assert S.inverse_time(4, power=0.5)(12) == pytest.approx(0.5)
    c = S.cosine(100, min_mult=0.1)
    assert c(0) == pytest.approx(1) and c(50) == pytest.approx(0.55) and c(100) == pytest.approx(0.1)
    assert c(1000) == pytest.approx(0.1)
    assert S.linear(10, end=0.2)(5) == pytest.approx(0.6)


def test_cyclical_closed_form():
    cy = S.cyclical(4, low=0.1, high=1.0)
    assert [cy(t) for t in (0, 2, 4, 6, 8, 12)] == pytest.approx([0.1, 0.55, 1, 0.55, 0.1, 1])
    cy2 = S.cyclical(4, low=0.0 + 1e-9, high=1.0, mode="triangular2")
    assert cy2(12) == pytest.approx(0.5, abs=1e-8)  # peak of the second cycle is halved


@pytest.mark.parametrize("mode", S.CYCLICAL_MODES)
def test_cyclical_equals_torch(mode):
    ours = S.cyclical(7, low=0.2, high=1.0, mode=mode, gamma=0.99).values(60)
    ref = torch_multipliers(lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=0.2, max_lr=1.0, step_size_up=7, mode=mode, gamma=0.99,
        cycle_momentum=False), 60)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_cosine_equals_torch():
    ours = S.cosine(40, min_mult=0.05).values(41)
    ref = torch_multipliers(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=40, eta_min=0.05), 41)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("t_mult", [1, 2, 3])
def test_sgdr_equals_torch(t_mult):
    ours = S.sgdr(5, t_mult=t_mult, min_mult=0.01).values(100)
    ref = torch_multipliers(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=5, T_mult=t_mult, eta_min=0.01), 100)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)
    restarts = [t for t in range(1, 100) if ours[t] > ours[t - 1] + 0.1]
    expected = [5 * (t_mult**i - 1) // (t_mult - 1) if t_mult > 1 else 5 * i for i in range(1, 30)]
    assert restarts == [r for r in expected if r < 100]


def test_one_cycle_equals_torch():
    ours = S.one_cycle(50, pct_start=0.3, div_factor=25, final_div_factor=1e4).values(50)
    ref = torch_multipliers(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=1.0, total_steps=50, pct_start=0.3, div_factor=25, final_div_factor=1e4,
        cycle_momentum=False), 50)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)
    assert ours.max() == pytest.approx(1.0) and ours[0] == pytest.approx(1 / 25)


def test_warmup_composition():
    w = S.warmup(S.cosine(100), steps=10)
    assert w(0) == 0 and w(5) == pytest.approx(0.5) and w(10) == pytest.approx(1.0)
    assert w(60) == pytest.approx(S.cosine(100)(50))
    w2 = S.warmup(S.step(5, 0.1), steps=4, start=0.25)
    assert w2(0) == pytest.approx(0.25) and w2(2) == pytest.approx(0.625) and w2(9) == pytest.approx(0.1)
    assert S.warmup(None, 4)(100) == 1.0
    assert S.warmup(lambda t: 0.5, 2)(1) == pytest.approx(0.25)
    prod = S.cosine(10) * S.exponential(0.5) * 2
    assert prod(5) == pytest.approx(2 * 0.5 * 0.5**5)
    assert (3 * S.constant())(4) == pytest.approx(3)
    assert "warmup" in repr(w)


def test_schedule_drives_fit():
    ds = nu.least_squares(32, 3, seed=0, dtype=torch.float32)
    model = torch.nn.Linear(3, 1)
    h = nu.fit(model, ds, loss="mse", lr=0.2, steps=12, schedule=S.step(5, 0.5))
    np.testing.assert_allclose(h["lr"], 0.2 * S.step(5, 0.5).values(12), rtol=1e-6)


def test_lr_range_test_digits():
    ds = nu.digits()
    model = nu.mlp(64, [32], 10, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    res = S.lr_range_test(model, ds, lr_min=1e-4, lr_max=100.0, steps=80, batch_size=64)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # untouched
    assert len(res.lrs) == len(res.losses) == len(res.smoothed) >= 10
    assert np.all(np.diff(res.lrs) > 0) and res.lrs[0] == pytest.approx(1e-4)
    assert res.diverged  # lr = 100 blows up plain SGD on this MLP
    assert 1e-3 < res.suggested_lr < 10
    # the suggested lr trains: a short run lowers the loss well below log(10)
    h = nu.fit(nu.mlp(64, [32], 10, seed=0), ds, lr=res.suggested_lr, steps=100, batch_size=64)
    assert not h.diverged and h["loss"][-10:].mean() < 0.5 * math.log(10)


@pytest.mark.parametrize("make", [
    lambda: S.constant(0), lambda: S.constant(-1), lambda: S.step(0), lambda: S.step(3, 1.5),
    lambda: S.exponential(0), lambda: S.inverse_time(-1), lambda: S.inverse_time(1, power=2),
    lambda: S.cosine(0), lambda: S.cosine(10, min_mult=2), lambda: S.warmup(S.constant(), 0),
    lambda: S.warmup("cosine", 5), lambda: S.cyclical(5, low=1, high=0.5),
    lambda: S.cyclical(5, mode="sawtooth"), lambda: S.one_cycle(2),
    lambda: S.one_cycle(100, pct_start=1.0), lambda: S.sgdr(0), lambda: S.sgdr(5, t_mult=0),
    lambda: S.constant() * "x", lambda: S.Schedule(3, "x"), lambda: S.step(2.5),
])
def test_bad_input(make):
    with pytest.raises(ValueError):
        make()


def test_bad_steps_and_range_test_args():
    with pytest.raises(ValueError, match="step must be"):
        S.cosine(10)(-1)
    with pytest.raises(ValueError, match="step must be"):
        S.cosine(10)(1.5)
    with pytest.raises(ValueError, match="unknown mode 'sawtooth'"):
        S.cyclical(5, mode="sawtooth")
    ds = nu.digits()
    m = nu.mlp(64, [8], 10, seed=0)
    with pytest.raises(ValueError, match="lr_min < lr_max"):
        S.lr_range_test(m, ds, lr_min=1.0, lr_max=0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        S.lr_range_test(m, ds, optimizer="lbfgs")


def test_lr_range_suggestion_never_passes_the_loss_minimum():
    # a wide window (400 steps: 20-step differences after a 40-step transient) and a
    # smoothed minimum early, at step ~24: the suggestion must still come before it
    ds = nu.least_squares(200, 5, noise=0.1, seed=0, dtype=torch.float32)
    res = S.lr_range_test(nu.mlp(5, [], 1, seed=0), (ds.X, ds.y.unsqueeze(1)), loss="mse",
                          lr_min=0.5, lr_max=2.0, steps=400, smoothing=0.5, stop_factor=1e9,
                          batch_size=20)
    stop = int(np.argmin(res.smoothed))
    assert stop < 60 < len(res.smoothed)  # the case: minimum before skip + window
    assert res.suggested_lr <= res.lrs[stop]


def test_steepest_descent_on_a_known_curve():
    from nnopt_utils.schedules import _steepest_descent_lr

    lrs = np.logspace(-3, 1, 200)
    x = np.log(lrs)
    # falls fastest at log lr = -2 (a tanh step), minimum at log lr = 0, then rises
    sm = 1 - np.tanh(2 * (x + 2)) + 0.5 * np.where(x > 0, x, 0) ** 2
    best = _steepest_descent_lr(lrs, sm, 200)
    assert abs(np.log(best) + 2) < 0.1
    # a minimum at step 5 of 200: the answer is at or before it
    early = np.concatenate([np.linspace(1, 0, 6), np.linspace(0, 5, 194)])
    assert _steepest_descent_lr(lrs, early, 200) <= lrs[5]
    assert _steepest_descent_lr(lrs, np.linspace(0, 1, 200), 200) == lrs[0]
