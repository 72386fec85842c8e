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
