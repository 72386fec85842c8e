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
    assert hessian.top_eigenvalue(q.loss, torch.zeros(12, dtype=torch.float64), iters=500) == \
        pytest.approx(3.0, rel=1e-6)


def test_finite_difference_gradient():
    (f, theta), *_ = _problem()
    g = torch.func.grad(f)(theta)
    assert torch.allclose(hessian.finite_difference_gradient(f, theta, eps=1e-6), g, atol=1e-8)


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
    with pytest.raises(ValueError, match="eps must be positive"):
        hessian.finite_difference_gradient(f, theta, eps=0.0)
