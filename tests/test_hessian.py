import math
import warnings

import pytest
import torch

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
