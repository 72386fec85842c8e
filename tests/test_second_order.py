"""nnopt_utils.second_order against dense oracles: HVP vs torch.func.hessian, CG vs
torch.linalg.solve, K-FAC vs the exact Fisher and Newton, Shampoo vs its SVD closed form,
block coordinate descent monotonicity, bad input."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, hessian, jacrev

import nnopt_utils as nu
from nnopt_utils import second_order as so


D = torch.float64


def spd(n: int, kappa: float = 50.0, seed: int = 0) -> torch.Tensor:
    return nu.quadratic(n, kappa=kappa, seed=seed).A


def test_hvp_equals_dense_hessian():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 3, dtype=D, generator=g)
    X = torch.randn(20, 5, dtype=D, generator=g)

    def f(w):
        return torch.tanh(X @ w).pow(2).sum() + w.pow(4).sum()

    v = torch.randn(5, 3, dtype=D, generator=g)
    H = hessian(f)(W).reshape(15, 15)
    torch.testing.assert_close(so.hvp(f, W, v).reshape(-1), H @ v.reshape(-1))


def test_hvp_tuple_params():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, dtype=D, generator=g), torch.randn(2, dtype=D, generator=g)

    def f(ps):
        x, y = ps
        return (x.sin().sum() * y.pow(2).sum()) + (x[:2] * y).sum() ** 2

    va, vb = torch.randn(3, dtype=D, generator=g), torch.randn(2, dtype=D, generator=g)
    flat = lambda z: f((z[:3], z[3:]))  # noqa: E731
    H = hessian(flat)(torch.cat([a, b]))
    ha, hb = so.hvp(f, (a, b), (va, vb))
    torch.testing.assert_close(torch.cat([ha, hb]), H @ torch.cat([va, vb]))


def test_gnvp_equals_dense_gauss_newton():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(10, 4, dtype=D, generator=g)
    Y = torch.randn(10, 3, dtype=D, generator=g)
    w = torch.randn(12, dtype=D, generator=g)
    model = lambda p: torch.tanh(X @ p.reshape(4, 3))  # noqa: E731
    out_loss = lambda o: 0.5 * (o - Y).pow(2).sum()  # noqa: E731
    J = jacrev(model)(w).reshape(30, 12)
    v = torch.randn(12, dtype=D, generator=g)
    torch.testing.assert_close(so.gnvp(model, out_loss, w, v), J.T @ (J @ v))


def test_cg_solves_spd_system():
    A = spd(30, kappa=100.0)
    b = torch.randn(30, dtype=D, generator=torch.Generator().manual_seed(3))
    res = so.conjugate_gradient(lambda v: A @ v, b, tol=1e-10, max_iter=60)
    assert res.converged and res.iterations <= 45  # n = 30 in exact arithmetic
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)
    # at most as many steps as distinct eigenvalues: 3 clusters -> 3 steps
    Q = torch.linalg.qr(torch.randn(30, 30, dtype=D, generator=torch.Generator().manual_seed(4)))[0]
    lam = torch.tensor([1.0] * 10 + [5.0] * 10 + [20.0] * 10, dtype=D)
    A3 = (Q * lam) @ Q.T
    res3 = so.conjugate_gradient(lambda v: A3 @ v, b, tol=1e-10)
    assert res3.converged and res3.iterations == 3


def test_cg_negative_curvature_and_x0():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=D))
    res = so.conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 1.0], dtype=D))
    assert res.negative_curvature and not res.converged
    A = spd(8)
    b = torch.ones(8, dtype=D)
    x_star = torch.linalg.solve(A, b)
    res = so.conjugate_gradient(lambda v: A @ v, b, x0=x_star.clone())
    assert res.iterations == 0 and res.converged


def test_cg_zero_right_hand_side_returns_zero():
    # b = 0: the solution is 0, whatever the start (a relative test ||r|| <= tol ||b|| = 0
    # never stops, and the start is not a solution)
    A = spd(8)
    for x0 in (None, torch.ones(8, dtype=D)):
        res = so.conjugate_gradient(lambda v: A @ v, torch.zeros(8, dtype=D), x0=x0)
        assert res.converged and torch.equal(res.x, torch.zeros(8, dtype=D))


def _linear_layer_problem(n=40, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=D, generator=g)
    Y = X @ torch.randn(d, k, dtype=D, generator=g) + 0.3 * torch.randn(n, k, dtype=D, generator=g)
    layer = torch.nn.Linear(d, k).double()
    return X, Y, layer


def test_kfac_factors_equal_exact_fisher_of_linear_layer():
    """Gaussian likelihood, single Linear layer: the Fisher is exactly kron(G, A)."""
    X, Y, layer = _linear_layer_problem()
    opt = so.KFAC(layer, fisher="exact", likelihood="gaussian")
    out = layer(X)
    opt.update_curvature(out)
    A, G = opt.factors[layer]
    # dense oracle: F = (1/n) sum_i J_i^T J_i, J_i = d out_i / d [W, b] (W row-major, then b)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def out_i(W, b, x):
        return functional_call(layer, {"weight": W, "bias": b}, (x,))

    JW, Jb = torch.vmap(jacrev(out_i, argnums=(0, 1)), in_dims=(None, None, 0))(
        params["weight"], params["bias"], X)
    k, d = params["weight"].shape
    # order the columns like vec([W, b]) row-major: for each output row o: W[o, :], b[o]
    J = torch.cat([JW, Jb.unsqueeze(-1)], -1).reshape(len(X), k, k * (d + 1))
    F = torch.einsum("nki,nkj->ij", J, J) / len(X)
    torch.testing.assert_close(torch.kron(G, A), F)
    # and the preconditioned gradient equals the damped Fisher's inverse applied to vec(grad)
    loss = 0.5 * (out - Y).pow(2).sum(1).mean()
    gW, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
    grad = torch.cat([gW, gb.unsqueeze(1)], 1)
    damp = 1e-2
    s = damp**0.5
    Fd = torch.kron(G + s * torch.eye(k, dtype=D), A + s * torch.eye(d + 1, dtype=D))
    dense = torch.linalg.solve(Fd, grad.reshape(-1)).reshape(k, d + 1)
    torch.testing.assert_close(so.kfac_precondition(grad, A, G, damp), dense)


def test_kfac_one_step_is_newton_on_least_squares():
    X, Y, layer = _linear_layer_problem()
    opt = so.KFAC(layer, lr=1.0, damping=0.0, fisher="exact")
    out = layer(X)
    opt.update_curvature(out)
    opt.zero_grad()
    (0.5 * (out - Y).pow(2).sum(1).mean()).backward()
    opt.step()
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=D)], 1)
    sol = torch.linalg.lstsq(X1, Y).solution  # (d+1, k)
    torch.testing.assert_close(layer.weight.detach(), sol[:-1].T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(layer.bias.detach(), sol[-1], rtol=1e-7, atol=1e-8)


def test_kfac_categorical_exact_G_is_mean_output_hessian():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(30, 4, dtype=D, generator=g)
    layer = torch.nn.Linear(4, 5).double()
    opt = so.KFAC(layer, fisher="exact", likelihood="categorical")
    out = layer(X)
    opt.update_curvature(out)
    _, G = opt.factors[layer]
    p = out.detach().softmax(-1)
    H = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(0)
    torch.testing.assert_close(G, H)
    # sampled / empirical Fisher run and give PSD factors of the right size
    for fisher in ("sampled", "empirical"):
        o2 = so.KFAC(layer, fisher=fisher, likelihood="categorical")
        out = layer(X)
        o2.update_curvature(out, torch.randint(0, 5, (30,), generator=g))
        A, G = o2.factors[layer]
        assert A.shape == (5, 5) and G.shape == (5, 5)
        assert torch.linalg.eigvalsh(G).min() > -1e-12
        o2.remove_hooks()


def test_kfac_state_dict_round_trip_keeps_curvature():
    """Saving and loading mid-run must continue the same run: the Kronecker factors (an
    exponential average here) are part of the state."""
    import copy

    g = torch.Generator().manual_seed(9)
    X, y = torch.randn(64, 6, dtype=D, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = nu.mlp(6, [8], 3, seed=0).double()
    opt = so.KFAC(model, lr=0.3, damping=1e-2, ema=0.9, fisher="exact",
                  likelihood="categorical")
    lossf = torch.nn.functional.cross_entropy

    def run(m, o, steps):
        for _ in range(steps):
            out = m(X)
            o.update_curvature(out)
            o.zero_grad()
            lossf(out, y).backward()
            o.step()

    run(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert {"A", "G"} <= set(sd["state"][0])
    clone = nu.mlp(6, [8], 3, seed=1).double()  # other weights, overwritten from the save
    clone.load_state_dict(model.state_dict())
    opt2 = so.KFAC(clone, lr=0.3, damping=1e-2, ema=0.9, fisher="exact",
                   likelihood="categorical")
    opt2.load_state_dict(sd)
    for layer, twin in zip(opt.layers, opt2.layers):
        torch.testing.assert_close(opt2.factors[twin], opt.factors[layer], rtol=0, atol=0)
    run(model, opt, 2)
    run(clone, opt2, 2)
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_kfac_trains_mlp_on_digits():
    ds = nu.digits()
    X, y = ds.X[:512], ds.y[:512]
    model = nu.mlp(64, [32], 10, seed=0)
    opt = so.KFAC(model, lr=0.5, damping=1e-2, ema=0.9, fisher="sampled",
                  likelihood="categorical")
    lossf = torch.nn.functional.cross_entropy
    first = None
    for t in range(15):
        out = model(X)
        opt.update_curvature(out)
        loss = lossf(out, y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(lossf(model(X), y).detach()) < 0.2 * first


def test_shampoo_one_step_is_polar_factor():
    g = torch.Generator().manual_seed(6)
    G = torch.randn(5, 3, dtype=D, generator=g)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    d = so.shampoo_direction(G, G @ G.T, G.T @ G, eps=0.0)
    torch.testing.assert_close(d, U @ Vh)
    torch.testing.assert_close(torch.linalg.svdvals(d), torch.ones(3, dtype=D))
    # the optimizer's first step from zero statistics does the same
    W = torch.nn.Parameter(torch.zeros(5, 3, dtype=D))
    opt = so.Shampoo([W], lr=0.5, eps=0.0)
    W.grad = G.clone()
    opt.step()
    torch.testing.assert_close(W.detach(), -0.5 * U @ Vh)


def test_shampoo_first_step_with_eps_is_polar_factor():
    # G = I with G[0, 0] = 1000 in float32: U V^T = I. With eps > 0 every direction gets
    # (s^2 + eps)^(-1/4); the pseudo-inverse cutoff (10 * 1e6 * eps_mach = 1.2 > 1) dropped all
    # but the first, so only coordinate 0 moved
    for dtype in (torch.float32, D):
        G = torch.eye(10, dtype=dtype)
        G[0, 0] = 1000.0
        W = torch.nn.Parameter(torch.zeros(10, 10, dtype=dtype))
        opt = so.Shampoo([W], lr=0.5, eps=1e-4)
        W.grad = G.clone()
        opt.step()
        torch.testing.assert_close(W.detach(), -0.5 * torch.eye(10, dtype=dtype), rtol=0,
                                   atol=1e-4)
    # a vector: (g g^T + eps I)^{-1/2} g = g / sqrt(|g|^2 + eps), g an eigenvector
    b = torch.nn.Parameter(torch.zeros(3, dtype=D))
    opt = so.Shampoo([b], lr=1.0, eps=1e-4)
    gv = torch.tensor([3.0, 1e-3, 0.0], dtype=D)
    b.grad = gv.clone()
    opt.step()
    torch.testing.assert_close(b.detach(), -gv / (gv.dot(gv) + 1e-4).sqrt(), rtol=1e-12, atol=0)


def test_shampoo_vector_and_second_step():
    g = torch.Generator().manual_seed(7)
    b = torch.nn.Parameter(torch.zeros(4, dtype=D))
    W = torch.nn.Parameter(torch.zeros(3, 2, dtype=D))
    opt = so.Shampoo([W, b], lr=1.0, eps=1e-3)
    G1, G2 = torch.randn(3, 2, dtype=D, generator=g), torch.randn(3, 2, dtype=D, generator=g)
    g1, g2 = torch.randn(4, dtype=D, generator=g), torch.randn(4, dtype=D, generator=g)
    for G, gv in ((G1, g1), (G2, g2)):
        W.grad, b.grad = G.clone(), gv.clone()
        opt.step()
    L = G1 @ G1.T + G2 @ G2.T
    R = G1.T @ G1 + G2.T @ G2
    I3, I2 = torch.eye(3, dtype=D), torch.eye(2, dtype=D)
    root = lambda M, p: so.matrix_power(M, p)  # noqa: E731
    expect_W = -(root(G1 @ G1.T + 1e-3 * I3, -0.25) @ G1 @ root(G1.T @ G1 + 1e-3 * I2, -0.25)) \
        - root(L + 1e-3 * I3, -0.25) @ G2 @ root(R + 1e-3 * I2, -0.25)
    torch.testing.assert_close(W.detach(), expect_W)
    H1 = torch.outer(g1, g1) + 1e-3 * torch.eye(4, dtype=D)
    H2 = H1 + torch.outer(g2, g2)
    torch.testing.assert_close(b.detach(), -(root(H1, -0.5) @ g1) - root(H2, -0.5) @ g2)


def test_matrix_power():
    A = spd(6, kappa=10.0)
    torch.testing.assert_close(so.matrix_power(A, -1.0), torch.linalg.inv(A))
    R = so.matrix_power(A, 0.25)
    torch.testing.assert_close(R @ R @ R @ R, A)


def test_matrix_power_eps_keeps_null_directions():
    M = torch.diag(torch.tensor([1e8, 0.0], dtype=D))
    torch.testing.assert_close(so.matrix_power(M, -0.25, eps=1e-4),
                               torch.diag(torch.tensor([0.01, 10.0], dtype=D)))
    # eps = 0: the pseudo-inverse power, on the range only
    torch.testing.assert_close(so.matrix_power(M, -0.25),
                               torch.diag(torch.tensor([0.01, 0.0], dtype=D)))
    with pytest.raises(ValueError, match="p must be a finite number"):
        so.matrix_power(M, float("nan"))


def test_hessian_free_beats_gd_on_small_net():
    data, _ = nu.teacher_student(64, 4, width=3, activation="tanh", seed=0, dtype=D)
    X, y = data.X, data.y
    shapes = [(8, 4), (1, 8)]
    sizes = [a * b for a, b in shapes]

    def model_fn(p):
        W1, W2 = p[: sizes[0]].reshape(shapes[0]), p[sizes[0]:].reshape(shapes[1])
        return (torch.tanh(X @ W1.T) @ W2.T).squeeze(1)

    out_loss = lambda o: 0.5 * (o - y).pow(2).mean()  # noqa: E731
    loss_fn = lambda p: out_loss(model_fn(p))  # noqa: E731
    p0 = 0.5 * torch.randn(sum(sizes), dtype=D, generator=torch.Generator().manual_seed(0))
    hf = so.hessian_free(loss_fn, p0, steps=12, cg_iters=10, damping=1.0,
                         model_fn=model_fn, out_loss_fn=out_loss)
    assert all(b <= a for a, b in zip(hf.losses, hf.losses[1:]))
    assert hf.losses[-1] < 1e-2 * hf.losses[0]
    hh = so.hessian_free(loss_fn, p0, steps=3, cg_iters=5, damping=1.0, curvature="hessian")
    assert hh.losses[-1] < hh.losses[0]


@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_hessian_free_counts_every_product(monkeypatch, curvature):
    data, _ = nu.teacher_student(32, 3, width=2, activation="tanh", seed=1, dtype=D)
    X, y = data.X, data.y

    def model_fn(p):
        return torch.tanh(X @ p[:12].reshape(4, 3).T) @ p[12:]

    out_loss = lambda o: 0.5 * (o - y).pow(2).mean()  # noqa: E731
    loss_fn = lambda p: out_loss(model_fn(p))  # noqa: E731
    calls = [0]
    name = "gnvp" if curvature == "gauss_newton" else "hvp"
    original = getattr(so, name)

    def counted(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(so, name, counted)
    p0 = 0.5 * torch.randn(16, dtype=D, generator=torch.Generator().manual_seed(2))
    hf = so.hessian_free(loss_fn, p0, steps=6, cg_iters=4, damping=1.0, curvature=curvature,
                         model_fn=model_fn, out_loss_fn=out_loss)
    assert hf.products == calls[0] and sum(hf.step_products) == calls[0]
    # per step: CG's products, the warm start's residual (not on the first step: x0 = 0),
    # and the product in rho
    assert hf.step_products[0] == hf.cg_iterations[0] + 1
    assert all(c >= i + 1 for c, i in zip(hf.step_products, hf.cg_iterations))


def test_block_coordinate_descent_monotone():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(6, 50, dtype=D, generator=g)
    Y = torch.randn(4, 6, dtype=D, generator=g) @ X
    Y = Y + 0.1 * torch.randn(Y.shape, dtype=D, generator=g)
    W1 = torch.randn(2, 6, dtype=D, generator=g)
    W2 = torch.randn(4, 2, dtype=D, generator=g)
    f = lambda ws: 0.5 * (Y - ws[1] @ ws[0] @ X).pow(2).sum()  # noqa: E731
    solve1 = lambda ws: torch.linalg.pinv(ws[1]) @ Y @ torch.linalg.pinv(X)  # noqa: E731
    solve2 = lambda ws: Y @ torch.linalg.pinv(ws[0] @ X)  # noqa: E731
    res = so.block_coordinate_descent(f, [W1, W2], [solve1, solve2], sweeps=30)
    L = torch.tensor(res.losses)
    assert (L[1:] <= L[:-1] + 1e-9 * L[0]).all()
    assert len(res.losses) == 61
    # reaches the best rank-2 fit (Eckart-Young on the projected targets)
    P = Y @ torch.linalg.pinv(X) @ X
    s = torch.linalg.svdvals(P)
    best = 0.5 * ((Y - P).pow(2).sum() + s[2:].pow(2).sum())
    assert res.losses[-1] == pytest.approx(float(best), rel=1e-6)


@pytest.mark.parametrize("make", [
    lambda: so.hvp(3, torch.zeros(2), torch.zeros(2)),
    lambda: so.hvp(lambda p: p.sum(), torch.zeros(2), torch.zeros(3)),
    lambda: so.conjugate_gradient(lambda v: v, [1.0, 2.0]),
    lambda: so.conjugate_gradient(lambda v: v, torch.ones(3), x0=torch.zeros(2)),
    lambda: so.conjugate_gradient(lambda v: v, torch.ones(3), max_iter=0),
    lambda: so.conjugate_gradient(lambda v: v[:2], torch.ones(3)),
    lambda: so.KFAC(torch.nn.ReLU()),
    lambda: so.KFAC(torch.nn.Linear(2, 2), fisher="diagonal"),
    lambda: so.KFAC(torch.nn.Linear(2, 2), likelihood="poisson"),
    lambda: so.KFAC(torch.nn.Linear(2, 2), lr=-1.0),
    lambda: so.KFAC(torch.nn.Linear(2, 2), ema=1.0),
    lambda: so.kfac_precondition(torch.ones(2, 3), torch.eye(2), torch.eye(2)),
    lambda: so.kfac_factors(torch.ones(4, 2), torch.ones(3, 2)),
    lambda: so.Shampoo([torch.nn.Parameter(torch.zeros(2))], lr=0.0),
    lambda: so.Shampoo([torch.nn.Parameter(torch.zeros(2))], update_freq=0),
    lambda: so.shampoo_direction(torch.ones(2, 3), torch.eye(3), torch.eye(3)),
    lambda: so.matrix_power(torch.ones(2, 3), 0.5),
    lambda: so.hessian_free(lambda p: p.sum(), torch.zeros(2), curvature="bfgs"),
    lambda: so.hessian_free(lambda p: p.sum(), torch.zeros(2)),  # GN without model_fn
    lambda: so.hessian_free(lambda p: p.sum(), torch.zeros(2, 2), curvature="hessian"),
    lambda: so.block_coordinate_descent(lambda ws: 0, [torch.zeros(1)], []),
])
def test_bad_input(make):
    with pytest.raises(ValueError):
        make()


def test_kfac_step_needs_curvature_and_messages():
    layer = torch.nn.Linear(2, 2)
    opt = so.KFAC(layer)
    layer(torch.ones(3, 2)).sum().backward()
    with pytest.raises(ValueError, match="update_curvature"):
        opt.step()
    with pytest.raises(ValueError, match="unknown fisher 'diag'"):
        so.KFAC(layer, fisher="diag")
    e = so.KFAC(layer, fisher="empirical")
    with pytest.raises(ValueError, match="needs the targets"):
        e.update_curvature(layer(torch.ones(3, 2)))
