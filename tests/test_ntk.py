import copy
import math

import pytest
import torch
from torch import nn

import nnopt_utils as nu
from nnopt_utils import ntk


def _inputs(n, d=3, seed=0):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _dense_ntk(model, X1, X2):
    """The oracle: every per-sample, per-output gradient by autograd, one at a time, then
    the Gram matrix of the flattened Jacobians."""
    params = list(model.parameters())

    def jac(X):
        rows = []
        for x in X:
            out = model(x.unsqueeze(0)).reshape(-1)
            for k in range(len(out)):
                g = torch.autograd.grad(out[k], params, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                       for p, gi in zip(params, g)]))
        return torch.stack(rows).reshape(len(X), -1, sum(p.numel() for p in params))

    J1, J2 = jac(X1), jac(X2)
    return torch.einsum("ikp,jmp->ijkm", J1, J2)


MODELS = {
    "mlp_tanh": lambda: nu.mlp(3, [7, 6], 2, activation="tanh", seed=0).double(),
    "mlp_relu_nobias": lambda: nu.mlp(3, [5], 4, bias=False, seed=1).double(),
    "ntk_mlp_bias": lambda: ntk.ntk_mlp(3, [5, 4], 2, activation="tanh", sigma_b=0.3, seed=2),
    "ends_in_activation": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2),
                                                nn.Sigmoid()).double(),
}


@pytest.mark.parametrize("name", MODELS)
def test_both_paths_equal_the_dense_jacobian_oracle(name):
    model = MODELS[name]()
    X1, X2 = _inputs(5, seed=0), _inputs(4, seed=1)
    want = _dense_ntk(model, X1, X2)
    for method in ("mlp", "jacobian", "auto"):
        got = ntk.empirical_ntk(model, X1, X2, method=method)
        assert got.shape == want.shape and got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=1e-11, atol=1e-12), method
        tr = ntk.empirical_ntk(model, X1, X2, trace=True, method=method)
        assert torch.allclose(tr, want.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-11,
                              atol=1e-12)
    same = ntk.empirical_ntk(model, X1)  # X2 = X1: symmetric in (i, k) <-> (j, m)
    assert torch.allclose(same, same.permute(1, 0, 3, 2), rtol=1e-12, atol=1e-13)
    assert torch.allclose(same, _dense_ntk(model, X1, X1), rtol=1e-11, atol=1e-12)


def test_general_path_on_a_convolutional_net():
    net = nu.small_cnn(1, 3, width=4, seed=0).double()
    X = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = _dense_ntk(net, X, X[:2])
    got = ntk.empirical_ntk(net, X, X[:2], chunk_size=2)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    net.train()
    ntk.empirical_ntk(net, X[:1])
    assert net.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="method='mlp' needs a plain MLP"):
        ntk.empirical_ntk(net, X, method="mlp")


def _closed_form_two_layer(X1, X2):
    # the two-layer ReLU net without biases, sigma_w^2 = 2, derived by hand:
    # Theta = (2/d) (x.x' kappa0 + |x||x'| kappa1), kappa0 = (pi - t)/pi,
    # kappa1 = (sin t + (pi - t) cos t)/pi, t the angle between x and x'
    dot = X1 @ X2.T
    norms = X1.norm(dim=1)[:, None] * X2.norm(dim=1)[None, :]
    t = torch.arccos((dot / norms).clamp(-1, 1))
    k0 = (math.pi - t) / math.pi
    k1 = (torch.sin(t) + (math.pi - t) * torch.cos(t)) / math.pi
    return 2 / X1.shape[1] * (dot * k0 + norms * k1)


def test_relu_ntk_depth_one_closed_form():
    X1, X2 = _inputs(6, 4, seed=0), _inputs(5, 4, seed=1)
    got = ntk.relu_ntk(X1, X2, depth=1)
    assert torch.allclose(got, _closed_form_two_layer(X1, X2), rtol=1e-12)
    # on the diagonal (t = 0): Theta(x, x) = (2/d)(|x|^2 + |x|^2) = 4 |x|^2 / d
    diag = ntk.relu_ntk(X1, depth=1).diagonal()
    assert torch.allclose(diag, 4 * (X1 * X1).sum(1) / 4, rtol=1e-12)
    # every depth: with sigma_w^2 = 2 and no bias, Theta^{L+1}(x, x) = (L + 1) * 2|x|^2/d
    # (arccos near rho = 1 turns a rounding error eps of rho into an angle sqrt(eps))
    for depth in (2, 3):
        assert torch.allclose(ntk.relu_ntk(X1, depth=depth).diagonal(),
                              (depth + 1) * 2 * (X1 * X1).sum(1) / 4, rtol=1e-7)


@pytest.mark.parametrize("depth,sigma_b", [(1, 0.0), (2, 0.0), (2, 0.5)])
def test_relu_ntk_is_the_limit_of_wide_networks(depth, sigma_b):
    X = _inputs(6, 5, seed=3)
    want = ntk.relu_ntk(X, depth=depth, sigma_b=sigma_b)
    errors = {}
    for width in (64, 2048):
        errs = []
        for seed in range(3):
            net = ntk.ntk_mlp(5, [width] * depth, 1, sigma_b=sigma_b, seed=seed)
            got = ntk.empirical_ntk(net, X, trace=True)
            errs.append(float((got - want).norm() / want.norm()))
        errors[width] = sum(errs) / len(errs)
    # fluctuations of order 1/sqrt(width): 32 times wider, about 5.7 times closer
    assert errors[2048] < 0.1
    assert errors[64] > 2.5 * errors[2048]


def test_linearize_is_first_order():
    model = nu.mlp(3, [8, 6], 2, activation="tanh", seed=0).double()
    X = _inputs(7)
    lin = ntk.linearize(model)
    assert [p.shape for p in lin.parameters()] == [p.shape for p in model.parameters()]
    assert torch.equal(lin(X), model(X))  # zero offset: f(theta0) exactly
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
                 for i, p in enumerate(model.parameters())]
    gaps = []
    for eps in (1e-2, 5e-3, 2.5e-3):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for o, p, d in zip(lin.offsets, moved.parameters(), direction):
                o.copy_(eps * d)
                p.add_(eps * d)
        gaps.append(float((lin(X) - moved(X)).detach().norm()))
    # the remainder is O(|delta|^2): halving delta divides it by about 4
    for big, small in zip(gaps, gaps[1:]):
        assert 0.22 < small / big < 0.28
    assert all(torch.equal(lin.params()[n], p.detach() + lin.delta()[n])
               for n, p in model.named_parameters())
    with torch.no_grad():  # the model is copied: changing it does not move theta0
        next(model.parameters()).add_(1.0)
    assert torch.equal(lin.theta0["0.weight"], next(lin._base[0].parameters()))
    assert not torch.equal(lin.theta0["0.weight"], model[0].weight)


def test_linearized_gradient_step_is_the_ntk_step():
    # one GD step on 1/2 sum ||f - y||^2 moves the linear model's outputs by exactly
    # -lr * Theta (f - y) (Lee et al., 2019): the offsets are trainable by torch.optim
    model = nu.mlp(3, [6], 2, activation="tanh", seed=0).double()
    X, Y = _inputs(5), _inputs(5, 2, seed=1)
    lin = ntk.linearize(model)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    f0 = lin(X).detach()
    (0.5 * (lin(X) - Y).pow(2).sum()).backward()
    opt.step()
    theta = ntk.empirical_ntk(model, X)  # (N, N, K, K)
    want = f0 - 0.05 * torch.einsum("ijkm,jm->ik", theta, f0 - Y)
    assert torch.allclose(lin(X), want, rtol=1e-12, atol=1e-13)
    # and nnopt_utils.train.fit trains it like any module
    h = nu.fit(lin, (X, Y), loss="mse", lr=0.1, steps=20)
    assert h["loss"][-1] < h["loss"][0]


def test_bad_input():
    model = nu.mlp(3, [4], 2, seed=0).double()
    X = _inputs(3)
    with pytest.raises(ValueError, match="unknown method 'fast'; choose one of: auto, mlp, "
                                         "jacobian"):
        ntk.empirical_ntk(model, X, method="fast")
    with pytest.raises(ValueError, match="model must be an nn.Module, got str"):
        ntk.empirical_ntk("net", X)
    with pytest.raises(ValueError, match=r"X1 must be a tensor of inputs \(N, ...\) with N >= 1"):
        ntk.empirical_ntk(model, X[:0])
    with pytest.raises(ValueError, match=r"X2 samples have shape \(4,\), X1 samples \(3,\)"):
        ntk.empirical_ntk(model, X, _inputs(2, 4))
    with pytest.raises(ValueError, match="trace must be True or False, got 'yes'"):
        ntk.empirical_ntk(model, X, trace="yes")
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        ntk.empirical_ntk(model, X, chunk_size=0)
    with pytest.raises(ValueError, match=r"depth must be a positive int \(hidden layers\), "
                                         "got 0"):
        ntk.relu_ntk(X, depth=0)
    with pytest.raises(ValueError, match="sigma_b must be a non-negative finite number, got -1"):
        ntk.relu_ntk(X, sigma_b=-1)
    with pytest.raises(ValueError, match="sigma_w must be a positive finite number, got 0"):
        ntk.ntk_mlp(3, [4], 1, sigma_w=0)
    with pytest.raises(ValueError, match="must be 2-D with the same number of columns"):
        ntk.relu_ntk(X, _inputs(2, 4))
    with pytest.raises(ValueError, match="hidden width must be a positive int, got 0"):
        ntk.ntk_mlp(3, [0], 1)
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        ntk.linearize(lambda x: x)


class _Scaled(nn.Sequential):  # a subclass whose forward is not the layers' composition
    def forward(self, x):
        return 2 * super().forward(x)


def test_fast_path_only_where_it_is_exact():
    torch.manual_seed(0)
    X = _inputs(5).double()
    for act in (nn.ELU(inplace=True), nn.LeakyReLU(0.1, inplace=True), nn.SiLU(inplace=True)):
        m = nn.Sequential(nn.Linear(3, 8), act, nn.Linear(8, 2)).double()
        torch.testing.assert_close(ntk.empirical_ntk(m, X, method="mlp"),
                                   ntk.empirical_ntk(m, X, method="jacobian"))
    scaled = _Scaled(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    torch.testing.assert_close(ntk.empirical_ntk(scaled, X),
                               ntk.empirical_ntk(scaled, X, method="jacobian"))
    with pytest.raises(ValueError, match="method='mlp' needs a plain MLP"):
        ntk.empirical_ntk(scaled, X, method="mlp")
    plain = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    X3 = torch.randn(4, 2, 3, dtype=torch.float64)  # Linear acts on the last dimension
    torch.testing.assert_close(ntk.empirical_ntk(plain, X3),
                               ntk.empirical_ntk(plain, X3, method="jacobian"))
    with pytest.raises(ValueError, match=r"inputs of shape \(N, d\), got \(4, 2, 3\)"):
        ntk.empirical_ntk(plain, X3, method="mlp")


# ---------------------------------------------------------------------------------------
# the two-layer network of Du et al.

def _sphere(n, d, seed=0, dtype=torch.float64):
    X = torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return X / X.norm(dim=1, keepdim=True)


def _at_angle(theta):
    return torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]], dtype=torch.float64)


def test_h_infinity_exact_values_at_known_angles():
    # x.x' (pi - t) / (2 pi) with t the angle. Nearest wrong formulas: t for pi - t
    # (1/12 at pi/3), (pi - t)/pi without the 1/2 (1/3 at pi/3), the factor x.x' dropped
    # (1/3 at pi/3, 1/2 instead of 0 at pi/2).
    for theta, want in [(0.0, 0.5), (math.pi / 2, 0.0), (math.pi / 3, 1 / 6),
                        (2 * math.pi / 3, -1 / 12), (math.pi, 0.0)]:
        H = ntk.h_infinity(_at_angle(theta))
        assert H[0, 0] == 0.5  # x.x = 1 exactly; (cos t, sin t) rounds: sqrt(eps) error
        assert abs(H[1, 1].item() - 0.5) < 1e-8
        assert abs(H[0, 1].item() - want) < 1e-15, theta
        assert H[0, 1] == H[1, 0]
    # exactly 0 for orthogonal axes, 1/2 for an axis with itself
    E = torch.eye(4, dtype=torch.float64)
    assert torch.equal(ntk.h_infinity(E), 0.5 * E)
    # the diagonal to rounding (arccos(x.x) would give errors of sqrt(eps): 1e-8, 1e-4)
    for dtype, tol in ((torch.float64, 1e-15), (torch.float32, 1e-6)):
        S = _sphere(50, 30).to(dtype)
        assert (ntk.h_infinity(S).diagonal() - 0.5).abs().max() < tol, dtype
    # any norms: E[x.x' 1{w.x > 0, w.x' > 0}] scales with both norms; a zero row gives 0
    X = _sphere(4, 3)
    c = torch.tensor([1.0, 2.0, 0.5, 0.0], dtype=torch.float64)[:, None]
    assert torch.allclose(ntk.h_infinity(c * X), c * ntk.h_infinity(X) * c.T, rtol=1e-13,
                          atol=1e-16)
    # X2: the cross block of the full matrix (to rounding: the products are blocked apart)
    X = _sphere(7, 5)
    assert torch.allclose(ntk.h_infinity(X[:3], X[3:]), ntk.h_infinity(X)[:3, 3:],
                          rtol=1e-14, atol=1e-16)


def _jacobian_kernel(W, a, X, scale, act):
    """The oracle: the Gram matrix of the per-input gradients of u with respect to W, each
    by autograd, for u(x) = scale * sum_r a_r act(w_r . x)."""
    phi = {"relu": torch.relu, "tanh": torch.tanh}[act]
    W = W.clone().requires_grad_(True)
    rows = []
    for x in X:
        u = scale * (a * phi(W @ x)).sum()
        rows.append(torch.autograd.grad(u, W)[0].reshape(-1))
    J = torch.stack(rows)
    return J @ J.T


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_two_layer_ntk_is_the_gram_matrix_of_autograd_gradients(act):
    # rejects a missing 1/m (m times too large), phi for phi', and a kernel without x.x'
    W, a = ntk.two_layer_init(16, 5, [0, 1], dtype=torch.float64)
    X = _sphere(6, 5)
    got = ntk.two_layer_ntk(W, X, act)
    assert got.shape == (2, 6, 6) and got.dtype == torch.float64
    for s in range(2):
        want = _jacobian_kernel(W[s], a[s], X, 16 ** -0.5, act)
        assert torch.allclose(got[s], want, rtol=1e-12, atol=1e-14)
    # W in float32, X in float64: computed in float64, from W's float32 values
    assert torch.equal(ntk.two_layer_ntk(W.float(), X, act),
                       ntk.two_layer_ntk(W.float().double(), X, act))


def test_h_infinity_is_the_infinite_width_limit_of_the_first_layer_kernel():
    # H(W)_ij = x_i.x_j (1/m) sum_r B_r with B_r ~ Bernoulli(p), p = (pi - t_ij)/(2 pi):
    # its standard deviation is |x_i.x_j| sqrt(p (1 - p) / m), so at m = 2^16 every entry
    # is within 5 of them (a factor 2 in H_inf is off by 0.25 on the diagonal, 128 of them)
    X = _sphere(8, 5, seed=4)
    m = 2 ** 16
    W, _ = ntk.two_layer_init(m, 5, [3], dtype=torch.float64)
    H = ntk.two_layer_ntk(W, X)[0]
    Hinf = ntk.h_infinity(X)
    G = (X @ X.T).clamp(-1, 1)
    p = (math.pi - torch.arccos(G)) / (2 * math.pi)
    sd = G.abs() * (p * (1 - p) / m).sqrt()
    assert bool(((H - Hinf).abs() <= 5 * sd + 1e-12).all())
    assert not bool(((H - 2 * Hinf).abs() <= 5 * sd + 1e-12).all())
    # and the distance shrinks like m^(-1/2): 64 times narrower, about 8 times farther
    W_small, _ = ntk.two_layer_init(m // 64, 5, range(10, 20), dtype=torch.float64)
    far = (ntk.two_layer_ntk(W_small, X) - Hinf).norm(dim=(1, 2)).mean()
    near = (ntk.two_layer_ntk(ntk.two_layer_init(m, 5, range(10, 20),
                                                 dtype=torch.float64)[0], X) - Hinf
            ).norm(dim=(1, 2)).mean()
    assert 4 < far / near < 16


def test_two_layer_init_draws_from_the_seeded_generator():
    W, a = ntk.two_layer_init(6, 3, [5, 7])
    assert W.shape == (2, 6, 3) and a.shape == (2, 6) and W.dtype == a.dtype == torch.float32
    for i, s in enumerate([5, 7]):  # each copy: randn(m, d), then m signs, from generator(s)
        g = nu.generator(s)
        assert torch.equal(W[i], torch.randn(6, 3, generator=g))
        assert torch.equal(a[i], torch.randint(2, (6,), generator=g) * 2.0 - 1)
    assert torch.equal(ntk.two_layer_init(6, 3, [7])[0][0], W[1])  # copies are independent
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    W64, _ = ntk.two_layer_init(6, 3, [5], dtype=torch.float64)
    assert W64.dtype == torch.float64


def test_symmetric_init_gives_zero_output():
    # pairs (w, a), (w, -a): the output is 0 at initialization. Rejects i.i.d. units
    # (output O(1)), pairs (w, a), (w, a) (twice the output of m/2 units) and (-w, -a).
    W, a = ntk.two_layer_init(64, 5, [1, 2], symmetric=True, dtype=torch.float64)
    half, _ = ntk.two_layer_init(32, 5, [1, 2], dtype=torch.float64)
    assert torch.equal(W[:, :32], half) and torch.equal(W[:, 32:], half)
    assert torch.equal(a[:, 32:], -a[:, :32])
    X, y = _sphere(10, 5), torch.ones(10, dtype=torch.float64)
    for act in ("relu", "tanh"):
        run = ntk.two_layer_gd(W, a, X, y, 0.1, 0, act=act)
        # u(0) = 0 up to rounding in the sum over units, so the loss is ||y||^2 / 2
        assert abs(run.loss[0, 0].item() - 5.0) < 1e-13 and abs(run.loss[1, 0] - 5) < 1e-13
    iid, b = ntk.two_layer_init(64, 5, [1, 2], dtype=torch.float64)
    assert (ntk.two_layer_gd(iid, b, X, y, 0.1, 0).loss[:, 0] - 5).abs().max() > 0.1


def _autograd_gd(W, a, X, y, lr, scale, steps, act, center=False):
    """The oracle: gradient descent on 1/2 ||u - y||^2 with the gradient from autograd."""
    phi = {"relu": torch.relu, "tanh": torch.tanh}[act]

    def u(W):
        return scale * (phi(W @ X.T) * a[:, None]).sum(0)

    u0 = u(W).detach() if center else 0
    losses = []
    for k in range(steps + 1):
        W = W.detach().requires_grad_(True)
        loss = 0.5 * ((u(W) - u0 - y) ** 2).sum()
        losses.append(loss.item())
        if k < steps:
            W = W - lr * torch.autograd.grad(loss, W)[0]
    return W.detach(), torch.tensor(losses, dtype=W.dtype)


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("center", [False, True])
def test_two_layer_gd_equals_autograd_per_copy(act, center):
    # one step, then five, against autograd on the same loss, with a different lr and scale
    # per copy. Rejects a factor 2 in the gradient (the loss without 1/2), the scale missing
    # from the gradient (off by the factor c), and one copy's lr or scale used for another.
    S, m, d, n = 3, 12, 4, 7
    W0, a = ntk.two_layer_init(m, d, range(S), dtype=torch.float64)
    X = _sphere(n, d, seed=1)
    y = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lr, scale = [0.3, 0.05, 1.0], torch.tensor([0.5, 2.0, m ** -0.5], dtype=torch.float64)
    for steps in (1, 5):
        run = ntk.two_layer_gd(W0, a, X, y, lr, steps, scale=scale, act=act, center=center)
        assert run.W.shape == W0.shape and run.loss.shape == (S, steps + 1)
        assert not run.diverged.any() and (run.diverged_at == -1).all()
        for s in range(S):
            W_want, loss_want = _autograd_gd(W0[s], a[s], X, y, lr[s], scale[s].item(),
                                             steps, act, center)
            step = W_want - W0[s]
            assert (run.W[s] - W_want).norm() <= 1e-12 * step.norm(), (s, steps)
            assert torch.allclose(run.loss[s], loss_want, rtol=1e-12, atol=0)
    if center:  # u(0) - u0 = 0 exactly: the loss starts at ||y||^2 / 2 for every copy
        assert torch.equal(run.loss[:, 0], torch.full((S,), 0.5 * (y * y).sum().item(),
                                                      dtype=torch.float64))
    assert torch.equal(W0, ntk.two_layer_init(m, d, range(S), dtype=torch.float64)[0])


def test_two_layer_gd_default_scale_is_du_et_al():
    # scale=None is 1/sqrt(m) (rejects 1, the missing sqrt(m), and 1/m); numbers broadcast
    W, a = ntk.two_layer_init(16, 3, [0, 1], dtype=torch.float64)
    X, y = _sphere(5, 3), torch.zeros(5, dtype=torch.float64)
    default = ntk.two_layer_gd(W, a, X, y, 0.2, 3)
    explicit = ntk.two_layer_gd(W, a, X, y, [0.2, 0.2], 3, scale=0.25)
    assert torch.equal(default.W, explicit.W) and torch.equal(default.loss, explicit.loss)
    u = (torch.relu(W @ X.T) * a[..., None]).sum(1) / 4
    assert torch.allclose(default.loss[:, 0], 0.5 * (u * u).sum(1), rtol=1e-14)
    # per-copy targets (S, n)
    Y = torch.stack([y, y + 1])
    per = ntk.two_layer_gd(W, a, X, Y, 0.2, 3)
    assert torch.equal(per.loss[0], default.loss[0])
    assert torch.allclose(per.loss[1], ntk.two_layer_gd(W[1:], a[1:], X, y + 1, 0.2, 3).loss[0],
                          rtol=1e-13)


def test_two_layer_gd_flags_divergence_and_spares_the_other_copies():
    # a step far above 2 / lambda_max blows up; that copy is frozen at its last finite
    # iterate, its loss is NaN from then on, and the other copy is unaffected (rejects a
    # crash, NaN weights, and a NaN spreading to the batch)
    W, a = ntk.two_layer_init(32, 4, [0, 1])
    X = _sphere(6, 4, dtype=torch.float32)
    y = torch.ones(6)
    run = ntk.two_layer_gd(W, a, X, y, torch.tensor([0.1, 1e6]), 40)
    assert run.diverged.tolist() == [False, True]
    k = run.diverged_at[1].item()
    assert 0 < k < 40 and run.diverged_at[0] == -1
    assert torch.isfinite(run.loss[1, :k]).all() and run.loss[1, k:].isnan().all()
    assert run.loss[1, k - 1] > 1e20  # it was growing, not silently stuck
    assert torch.isfinite(run.W).all()
    alone = ntk.two_layer_gd(W[:1], a[:1], X, y, 0.1, 40)
    assert torch.allclose(run.W[0], alone.W[0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(run.loss[0], alone.loss[0], rtol=1e-6)
    # the frozen copy is the iterate of step k: rerunning k - 1... k steps reproduces it
    again = ntk.two_layer_gd(W[1:], a[1:], X, y, 1e6, k)
    assert torch.equal(again.W[0], run.W[1])
    # an update that overflows while the loss is still finite: the loss at step 0 is kept,
    # divergence is at step 1 (as sweep records it), and the copy keeps its finite weights
    # (rejects checking the loss alone: W would be inf)
    over = ntk.two_layer_gd(W, a, X, 1e3 * y, torch.tensor([1e-6, 3e37]), 3)
    assert over.diverged_at.tolist() == [-1, 1] and torch.equal(over.W[1], W[1])
    assert torch.isfinite(over.loss[1, 0]) and over.loss[1, 1:].isnan().all()
    assert torch.isfinite(over.loss[0]).all()
    # no autograd graph through the steps, even for weights that require gradients
    graded = ntk.two_layer_gd(W.clone().requires_grad_(), a, X, y, 0.1, 3)
    assert graded.W.grad_fn is None and graded.loss.grad_fn is None
    # steps = 0: only the initial loss, weights untouched
    zero = ntk.two_layer_gd(W, a, X, y, 0.1, 0)
    assert zero.loss.shape == (2, 1) and torch.equal(zero.W, W)


def test_two_layer_bad_input():
    W, a = ntk.two_layer_init(4, 3, [0, 1])
    X, y = _sphere(5, 3, dtype=torch.float32), torch.zeros(5)
    with pytest.raises(ValueError, match="unknown activation 'gelu'; choose one of: relu, tanh"):
        ntk.two_layer_gd(W, a, X, y, 0.1, 1, act="gelu")
    with pytest.raises(ValueError, match="unknown activation 'sigmoid'; choose one of"):
        ntk.two_layer_ntk(W, X, "sigmoid")
    with pytest.raises(ValueError, match=r"W must be a floating tensor of first layers "
                                         r"\(S, m, d\), one per copy, got \(4, 3\)"):
        ntk.two_layer_gd(W[0], a[0], X, y, 0.1, 1)
    with pytest.raises(ValueError, match=r"a must be a tensor of output weights \(S, m\) = "
                                         r"\(2, 4\), got \(4,\)"):
        ntk.two_layer_gd(W, a[0], X, y, 0.1, 1)
    with pytest.raises(ValueError, match=r"X must be a floating tensor of inputs \(n, d\) with "
                                         r"d = 3 \(W's last dimension\), got \(5, 4\)"):
        ntk.two_layer_gd(W, a, torch.zeros(5, 4), y, 0.1, 1)
    with pytest.raises(ValueError, match=r"y must be a tensor of targets \(n,\) = \(5,\) or "
                                         r"\(S, n\) = \(2, 5\), got \(4,\)"):
        ntk.two_layer_gd(W, a, X, y[:4], 0.1, 1)
    with pytest.raises(ValueError, match="X has dtype torch.float64, W torch.float32; they "
                                         "must match"):
        ntk.two_layer_gd(W, a, X.double(), y, 0.1, 1)
    with pytest.raises(ValueError, match="steps must be a non-negative int, got -1"):
        ntk.two_layer_gd(W, a, X, y, 0.1, -1)
    with pytest.raises(ValueError, match="steps must be a non-negative int, got 2.5"):
        ntk.two_layer_gd(W, a, X, y, 0.1, 2.5)
    with pytest.raises(ValueError, match=r"lr must be a positive finite number \(torch.float32"
                                         r"\), or one per copy \(S = 2\), got 0"):
        ntk.two_layer_gd(W, a, X, y, 0, 1)
    with pytest.raises(ValueError, match=r"lr must be .* one per copy \(S = 2\), got \[0.1, "
                                         r"0.2, 0.3\]"):
        ntk.two_layer_gd(W, a, X, y, [0.1, 0.2, 0.3], 1)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        ntk.two_layer_gd(W, a, X, y, 1e300, 1)  # inf in float32
    with pytest.raises(ValueError, match="scale must be a positive finite number .* got -1"):
        ntk.two_layer_gd(W, a, X, y, 0.1, 1, scale=-1)
    with pytest.raises(ValueError, match="center must be True or False, got 'yes'"):
        ntk.two_layer_gd(W, a, X, y, 0.1, 1, center="yes")
    with pytest.raises(ValueError, match="symmetric=True pairs the units, so m must be even, "
                                         "got 5"):
        ntk.two_layer_init(5, 3, [0], symmetric=True)
    with pytest.raises(ValueError, match="seeds must be a non-empty sequence of ints, got 3"):
        ntk.two_layer_init(4, 3, 3)
    with pytest.raises(ValueError, match=r"seeds must be a non-empty sequence of ints, got \[\]"):
        ntk.two_layer_init(4, 3, [])
    with pytest.raises(ValueError, match="m must be a positive int, got 0"):
        ntk.two_layer_init(0, 3, [0])
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        ntk.two_layer_init(4, 3, [0], dtype=torch.int64)
    with pytest.raises(ValueError, match="X1 and X2 must have one dtype and device, got "
                                         "torch.float32 on cpu and torch.float64"):
        ntk.h_infinity(_sphere(3, 3).float(), _sphere(3, 3))
    with pytest.raises(ValueError, match="X is on meta, W on cpu; they must match"):
        ntk.two_layer_gd(W, a, X.to("meta"), y, 0.1, 1)
    with pytest.raises(ValueError, match="X1 must be a floating tensor, got torch.int64"):
        ntk.h_infinity(torch.eye(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be 2-D with the same number of columns"):
        ntk.h_infinity(_sphere(3, 3), _sphere(3, 4))
