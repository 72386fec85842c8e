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
