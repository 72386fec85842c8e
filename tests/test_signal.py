"""Tests of nnopt_utils.signal: closed-form mean-field oracles, Monte Carlo, dense Jacobians."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special

import nnopt_utils as nu
from nnopt_utils import signal as S

D = torch.float64
SELU_L, SELU_A = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717


# ---------------------------------------------------------------------------------------
# references: adaptive quadrature (scipy) and closed forms, in NumPy/math

def _quad_expect(f, q: float) -> float:
    """E[f(sqrt(q) z)], z ~ N(0, 1), by adaptive quadrature on [-40, 40] with breakpoints at
    the kink z = 0 and at the scale 1/sqrt(q) of the integrand's features."""
    sq = math.sqrt(q)
    pts = sorted({0.0, -1.0, 1.0, *(s * k / sq for s in (-1, 1) for k in (0.5, 1, 2, 4, 8)
                                    if k / sq < 40)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        v, _ = integrate.quad(lambda z: f(sq * z) * math.exp(-z * z / 2), -40, 40, points=pts,
                              limit=2000, epsabs=0, epsrel=1e-13)
    return v / math.sqrt(2 * math.pi)


def _selu(x):
    return SELU_L * x if x > 0 else SELU_L * SELU_A * math.expm1(x)


def _dselu(x):
    return SELU_L if x > 0 else SELU_L * SELU_A * math.exp(x)


def _ndtr(x):
    return float(special.ndtr(x))


#: (phi, phi') in math for the named activations (reference side)
REF = {
    "tanh": (math.tanh, lambda x: (1 / math.cosh(min(abs(x), 300.0))) ** 2),
    "sigmoid": (special.expit, lambda x: special.expit(x) * special.expit(-x)),
    "erf": (math.erf, lambda x: 2 / math.sqrt(math.pi) * math.exp(-x * x)),
    "gelu": (lambda x: x * _ndtr(x),
             lambda x: _ndtr(x) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)),
    "selu": (_selu, _dselu),
    "softplus": (lambda x: float(np.logaddexp(0.0, x)), special.expit),
    "relu": (lambda x: max(x, 0.0), lambda x: float(x > 0)),
    "leaky_relu": (lambda x: x if x > 0 else 0.01 * x, lambda x: 1.0 if x > 0 else 0.01),
    "linear": (lambda x: x, lambda x: 1.0),
}


# ---------------------------------------------------------------------------------------
# theory: closed forms

def test_gaussian_expectation_moments_exact():
    q = torch.tensor([0.0, 1e-30, 0.5, 1.0, 3.0, 1e4], dtype=torch.float64)
    # q = 0 is evaluated at q = 1e-200 (the limit q -> 0+)
    assert torch.allclose(S.gaussian_expectation(lambda u: u**2, q), q, rtol=1e-14, atol=1e-199)
    assert torch.allclose(S.gaussian_expectation(lambda u: u**4, q), 3 * q**2, rtol=1e-10,
                          atol=0)
    assert torch.allclose(S.gaussian_expectation(lambda u: u**8, q), 105 * q**4, rtol=1e-8,
                          atol=0)


def test_gaussian_expectation_limits_at_zero_and_infinity():
    step = lambda u: (u > 0).double()  # noqa: E731
    # q -> 0+: a jump at 0 counts each side with weight 1/2; q = inf: (f(inf) + f(-inf))/2
    assert float(S.gaussian_expectation(step, 0.0)) == pytest.approx(0.5, abs=1e-14)
    assert float(S.gaussian_expectation(torch.tanh, math.inf)) == 0.0
    assert float(S.gaussian_expectation(lambda u: torch.tanh(u) ** 2, math.inf)) == 1.0
    # with q = 1e4 in the batch the rule for q = 1 reaches z = 1000, where exp overflows and
    # the weight is 0: that entry stays finite
    out = S.gaussian_expectation(torch.exp, [1.0, 1e4])
    assert float(out[0]) == pytest.approx(math.exp(0.5), rel=1e-10) and math.isinf(out[1])


@pytest.mark.parametrize("name", list(REF))
def test_expectations_match_adaptive_quadrature_up_to_large_q(name):
    """E[phi^2] (variance map) and E[phi'^2] (chi_1) to 1e-9 relative for q from 0.001 to
    1e4: the spike of width 1/sqrt(q) of tanh'^2, the kinks of ReLU, leaky ReLU and SELU."""
    phi, dphi = REF[name]
    q = torch.tensor([1e-3, 0.3, 1.0, 7.0, 100.0, 1e3, 1e4], dtype=D)
    v = S.variance_map(q, 1.0, 0.0, name)
    x = S.chi1(1.0, 0.0, name, q=q)
    for i, qi in enumerate(q.tolist()):
        assert float(v[i]) == pytest.approx(_quad_expect(lambda u: phi(u) ** 2, qi), rel=1e-9)
        assert float(x[i]) == pytest.approx(_quad_expect(lambda u: dphi(u) ** 2, qi), rel=1e-9)


def test_variance_map_slope_matches_adaptive_quadrature():
    for name in ("tanh", "softplus", "selu", "gelu"):
        phi, dphi = REF[name]
        for q in (0.01, 2.0, 1e4):
            want = _quad_expect(lambda u: u * phi(u) * dphi(u), q) / q
            assert float(S.variance_map_slope(q, 1.0, name)) == pytest.approx(want, rel=1e-9)


def test_tanh_at_large_sigma_w_matches_reference():
    """Deep in the chaotic phase q* is large and tanh'(sqrt(q*) z)^2 a spike of width
    1/sqrt(q*); a fixed Gauss-Hermite rule gave q* = 255.40 and chi_1 = 0.0046 at
    sigma_w2 = 256 instead of 242.92 and 8.73."""
    phi2 = lambda u: math.tanh(u) ** 2  # noqa: E731
    dphi4 = lambda u: (1 / math.cosh(min(abs(u), 300.0))) ** 4  # noqa: E731
    table = {16.0: (12.5006, 2.3768), 64.0: (57.3019, 4.4846), 256.0: (242.9167, 8.7312)}
    sw = torch.tensor(list(table), dtype=D)
    q, x = S.fixed_point_q(sw, 0.0, "tanh"), S.chi1(sw, 0.0, "tanh")
    for i, (s, (q4, x4)) in enumerate(table.items()):
        q_ref = optimize.brentq(lambda qq: s * _quad_expect(phi2, qq) - qq, 1.0, s,
                                xtol=1e-13, rtol=1e-14)
        assert float(q[i]) == pytest.approx(q_ref, rel=1e-9)
        assert float(x[i]) == pytest.approx(s * _quad_expect(dphi4, q_ref), rel=1e-9)
        assert round(float(q[i]), 4) == q4 and round(float(x[i]), 4) == x4


def test_selu_chi1_kink_split():
    # phi' of SELU jumps at 0 (1.0507 vs 1.7581): unsplit rules converge only like 1/n
    assert float(S.chi1(1.0, 0.0, "selu", q=1.0)) == pytest.approx(1.071575, abs=1e-6)
    assert float(S.chi1(1.0, 0.0, "selu", q=1.0)) == pytest.approx(
        _quad_expect(lambda u: _dselu(u) ** 2, 1.0), rel=1e-10)


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


def test_relu_correlation_map_is_the_closed_form():
    # a 48-point Gauss-Hermite rule was off by 0.85% at the kink; now the arc-cosine kernel
    c = torch.linspace(-1, 1, 9, dtype=D)
    for sw, sb in ((2.0, 0.0), (1.5, 0.1), (1.0, 0.5)):
        exact = S.relu_correlation_map(c, sw, sb)
        assert (exact - S.correlation_map(c, sw, sb, "relu")).abs().max() < 1e-14, (sw, sb)


@pytest.mark.parametrize("name, phi", [
    ("relu", lambda x: torch.relu(x)),
    ("leaky_relu", lambda x: torch.nn.functional.leaky_relu(x)),
    ("linear", lambda x: 1.0 * x),
])
def test_homogeneous_closed_forms_equal_split_quadrature(name, phi):
    """The closed forms (arc-cosine kernels) against the general quadrature, which sees only
    a callable with a kink at 0: it must split there."""
    c = torch.linspace(-1, 1, 9, dtype=D)
    for sw, sb in ((0.9, 0.1), (0.7, 0.0)):
        for f in (S.fixed_point_q, S.chi1, S.fixed_point_c):
            assert float(f(sw, sb, name)) == pytest.approx(float(f(sw, sb, phi)), rel=1e-9,
                                                           abs=1e-12), (f.__name__, sw, sb)
        exact, quad = S.correlation_map(c, sw, sb, name), S.correlation_map(c, sw, sb, phi)
        assert (exact - quad).abs().max() < 1e-9, (sw, sb)
        assert float(S.variance_map_slope(0.7, sw, name)) == pytest.approx(
            float(S.variance_map_slope(0.7, sw, phi)), rel=1e-9)


def test_relu_correlation_map_checks_each_grid_point():
    # (2.5, 0) has an infinite q* but its map needs none; only (sigma_b2 > 0, sigma_w2 >= 2)
    # at the same point is an error
    out = S.relu_correlation_map(0.5, torch.tensor([2.5, 1.5]), torch.tensor([0.0, 0.1]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.stack([S.relu_correlation_map(0.5, 2.5, 0.0),
                                            S.relu_correlation_map(0.5, 1.5, 0.1)]))
    with pytest.raises(ValueError, match="sigma_w2=2.5"):
        S.relu_correlation_map(0.5, torch.tensor([2.5, 1.5]), torch.tensor([0.1, 0.0]))


def _erf_kernels(q, c):
    """Williams (1997): E[erf(u1) erf(u2)] and E[erf'(u1) erf'(u2)] for (u1, u2) of variance q
    and correlation c."""
    return (2 / math.pi * torch.arcsin(2 * q * c / (1 + 2 * q)),
            4 / math.pi / torch.sqrt((1 + 2 * q) ** 2 - 4 * q * q * c * c))


def test_two_input_expectations_match_erf_closed_form_at_large_q():
    q = torch.tensor([1e-3, 1.0, 100.0, 1e4], dtype=D).unsqueeze(-1)
    c = torch.tensor([-0.999, -0.3, 0.0, 0.5, 0.99, 0.999999, 1.0], dtype=D)
    pp, dd = _erf_kernels(q, c)
    got = S.correlation_map(c, 1.0, 0.0, "erf", q=q)
    assert torch.allclose(got, pp / _erf_kernels(q, 1.0)[0], rtol=1e-9, atol=1e-12)
    E = S._expect2(S._resolve("erf"), q, c, S.N_DEFAULT, derivative=True)
    assert torch.allclose(E[1], dd, rtol=1e-9, atol=0)
    # the chaotic fixed point and the slope there (Schoenholz et al.'s chi_c)
    mf = S.mean_field(3.0, 0.05, "erf")
    pp, dd = _erf_kernels(mf.q_star, mf.c_star)
    assert 0 < float(mf.c_star) < 1
    assert float(mf.c_star) == pytest.approx(float((3.0 * pp + 0.05) / mf.q_star), abs=1e-10)
    assert float(mf.chi_c) == pytest.approx(float(3.0 * dd), rel=1e-9)


def _selu_given(m, s):
    """E[selu(m + s Z)] and E[selu'(m + s Z)] for Z ~ N(0, 1), s > 0, in closed form."""
    p = _ndtr(m / s)
    e = math.exp(m + s * s / 2 + special.log_ndtr(-(m + s * s) / s))  # E[e^(m+sZ); m+sZ < 0]
    v = SELU_L * (m * p + s * math.exp(-m * m / (2 * s * s)) / math.sqrt(2 * math.pi)) \
        + SELU_L * SELU_A * (e - (1 - p))
    return v, SELU_L * p + SELU_L * SELU_A * e


def test_two_input_expectations_match_reference_for_kinked_selu():
    """u2 given u1 in closed form, u1 by adaptive quadrature: E[phi(u1) phi(u2)] and
    E[phi'(u1) phi'(u2)] for SELU, whose phi' jumps, near c = 1 and at large q."""
    for q in (0.5, 30.0, 1e4):
        for c in (-0.5, 0.2, 0.9999):
            s = math.sqrt(1 - c * c)
            pp = _quad_expect(lambda u: _selu(u) * _selu_given(c * u, s * math.sqrt(q))[0], q)
            dd = _quad_expect(lambda u: _dselu(u) * _selu_given(c * u, s * math.sqrt(q))[1], q)
            V = float(S.variance_map(q, 1.0, 0.0, "selu"))
            assert float(S.correlation_map(c, 1.0, 0.0, "selu", q=q)) * V == pytest.approx(
                pp, rel=1e-9), (q, c)
            E = S._expect2(S._resolve("selu"), torch.tensor(q, dtype=D),
                           torch.tensor(c, dtype=D), S.N_DEFAULT, derivative=True)
            assert float(E[1]) == pytest.approx(dd, rel=1e-9), (q, c)


def test_two_input_expectation_matches_nested_adaptive_quadrature_for_tanh():
    q, c = 100.0, 0.3
    sq, s = math.sqrt(q), math.sqrt(1 - c * c)

    def given(z1):  # E[tanh(u2) | u1 = sqrt(q) z1]
        m, sd = c * sq * z1, s * sq
        pts = sorted({0.0, *(-m / sd + k / sd for k in (-4, -1, 0, 1, 4))} & set(
            p for p in [0.0, *(-m / sd + k / sd for k in (-4, -1, 0, 1, 4))] if abs(p) < 12))
        return integrate.quad(lambda z: math.tanh(m + sd * z) * math.exp(-z * z / 2), -12, 12,
                              points=pts, limit=200, epsabs=0, epsrel=1e-11)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        ref = integrate.quad(lambda z: math.tanh(sq * z) * given(z) * math.exp(-z * z / 2),
                             -12, 12, points=[-4 / sq, -1 / sq, 0.0, 1 / sq, 4 / sq], limit=200,
                             epsabs=0, epsrel=1e-10)[0] / (2 * math.pi)
    got = S.correlation_map(c, 1.0, 0.0, "tanh", q=q) * S.variance_map(q, 1.0, 0.0, "tanh")
    assert float(got) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("name", list(REF) + ["callable"])
def test_correlation_map_is_one_at_one(name):
    act = (lambda x: torch.tanh(x)) if name == "callable" else name
    for kw in ({"n": 3}, {}):
        for sb in (0.0, 0.1):
            c1 = float(S.correlation_map(1.0, 1.5, sb, act, **kw))
            assert abs(c1 - 1) < 1e-12, (kw, sb, c1)


def test_quadrature_order_reaches_every_expectation():
    # a 3-point rule per panel must change (a little) every quantity: n is used all the way down
    fine, coarse = S.mean_field(3.0, 0.05, "tanh"), S.mean_field(3.0, 0.05, "tanh", n=3)
    for k in ("q_star", "chi1", "chi_q", "c_star", "chi_c"):
        a, b = float(getattr(fine, k)), float(getattr(coarse, k))
        assert a != b and abs(a - b) < 5e-2 * abs(a), k
    for f in (S.chi1, S.fixed_point_c, S.fixed_point_q):
        assert float(f(3.0, 0.05, "tanh", n=3)) != float(f(3.0, 0.05, "tanh")), f.__name__
    assert float(S.correlation_map(0.5, 3.0, 0.05, "tanh", n=3)) != \
        float(S.correlation_map(0.5, 3.0, 0.05, "tanh"))


def test_zero_fixed_point_limits_and_continuity_in_sigma_b():
    # bias-free ReLU in the ordered phase: q* = 0, chi_1 = sigma_w2 / 2, xi_c = -1/ln(0.9)
    mf = S.mean_field(1.8, 0.0, "relu")
    assert float(mf.q_star) == 0
    assert float(mf.chi1) == pytest.approx(0.9, rel=1e-14)
    assert float(mf.xi_c) == pytest.approx(-1 / math.log(0.9), rel=1e-12)
    # tanh without biases at the boundary sigma_w2 = 1: q* = 0 exactly, chi_1 = 1
    assert float(S.fixed_point_q(1.0, 0.0, "tanh")) == 0
    assert float(S.chi1(1.0, 0.0, "tanh")) == pytest.approx(1.0, abs=1e-12)
    c = torch.linspace(-1, 1, 9, dtype=D)
    for name in ("relu", "leaky_relu", "linear", "tanh", "erf", "gelu", "selu", "sigmoid",
                 "softplus"):
        a, b = S.mean_field(0.6, 0.0, name), S.mean_field(0.6, 1e-12, name)
        for k in ("q_star", "chi1", "chi_q", "c_star", "chi_c", "xi_q", "xi_c"):
            x, y = getattr(a, k), getattr(b, k)
            assert torch.isfinite(x) and float(x) == pytest.approx(float(y), rel=1e-6,
                                                                   abs=1e-9), (name, k)
        C0, C1 = S.correlation_map(c, 0.6, 0.0, name), S.correlation_map(c, 0.6, 1e-12, name)
        assert torch.isfinite(C0).all() and (C0 - C1).abs().max() < 1e-8, name
    # the map at q* = 0 has slope chi_1 at c = 1, like everywhere else
    h = 1e-10
    for name in ("relu", "tanh", "gelu"):
        slope = (1 - S.correlation_map(1 - h, 0.8, 0.0, name)) / h
        assert float(slope) == pytest.approx(float(S.chi1(0.8, 0.0, name)), rel=1e-4), name
    # a bias-free ReLU net at q > 0 has the arc-cosine map whatever sigma_w2
    assert torch.allclose(S.correlation_map(c, 1.5, 0.0, "relu", q=1.0), S.arccos_kernel(c))


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


def test_mean_field_mlp_without_seed_draws_fresh_networks():
    a, b = S.mean_field_mlp(8, 8, 2), S.mean_field_mlp(8, 8, 2, weights="orthogonal")
    c = S.mean_field_mlp(8, 8, 2, weights="orthogonal")
    assert not torch.equal(a[0].weight, S.mean_field_mlp(8, 8, 2)[0].weight)
    assert not torch.equal(b[0].weight, c[0].weight)
    assert not torch.equal(a[0].bias, S.mean_field_mlp(8, 8, 2, sigma_b2=1.0)[0].bias)


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
    (lambda: S.chi1(1.0, 0.0, "tanh", n=1.5), "quadrature order"),
    (lambda: S.fixed_point_c(1.0, 0.0, tol=0.0), "tol must be a positive number"),
    (lambda: S.fixed_point_q(1.0, 0.0, steps=0), "steps must be a positive int"),
    (lambda: S.order_chaos_boundary(0.1, iters=0), "iters must be a positive int"),
    (lambda: S.mean_field(1.0, 0.0, 3), "activation must be a name or a callable"),
    (lambda: S.relu_correlation_map(0.5, 2.5, 0.1), "needs sigma_w2 < 2"),
    (lambda: S.mean_field_mlp(4, 4, 2, weights="orthogonl"), "unknown weights 'orthogonl'"),
    (lambda: S.mean_field_mlp(4, 4, 0), "depth must be a positive int"),
    (lambda: S.jacobian_singular_values(torch.nn.Linear(3, 2), torch.randn(3)), "2-D tensor"),
    (lambda: S.jacobian_singular_values(lambda X: X.sum(1), torch.randn(4, 3)),
     "batch of vectors to a batch of vectors"),
    (lambda: S.layer_statistics(torch.nn.ReLU(), torch.randn(2, 3)), "no nn.Linear"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
