"""nnopt_utils.sweep: N vectorized copies equal N separate runs of nu.fit (sgd, momentum,
adam; mini-batch and full batch; with a schedule), divergence of one copy is isolated,
bad input errors."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

import nnopt_utils as nu


D = torch.float64


@pytest.fixture(scope="module")
def digits64():
    ds = nu.digits()
    # a small float64 subset: exact comparisons without float32 reduction-order noise
    return nu.Dataset(ds.X[:300].double(), ds.y[:300], ds.X_test[:100].double(), ds.y_test[:100])


def build(seed: int) -> torch.nn.Module:
    return nu.mlp(64, [16], 10, activation="tanh", seed=seed).double()


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("batch_size", [32, None])
def test_sweep_equals_separate_fits(digits64, optimizer, batch_size):
    seeds, lrs = (0, 1), (0.05, 0.2) if optimizer != "adam" else (1e-3, 1e-2)
    sched = nu.schedules.cosine(25, min_mult=0.1)
    res = nu.sweep(build, digits64, seeds=seeds, lr=lrs, steps=25, optimizer=optimizer,
                   momentum=0.9, batch_size=batch_size, data_seed=3, schedule=sched,
                   eval_every=10, weight_decay=1e-3)
    assert [c["lr"] for c in res.configs] == [lrs[0], lrs[1]] * 2
    for i, cfg in enumerate(res.configs):
        model = build(cfg["seed"])
        if optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=1e-3)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], weight_decay=1e-3,
                                  momentum=0.9 if optimizer == "momentum" else 0.0)
        h = nu.fit(model, digits64, optimizer=opt, steps=25, batch_size=batch_size, seed=3,
                   schedule=sched, eval_every=10)
        # SweepResult.loss is stored in float32 (torch's default dtype), whatever the model's
        np.testing.assert_allclose(res.loss[i].numpy(), h["loss"], rtol=1e-6)
        np.testing.assert_allclose(res.metrics["train_loss"][i].numpy(), h["train_loss"],
                                   rtol=1e-9)
        np.testing.assert_allclose(res.metrics["test_acc"][i].numpy(), h["test_acc"])
        for name, p in model.named_parameters():
            torch.testing.assert_close(res.params[name][i], p.detach(), rtol=1e-9, atol=1e-12)
    assert res.eval_steps == [0, 10, 20, 25]
    assert not res.diverged.any()


def test_sweep_equals_plain_torch_loop(digits64):
    """A hand-written loop (no nu.fit) with the same batches gives the same parameters."""
    res = nu.sweep(build, digits64, seeds=(4,), lr=0.1, steps=15, batch_size=50,
                   sampling="replacement", data_seed=7)
    model = build(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for idx in nu.train.batches(len(digits64.X), 50, 15, sampling="replacement", seed=7):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(digits64.X[idx]), digits64.y[idx]).backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(res.params[name][0], p.detach(), rtol=1e-9, atol=1e-12)


def test_divergence_on_regression_matches_fit():
    ds = nu.least_squares(64, 8, noise=0.1, seed=0)
    build_lin = lambda s: nu.mlp(8, [], 1, seed=s).double()  # noqa: E731
    # GD on 1/2 MSE diverges for lr > 2/L with L = lambda_max(X1^T X1 / n), X1 = [X, 1];
    # at lr = c/L the error grows like (c-1)^t and overflows to inf within 300 steps
    X1 = torch.cat([ds.X, torch.ones(64, 1, dtype=D)], 1)
    L = float(torch.linalg.eigvalsh(X1.T @ X1 / 64)[-1])
    lrs = (0.5 / L, 1.5 / L, 6.0 / L, 8.0 / L)
    res = nu.sweep(build_lin, ds, seeds=(0,), lr=lrs, steps=300, loss="mse", eval_every=100)
    assert math.isnan(float(res.metrics["train_loss"][3, -1]))
    assert res.diverged.tolist() == [False, False, True, True]
    h = nu.fit(build_lin(0), ds, loss="mse", lr=lrs[3], steps=300)
    assert h.diverged and h.diverged_at == int(res.diverged_at[3])
    ok = nu.fit(build_lin(0), ds, loss="mse", lr=lrs[1], steps=300)
    np.testing.assert_allclose(res.loss[1].numpy(), ok["loss"], rtol=1e-6)
    # the diverged copies are frozen and their later losses are NaN ...
    for i in (2, 3):
        t = int(res.diverged_at[i])
        assert 0 < t < 300
        assert torch.isnan(res.loss[i, t:]).all() and not torch.isnan(res.loss[i, :t]).any()
    # ... and they do not touch the others: same numbers as a sweep without them
    alone = nu.sweep(build_lin, ds, seeds=(0,), lr=lrs[:2], steps=300, loss="mse")
    torch.testing.assert_close(res.loss[:2], alone.loss)
    for k in res.params:
        torch.testing.assert_close(res.params[k][:2], alone.params[k])


@pytest.mark.parametrize("kw, match", [
    (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs'"),
    (dict(lr=-0.1), "lr must be positive"),
    (dict(lr=[]), "lr must be positive"),
    (dict(seeds=[]), "seeds must not be empty"),
    (dict(eval_every=0), "eval_every"),
    (dict(loss="hinge"), "unknown loss 'hinge'"),
    (dict(sampling="sorted"), "unknown sampling 'sorted'"),
])
def test_bad_input(digits64, kw, match):
    with pytest.raises(ValueError, match=match):
        nu.sweep(build, digits64, **{"steps": 2, **kw})


def test_bad_model_and_data(digits64):
    with pytest.raises(ValueError, match="without buffers"):
        nu.sweep(lambda s: nu.mlp(64, [8], 10, norm="batch", seed=s), nu.digits(), steps=1)
    with pytest.raises(ValueError, match="data must be"):
        nu.sweep(build, digits64.X, steps=1)


@pytest.mark.skipif(os.environ.get("NNOPT_BENCH") is None, reason="timing: set NNOPT_BENCH=1")
def test_speedup_report():  # pragma: no cover - a measurement, printed, not a pass/fail oracle
    ds = nu.digits()
    build32 = lambda s: nu.mlp(64, [64], 10, seed=s)  # noqa: E731
    seeds = list(range(16))
    t0 = time.perf_counter()
    nu.sweep(build32, ds, seeds=seeds, lr=0.1, steps=200, batch_size=64)
    t_sweep = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in seeds:
        nu.fit(build32(s), ds, lr=0.1, steps=200, batch_size=64, progress=False)
    t_loop = time.perf_counter() - t0
    print(f"\nsweep of 16: {t_sweep:.2f}s; 16 fits: {t_loop:.2f}s; speed-up {t_loop / t_sweep:.1f}x")


def test_divergence_by_the_last_update_matches_fit():
    ds = nu.least_squares(20, 3, seed=0)
    build_lin = lambda s: nu.mlp(3, [], 1, seed=s).double()  # noqa: E731
    h = nu.fit(build_lin(0), ds, loss="mse", lr=1e200, steps=1, eval_every=1)
    res = nu.sweep(build_lin, ds, lr=(0.01, 1e200), steps=1, loss="mse", eval_every=1)
    assert h.diverged and h.diverged_at == 1
    assert math.isinf(float(res.metrics["train_loss"][1, -1]))
    assert res.diverged.tolist() == [False, True]
    assert res.diverged_at.tolist() == [-1, h.diverged_at]
    # without evaluation: non-finite parameters after the last update, in both
    X, y = 1e3 * ds.X, 1e3 * ds.y
    h = nu.fit(build_lin(0), (X, y), loss="mse", lr=1e307, steps=1)
    res = nu.sweep(build_lin, (X, y), lr=1e307, steps=1, loss="mse")
    assert h.diverged_at == 1 and res.diverged_at.tolist() == [1]


@pytest.mark.parametrize("lr", [np.float32(0.05), np.float64(0.05), torch.tensor(0.05),
                                np.array([0.05, 0.1]), torch.tensor([0.05, 0.1]),
                                [np.float32(0.05)]],
                         ids=["np.float32", "np.float64", "tensor0d", "ndarray", "tensor1d",
                              "list"])
def test_lr_as_numpy_or_tensor(digits64, lr):
    res = nu.sweep(build, digits64, lr=lr, steps=2)
    expected = np.atleast_1d(np.asarray(lr, dtype=np.float64) if not isinstance(lr, torch.Tensor)
                             else lr.double().numpy())
    np.testing.assert_allclose([c["lr"] for c in res.configs], expected, rtol=1e-7)
    ref = nu.sweep(build, digits64, lr=[float(v) for v in expected], steps=2)
    torch.testing.assert_close(res.loss, ref.loss)


@pytest.mark.parametrize("lr", [True, "0.1", float("inf"), [0.1, -1.0], torch.tensor([])])
def test_bad_lr_is_named(digits64, lr):
    with pytest.raises(ValueError, match="lr must be positive and finite"):
        nu.sweep(build, digits64, lr=lr, steps=1)


class Scaled(torch.nn.Module):
    """A linear model times a learnable 0-d scale."""

    def __init__(self, seed: int):
        super().__init__()
        self.lin = nu.mlp(3, [], 1, seed=seed).double()
        self.scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x):
        return self.scale * self.lin(x)


def test_zero_dim_parameters(digits64):
    ds = nu.least_squares(30, 3, seed=0)
    res = nu.sweep(Scaled, ds, seeds=(0, 1), lr=0.05, steps=5, loss="mse", eval_every=5)
    assert res.params["scale"].shape == (2,)
    for i, seed in enumerate((0, 1)):
        model = Scaled(seed)
        h = nu.fit(model, ds, loss="mse", lr=0.05, steps=5)
        np.testing.assert_allclose(res.loss[i].numpy(), h["loss"], rtol=1e-6)
        torch.testing.assert_close(res.params["scale"][i], model.scale.detach())


def test_final_and_grid_name_what_is_missing(digits64):
    empty = nu.sweep(build, digits64, steps=0)
    with pytest.raises(ValueError, match="steps=0"):
        empty.final("loss")
    plain = nu.sweep(build, digits64, seeds=(0, 1), lr=(0.05, 0.1), steps=2)
    with pytest.raises(ValueError, match="without eval_every"):
        plain.final("train_loss")
    with pytest.raises(ValueError, match="without eval_every"):
        plain.grid("train_loss", "seed", "lr")
    table = plain.grid("loss", "seed", "lr")
    assert table.shape == (2, 2)
    np.testing.assert_allclose(table.to_numpy().ravel(), plain.final("loss").numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown config key 'batch'; choose one of: seed, lr"):
        plain.grid("loss", "batch", "lr")
    # evaluated at steps=0: the initial state
    init = nu.sweep(build, digits64, steps=0, eval_every=1)
    assert init.eval_steps == [0] and init.final("train_loss").shape == (1,)


def test_grid_keeps_diverged_configurations():
    ds = nu.least_squares(64, 8, seed=0)
    build_lin = lambda s: nu.mlp(8, [], 1, seed=s).double()  # noqa: E731
    res = nu.sweep(build_lin, ds, seeds=(0,), lr=(0.01, 1e3), steps=50, loss="mse",
                   eval_every=50)
    assert res.diverged.tolist() == [False, True]
    table = res.grid("train_loss", "seed", "lr")
    assert table.shape == (1, 2) and np.isnan(table.to_numpy()[0, 1])
