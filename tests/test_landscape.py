import functools

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


# ---------------------------------------------------------------------------------------
# mode connectivity


@functools.lru_cache(maxsize=1)
def _trained_pair():
    """Two small nets trained from different seeds on a nonlinear problem: a high loss
    barrier on the segment between them."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 4, dtype=torch.float64, generator=g)
    y = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
    nets = []
    for seed in (0, 1):
        net = nu.mlp(4, [16, 16], 3, seed=seed).double()
        nu.fit(net, (X, y), optimizer="momentum", lr=0.1, steps=150, progress=False)
        nets.append(net)
    return nets, (X, y)


def test_barrier_is_the_largest_rise_above_the_line():
    (a, b), (X, y) = _trained_pair()
    r = landscape.barrier(a, b, (X, y), 11)
    s = landscape.interpolate(a, b, (X, y), 11)
    assert torch.equal(r.loss, s.loss) and torch.equal(r.alphas, s.alphas)
    # the oracle, by hand: L(alpha) - ((1 - alpha) L(0) + alpha L(1)), maximized
    line = (1 - s.alphas) * s.loss[0] + s.alphas * s.loss[-1]
    k = int(torch.argmax(s.loss - line))
    assert r.height == pytest.approx(float(s.loss[k] - line[k]), rel=1e-14)
    assert r.argmax == float(s.alphas[k]) and 0 < k < 10 and r.height > 0
    diff = {n: (q - p).detach() for (n, p), q in zip(a.named_parameters(), b.parameters())}
    at_max = nu.train.evaluate(_moved(a, (r.argmax, diff)), X, y)["loss"]
    assert float(r.loss[k]) == pytest.approx(at_max, rel=1e-12)
    assert float(r.excess[0]) == 0 and abs(float(r.excess[-1])) < 1e-15
    # a grid without the endpoints gets them
    g = landscape.barrier(a, b, (X, y), [0.3, 0.5])
    assert g.alphas.tolist() == [0, 0.3, 0.5, 1]
    # the error barrier (Frankle et al., 2020) on 1 - accuracy
    e = landscape.barrier(a, b, (X, y), 11, metric="error")
    assert torch.equal(e.values, 1 - s.acc) and e.metric == "error"
    # a model with itself: no barrier
    assert landscape.barrier(a, a, (X, y), 5).height == 0


def test_barrier_of_a_convex_problem_is_zero():
    # linear regression: the loss is convex in the parameters, so the segment stays below
    # the line between the endpoint losses
    X, _ = _data()
    Y = torch.randn(len(X), 2, dtype=torch.float64)
    a = nn.Linear(4, 2).double()
    b = nn.Linear(4, 2).double()
    with torch.no_grad():
        b.weight.mul_(-3)
    r = landscape.barrier(a, b, (X, Y), 21, "mse")
    assert r.height == 0 and r.argmax in (0, 1)
    assert float(r.excess[1:-1].max()) < -1e-3


def test_bezier_starts_as_the_segment_and_one_step_is_the_chain_rule():
    X, y = _data()
    a, b = _net(0), _net(1)
    straight = landscape.fit_bezier(a, b, (X, y), steps=0)
    for n, p in a.named_parameters():  # the control starts at the midpoint
        assert torch.equal(straight.control[n], (p + dict(b.named_parameters())[n]) / 2)
    ts = torch.tensor([0, 0.3, 0.5, 1], dtype=torch.float64)
    # (1-t)^2 a + 2t(1-t)(a+b)/2 + t^2 b = (1-t) a + t b: the curve is the segment
    assert torch.allclose(straight.evaluate((X, y), ts).loss,
                          landscape.interpolate(a, b, (X, y), ts).loss, rtol=1e-12)
    assert all(torch.equal(straight.params(0)[n], p) for n, p in a.named_parameters())
    assert all(torch.equal(straight.params(1)[n], p) for n, p in b.named_parameters())
    # one SGD step: d L(phi(t)) / d theta = 2t(1-t) grad L at phi(t), t the seed's first draw
    curve = landscape.fit_bezier(a, b, (X, y), steps=1, lr=0.5, optimizer="sgd", seed=3)
    t = torch.rand(1, generator=nu.generator(3), dtype=torch.float64)[0]
    at_t = straight.to_model(t)
    nn.functional.cross_entropy(at_t(X), y).backward()
    for n, p in at_t.named_parameters():
        want = straight.control[n] - 0.5 * 2 * t * (1 - t) * p.grad
        assert torch.allclose(curve.control[n], want, rtol=1e-12, atol=1e-14)
    assert float(curve.history[0]) == pytest.approx(
        float(nn.functional.cross_entropy(straight.to_model(t)(X), y).detach()), rel=1e-12)
    # seeded
    again = landscape.fit_bezier(a, b, (X, y), steps=3, ts_per_step=2, seed=3, batch_size=8)
    other = landscape.fit_bezier(a, b, (X, y), steps=3, ts_per_step=2, seed=4, batch_size=8)
    same = landscape.fit_bezier(a, b, (X, y), steps=3, ts_per_step=2, seed=3, batch_size=8)
    assert torch.equal(again.control["0.weight"], same.control["0.weight"])
    assert not torch.equal(again.control["0.weight"], other.control["0.weight"])


def test_trained_bezier_curve_removes_the_barrier_and_alignment_shrinks_it():
    (a, b), data = _trained_pair()
    linear = landscape.barrier(a, b, data, 21)
    ends = float(max(linear.loss[0], linear.loss[-1]))
    assert linear.height > 0.3 and linear.height > 3 * ends
    curve = landscape.fit_bezier(a, b, data, steps=150, lr=0.01, ts_per_step=4)
    along = curve.evaluate(data, 21)
    assert torch.allclose(along.loss[[0, -1]], linear.loss[[0, -1]], rtol=1e-12)
    assert float(along.loss.max()) < linear.height / 4
    assert float(curve.history[-10:].mean()) < float(curve.history[:10].mean())
    # weight matching: the same function as b, and a lower barrier to a
    aligned = landscape.align(a, b)
    X = data[0]
    assert torch.allclose(aligned(X), b(X), rtol=1e-12, atol=1e-12)
    assert landscape.barrier(a, aligned, data, 21).height < linear.height / 2


def _permuted(model, seed):
    """A copy of an MLP with its hidden units shuffled: the same function."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    linears = [m for m in out if isinstance(m, nn.Linear)]
    with torch.no_grad():
        prev = None
        for i, lin in enumerate(linears):
            if prev is not None:
                lin.weight.copy_(lin.weight[:, prev])
            if i < len(linears) - 1:
                prev = torch.randperm(lin.out_features, generator=g)
                lin.weight.copy_(lin.weight[prev])
                lin.bias.copy_(lin.bias[prev])
    return out


def test_align_recovers_a_permuted_copy_exactly():
    X, _ = _data()
    for seed in range(3):
        a = nu.mlp(4, [12, 10, 8], 3, seed=seed).double()
        b = _permuted(a, seed)
        assert torch.allclose(b(X), a(X), rtol=1e-12, atol=1e-13)
        assert not torch.equal(b[0].weight, a[0].weight)
        before = [p.clone() for p in b.parameters()]
        r = landscape.align(a, b, seed=seed)
        assert all(torch.equal(p, q) for p, q in zip(r.parameters(), a.parameters()))
        assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))  # untouched


def test_align_one_hidden_layer_is_the_best_permutation():
    # with one hidden layer weight matching is a single assignment problem: its answer is
    # the best of all 5! permutations, found here by brute force
    import itertools

    X, _ = _data()
    a, b = nu.mlp(4, [5], 3, seed=0).double(), nu.mlp(4, [5], 3, seed=1).double()
    r = landscape.align(a, b)
    assert torch.allclose(r(X), b(X), rtol=1e-12, atol=1e-13)

    def score(W1, b1, W2):
        with torch.no_grad():
            return float((a[0].weight * W1).sum() + (a[0].bias * b1).sum()
                         + (a[2].weight * W2).sum())

    best = max(score(b[0].weight[list(p)], b[0].bias[list(p)], b[2].weight[:, list(p)])
               for p in itertools.permutations(range(5)))
    assert score(r[0].weight, r[0].bias, r[2].weight) == pytest.approx(best, rel=1e-12)
    assert best > score(b[0].weight, b[0].bias, b[2].weight)


def test_mode_connectivity_bad_input():
    X, y = _data()
    net = _net()
    with pytest.raises(ValueError, match="unknown metric 'acc'; choose one of: loss, error"):
        landscape.barrier(net, net, (X, y), metric="acc")
    with pytest.raises(ValueError, match=r"alphas of a barrier must lie in \[0, 1\]"):
        landscape.barrier(net, net, (X, y), [-0.5, 0.5])
    with pytest.raises(ValueError, match="metric='error' needs classification data"):
        landscape.barrier(net, net, (X, torch.randn(len(X), 3, dtype=torch.float64)), 3,
                          "mse", metric="error")
    with pytest.raises(ValueError, match="ts_per_step must be a positive int, got 0"):
        landscape.fit_bezier(net, net, (X, y), ts_per_step=0)
    with pytest.raises(ValueError, match="steps must be a non-negative int, got -1"):
        landscape.fit_bezier(net, net, (X, y), steps=-1)
    with pytest.raises(ValueError, match="lr must be a positive number, got -1"):
        landscape.fit_bezier(net, net, (X, y), lr=-1)
    with pytest.raises(ValueError, match="model_a and model_b must have the same parameter"):
        landscape.fit_bezier(net, nu.mlp(4, [6], 3).double(), (X, y))
    with pytest.raises(ValueError, match="ts must be an int >= 2 or a 1-D sequence, got 1"):
        landscape.fit_bezier(net, net, (X, y), steps=0).evaluate((X, y), 1)
    bn = nu.mlp(4, [6], 3, norm="batch")
    with pytest.raises(ValueError, match="layer '1' is BatchNorm1d, which it cannot permute"):
        landscape.align(bn, bn)
    cnn = nu.small_cnn(1, 3, width=4)
    with pytest.raises(ValueError, match="layer '0' is Conv2d"):
        landscape.align(cnn, cnn)
    with pytest.raises(ValueError, match="align supports MLPs .* got Linear"):
        landscape.align(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_iter must be a positive int, got 0"):
        landscape.align(net, net, max_iter=0)


class _Skip(nn.Sequential):  # same layers as an MLP, another function
    def forward(self, x):
        h = self[0](x)
        return self[2](h + torch.relu(h))


def test_fit_bezier_owns_its_curve_and_align_rejects_other_functions():
    X, y = _data()
    a, b = _net(0), _net(1)
    curve = landscape.fit_bezier(a, b, (X, y), steps=2)
    before = {n: p.clone() for n, p in curve.params(0.0).items()}
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)  # the caller changes model_a afterwards
    assert all(torch.equal(curve.params(0.0)[n], p) for n, p in before.items())
    with pytest.raises(ValueError, match="optimizer must be a name, an optimizer class or"):
        landscape.fit_bezier(a, b, (X, y), steps=1,
                             optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    skip = [_Skip(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double() for _ in range(2)]
    with pytest.raises(ValueError, match="align supports MLPs"):
        landscape.align(*skip)
