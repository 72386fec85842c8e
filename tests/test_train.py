import math

import pytest
import torch

import nnopt_utils as nu
from nnopt_utils.train import batches


def test_fit_reduces_loss_and_is_reproducible():
    ds = nu.digits(seed=0)
    runs = []
    for _ in range(2):
        model = nu.mlp(64, [32], 10, seed=0)
        runs.append(nu.fit(model, ds, lr=0.1, steps=60, batch_size=64, eval_every=20, seed=1))
    h = runs[0]
    assert h.last("train_loss") < 0.5 * h["train_loss"][0]
    assert (h["loss"] == runs[1]["loss"]).all()
    df = h.to_frame()
    assert {"step", "loss", "lr", "train_acc", "test_acc"} <= set(df.columns)
    assert not h.diverged


def test_divergence_is_recorded_not_raised():
    ds = nu.least_squares(50, 5, seed=0, dtype=torch.float32)
    model = torch.nn.Linear(5, 1)
    h = nu.fit(model, (ds.X, ds.y.unsqueeze(1)), loss="mse", lr=50.0, steps=200)
    assert h.diverged and 0 < h.diverged_at < 200
    assert not math.isfinite(h["loss"][-1]) or h["loss"][-1] > 1e30
    assert "diverged at step" in repr(h)


def test_schedule_and_grad_norm():
    ds = nu.digits(seed=0)
    h = nu.fit(nu.mlp(64, [16], 10, seed=0), ds, lr=0.2, steps=10, batch_size=32,
               schedule=lambda t: 1.0 / (1 + t), record_grad_norm=True)
    assert h["lr"][3] == pytest.approx(0.05)
    assert (h["grad_norm"] > 0).all()


def test_batches_sampling_modes():
    idx = list(batches(10, 5, 4, sampling="reshuffle", seed=0))
    assert sorted(torch.cat(idx[:2]).tolist()) == list(range(10))
    cyc = list(batches(10, 5, 4, sampling="cyclic", seed=0))
    assert torch.equal(cyc[0], cyc[2])
    assert all(b is None for b in batches(10, None, 3))
    with pytest.raises(ValueError, match="unknown sampling 'shuffle'"):
        list(batches(10, 5, 1, sampling="shuffle"))


def test_bad_arguments():
    ds = nu.digits(seed=0)
    m = nu.mlp(64, [8], 10)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        nu.fit(m, ds, loss="hinge")
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        nu.fit(m, ds, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr must be positive, got -0.1"):
        nu.fit(m, ds, lr=-0.1)
    with pytest.raises(ValueError, match="data must be a Dataset"):
        nu.fit(m, ds.X)


def test_history_missing_column_names_known_ones():
    h = nu.History()
    h.log(step=0, loss=1.0)
    with pytest.raises(KeyError, match="recorded: loss, step"):
        h["acc"]


def test_mse_reshapes_size_one_dims_and_raises_on_other_mismatches():
    mse = nu.train.LOSSES["mse"]
    y = torch.tensor([0.0, 1.0, 2.0, 3.0])
    # a perfect fit is a zero loss whichever side carries the trailing 1
    assert mse(y, y.unsqueeze(1)).item() == 0.0
    assert mse(y.unsqueeze(1), y).item() == 0.0
    assert mse(y + 1, y.unsqueeze(1)).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"output shape \(2, 2\) does not match target shape "
                                         r"\(4,\)"):
        mse(y.view(2, 2), y)
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 1\)"):
        mse(torch.zeros(4, 2), y.unsqueeze(1))
    # and fit trains on (n,) outputs with (n, 1) targets as on matching shapes
    ds = nu.least_squares(40, 3, seed=0)
    runs = []
    for target in (ds.y, ds.y.unsqueeze(1)):
        model = nu.mlp(3, [], 1, seed=0).double()
        squeeze = torch.nn.Sequential(model, torch.nn.Flatten(0))
        runs.append(nu.fit(squeeze, (ds.X, target), loss="mse", lr=0.1, steps=5)["loss"])
    assert (runs[0] == runs[1]).all()


def test_reused_optimizer_restarts_its_schedule():
    ds = nu.least_squares(30, 3, seed=0)
    model = torch.nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = lambda t: 0.5 ** (t + 1)  # noqa: E731
    first = nu.fit(model, (ds.X, ds.y), loss="mse", optimizer=opt, steps=3, schedule=sched)
    second = nu.fit(model, (ds.X, ds.y), loss="mse", optimizer=opt, steps=3, schedule=sched)
    assert first["lr"].tolist() == second["lr"].tolist() == [0.05, 0.025, 0.0125]
    assert opt.param_groups[0]["initial_lr"] == 0.1


def test_fit_momentum_argument():
    from nnopt_utils.train import _make_optimizer

    m = nu.mlp(3, [4], 1, seed=0)
    ds = nu.least_squares(20, 3, seed=0, dtype=torch.float32)
    for name, momentum, expected in (("momentum", 0.0, 0.0), ("momentum", None, 0.9),
                                     ("nesterov", 0.5, 0.5), ("sgd", None, 0)):
        opt = _make_optimizer(name, m.parameters(), 0.1, momentum, 0.0)
        assert opt.param_groups[0]["momentum"] == expected
    with pytest.raises(ValueError, match="momentum must lie in \\(0, 1\\) for optimizer "
                                         "'nesterov', got 0.0"):
        nu.fit(m, ds, loss="mse", optimizer="nesterov", momentum=0.0, steps=1)
    with pytest.raises(ValueError, match="momentum=0.9 is used only by optimizer 'momentum'"):
        nu.fit(m, ds, loss="mse", optimizer="sgd", momentum=0.9, steps=1)
    with pytest.raises(ValueError, match="momentum must lie in \\[0, 1\\).*got 1.5"):
        nu.fit(m, ds, loss="mse", optimizer="momentum", momentum=1.5, steps=1)


def test_momentum_zero_equals_plain_sgd():
    ds = nu.least_squares(30, 3, seed=0)
    finals = []
    for kw in (dict(optimizer="momentum", momentum=0.0), dict(optimizer="sgd")):
        model = nu.mlp(3, [], 1, seed=0).double()
        nu.fit(model, ds, loss="mse", lr=0.1, steps=10, **kw)
        finals.append(model[0].weight.detach().clone())
    assert torch.equal(finals[0], finals[1])


def test_batches_accept_numpy_integers_and_name_bad_values():
    import numpy as np

    a = list(batches(np.int64(10), np.int64(3), np.int64(4), seed=0))
    b = list(batches(10, 3, 4, seed=0))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 4
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got 2.5"):
        list(batches(10, 2.5, 1))
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got '4'"):
        list(batches(10, "4", 1))
    with pytest.raises(ValueError, match="steps must be a non-negative int, got -1"):
        list(batches(10, 3, -1))
    h = nu.fit(nu.mlp(64, [8], 10, seed=0), nu.digits(seed=0), steps=np.int64(2),
               batch_size=np.int64(16))
    assert len(h) == 2


def test_cyclic_sampling_visits_every_sample():
    n, B = 10, 3
    idx = list(batches(n, B, 10, sampling="cyclic", seed=0))
    stream = torch.cat(idx)
    order = stream[:n]
    assert sorted(order.tolist()) == list(range(n))  # one fixed order ...
    assert torch.equal(stream, order.repeat(3))       # ... read as an endless cycle
    assert torch.bincount(stream, minlength=n).tolist() == [3] * n
    # when B divides n the batches are the same fixed order every epoch
    even = list(batches(12, 4, 6, sampling="cyclic", seed=0))
    assert all(torch.equal(even[i], even[i + 3]) for i in range(3))


def test_evaluate_restores_training_mode_when_forward_raises():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("forward failed")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="forward failed"):
        nu.train.evaluate(model, torch.zeros(2, 3), torch.zeros(2), "mse")
    assert model.training


def test_fit_flags_non_finite_parameters_after_the_last_step():
    ds = nu.least_squares(20, 3, seed=0)
    model = nu.mlp(3, [], 1, seed=0).double()
    # a huge step: the loss before the update is finite, the parameters after it overflow
    h = nu.fit(model, (1e3 * ds.X, 1e3 * ds.y), loss="mse", lr=1e307, steps=1)
    assert not torch.isfinite(model[0].weight).all()
    assert h.diverged and h.diverged_at == 1
