"""Tests of nnopt_utils.signal: closed-form mean-field oracles, Monte Carlo, dense Jacobians."""

from __future__ import annotations

import math

import pytest
import torch

import nnopt_utils as nu
from nnopt_utils import signal as S


# ---------------------------------------------------------------------------------------
# theory: closed forms

def test_gaussian_expectation_moments_exact():
    q = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    assert torch.allclose(S.gaussian_expectation(lambda u: u**2, q), q, rtol=1e-12)
    assert torch.allclose(S.gaussian_expectation(lambda u: u**4, q), 3 * q**2, rtol=1e-12)


def test_relu_fixed_point_and_chi1_closed_form():
    sw = torch.tensor([0.5, 1.0, 1.5, 1.9], dtype=torch.float64)
    sb = torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64)
    q = S.fixed_point_q(sw, sb, "relu")
    assert torch.allclose(q, sb / (1 - sw / 2), rtol=1e-9)
    assert torch.allclose(S.chi1(sw, sb, "relu"), sw / 2, rtol=1e-12)


def test_relu_divergent_and_identity_maps():
    q = S.fixed_point_q([2.0, 2.5], 0.1, "relu")
    assert torch.isinf(q).all()
    # sigma_w2 = 2, sigma_b2 = 0: the variance map is the identity, q0 is returned
    assert float(S.fixed_point_q(2.0, 0.0, "relu", q0=3.0)) == pytest.approx(3.0)


def test_linear_activation_oracles():
    # V(q) = sigma_w2 q + sigma_b2, q* = sigma_b2 / (1 - sigma_w2), chi_1 = sigma_w2
    sw = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    assert torch.allclose(S.variance_map(2.0, sw, 0.1, "linear"), 2 * sw + 0.1, rtol=1e-12)
    assert torch.allclose(S.fixed_point_q(sw, 0.1, "linear"), 0.1 / (1 - sw), rtol=1e-9)
    assert torch.allclose(S.chi1(sw, 0.1, "linear"), sw, rtol=1e-12)
    # the linear correlation map: (sigma_w2 q c + sigma_b2) / q*
    c = torch.linspace(-1, 1, 7, dtype=torch.float64)
    q = 0.1 / (1 - 0.6)
    want = (0.6 * q * c + 0.1) / q
    assert torch.allclose(S.correlation_map(c, 0.6, 0.1, "linear"), want, atol=1e-10)
    assert float(S.order_chaos_boundary(0.3, "linear")) == pytest.approx(1.0)


def test_arccos_kernel_values():
    k = S.arccos_kernel(torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(k, torch.tensor([0.0, 1 / math.pi, 1.0], dtype=torch.float64),
                          atol=1e-12)


def test_relu_correlation_map_matches_quadrature():
    c = torch.linspace(-0.99, 0.99, 9, dtype=torch.float64)
    for sw, sb in ((2.0, 0.0), (1.5, 0.1), (1.0, 0.5)):
        exact = S.relu_correlation_map(c, sw, sb)
        quad = S.correlation_map(c, sw, sb, "relu", n=96)
        assert (exact - quad).abs().max() < 3e-3, (sw, sb)


def test_relu_correlation_map_slope_is_chi1():
    h = 1e-6
    for sw, sb in ((2.0, 0.0), (1.5, 0.1)):
        slope = (1 - S.relu_correlation_map(1 - h, sw, sb)) / h
        assert float(slope) == pytest.approx(sw / 2, rel=1e-3)


def test_tanh_boundary_sigma_b_zero_is_one():
    b = S.order_chaos_boundary([0.0, 0.05, 0.1], "tanh")
    assert float(b[0]) == pytest.approx(1.0, abs=1e-6)
    # on the boundary chi_1 = 1; off it, below 1 (ordered) and above 1 (chaotic)
    x = S.chi1(b[1:], torch.tensor([0.05, 0.1], dtype=torch.float64), "tanh")
    assert torch.allclose(x, torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert float(S.chi1(0.9 * b[1], 0.05, "tanh")) < 1 < float(S.chi1(1.1 * b[1], 0.05, "tanh"))
    assert torch.allclose(S.order_chaos_boundary([0.0, 0.7], "relu"),
                          torch.full((2,), 2.0, dtype=torch.float64))


def test_chi1_is_slope_of_correlation_map_at_one():
    sw, sb, h = 1.5, 0.05, 1e-5
    q = S.fixed_point_q(sw, sb, "tanh")
    slope = (1 - S.correlation_map(1 - h, sw, sb, "tanh", q=q, n=64)) / h
    assert float(slope) == pytest.approx(float(S.chi1(sw, sb, "tanh")), rel=1e-3)


def test_mean_field_depth_scales():
    sw = torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64)
    mf = S.mean_field(sw, 0.05, "tanh")
    # ordered points: c* = 1 and xi_c = -1 / ln chi_1
    assert torch.allclose(mf.c_star[:2], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(mf.xi_c[:2], -1 / torch.log(mf.chi1[:2]))
    # chaotic point: c* < 1 is a fixed point of the correlation map, chi_c < 1
    c3 = mf.c_star[2]
    assert 0 < c3 < 1
    assert float(S.correlation_map(c3, 3.0, 0.05, "tanh")) == pytest.approx(float(c3), abs=1e-8)
    assert 0 < mf.chi_c[2] < 1 and mf.chi1[2] > 1
    # xi_q from the slope of the variance map (finite differences)
    q, h = mf.q_star[1], 1e-6
    fd = (S.variance_map(q + h, 1.5, 0.05) - S.variance_map(q - h, 1.5, 0.05)) / (2 * h)
    assert float(fd) == pytest.approx(float(mf.chi_q[1]), rel=1e-6)


def test_vectorized_over_grid_matches_pointwise():
    sw, sb = torch.meshgrid(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.1]),
                            indexing="ij")
    grid = S.chi1(sw, sb, "tanh")
    assert grid.shape == (3, 2)
    assert float(grid[1, 1]) == pytest.approx(float(S.chi1(2.0, 0.1, "tanh")), rel=1e-6)


# ---------------------------------------------------------------------------------------
# theory against Monte Carlo

def test_quadrature_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    n = 400_000
    sw, sb, q, c = 1.8, 0.1, 0.7, 0.4
    z1 = torch.randn(n, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, generator=g, dtype=torch.float64)
    u1, u2 = math.sqrt(q) * z1, math.sqrt(q) * (c * z1 + math.sqrt(1 - c * c) * z2)
    vq = sw * torch.tanh(u1).pow(2).mean() + sb
    assert float(S.variance_map(q, sw, sb, "tanh")) == pytest.approx(float(vq), rel=5e-3)
    cmc = (sw * (torch.tanh(u1) * torch.tanh(u2)).mean() + sb) / vq
    assert float(S.correlation_map(c, sw, sb, "tanh", q=q)) == pytest.approx(float(cmc), abs=5e-3)
    chi = sw * (1 - torch.tanh(u1) ** 2).pow(2).mean()
    assert float(S.chi1(sw, sb, "tanh", q=q)) == pytest.approx(float(chi), rel=5e-3)


def test_callable_activation_equals_named():
    a = S.fixed_point_q(1.7, 0.1, lambda x: torch.tanh(x))
    b = S.fixed_point_q(1.7, 0.1, "tanh")
    assert torch.allclose(a, b)


def test_simulated_wide_net_reaches_q_star():
    # each layer of width n adds a relative fluctuation ~ sqrt(2/n); average layers and nets
    torch.manual_seed(0)
    sw, sb = 1.5, 0.05
    X = torch.randn(32, 100)
    q = torch.stack([S.layer_statistics(S.mean_field_mlp(100, 400, 18, sigma_w2=sw, sigma_b2=sb,
                                                         seed=s), X).preact_q[10:]
                     for s in range(3)])
    q_star = float(S.fixed_point_q(sw, sb, "tanh"))
    assert q.mean().item() == pytest.approx(q_star, rel=0.05)


# ---------------------------------------------------------------------------------------
# measurement

def test_layer_statistics_shapes_values_and_no_side_effects():
    model = nu.mlp(8, [16, 16], 3, activation="relu", seed=0)
    X, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    st = S.layer_statistics(model, X, y)
    assert len(st) == 3 and st.fan_in == [8, 16, 16] and st.fan_out == [16, 16, 3]
    assert st.act_var[0].item() == pytest.approx(X.double().var(unbiased=False).item())
    h1 = model[0](X).double()
    assert st.preact_var[0].item() == pytest.approx(h1.var(unbiased=False).item(), rel=1e-6)
    # weight gradient norms equal autograd's
    torch.nn.functional.cross_entropy(model(X), y).backward()
    for lin, w in zip(model.layers, st.weight_grad_norm):
        assert w.item() == pytest.approx(lin.weight.grad.norm().item(), rel=1e-5)
    df = st.to_frame()
    assert list(df["fan_out"]) == [16, 16, 3]
    # without targets: no gradients, no .grad touched
    model.zero_grad(set_to_none=True)
    st2 = S.layer_statistics(model, X)
    assert torch.isnan(st2.grad_norm).all()
    assert all(p.grad is None for p in model.parameters())


def test_jacobian_singular_values_match_dense_jacobian():
    torch.manual_seed(0)
    model = nu.mlp(6, [10, 10], 4, activation="tanh", seed=3).double()
    X = torch.randn(5, 6, dtype=torch.float64)
    sv = S.jacobian_singular_values(model, X)
    assert sv.shape == (5, 4)
    for i in range(5):
        J = torch.autograd.functional.jacobian(model, X[i])
        assert torch.allclose(sv[i], torch.linalg.svdvals(J), atol=1e-12)


def test_orthogonal_linear_net_is_an_isometry():
    net = S.mean_field_mlp(32, 32, 20, sigma_w2=1.0, activation="linear", weights="orthogonal",
                           seed=0, dtype=torch.float64)
    sv = S.jacobian_singular_values(net, torch.randn(3, 32, dtype=torch.float64))
    assert (sv - 1).abs().max() < 1e-12


def test_mean_field_mlp_statistics_and_seed():
    a = S.mean_field_mlp(400, 400, 1, sigma_w2=2.0, sigma_b2=0.5, seed=4)
    b = S.mean_field_mlp(400, 400, 1, sigma_w2=2.0, sigma_b2=0.5, seed=4)
    w = a[0].weight.double()
    assert torch.equal(a[0].weight, b[0].weight)
    assert w.var().item() == pytest.approx(2.0 / 400, rel=0.02)
    assert a[0].bias.double().var().item() == pytest.approx(0.5, rel=0.2)


# ---------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("call, match", [
    (lambda: S.variance_map(1.0, 1.0, 0.0, "tahn"), "unknown activation 'tahn'"),
    (lambda: S.variance_map(-1.0, 1.0), "q must be non-negative"),
    (lambda: S.chi1(1.0, -0.1), "sigma_b2 must be non-negative"),
    (lambda: S.correlation_map(1.5, 1.0), r"correlations must lie in \[-1, 1\]"),
    (lambda: S.fixed_point_q(1.0, q0=0.0), "q0 must be a positive number"),
    (lambda: S.gaussian_expectation(torch.tanh, 1.0, n=1), "quadrature order"),
    (lambda: S.relu_correlation_map(0.5, 2.5, 0.1), "needs sigma_w2 < 2"),
    (lambda: S.mean_field_mlp(4, 4, 2, weights="orthogonl"), "unknown weights 'orthogonl'"),
    (lambda: S.mean_field_mlp(4, 4, 0), "depth must be a positive int"),
    (lambda: S.jacobian_singular_values(torch.nn.Linear(3, 2), torch.randn(3)), "2-D tensor"),
    (lambda: S.layer_statistics(torch.nn.ReLU(), torch.randn(2, 3)), "no nn.Linear"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
