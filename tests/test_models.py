import math

import pytest
import torch
from torch import nn

import nnopt_utils as nu
from nnopt_utils import init


@pytest.mark.parametrize("scheme,var", [("lecun", 1 / 400), ("xavier", 2 / 700),
                                        ("kaiming", 2 / 400), ("normal", 0.01**2)])
def test_init_variances(scheme, var):
    w = torch.empty(300, 400)
    init.init_tensor_(w, scheme, std=0.01 if scheme == "normal" else None,
                      generator=torch.Generator().manual_seed(0))
    assert w.var().item() == pytest.approx(var, rel=0.02)


def test_orthogonal_and_delta_orthogonal():
    w = torch.empty(50, 80)
    init.init_tensor_(w, "orthogonal", gain=2.0)
    assert torch.allclose(w @ w.T, 4 * torch.eye(50), atol=1e-4)
    k = torch.empty(16, 16, 3, 3)
    init.init_tensor_(k, "delta_orthogonal")
    centre = k[:, :, 1, 1]
    assert torch.allclose(centre @ centre.T, torch.eye(16), atol=1e-5)
    assert k.abs().sum() == pytest.approx(centre.abs().sum().item())


def test_init_errors():
    with pytest.raises(ValueError, match="unknown init 'xavir'; choose one of: normal, lecun"):
        init.init_tensor_(torch.empty(2, 2), "xavir")
    with pytest.raises(ValueError, match="std is only used by init 'normal'"):
        init.init_tensor_(torch.empty(2, 2), "kaiming", std=0.1)
    with pytest.raises(ValueError, match="fixup"):
        nu.initialize(nu.mlp(2, [3], 1), "fixup")


def test_mlp_structure_and_seed():
    m = nu.mlp(5, [7, 7], 3, activation="tanh", norm="layer", seed=1)
    assert [l.in_features for l in m.layers] == [5, 7, 7]
    assert sum(isinstance(x, nn.LayerNorm) for x in m) == 2
    m2 = nu.mlp(5, [7, 7], 3, activation="tanh", norm="layer", seed=1)
    x = torch.randn(4, 5)
    assert torch.equal(m(x), m2(x))
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        nu.mlp(5, [7], 3, activation="relu6")
    with pytest.raises(ValueError, match="unknown norm 'instance'"):
        nu.mlp(5, [7], 3, norm="instance")
    with pytest.raises(ValueError, match="hidden width must be a positive int, got 0"):
        nu.mlp(5, [0], 3)


def test_weight_norm_mlp_trains():
    m = nu.mlp(4, [8], 2, norm="weight", seed=0)
    out = m(torch.randn(3, 4))
    out.sum().backward()
    assert out.shape == (3, 2)


def test_residual_variance_and_fixup():
    m = nu.residual_mlp(10, 16, 6, 2, alpha="1/sqrt(L)", seed=0)
    assert m.blocks[0].alpha == pytest.approx(1 / math.sqrt(6))
    f = nu.residual_mlp(10, 16, 6, 2, init="fixup", seed=0)
    x = torch.randn(5, 10)
    stream = f.stem(x)
    for b in f.blocks:  # every branch outputs zero: the blocks are the identity
        assert torch.equal(b(stream), stream)
    assert torch.count_nonzero(f(x)) == 0
    loss = nu.train.LOSSES["cross_entropy"](f(x), torch.tensor([0, 1, 0, 1, 0]))
    loss.backward()
    assert f.head.weight.grad.abs().sum() > 0
    z = nu.residual_mlp(10, 16, 3, 2, zero_init_branches=True, seed=0)
    assert all(torch.equal(b(stream), stream) for b in z.blocks)
    with pytest.raises(ValueError, match="unknown alpha"):
        nu.residual_mlp(10, 16, 3, 2, alpha="1/L")


def test_deep_linear_inits():
    net = nu.DeepLinear([4, 6, 6, 3], init="balanced", std=1.0, seed=0)
    W = list(net.weights)
    for a, b in zip(W[:-1], W[1:]):  # balancedness W_{j+1}^T W_{j+1} = W_j W_j^T
        assert torch.allclose(b.T @ b, a @ a.T, atol=1e-5)
    x = torch.randn(2, 4)
    assert torch.allclose(net(x), x @ net.product().T, atol=1e-6)
    orth = nu.DeepLinear([5, 5, 5], init="orthogonal", seed=0)
    P = orth.product()
    assert torch.allclose(P @ P.T, torch.eye(5), atol=1e-5)
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        nu.DeepLinear([2, 2], init="xavier")


def test_small_cnn_runs():
    m = nu.small_cnn(1, 10, width=8, norm="batch", seed=0)
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)


NAMES = list(nu.models.ACTIVATIONS)


@pytest.mark.parametrize("act", NAMES)
def test_every_named_activation_pickles(act, tmp_path):
    import pickle

    for model, x in ((nu.mlp(3, [4, 4], 2, activation=act, seed=0), torch.randn(2, 3)),
                     (nu.residual_mlp(3, 4, 2, 2, activation=act, seed=0), torch.randn(2, 3)),
                     (nu.small_cnn(1, 3, width=4, activation=act, seed=0),
                      torch.randn(2, 1, 5, 5))):
        clone = pickle.loads(pickle.dumps(model))
        assert torch.equal(clone(x), model(x))
    path = tmp_path / "model.pt"
    torch.save(nu.mlp(3, [4], 1, activation=act), path)
    assert isinstance(torch.load(path, weights_only=False), nu.models.MLP)


def sine(x):
    return torch.sin(x)


def test_callable_activations():
    import functools
    import pickle

    x = torch.randn(6, 3)
    ref = nu.mlp(3, [5, 5], 2, activation="leaky_relu", seed=0)
    # a class, an instance, a factory, a function: all build the same network as the name
    for spec in (nn.LeakyReLU, nn.LeakyReLU(0.01), functools.partial(nn.LeakyReLU, 0.01),
                 nn.functional.leaky_relu):
        m = nu.mlp(3, [5, 5], 2, activation=spec, seed=0)
        torch.testing.assert_close(m(x), ref(x))
        torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), m(x))
    # the exercise's leaky ReLU with its own slope
    steep = nu.mlp(3, [5], 1, activation=nn.LeakyReLU(0.2), seed=0)
    acts = [m for m in steep if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 1 and acts[0].negative_slope == 0.2
    # every layer gets its own copy of an instance (a PReLU's slope is a parameter)
    prelu = nu.mlp(3, [5, 5], 1, activation=nn.PReLU(), seed=0)
    slopes = [m.weight for m in prelu if isinstance(m, nn.PReLU)]
    assert len(slopes) == 2 and slopes[0] is not slopes[1]
    # a module-level function pickles; the model computes with it
    m = nu.mlp(3, [5], 1, activation=sine, seed=0)
    torch.testing.assert_close(m(x), m[2](torch.sin(m[0](x))))
    assert torch.equal(pickle.loads(pickle.dumps(m))(x), m(x))
    r = nu.residual_mlp(3, 4, 2, 1, activation=nn.SiLU, seed=0)
    assert sum(isinstance(a, nn.SiLU) for a in r.modules()) == 5


@pytest.mark.parametrize("spec, match", [
    (3, "activation must be a name"),
    (nn.Linear, "activation class Linear needs arguments"),
    (int, "activation class int is not an nn.Module"),
    (lambda: 3, "returned int, not an nn.Module"),
    ("relu6", "unknown activation 'relu6'"),
])
def test_bad_activation_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        nu.mlp(3, [4], 1, activation=spec)


def test_backprop_trusts_only_named_activations():
    def relu(x):  # a custom function that happens to be called relu
        return torch.tanh(x)

    m = nu.mlp(3, [4], 1, activation=relu, seed=0)
    with pytest.raises(ValueError, match="backprop supports"):
        nu.models.backprop(m, torch.randn(2, 3), torch.randn(2, 1))
    lin = nu.mlp(3, [4], 1, activation="linear", seed=0).double()
    X, Y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    grads = nu.models.backprop(lin, X, Y)
    loss = 0.5 * (lin(X) - Y).pow(2).sum(1).mean()
    auto = torch.autograd.grad(loss, list(lin.parameters()))
    for a, b in zip(grads, auto):
        torch.testing.assert_close(a, b)


def test_balanced_deep_linear_with_one_layer_is_the_target_matrix():
    std = 0.7
    A = torch.randn(3, 4, generator=nu.generator(0), dtype=torch.float64) * std
    one = nu.DeepLinear([4, 3], init="balanced", std=std, seed=0, dtype=torch.float64)
    torch.testing.assert_close(one.product(), A)
    # the same end-to-end matrix as deeper balanced nets of the same seed
    for dims in ([4, 5, 3], [4, 3, 6, 3]):
        deep = nu.DeepLinear(dims, init="balanced", std=std, seed=0, dtype=torch.float64)
        torch.testing.assert_close(deep.product(), A)
