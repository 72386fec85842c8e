"""µP: the multipliers of Tables 3 and 8 of Yang et al. (2022), and µP = SP at the base width."""

import math

import pytest
import torch

import nnopt_utils as nu
from nnopt_utils import mup

# Table 3 relative to the base width, m = width / base_width:
# (role) -> (SGD lr, Adam lr, init variance) multipliers
TABLE3 = {
    "input": (lambda m: m, lambda m: 1.0, lambda m: 1.0),
    "bias": (lambda m: m, lambda m: 1.0, lambda m: 1.0),
    "hidden": (lambda m: 1.0, lambda m: 1 / m, lambda m: 1.0),
    "output": (lambda m: 1 / m, lambda m: 1 / m, lambda m: 1 / m),
    "output_bias": (lambda m: 1.0, lambda m: 1.0, lambda m: 1.0),
}


@pytest.mark.parametrize("width", [128, 1024])
@pytest.mark.parametrize("role", sorted(TABLE3))
def test_table3_multipliers(width, role):
    m = width / 64
    sgd, adam, var = (f(m) for f in TABLE3[role])
    assert mup.lr_multiplier(role, width, 64, optimizer="sgd") == pytest.approx(sgd)
    assert mup.lr_multiplier(role, width, 64, optimizer="adam") == pytest.approx(adam)
    assert mup.init_variance_multiplier(role, width, 64) == pytest.approx(var)
    for opt in ("sgd", "adam"):
        assert mup.lr_multiplier(role, width, 64, parametrization="sp", optimizer=opt) == 1.0


@pytest.mark.parametrize("width", [128, 1024])
def test_table8_output_layer(width):
    m = width / 64
    assert mup.lr_multiplier("output", width, 64, optimizer="sgd", output_multiplier=True) == m
    assert mup.lr_multiplier("output", width, 64, optimizer="adam", output_multiplier=True) == 1
    assert mup.init_variance_multiplier("output", width, 64, output_multiplier=True) == m
    model = mup.mlp(10, width, 3, depth=2, base_width=64, output_multiplier=True, seed=0)
    assert isinstance(model[-2], mup.Multiplier) and model[-2].scale == pytest.approx(1 / m)


def test_table3_and_table8_give_the_same_function_and_updates():
    """The effective output weights W / m of Table 8 follow Table 3's trajectory (SGD)."""
    X, y = torch.randn(32, 10, generator=nu.generator(1)), torch.randint(0, 3, (32,))
    outs = []
    for mult in (False, True):
        model = mup.mlp(10, 256, 3, base_width=64, output_multiplier=mult, seed=0)
        if mult:  # same effective initial output weights as Table 3
            with torch.no_grad():
                ref = mup.mlp(10, 256, 3, base_width=64, seed=0)
                model[5].weight.copy_(ref[4].weight * 4)
        opt = torch.optim.SGD(mup.param_groups(model, 0.1, "sgd"), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        outs.append(model(X).detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_init_variances():
    model = mup.mlp(20, 1024, 10, depth=2, base_width=64, seed=0)
    w_in, w_hid, w_out = (model[i].weight for i in (0, 2, 4))
    assert w_in.var().item() == pytest.approx(2 / 20, rel=0.05)
    assert w_hid.var().item() == pytest.approx(2 / 1024, rel=0.05)
    assert w_out.var().item() == pytest.approx(1 / 1024 / 16, rel=0.1)
    assert all((model[i].bias == 0).all() for i in (0, 2, 4))
    assert model.roles == {"0.weight": "input", "0.bias": "bias", "2.weight": "hidden",
                           "2.bias": "bias", "4.weight": "output", "4.bias": "output_bias"}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("output_multiplier", [False, True])
def test_mup_equals_sp_at_base_width(optimizer, output_multiplier):
    a = mup.mlp(8, 64, 4, base_width=64, parametrization="mup",
                output_multiplier=output_multiplier, seed=3)
    b = mup.mlp(8, 64, 4, base_width=64, parametrization="sp", seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    X = torch.randn(5, 8, generator=nu.generator(0))
    torch.testing.assert_close(a(X), b(X))
    for g in mup.param_groups(a, 0.01, optimizer):
        assert g["lr"] == 0.01 and g["lr_multiplier"] == 1.0


def test_param_groups_lrs_and_order():
    model = mup.mlp(8, 256, 4, depth=3, base_width=64, seed=0)
    groups = mup.param_groups(model, 0.01, "adam", copies=None)
    assert groups[0]["lr_multiplier"] == 1.0
    by_role = {g["role"]: g for g in groups}
    assert by_role["hidden"]["lr"] == pytest.approx(0.01 / 4)
    assert len(by_role["hidden"]["params"]) == 2 and len(by_role["bias"]["params"]) == 3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = nu.optim.Adam(groups, lr=0.01)  # any optimizer takes them
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    per_copy = mup.param_groups(model, torch.tensor([0.01, 0.02]), "sgd")
    hidden = {g["role"]: g for g in per_copy}["input"]
    torch.testing.assert_close(hidden["lr"], torch.tensor([0.04, 0.08]))


def test_sweep_factory_with_stacked_copies():
    """param_groups on nu.sweep's stacked parameters: copy i = a single run with lr_i."""
    data = nu.Dataset(torch.randn(64, 6, generator=nu.generator(0)),
                      torch.randint(0, 3, (64,), generator=nu.generator(1)))
    ref = mup.mlp(6, 128, 3, base_width=32, seed=0)
    lrs = [1e-3, 4e-3]

    def factory(groups):
        g = groups[0]
        lr = torch.tensor(lrs)
        return nu.optim.Adam(mup.param_groups(ref, lr, "adam", params=g["params"],
                                              copies=g["copies"]), lr=1e-3)

    res = nu.sweep(lambda s: mup.mlp(6, 128, 3, base_width=32, seed=s), data, lr=lrs,
                   optimizer=factory, steps=5, eval_every=5)
    for i, lr in enumerate(lrs):
        model = mup.mlp(6, 128, 3, base_width=32, seed=0)
        opt = nu.optim.Adam(mup.param_groups(model, lr, "adam"), lr=lr)
        h = nu.fit(model, data, optimizer=opt, steps=5, eval_every=5)
        assert res.final("train_loss")[i].item() == pytest.approx(h.last("train_loss"), rel=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="parametrization 'ntk'"):
        mup.mlp(4, 8, 2, parametrization="ntk")
    with pytest.raises(ValueError, match="width must be a positive int"):
        mup.mlp(4, 0, 2)
    with pytest.raises(ValueError, match="optimizer family 'rmsprop'"):
        mup.param_groups(mup.mlp(4, 8, 2), 0.1, "rmsprop")
    with pytest.raises(ValueError, match="built by nnopt_utils.mup.mlp"):
        mup.param_groups(nu.mlp(4, [8], 2), 0.1)
    with pytest.raises(ValueError, match="role 'embedding'"):
        mup.lr_multiplier("embedding", 8, 8)
    with pytest.raises(ValueError, match="params must hold"):
        mup.param_groups(mup.mlp(4, 8, 2), 0.1, params=[torch.zeros(1)])
    assert math.isclose(mup.lr_multiplier("hidden", 128, 64, optimizer="adam"), 0.5)


def test_sweep_grid_lr_is_the_base_rate_of_every_group():
    """SGD, one hidden layer, no bias: no group has multiplier 1; a grid lr must still
    reach every group times its multiplier, as in separate runs."""
    data = nu.Dataset(torch.randn(64, 6, generator=nu.generator(0)),
                      torch.randn(64, 2, generator=nu.generator(1)))
    build = lambda s: mup.mlp(6, 128, 2, depth=1, base_width=32, bias=False,  # noqa: E731
                              seed=s)
    groups = mup.param_groups(build(0), 1.0, "sgd")
    assert all(g["lr_multiplier"] != 1.0 for g in groups)
    lrs = [0.01, 0.02]

    def factory(gs):
        g = gs[0]
        return nu.optim.SGD(mup.param_groups(build(0), 0.5, "sgd", params=g["params"],
                                             copies=g["copies"]), lr=0.5)

    res = nu.sweep(build, data, seeds=(0,), lr=lrs, optimizer=factory, loss="mse",
                   steps=5, eval_every=5)
    for i, lr in enumerate(lrs):
        model = build(0)
        opt = nu.optim.SGD(mup.param_groups(model, lr, "sgd"), lr=lr)
        h = nu.fit(model, data, optimizer=opt, loss="mse", steps=5, eval_every=5)
        assert res.final("train_loss")[i].item() == pytest.approx(h.last("train_loss"),
                                                                  rel=1e-5)
