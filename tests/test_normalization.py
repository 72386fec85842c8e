"""Tests of nnopt_utils.normalization: equality with torch.nn's layers, invariances,
the gradient-direction probe and the BN-ReLU gradient measurement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnopt_utils import normalization as N


def _pair_bn(C, momentum=0.1, eps=1e-5, dtype=torch.float64):
    ours = N.BatchNorm(C, momentum=momentum, eps=eps).to(dtype)
    ref = nn.BatchNorm1d(C, momentum=momentum, eps=eps).to(dtype)
    with torch.no_grad():
        w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
        ours.weight.copy_(w), ref.weight.copy_(w)
        ours.bias.copy_(b), ref.bias.copy_(b)
    return ours, ref


@pytest.mark.parametrize("shape", [(32, 7), (16, 5, 9)])
def test_batch_norm_equals_torch_train_and_eval(shape):
    torch.manual_seed(0)
    ours, ref = _pair_bn(shape[1], momentum=0.3)
    for step in range(3):  # several steps: running statistics accumulate
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        up = torch.randn(shape, dtype=torch.float64)
        y, y2 = ours(x), ref(x2)
        torch.testing.assert_close(y, y2)
        (y * up).sum().backward()
        (y2 * up).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ours.eval(), ref.eval()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(ours(x), ref(x2))
    ours(x).sum().backward(), ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_layer_norm_and_group_norm_equal_torch():
    torch.manual_seed(1)
    x = torch.randn(6, 12, 5, dtype=torch.float64, requires_grad=True)
    ln_ours, ln_ref = N.LayerNorm((12, 5)).double(), nn.LayerNorm((12, 5)).double()
    gn_ours, gn_ref = N.GroupNorm(4, 12).double(), nn.GroupNorm(4, 12).double()
    with torch.no_grad():
        for a, b in ((ln_ours, ln_ref), (gn_ours, gn_ref)):
            a.weight.copy_(torch.randn_like(a.weight)), b.weight.copy_(a.weight)
            a.bias.copy_(torch.randn_like(a.bias)), b.bias.copy_(a.bias)
    for a, b in ((ln_ours, ln_ref), (gn_ours, gn_ref)):
        x1 = x.detach().clone().requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        y1, y2 = a(x1), b(x2)
        torch.testing.assert_close(y1, y2)
        up = torch.randn_like(y1)
        (y1 * up).sum().backward(), (y2 * up).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(a.weight.grad, b.weight.grad)
    # 2-D input: LayerNorm over features equals GroupNorm with one group
    z = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(N.layer_norm(z, 8), N.group_norm(z, 1))


def test_normalized_output_statistics():
    x = torch.randn(64, 10, dtype=torch.float64) * 5 - 2
    y = N.batch_norm(x, eps=0.0)
    torch.testing.assert_close(y.mean(0), torch.zeros(10, dtype=torch.float64))
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(10, dtype=torch.float64))
    z = N.layer_norm(x, 10, eps=0.0)
    torch.testing.assert_close(z.var(1, unbiased=False), torch.ones(64, dtype=torch.float64))


def test_scale_invariance_of_weights_before_batch_norm():
    """L(cW) = L(W), <W, grad W> = 0 and grad L(cW) = grad L(W) / c when eps = 0."""
    torch.manual_seed(2)
    X, v = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    W = torch.randn(4, 6, dtype=torch.float64)

    def loss(W):
        return (torch.tanh(N.batch_norm(X @ W.T, eps=0.0)) * v).sum()

    W1 = W.clone().requires_grad_(True)
    W3 = (3.0 * W).requires_grad_(True)
    l1, l3 = loss(W1), loss(W3)
    l1.backward(), l3.backward()
    assert abs(float((l1 - l3).detach())) < 1e-12
    Wd = W1.detach()
    assert abs(float((Wd * W1.grad).sum())) < 1e-12 * float(W1.grad.norm() * Wd.norm())
    torch.testing.assert_close(W3.grad, W1.grad / 3.0)


def test_loss_along_gradient_matches_a_quadratic():
    """For L = 1/2 ||A theta - b||^2 the probe has closed forms."""
    torch.manual_seed(3)
    A, b = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    loss_fn = lambda out, y: 0.5 * (out.squeeze(1) - y).pow(2).sum()  # noqa: E731
    theta = model.weight.detach().clone().squeeze(0)
    g = A.T @ (A @ theta - b)
    s = torch.tensor([0.01, 0.02, 0.05], dtype=torch.float64)
    prof = N.loss_along_gradient(model, loss_fn, A, b, s)
    expect_loss = torch.stack([0.5 * (A @ (theta - si * g) - b).pow(2).sum() for si in s])
    expect_change = torch.stack([(si * A.T @ A @ g).norm() for si in s])
    torch.testing.assert_close(prof.loss, expect_loss)
    torch.testing.assert_close(prof.grad_change, expect_change)
    assert math.isclose(prof.grad_norm, float(g.norm()), rel_tol=1e-12)
    # effective smoothness = max over s of ||H g|| / ||g|| <= the largest eigenvalue of A^T A
    assert prof.effective_smoothness <= float(torch.linalg.eigvalsh(A.T @ A)[-1]) * (1 + 1e-12)
    assert math.isclose(prof.loss_range, float(expect_loss.max() - expect_loss.min()))


def test_loss_along_gradient_leaves_model_unchanged():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 8), N.BatchNorm(8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    N.loss_along_gradient(model, nn.functional.cross_entropy, X, y, [0.1, 0.5])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_bn_relu_gradient_norms_shape_seed_and_growth():
    g1 = N.bn_relu_gradient_norms(12, 64, 64, n_nets=3, seed=5)
    g2 = N.bn_relu_gradient_norms(12, 64, 64, n_nets=3, seed=5)
    assert g1.shape == (3, 12) and torch.equal(g1, g2)
    # gradients grow towards the input (Yang et al. 2019)
    assert bool((g1[:, 0] > g1[:, -1]).all())


def test_bn_relu_gradient_norms_match_a_module_network():
    """The batched nets equal the same nets written with nn.Linear + our BatchNorm."""
    depth, width, batch = 4, 16, 10
    g = N.bn_relu_gradient_norms(depth, width, batch, n_nets=2, seed=7, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    Ws = [torch.randn(2, width, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
          for _ in range(depth)]
    x0 = torch.randn(2, batch, width, generator=gen, dtype=torch.float64)
    v = torch.randn(2, batch, width, generator=gen, dtype=torch.float64)
    for k in range(2):
        layers = []
        for W in Ws:
            lin = nn.Linear(width, width, bias=False).double()
            with torch.no_grad():
                lin.weight.copy_(W[k])
            layers += [lin, N.BatchNorm(width, affine=False).double(), nn.ReLU()]
        net = nn.Sequential(*layers)
        (net(x0[k]) * v[k]).sum().backward()
        ref = torch.stack([m.weight.grad.pow(2).sum() for m in net if isinstance(m, nn.Linear)])
        torch.testing.assert_close(g[k], ref)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_groups must be a positive divisor"):
        N.GroupNorm(5, 12)
    with pytest.raises(ValueError, match="num_groups must be a positive divisor"):
        N.group_norm(torch.randn(2, 6), 4)
    with pytest.raises(ValueError, match="normalized_shape"):
        N.layer_norm(torch.randn(2, 6), 5)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        N.BatchNorm(4, eps=-1.0)
    with pytest.raises(ValueError, match="momentum must lie in"):
        N.batch_norm(torch.randn(4, 3), momentum=2.0)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        N.batch_norm(torch.randn(4, 3), training=False)
    with pytest.raises(ValueError, match="more than one value per feature"):
        N.batch_norm(torch.randn(1, 3))
    with pytest.raises(ValueError, match="step_sizes must be"):
        N.loss_along_gradient(nn.Linear(2, 1), lambda o, y: o.sum(), torch.randn(3, 2),
                              torch.zeros(3), [0.1, -1.0])
    with pytest.raises(ValueError, match="batch must be an int >= 2"):
        N.bn_relu_gradient_norms(3, 4, 1)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        N.bn_relu_gradient_norms(0, 4, 4)


# ---------------------------------------------------------------------------------------
# MLPStack and the per-copy probe

NORMS = ("none", "batch", "layer", "group", "weight")


def _copies(norm, n=3, seed=0):
    from nnopt_utils.models import mlp
    # width 16: GroupNorm's 8 groups have 2 units (groups of 1 unit are degenerate)
    return [mlp(6, [16, 16], 3, norm=norm, seed=seed + k).double() for k in range(n)]


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_stack_trains_exactly_like_its_models(norm):
    """One SGD step on the stack = one step of every model, in train and eval mode."""
    torch.manual_seed(0)
    models, refs = _copies(norm), _copies(norm)
    stack = N.MLPStack(models)
    for m, r in zip(models, refs):  # stacking leaves the models unchanged
        for (k, a), b in zip(m.state_dict().items(), r.state_dict().values()):
            assert torch.equal(a, b), k
    opt = torch.optim.SGD(stack.parameters(), lr=0.2)
    ref_opts = [torch.optim.SGD(r.parameters(), lr=0.2) for r in refs]
    for _ in range(4):
        X, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
        opt.zero_grad()
        losses = stack.losses(X, y)
        losses.sum().backward()
        opt.step()
        for k, (r, o) in enumerate(zip(refs, ref_opts)):
            o.zero_grad()
            loss = nn.functional.cross_entropy(r(X), y)
            loss.backward()
            o.step()
            assert math.isclose(float(losses[k].detach()), float(loss.detach()), rel_tol=1e-10)
    X = torch.randn(7, 6, dtype=torch.float64)
    for mode in (True, False):
        stack.train(mode), [r.train(mode) for r in refs]
        out = stack(X)
        assert out.shape == (3, 7, 3)
        for k, r in enumerate(refs):
            torch.testing.assert_close(out[k], r(X), rtol=1e-9, atol=1e-11)
    if norm == "batch":  # running statistics, copy by copy
        bn = [m for m in stack.modules() if hasattr(m, "running_mean")][0]
        torch.testing.assert_close(bn.running_var[1], refs[1][1].running_var)
    y = torch.randint(0, 3, (7,))
    expect = torch.tensor([(r(X).argmax(1) == y).double().mean().item() for r in refs],
                          dtype=torch.float64)
    torch.testing.assert_close(stack.accuracy(X, y).double(), expect)
    assert stack.training is False  # accuracy restores the mode


def test_mlp_stack_weight_and_gradient_norms():
    models = _copies("batch", n=2)
    stack = N.MLPStack(models)
    with pytest.raises(ValueError, match="call backward first"):
        stack.weight_grad_norms()
    X, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    stack.losses(X, y).sum().backward()
    for k, m in enumerate(models):
        nn.functional.cross_entropy(m(X), y).backward()
        lins = [l for l in m if isinstance(l, nn.Linear)]
        torch.testing.assert_close(stack.weight_norms()[k],
                                   torch.stack([l.weight.pow(2).sum() for l in lins]))
        torch.testing.assert_close(stack.weight_grad_norms()[k],
                                   torch.stack([l.weight.grad.pow(2).sum() for l in lins]))
    assert len(stack.linears) == 3 and len(stack) == 2


def test_loss_along_gradient_per_copy_equals_one_model_at_a_time():
    models = _copies("batch", n=2, seed=3)
    stack = N.MLPStack(models)
    X, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    steps = [0.1, 0.4]
    profiles = N.loss_along_gradient(stack, stack.cross_entropy, X, y, steps, per_copy=True)
    assert len(profiles) == 2
    for p, m in zip(profiles, models):
        q = N.loss_along_gradient(m, nn.functional.cross_entropy, X, y, steps)
        torch.testing.assert_close(p.loss, q.loss)
        torch.testing.assert_close(p.grad_change, q.grad_change)
        assert math.isclose(p.grad_norm, q.grad_norm, rel_tol=1e-10)
        assert math.isclose(p.effective_smoothness, q.effective_smoothness, rel_tol=1e-9)


def test_relative_loss_range_of_a_linear_loss():
    """A linear loss decreases exactly as the gradient predicts: rho = 1 - s_min/s_max."""
    model = nn.Linear(4, 1, bias=False).double()
    c = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    prof = N.loss_along_gradient(model, lambda out, y: out.sum(), c, torch.zeros(1),
                                 [0.1, 0.2, 0.8])
    assert math.isclose(prof.grad_norm, float(c.norm()), rel_tol=1e-12)
    assert math.isclose(prof.relative_loss_range, 1 - 0.1 / 0.8, rel_tol=1e-12)
    assert prof.effective_smoothness == 0.0
    flat = N.loss_along_gradient(model, lambda out, y: 0 * out.sum(), c, torch.zeros(1), [0.1])
    assert math.isnan(flat.relative_loss_range) and math.isnan(flat.effective_smoothness)


def test_mlp_stack_and_per_copy_bad_inputs():
    from nnopt_utils.models import mlp
    with pytest.raises(ValueError, match="non-empty sequence"):
        N.MLPStack([])
    with pytest.raises(ValueError, match="differs between the models"):
        N.MLPStack([mlp(6, [8], 3, norm="batch", seed=0), mlp(6, [8], 3, norm="layer", seed=0)])
    with pytest.raises(ValueError, match="cannot stack layer 1"):
        N.MLPStack([nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1))])
    with pytest.raises(ValueError, match="running statistics"):
        N.MLPStack([nn.Sequential(nn.Linear(3, 3),
                                  nn.BatchNorm1d(3, track_running_stats=False))])
    with pytest.raises(ValueError, match="lead with the number of copies"):
        N.loss_along_gradient(nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 2)),
                              lambda o, y: o.sum(0), torch.randn(4, 6), torch.zeros(4), [0.1],
                              per_copy=True)
    stack = N.MLPStack(_copies("none", n=2))
    with pytest.raises(ValueError, match="one loss per copy"):
        N.loss_along_gradient(stack, lambda o, y: o.sum(),
                              torch.randn(4, 6, dtype=torch.float64), torch.zeros(4), [0.1],
                              per_copy=True)
