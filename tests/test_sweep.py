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


def test_general_path_equals_separate_fits(digits64):
    """A model that is not a plain Linear/activation stack (here with LayerNorm) runs through
    vmap of functional_call, and its copies still follow their separate fits."""
    from nnopt_utils.train import _stacked_forward

    build_ln = lambda s: nu.mlp(64, [16], 10, norm="layer", seed=s).double()  # noqa: E731
    stacked, _ = torch.func.stack_module_state([build_ln(0), build_ln(1)])
    assert _stacked_forward(build_ln(0), stacked).__name__ != "forward"  # the vmap path
    res = nu.sweep(build_ln, digits64, seeds=(0, 1), lr=0.1, steps=10, batch_size=32,
                   optimizer="momentum")
    for i in range(2):
        model = build_ln(i)
        nu.fit(model, digits64, optimizer="momentum", lr=0.1, steps=10, batch_size=32)
        for name, p in model.named_parameters():
            torch.testing.assert_close(res.params[name][i], p.detach(), rtol=1e-9, atol=1e-12)


def test_batched_mlp_path_equals_vmap_path(digits64):
    """The batched-matmul forward of a plain MLP equals vmap of functional_call."""
    from torch.func import functional_call, vmap

    from nnopt_utils.train import _stacked_forward

    models = [build(s) for s in range(3)]
    stacked, _ = torch.func.stack_module_state(models)
    fast = _stacked_forward(models[0], stacked)
    assert fast.__name__ == "forward"  # the batched-matmul path
    slow = vmap(lambda p, x: functional_call(models[0], p, (x,)), in_dims=(0, None))
    torch.testing.assert_close(fast(stacked, digits64.X), slow(stacked, digits64.X),
                               rtol=1e-12, atol=1e-12)
    for i, m in enumerate(models):
        torch.testing.assert_close(fast(stacked, digits64.X)[i], m(digits64.X),
                                   rtol=1e-12, atol=1e-12)


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
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_speedup_report(optimizer):  # pragma: no cover - a measurement, printed, not an oracle
    """N MLPs 64-64-10 on digits, 200 steps, batch 64: one sweep against N separate fits with
    the same optimizer class, repetitions interleaved (the machine may be shared), medians."""
    import statistics

    ds = nu.digits()
    build32 = lambda s: nu.mlp(64, [64], 10, seed=s)  # noqa: E731
    lr = 0.1 if optimizer == "sgd" else 1e-3
    reps = int(os.environ.get("NNOPT_BENCH_REPS", "3"))

    def timed(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    for n in (16, 64):
        seeds = list(range(n))
        t_sweep, t_fits = [], []
        for _ in range(reps):
            t_sweep.append(timed(lambda: nu.sweep(build32, ds, seeds=seeds, lr=lr, steps=200,
                                                  batch_size=64, optimizer=optimizer)))
            t_fits.append(timed(lambda: [nu.fit(build32(s), ds, lr=lr, steps=200, batch_size=64,
                                                optimizer=optimizer, progress=False)
                                         for s in seeds]))
        a, b = statistics.median(t_sweep), statistics.median(t_fits)
        print(f"\n{optimizer}: sweep of {n}: {a:.2f}s; {n} fits: {b:.2f}s; speed-up {b / a:.1f}x")


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


# ---------------------------------------------------------------------------------------
# every optimizer of nnopt_utils.optim over a hyperparameter grid

from nnopt_utils import optim as O  # noqa: E402

#: per optimizer: fixed keyword arguments and a grid of two hyperparameters
GRIDS = {
    "sgd": ({"weight_decay": 1e-3}, {"lr": [0.05, 0.2], "momentum": [0.0, 0.9]}),
    "adagrad": ({"lr_decay": 0.01}, {"lr": [0.01, 0.05], "weight_decay": [0.0, 1e-2]}),
    "rmsprop": ({"momentum": 0.5}, {"lr": [1e-3, 1e-2], "alpha": [0.9, 0.99]}),
    "adam": ({}, {"lr": [1e-3, 1e-2], "betas": [(0.9, 0.999), (0.8, 0.99)]}),
    "amsgrad": ({"weight_decay": 1e-3}, {"lr": [1e-3, 1e-2], "betas": [(0.9, 0.999), (0.8, 0.9)]}),
    "adamw": ({}, {"lr": [1e-3, 1e-2], "weight_decay": [0.0, 0.1]}),
    "adabound": ({"final_lr": 0.05}, {"lr": [1e-3, 1e-2], "gamma": [1e-3, 1e-1]}),
    "signsgd": ({}, {"lr": [1e-3, 1e-2], "momentum": [0.0, 0.9]}),
    "lion": ({"weight_decay": 0.1}, {"lr": [1e-4, 1e-3], "betas": [(0.9, 0.99), (0.95, 0.98)]}),
    "lars": ({"trust_coefficient": 0.01}, {"lr": [0.1, 1.0], "weight_decay": [0.0, 1e-3]}),
    "lamb": ({}, {"lr": [1e-3, 1e-2], "weight_decay": [0.0, 0.01], "eps": [1e-6, 1e-4]}),
    "muon": ({"adamw_lr": 1e-3}, {"lr": [0.01, 0.02], "momentum": [0.9, 0.95]}),
}

TORCH = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop,
         "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
         "amsgrad": lambda p, **kw: torch.optim.Adam(p, amsgrad=True, **kw)}


def test_grids_cover_every_optimizer():
    assert set(GRIDS) == set(O.OPTIMIZERS)


def _grid_sweep_vs(make, name, dtype, tol, digits):
    fixed, grid = GRIDS[name]
    ds = digits if dtype == torch.float64 else nu.Dataset(
        digits.X.float(), digits.y, digits.X_test.float(), digits.y_test)
    b = lambda s: nu.mlp(64, [16], 10, activation="tanh", seed=s).to(dtype)  # noqa: E731
    cls = O.OPTIMIZERS[name]
    if set(fixed) <= {"weight_decay"}:  # the class, with sweep's own keywords
        opt = dict(optimizer=cls, **fixed)
    else:  # a factory for the fixed values; the grid values are written into its group
        opt = dict(optimizer=lambda p: cls(p, lr=grid["lr"][0], **fixed))
    res = nu.sweep(b, ds, seeds=(0, 1), grid=grid, steps=12, batch_size=32, data_seed=3,
                   eval_every=6, **opt)
    n_grid = int(np.prod([len(v) for v in grid.values()]))
    assert len(res) == 2 * n_grid and not res.diverged.any()
    for i, cfg in enumerate(res.configs):
        kw = {**fixed, **{k: v for k, v in cfg.items() if k != "seed"}}
        model = b(cfg["seed"])
        h = nu.fit(model, ds, optimizer=lambda p: make(p, **kw), steps=12, batch_size=32,
                   seed=3, eval_every=6)
        np.testing.assert_allclose(res.loss[i].numpy(), h["loss"], rtol=tol, atol=tol)
        np.testing.assert_allclose(res.metrics["train_loss"][i].numpy(), h["train_loss"],
                                   rtol=tol, atol=tol)
        for pname, p in model.named_parameters():
            if dtype == torch.float64:
                torch.testing.assert_close(res.params[pname][i], p.detach(), rtol=tol, atol=tol)
            else:  # float32: the batched gradient sums in another order, and Adam-like
                # divisions by sqrt(v) amplify that rounding on small coordinates: the losses
                # agree to 1e-6, the parameters to 5e-6 relative to their norm
                err = (res.params[pname][i] - p.detach()).norm() / p.detach().norm()
                assert err <= 5 * tol, (pname, float(err))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_grid_sweep_equals_separate_fits(digits64, name, dtype, tol):
    """Copy i of a sweep over seeds x a grid of two hyperparameters follows the iterates of a
    separate fit with the same optimizer class and copy i's values."""
    _grid_sweep_vs(O.OPTIMIZERS[name], name, dtype, tol, digits64)


@pytest.mark.parametrize("name", sorted(TORCH))
def test_grid_sweep_equals_torch_optim(digits64, name):
    _grid_sweep_vs(TORCH[name], name, torch.float64, 1e-12, digits64)


def test_a_diverging_copy_in_a_grid_is_frozen_and_flagged():
    ds = nu.least_squares(64, 8, noise=0.1, seed=0)
    build_lin = lambda s: nu.mlp(8, [], 1, seed=s).double()  # noqa: E731
    grid = {"lr": [0.05, 50.0], "momentum": [0.0, 0.5]}
    res = nu.sweep(build_lin, ds, grid=grid, optimizer="momentum", steps=200, loss="mse")
    assert [c["lr"] for c in res.configs] == [0.05, 0.05, 50.0, 50.0]
    assert res.diverged.tolist() == [False, False, True, True]
    for i in (2, 3):  # frozen at the last finite iterate, later losses NaN
        t = int(res.diverged_at[i])
        assert 0 < t < 200 and torch.isnan(res.loss[i, t:]).all()
        assert all(torch.isfinite(v[i]).all() for v in res.params.values())
    alone = nu.sweep(build_lin, ds, grid={"lr": [0.05], "momentum": [0.0, 0.5]},
                     optimizer="momentum", steps=200, loss="mse")
    torch.testing.assert_close(res.loss[:2], alone.loss)
    for k in res.params:
        torch.testing.assert_close(res.params[k][:2], alone.params[k])


@pytest.mark.parametrize("optimizer", ["momentum", "adamw", "lamb", "lion"])
def test_masks_keep_pruned_entries_exactly_zero(digits64, optimizer):
    lr = 0.1 if optimizer == "momentum" else 1e-2
    shape = build(0).get_parameter("0.weight").shape
    gen = torch.Generator().manual_seed(0)
    mask = torch.stack([torch.ones(shape), (torch.rand(shape, generator=gen) > 0.7).double()])
    kw = dict(seeds=(0,), grid={"weight_decay": [0.0, 0.01]}, lr=lr, optimizer=optimizer,
              steps=10, batch_size=32)
    res = nu.sweep(build, digits64, masks={"0.weight": mask.repeat(2, 1, 1)[[0, 2, 1, 3]]},
                   **{**kw, "seeds": (0, 1)})
    plain = nu.sweep(build, digits64, **kw)
    w = res.params["0.weight"]
    # copies 0 and 1 (seed 0) are unmasked: the same as a sweep without masks
    torch.testing.assert_close(w[:2], plain.params["0.weight"], rtol=0, atol=0)
    pruned = mask[1] == 0
    assert (w[2:][:, pruned] == 0).all()
    start = nu.sweep(build, digits64, **{**kw, "seeds": (1,), "steps": 0}).params["0.weight"][0]
    assert (w[2:][:, ~pruned] != start[~pruned]).float().mean() > 0.9  # the others train


@pytest.mark.parametrize("kw, match", [
    (dict(grid={"lrr": [0.1]}), "unknown grid key 'lrr' for SGD; choose among: lr, momentum"),
    (dict(grid={"betas": [(0.9, 1.2)]}, optimizer="adam"),
     r"grid\['betas'\] value \(0.9, 1.2\): Invalid beta parameter at index 1: 1.2"),
    (dict(grid={"weight_decay": ["a"]}), r"grid\['weight_decay'\] holds 'a'"),
    (dict(grid={"weight_decay": [-1.0]}), r"grid\['weight_decay'\] value -1.0: Invalid"),
    (dict(grid={"lr": [0.1]}, lr=0.1), "lr= or grid"),
    (dict(grid={"momentum": []}, optimizer="momentum"), "non-empty"),
    (dict(betas=(0.9, 0.99)), "betas=.* is not a hyperparameter of SGD"),
    (dict(masks={"w": torch.ones(3)}), "unknown names: \\['w'\\]"),
    (dict(optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1)), "not an optimizer object"),
])
def test_bad_grid_is_named(digits64, kw, match):
    with pytest.raises(ValueError, match=match):
        nu.sweep(build, digits64, **{"steps": 1, **kw})


def test_per_copy_hyperparameters_need_stacked_copies():
    p = torch.nn.Parameter(torch.ones(3, 2))
    p.grad = torch.ones(3, 2)
    opt = O.SGD([p], lr=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="per-copy lr of shape \\(3,\\) needs a parameter group"):
        opt.step()
    opt = O.SGD([{"params": [p], "copies": 3}], lr=torch.tensor([0.1, 0.2, 0.3]))
    opt.step()
    torch.testing.assert_close(p.detach()[:, 0], torch.tensor([0.9, 0.8, 0.7]))
    with pytest.raises(ValueError, match="Invalid learning rate: tensor"):
        O.SGD([p], lr=torch.tensor([0.1, -0.2]))


def test_fit_takes_nnopt_classes_and_names():
    ds = nu.least_squares(20, 3, seed=0)
    b = lambda s: nu.mlp(3, [], 1, seed=s).double()  # noqa: E731
    h1 = nu.fit(b(0), ds, loss="mse", optimizer=O.Lion, lr=1e-3, steps=5)
    h2 = nu.fit(b(0), ds, loss="mse", optimizer="lion", lr=1e-3, steps=5)
    h3 = nu.fit(b(0), ds, loss="mse", optimizer=lambda p: O.Lion(p, lr=1e-3), steps=5)
    np.testing.assert_array_equal(h1["loss"], h2["loss"])
    np.testing.assert_array_equal(h1["loss"], h3["loss"])


class _Skip(torch.nn.Sequential):  # the layers of an MLP, another function
    def forward(self, x):
        h = self[0](x)
        return self[2](h + torch.relu(h))


def test_sweep_trains_a_sequential_subclass_as_its_own_forward():
    ds = nu.least_squares(32, 4, seed=0)
    build = lambda s: _Skip(torch.nn.Linear(4, 8), torch.nn.ReLU(),  # noqa: E731
                            torch.nn.Linear(8, 1)).double().requires_grad_()
    torch.manual_seed(0)
    res = nu.sweep(build, ds, seeds=(0,), lr=0.05, steps=5, loss="mse", eval_every=5)
    torch.manual_seed(0)
    single = build(0)
    nu.fit(single, ds, lr=0.05, steps=5, loss="mse", progress=False)
    for n, p in single.named_parameters():
        torch.testing.assert_close(res.params[n][0], p.detach())
