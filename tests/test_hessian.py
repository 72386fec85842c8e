import math
import warnings

import pytest
import torch
from torch import nn

import nnopt_utils as nu
from nnopt_utils import hessian


def _problem():
    torch.manual_seed(0)
    net = nu.mlp(4, [6], 2, activation="tanh", seed=0).double()
    X, Y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    return hessian.flat_function(net, nu.train.LOSSES["mse"], X, Y), net, X, Y


def test_flat_function_matches_module_loss():
    (f, theta), net, X, Y = _problem()
    assert f(theta).item() == pytest.approx(nu.train.LOSSES["mse"](net(X), Y).item())


def test_hvp_equals_dense_hessian_times_v():
    (f, theta), *_ = _problem()
    H = hessian.dense_hessian(f, theta)
    assert torch.allclose(H, H.T, atol=1e-12)
    v = torch.randn_like(theta)
    assert torch.allclose(hessian.hvp(f, theta, v), H @ v, atol=1e-10)


def test_quadratic_hessian_and_top_eigenvalue():
    q = nu.quadratic(12, L=3.0, kappa=30.0, seed=0)
    H = hessian.dense_hessian(q.loss, torch.zeros(12, dtype=torch.float64))
    assert torch.allclose(H, q.A, atol=1e-12)
    assert hessian.top_eigenvalue(q.loss, torch.zeros(12, dtype=torch.float64)) == \
        pytest.approx(3.0, rel=1e-12)


def _spectrum_problem(lam: torch.Tensor, seed: int = 0):
    Q = torch.linalg.qr(torch.randn(len(lam), len(lam), dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(seed)))[0]
    A = (Q * lam) @ Q.T
    return (lambda x: 0.5 * x @ A @ x), torch.zeros(len(lam), dtype=torch.float64), Q


def test_top_eigenvalue_tolerance_is_relative():
    # all eigenvalues below 1e-6: an absolute stopping rule quits at once (1.7e-2 off)
    lam = torch.cat([torch.tensor([1e-7, 0.8e-7], dtype=torch.float64),
                     torch.linspace(0, 5e-8, 38, dtype=torch.float64)])
    f, x0, _ = _spectrum_problem(lam)
    assert hessian.top_eigenvalue(f, x0) == pytest.approx(1e-7, rel=1e-12)
    for scale in (1e-12, 1.0, 1e12):  # the answer scales with H
        g = lambda x, s=scale: s * f(x)  # noqa: E731
        assert hessian.top_eigenvalue(g, x0) == pytest.approx(scale * 1e-7, rel=1e-12)


def test_plus_minus_lambda_returns_eigenvalues():
    # power iteration on diag(3, -3, 1) converges to no eigenvalue (it returned 2.79)
    f, x0, _ = _spectrum_problem(torch.tensor([3.0, -3.0, 1.0], dtype=torch.float64))
    assert hessian.top_eigenvalue(f, x0) == pytest.approx(3.0, rel=1e-12)
    assert hessian.top_eigenvalue(f, x0, which="smallest") == pytest.approx(-3.0, rel=1e-12)
    assert hessian.top_eigenvalue(f, x0, which="magnitude") == pytest.approx(3.0, rel=1e-12)
    both = hessian.lanczos(f, x0, 2, which="magnitude").eigenvalues
    assert torch.allclose(both, torch.tensor([3.0, -3.0], dtype=torch.float64), rtol=1e-12)
    # the same with a bulk below: 200 parameters, +-5 on top
    lam = torch.cat([torch.tensor([5.0, -5.0], dtype=torch.float64),
                     torch.linspace(-1, 1, 198, dtype=torch.float64)])
    f, x0, _ = _spectrum_problem(lam, seed=1)
    r = hessian.lanczos(f, x0, 2, which="magnitude")
    assert r.converged and torch.allclose(r.eigenvalues.abs(), torch.full((2,), 5.0,
                                                                          dtype=torch.float64))


def test_lanczos_matches_dense_hessian_of_a_network():
    (f, theta), *_ = _problem()
    H = hessian.dense_hessian(f, theta)
    ev, V = torch.linalg.eigh(H)
    for which, want, vecs in (("largest", ev.flip(0)[:3], V.flip(1)[:, :3]),
                              ("smallest", ev[:3], V[:, :3])):
        r = hessian.lanczos(f, theta, 3, which=which)
        assert r.converged and r.iterations < theta.numel()
        assert torch.allclose(r.eigenvalues, want, rtol=1e-10, atol=0)
        # eigenvectors up to sign, and the reported residuals are the true ones
        assert torch.allclose((r.eigenvectors * vecs).sum(0).abs(), torch.ones(3,
                              dtype=torch.float64), atol=1e-8)
        true_res = (H @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
        assert torch.allclose(r.residuals, true_res, rtol=1e-6, atol=1e-13)


def test_lanczos_float32_and_warning():
    (f, theta), *_ = _problem()
    H = hessian.dense_hessian(f, theta)
    top = float(torch.linalg.eigvalsh(H)[-1])
    _, _, X, Y = _problem()
    f32 = hessian.flat_function(nu.mlp(4, [6], 2, activation="tanh", seed=0),
                                nu.train.LOSSES["mse"], X.float(), Y.float())[0]
    assert hessian.top_eigenvalue(f32, theta.float()) == pytest.approx(top, rel=1e-5)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        r = hessian.lanczos(f, theta, 2, iters=3)
    assert not r.converged


def test_finite_difference_gradient():
    (f, theta), *_ = _problem()
    g = torch.func.grad(f)(theta)
    assert torch.allclose(hessian.finite_difference_gradient(f, theta, eps=1e-6), g, atol=1e-8)
    assert torch.allclose(hessian.finite_difference_gradient(f, theta), g, atol=1e-10)


def test_finite_difference_default_step_follows_dtype():
    # float32 (what flat_function gives for a default model): a fixed eps = 1e-6 left a 54%
    # error; eps_mach^(1/3) leaves about eps_mach^(2/3)
    torch.manual_seed(0)
    net = nu.mlp(4, [6], 2, activation="tanh", seed=0)
    X, Y = torch.randn(10, 4), torch.randn(10, 2)
    f, theta = hessian.flat_function(net, nu.train.LOSSES["mse"], X, Y)
    assert theta.dtype == torch.float32
    g = torch.func.grad(f)(theta)
    fd = hessian.finite_difference_gradient(f, theta)
    assert float((fd - g).norm() / g.norm()) < 2e-3
    # parameters far from 1 get a step in proportion: f(theta) = sum(theta^3) at theta = 1e3
    big = torch.full((3,), 1e3, dtype=torch.float64)
    fd = hessian.finite_difference_gradient(lambda t: t.pow(3).sum(), big)
    assert torch.allclose(fd, 3 * big**2, rtol=1e-9)


def test_backprop_matches_autograd():
    (f, theta), net, X, Y = _problem()
    manual = torch.cat([g.flatten() for g in nu.models.backprop(net, X, Y)])
    assert torch.allclose(manual, torch.func.grad(f)(theta), atol=1e-14)
    with pytest.raises(ValueError, match="backprop supports"):
        nu.models.backprop(nu.mlp(4, [6], 2, activation="gelu"), X.float(), Y.float())


def test_bad_input():
    (f, theta), *_ = _problem()
    with pytest.raises(ValueError, match="theta must be a 1-D tensor"):
        hessian.dense_hessian(f, theta[None])
    with pytest.raises(ValueError, match="v must match params in structure and shapes"):
        hessian.hvp(f, theta, theta[:3])
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        hessian.hvp(None, theta, theta)
    with pytest.raises(ValueError, match="eps must be a positive number or None"):
        hessian.finite_difference_gradient(f, theta, eps=0.0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 44\]"):
        hessian.lanczos(f, theta, 45)
    with pytest.raises(ValueError, match="unknown which 'top'"):
        hessian.top_eigenvalue(f, theta, which="top")
    with pytest.raises(ValueError, match="iters must be an int >= k = 3"):
        hessian.lanczos(f, theta, 3, iters=2)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        hessian.lanczos(f, theta, tol=0.0)


# --------------------------------------------------------------------------------------
# traces and spectral density


def _classifier(activation, loss, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nu.mlp(5, [7, 6], 3, activation=activation, seed=seed).double()
    X = torch.randn(n, 5, dtype=torch.float64, generator=g)
    y = (
        torch.randint(0, 3, (n,), generator=g)
        if loss == "cross_entropy"
        else torch.randn(n, 3, dtype=torch.float64, generator=g)
    )
    f, theta = hessian.flat_function(net, nu.train.LOSSES[loss], X, y)
    return net, X, y, f, theta


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "linear", "tanh"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_exact_trace_equals_dense_hessian_trace(activation, loss):
    net, X, y, f, theta = _classifier(activation, loss)
    H = hessian.dense_hessian(f, theta)
    want = float(torch.trace(H))
    methods = ["preactivation"] + (["gauss_newton"] if activation != "tanh" else [])
    for method in ["auto", *methods]:
        assert hessian.exact_trace(net, X, y, loss, method=method) == pytest.approx(
            want, rel=1e-10
        )
    assert hessian.hvp_trace(f, theta, chunk_size=17) == pytest.approx(want, rel=1e-10)
    # the nearest wrong answers are far outside rel=1e-10: the bias entries of the
    # diagonal (omitted, the trace would be off by them) and the 1/N of the mean (off by
    # N = 12)
    sizes = [p.numel() for p in net.parameters()]
    offsets = torch.cumsum(torch.tensor([0] + sizes), 0)
    bias = sum(
        float(torch.diagonal(H)[offsets[i] : offsets[i + 1]].sum())
        for i, p in enumerate(net.parameters())
        if p.dim() == 1
    )
    assert abs(bias) > 1e-3 * abs(want)


def test_exact_trace_gauss_newton_is_exact_only_when_piecewise_linear(monkeypatch):
    # ReLU: the Hessian is not the Gauss-Newton matrix (negative eigenvalues) yet the
    # traces agree; tanh: the Gauss-Newton trace misses the phi'' terms, so exact_trace
    # refuses it
    _, X, y, f, theta = _classifier("relu", "cross_entropy")
    assert float(torch.linalg.eigvalsh(hessian.dense_hessian(f, theta))[0]) < -1e-3
    tanh = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    f, theta = hessian.flat_function(tanh, nu.train.LOSSES["cross_entropy"], X, y)
    want = float(torch.trace(hessian.dense_hessian(f, theta)))
    assert hessian.exact_trace(tanh, X, y) == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="method 'gauss_newton' is exact only"):
        hessian.exact_trace(tanh, X, y, method="gauss_newton")
    monkeypatch.setattr(hessian, "_PIECEWISE_LINEAR", (nn.Tanh,))
    wrong = hessian.exact_trace(tanh, X, y, method="gauss_newton")
    assert abs(wrong - want) > 1e-3 * abs(want)


def test_exact_trace_structure_and_loss_checks():
    net, X, y, *_ = _classifier("relu", "cross_entropy")
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"does not support module '1': BatchNorm1d"):
        hessian.exact_trace(bn.double(), X, y)
    with pytest.raises(ValueError, match="needs an nn.Sequential"):
        hessian.exact_trace(nu.residual_mlp(5, 4, 2, 3).double(), X, y)
    with pytest.raises(ValueError, match="unknown method 'gn'"):
        hessian.exact_trace(net, X, y, method="gn")
    with pytest.raises(ValueError, match="same .positive. number of samples"):
        hessian.exact_trace(net, X, y[:5])

    def summed(out, t):
        return nn.functional.cross_entropy(out, t, reduction="sum")

    with pytest.raises(ValueError, match="loss must be a mean over samples"):
        hessian.exact_trace(net, X, y, summed)
    # without biases: no +1 terms, still exact
    nob = nu.mlp(5, [7], 3, bias=False, seed=1).double()
    f, theta = hessian.flat_function(nob, nu.train.LOSSES["cross_entropy"], X, y)
    assert hessian.exact_trace(nob, X, y) == pytest.approx(
        float(torch.trace(hessian.dense_hessian(f, theta))), rel=1e-10
    )


def test_hutchinson_trace_standard_error_and_stop():
    # a diagonal Hessian: every Rademacher probe gives tr H exactly (Gaussian probes
    # would not), so the standard error is 0 and it stops at min_probes
    d = torch.linspace(-1, 3, 20, dtype=torch.float64)
    r = hessian.hutchinson_trace(
        lambda x: 0.5 * (d * x * x).sum(),
        torch.zeros(20, dtype=torch.float64),
        min_probes=4,
        block=3,
    )
    assert r.converged and r.probes == 4 and r.stderr == 0.0
    assert torch.allclose(
        r.samples, torch.full((4,), float(d.sum()), dtype=torch.float64)
    )
    # a network: the estimate lies within 4 standard errors of the dense trace, and the
    # standard error is std / sqrt(m) (not std) and meets the target
    _, _, _, f, theta = _classifier("tanh", "mse")
    want = float(torch.trace(hessian.dense_hessian(f, theta)))
    r = hessian.hutchinson_trace(f, theta, rtol=0.05, max_probes=5000, block=50, seed=1)
    assert r.converged and r.probes == len(r.samples) >= 10
    assert r.stderr == pytest.approx(
        float(r.samples.std()) / math.sqrt(r.probes), rel=1e-12
    )
    assert r.stderr <= 0.05 * abs(r.estimate)
    assert abs(r.estimate - want) < 4 * r.stderr
    # a tighter target needs more probes; the same seed repeats, another one differs
    tight = hessian.hutchinson_trace(
        f, theta, rtol=0.025, max_probes=20000, block=50, seed=1
    )
    assert tight.probes > r.probes
    assert (
        hessian.hutchinson_trace(
            f, theta, rtol=0.05, max_probes=5000, block=50, seed=1
        ).estimate
        == r.estimate
    )
    assert (
        hessian.hutchinson_trace(
            f, theta, rtol=0.05, max_probes=5000, block=50, seed=2
        ).estimate
        != r.estimate
    )
    with pytest.warns(RuntimeWarning, match="raise max_probes"):
        r = hessian.hutchinson_trace(f, theta, rtol=1e-6, max_probes=20, block=8)
    assert not r.converged and r.probes == 20


def test_spectral_density_quadrature_reproduces_moments():
    lam = torch.cat(
        [
            torch.tensor([10.0, 7.0, 5.0], dtype=torch.float64),
            torch.linspace(-0.5, 1, 57, dtype=torch.float64),
        ]
    )
    f, x0, Q = _spectrum_problem(lam)
    A = (Q * lam) @ Q.T
    steps, probes = 6, 40
    r = hessian.spectral_density(f, x0, steps=steps, probes=probes, seed=3)
    assert r.nodes.shape == r.weights.shape == (probes, steps)
    assert torch.allclose(r.weights.sum(1), torch.ones(probes, dtype=torch.float64))
    # Gauss quadrature: sum_j w_j tau_j^k = v^T H^k v exactly for k < 2 steps (the same
    # probes, redrawn from the same generator); weights from the last row of S, or
    # unsquared, fail this at k = 0 or 1
    v = torch.randn(probes, 60, generator=nu.generator(3), dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    Hk = torch.eye(60, dtype=torch.float64)
    for k in range(2 * steps):
        quad = (r.weights * r.nodes**k).sum(1)
        assert torch.allclose(quad, ((v @ Hk) * v).sum(1), rtol=1e-8), k
        if k:  # and the probe mean estimates tr(H^k) / P within 4 standard errors
            se = float(quad.std()) / math.sqrt(probes)
            assert abs(float(quad.mean()) - float((lam**k).mean())) < 4 * se
        Hk = Hk @ A
    # the density integrates to 1 and is the sum of Gaussians at the nodes
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, rel=1e-6)
    t = r.grid[123]
    g = torch.exp(-0.5 * ((t - r.nodes) / r.sigma) ** 2) / (
        r.sigma * math.sqrt(2 * math.pi)
    )
    assert float(r.density[123]) == pytest.approx(
        float((g * r.weights).sum() / probes), rel=1e-12
    )


def test_spectral_density_full_krylov_space_gives_the_eigenvalues():
    # a network with P = 44 parameters: steps = P recovers the dense spectrum exactly
    (f, theta), *_ = _problem()
    ev = torch.linalg.eigvalsh(hessian.dense_hessian(f, theta))
    r = hessian.spectral_density(
        f, theta, steps=theta.numel(), grid=torch.linspace(-1, 1, 5)
    )
    nodes = r.nodes[0][r.weights[0] > 1e-12]
    assert len(nodes) == len(ev)
    assert torch.allclose(nodes, ev, atol=1e-9 * float(ev.abs().max()))
    assert torch.equal(r.grid, torch.linspace(-1, 1, 5).double())


def test_trace_and_density_bad_input():
    *_, f, theta = _classifier("relu", "cross_entropy")
    with pytest.raises(ValueError, match="rtol must be a positive number, got 0"):
        hessian.hutchinson_trace(f, theta, rtol=0)
    with pytest.raises(ValueError, match="max_probes must be an int >= 10, got 5"):
        hessian.hutchinson_trace(f, theta, max_probes=5)
    with pytest.raises(ValueError, match="min_probes must be an int >= 2, got 1"):
        hessian.hutchinson_trace(f, theta, min_probes=1)
    with pytest.raises(ValueError, match="theta must be a 1-D tensor"):
        hessian.hvp_trace(f, theta[None])
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        hessian.hvp_trace(f, theta, chunk_size=0)
    with pytest.raises(
        ValueError, match="steps must be at most the number of parameters"
    ):
        hessian.spectral_density(f, theta, steps=theta.numel() + 1)
    with pytest.raises(ValueError, match="probes must be an int >= 1, got 0"):
        hessian.spectral_density(f, theta, probes=0)
    with pytest.raises(ValueError, match="sigma must be a positive number, got -1"):
        hessian.spectral_density(f, theta, steps=4, sigma=-1.0)
    with pytest.raises(ValueError, match=r"grid must be an int >= 2 or a 1-D tensor"):
        hessian.spectral_density(f, theta, steps=4, grid=torch.zeros(3, 3))


def test_hvp_operator_equals_dense_hessian_for_one_vector_and_a_batch():
    (f, theta), *_ = _problem()
    H = hessian.dense_hessian(f, theta)
    op = hessian.hvp_operator(f, theta)
    V = torch.randn(5, theta.numel(), generator=torch.Generator().manual_seed(1),
                    dtype=theta.dtype)
    torch.testing.assert_close(op(V[0]), H @ V[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op(V), V @ H, rtol=1e-10, atol=1e-12)  # H symmetric
    torch.testing.assert_close(op(V[1]), hessian.hvp(f, theta, V[1]), rtol=1e-10, atol=1e-12)
    linear = hessian.hvp_operator(lambda t: (2 * t).sum(), theta)  # H = 0
    assert torch.equal(linear(V), torch.zeros_like(V))
    with pytest.raises(ValueError, match=r"v must have shape \(\d+,\) or \(B, \d+\), got \(3,\)"):
        op(torch.ones(3, dtype=theta.dtype))


# --------------------------------------------------------------------------------------
# sharpness_callback


def test_sharpness_callback_equals_lanczos_on_the_model_at_that_step():
    net = nu.mlp(4, [8], 3, activation="tanh", seed=0).double()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    Y = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    tracker = hessian.sharpness_callback(X, Y, loss="mse", every=3, seed=5)
    snapshots = {}

    def callback(t, model, row):
        tracker(t, model, row)
        snapshots[t] = [p.detach().clone() for p in model.parameters()]

    h = nu.fit(net, (X, Y), loss="mse", lr=0.5, steps=10, callback=callback, progress=False)
    assert tracker.steps == [0, 3, 6, 9]
    assert h["sharpness"].tolist() == tracker.values  # recorded into the History
    assert [r["step"] for r in h.rows if "sharpness" in r] == tracker.steps
    for t, value in zip(tracker.steps, tracker.values):
        model = nu.mlp(4, [8], 3, activation="tanh", seed=0).double()
        with torch.no_grad():
            for p, q in zip(model.parameters(), snapshots[t]):
                p.copy_(q)
        f, theta = hessian.flat_function(model, nu.train.LOSSES["mse"], X, Y)
        separate = hessian.lanczos(f, theta, 1, seed=5).eigenvalues[0].item()
        assert value == pytest.approx(separate, rel=1e-12)
        dense = torch.linalg.eigvalsh(hessian.dense_hessian(f, theta))[-1].item()
        assert value == pytest.approx(dense, rel=1e-6)
    # the iterates moved: the sharpness is measured at each step's own parameters
    assert len(set(tracker.values)) == len(tracker.values)


def test_sharpness_callback_on_a_quadratic_is_its_top_eigenvalue():
    # L(w) = 1/(2n) sum_i (a_i . w)^2 = w^T H w / 2 with H = A^T A / n, whatever w is
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    H = A.T @ A / len(A)
    top = torch.linalg.eigvalsh(H)[-1].item()
    net = nn.Linear(6, 1, bias=False).double()
    tracker = hessian.sharpness_callback(A, torch.zeros(30, 1, dtype=torch.float64),
                                         loss="mse", every=2, keep_vectors=True)
    nu.fit(net, (A, torch.zeros(30, 1, dtype=torch.float64)), loss="mse", lr=0.1, steps=6,
           callback=tracker, progress=False)
    assert tracker.steps == [0, 2, 4]
    assert tracker.values == pytest.approx([top] * 3, rel=1e-8)
    u = tracker.eigenvectors[0]
    assert torch.allclose(H @ u, top * u, atol=1e-8)


def test_sharpness_callback_bad_input():
    X, y = torch.randn(5, 2), torch.randn(5)
    for kwargs, match in [({"every": 0}, "every"), ({"every": 2.5}, "every"),
                          ({"every": True}, "every"), ({"tol": -1.0}, "tol"),
                          ({"iters": 0}, "iters"), ({"seed": 1.5}, "seed"),
                          ({"loss": "l2"}, "unknown loss")]:
        with pytest.raises(ValueError, match=match):
            hessian.sharpness_callback(X, y, **kwargs)
    with pytest.raises(ValueError, match="same positive number of samples, got 5 and 4"):
        hessian.sharpness_callback(X, y[:4])
    with pytest.raises(ValueError, match="X must be a tensor"):
        hessian.sharpness_callback([[0.0]], y)


def test_sharpness_callback_leaves_the_model_and_refuses_a_second_run():
    torch.manual_seed(0)
    X, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    net = nu.mlp(4, [8], 1, norm="batch", seed=0).double()
    before = {n: b.clone() for n, b in net.named_buffers()}
    tracker = hessian.sharpness_callback(X, y, loss="mse", every=1)
    tracker(0, net, {})
    assert all(torch.equal(b, before[n]) for n, b in net.named_buffers())
    assert len(tracker.values) == 1
    with pytest.raises(ValueError, match="a SharpnessTracker records one run: step 0"):
        tracker(0, net, {})
