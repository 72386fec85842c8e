import pytest
import torch
from torch import nn

import nnopt_utils as nu
from nnopt_utils import hessian, landscape


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (n,), generator=g
    )


def _net(seed=0):
    return nu.mlp(4, [6, 5], 3, seed=seed).double()


def _moved(model, *pairs):
    """A copy of ``model`` with parameters theta + sum_k c_k d_k (the unbatched
    oracle)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.add_(sum(c * d[name] for c, d in pairs))
    return out


def test_interpolate_endpoints_and_midpoint():
    X, y = _data()
    a, b = _net(0), _net(1)
    ea, eb = nu.train.evaluate(a, X, y), nu.train.evaluate(b, X, y)
    assert abs(ea["loss"] - eb["loss"]) > 0.1  # so swapped ends would fail
    r = landscape.interpolate(a, b, (X, y), 5)
    assert torch.equal(
        r.alphas, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64)
    )
    assert float(r.loss[0]) == pytest.approx(ea["loss"], rel=1e-13)
    assert float(r.loss[-1]) == pytest.approx(eb["loss"], rel=1e-13)
    # evaluate's accuracy is a float32 mean; ours keeps the model's dtype
    assert float(r.acc[0]) == pytest.approx(ea["acc"]) and float(
        r.acc[-1]
    ) == pytest.approx(eb["acc"])
    # alpha = 1/4: 3/4 theta_a + 1/4 theta_b, built by hand (1/4 theta_a + 3/4 theta_b
    # fails)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    diff = {n: (pb[n] - pa[n]).detach() for n in pa}
    quarter = nu.train.evaluate(_moved(a, (0.25, diff)), X, y)["loss"]
    assert float(r.loss[1]) == pytest.approx(quarter, rel=1e-12)
    assert abs(float(r.loss[3]) - quarter) > 1e-3
    # chunked and extrapolated evaluation agree with one-at-a-time
    s = landscape.interpolate(
        a, b, (X, y), torch.tensor([-0.5, 0.25, 1.5]), chunk_size=1
    )
    assert float(s.loss[1]) == pytest.approx(quarter, rel=1e-12)
    assert float(s.loss[0]) == pytest.approx(
        nu.train.evaluate(_moved(a, (-0.5, diff)), X, y)["loss"], rel=1e-12
    )


def test_interpolate_regression_has_no_accuracy():
    X, _ = _data()
    Y = torch.randn(len(X), 3, dtype=torch.float64)
    r = landscape.interpolate(_net(0), _net(1), (X, Y), 3, "mse")
    assert r.acc is None
    assert float(r.loss[0]) == pytest.approx(
        nu.train.evaluate(_net(0), X, Y, "mse")["loss"], rel=1e-13
    )


def test_filter_normalized_direction_per_filter_norms():
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)
    ).double()
    d = landscape.filter_normalized_direction(net, seed=0)
    assert list(d) == [n for n, _ in net.named_parameters()]
    for name, p in net.named_parameters():
        if p.dim() == 1:  # biases: zero
            assert torch.equal(d[name], torch.zeros_like(p))
            continue
        dims = tuple(range(1, p.dim()))
        want = torch.linalg.vector_norm(p.detach(), dim=dims)
        assert torch.allclose(
            torch.linalg.vector_norm(d[name], dim=dims), want, rtol=1e-12
        )
        # filters have different norms, so a per-layer normalization would fail the
        # above
        assert float(want.max() / want.min()) > 1.05
        assert not torch.allclose(
            d[name] / d[name].norm(), p / p.norm()
        )  # random, not theta
    copy = landscape.filter_normalized_direction(net, seed=0, one_d="copy")
    assert torch.equal(copy["3.bias"], net[3].bias.detach())
    assert torch.equal(copy["3.weight"], d["3.weight"])
    assert torch.equal(
        landscape.filter_normalized_direction(net, 0)["0.weight"], d["0.weight"]
    )
    assert not torch.equal(
        landscape.filter_normalized_direction(net, 1)["0.weight"], d["0.weight"]
    )


def test_surface_is_centred_on_the_model():
    X, y = _data()
    net = _net()
    d1, d2 = (landscape.filter_normalized_direction(net, s) for s in (0, 1))
    xs = landscape.grid_axis(5, 0.5, dtype=torch.float64)
    ys = landscape.grid_axis(3, 1.0, dtype=torch.float64)
    assert torch.equal(
        xs, torch.tensor([-0.5, -0.25, 0, 0.25, 0.5], dtype=torch.float64)
    )
    r = landscape.surface(net, (X, y), (d1, d2), (xs, ys))
    assert r.loss.shape == r.acc.shape == (5, 3)
    own = nu.train.evaluate(net, X, y)
    assert float(r.loss[2, 1]) == pytest.approx(own["loss"], rel=1e-14)
    assert float(r.acc[2, 1]) == pytest.approx(own["acc"])
    # every point is theta + x d1 + y d2 with 'ij' indexing: a point one cell off the
    # centre, or with x and y swapped, has another loss
    for i, j in ((3, 1), (0, 2), (4, 0)):
        want = nu.train.evaluate(_moved(net, (xs[i], d1), (ys[j], d2)), X, y)["loss"]
        assert float(r.loss[i, j]) == pytest.approx(want, rel=1e-12)
    assert abs(float(r.loss[3, 1]) - own["loss"]) > 1e-4
    assert abs(float(r.loss[2, 2]) - float(r.loss[3, 1])) > 1e-4
    # an odd int grid: grid_axis(n); chunked evaluation gives the same numbers
    full = landscape.surface(net, (X, y), (d1, d2), 5)
    assert float(full.loss[2, 2]) == pytest.approx(own["loss"], rel=1e-14)
    one = landscape.surface(net, (X, y), (d1, d2), 5, chunk_size=1)
    assert torch.allclose(one.loss, full.loss, rtol=1e-12)
    # the model is left as it was: parameters untouched, train mode restored
    before = [p.clone() for p in net.parameters()]
    net.train()
    landscape.surface(net, (X, y), (d1, d2), 3)
    assert net.training
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_rescaling_changes_sharpness_not_function_nor_filter_normalized_surface():
    # Dinh et al. (2017): (W1, b1, W2) -> (a W1, a b1, W2 / a) around a ReLU is the same
    # function; Li et al.'s filter normalization sees the same surface, sharpness does
    # not
    X, y = _data()
    net = _net()
    scaled = _net()
    with torch.no_grad():
        scaled[0].weight.mul_(4.0)
        scaled[0].bias.mul_(4.0)
        scaled[2].weight.div_(4.0)
    assert torch.allclose(scaled(X), net(X), rtol=1e-12, atol=1e-14)
    data = (X, y)
    surf = [
        landscape.surface(
            m,
            data,
            tuple(landscape.filter_normalized_direction(m, s) for s in (0, 1)),
            5,
        )
        for m in (net, scaled)
    ]
    assert torch.allclose(surf[0].loss, surf[1].loss, rtol=1e-10)
    assert torch.equal(surf[0].acc, surf[1].acc)
    assert (
        float(surf[0].loss.max() - surf[0].loss.min()) > 0.1
    )  # not a flat, trivial plane
    # a direction without filter normalization sees two different surfaces
    raw = [
        {
            n: torch.randn(p.shape, generator=nu.generator(s), dtype=p.dtype)
            for n, p in net.named_parameters()
        }
        for s in (0, 1)
    ]
    plain = [landscape.surface(m, data, tuple(raw), 5) for m in (net, scaled)]
    assert not torch.allclose(plain[0].loss, plain[1].loss, rtol=1e-2)
    # the top Hessian eigenvalue changes
    lam = [
        hessian.top_eigenvalue(
            *hessian.flat_function(m, nu.train.LOSSES["cross_entropy"], X, y)
        )
        for m in (net, scaled)
    ]
    assert lam[1] > 2 * lam[0] or lam[0] > 2 * lam[1]


def test_bad_input():
    X, y = _data()
    net = _net()
    d = landscape.filter_normalized_direction(net, 0)
    with pytest.raises(
        ValueError, match="model_a and model_b must have the same parameter"
    ):
        landscape.interpolate(net, nu.mlp(4, [6], 3).double(), (X, y))
    with pytest.raises(
        ValueError, match="alphas must be an int >= 2 or a 1-D sequence, got 1"
    ):
        landscape.interpolate(net, net, (X, y), 1)
    with pytest.raises(ValueError, match="alphas must be a non-empty 1-D sequence"):
        landscape.interpolate(net, net, (X, y), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="data must be a Dataset or an .X, y. pair"):
        landscape.interpolate(net, net, X)
    with pytest.raises(
        ValueError, match="chunk_size must be a positive int or None, got 0"
    ):
        landscape.interpolate(net, net, (X, y), chunk_size=0)
    with pytest.raises(
        ValueError, match="unknown one_d 'bias'; choose one of: zero, copy"
    ):
        landscape.filter_normalized_direction(net, 0, one_d="bias")
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        landscape.filter_normalized_direction(net, -1)
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        landscape.filter_normalized_direction("net", 0)
    with pytest.raises(ValueError, match="n must be an odd positive int .* got 4"):
        landscape.surface(net, (X, y), (d, d), 4)
    with pytest.raises(ValueError, match="directions must be a pair of dicts"):
        landscape.surface(net, (X, y), d, 5)
    with pytest.raises(
        ValueError, match=r"directions\[1\] must have the model's parameter"
    ):
        landscape.surface(net, (X, y), (d, {"0.weight": d["0.weight"]}), 5)
    with pytest.raises(
        ValueError, match="grid must be an odd int, a 1-D tensor or a pair"
    ):
        landscape.surface(net, (X, y), (d, d), "fine")
    with pytest.raises(ValueError, match="grid ys must be a non-empty 1-D tensor"):
        landscape.surface(net, (X, y), (d, d), (torch.zeros(3), torch.zeros(2, 2)))
