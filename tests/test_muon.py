"""Muon and its Newton-Schulz orthogonalization."""

import copy

import pytest
import torch
from torch import nn

from nnopt_utils.optim import Muon, newton_schulz


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 32, 96)])
def test_newton_schulz_puts_singular_values_in_the_band_and_keeps_the_vectors(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = newton_schulz(G, steps=5)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.68 and s.max() < 1.14  # the band p maps into itself
    inner = U.mT @ X @ Vh.mT  # = diag(p^5(sigma)) when the singular vectors are kept
    off = inner - torch.diag_embed(inner.diagonal(dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-10
    # two steps are not enough to reach the band
    s2 = torch.linalg.svdvals(newton_schulz(G, steps=2))
    assert s2.min() < 0.68 or s2.max() > 1.14
    assert torch.allclose(newton_schulz(G, steps=0), G / (G.norm(dim=(-2, -1),
                                                                 keepdim=True) + 1e-7))


def test_newton_schulz_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        newton_schulz(torch.ones(3))
    with pytest.raises(ValueError, match="steps must be a non-negative int, got -1"):
        newton_schulz(torch.ones(2, 2), steps=-1)


# a line-by-line transcription of the reference (KellerJordan/Muon, muon.py), in float32
def _ref_zeropower(G, steps):
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.clone()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def _ref_muon_update(grad, momentum, beta=0.95, ns_steps=5, nesterov=True):
    momentum.lerp_(grad, 1 - beta)
    update = grad.lerp_(momentum, beta) if nesterov else momentum
    if update.ndim == 4:
        update = update.view(len(update), -1)
    update = _ref_zeropower(update, steps=ns_steps)
    update *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    return update


def _ref_adam_update(grad, buf1, buf2, step, betas, eps):
    buf1.lerp_(grad, 1 - betas[0])
    buf2.lerp_(grad.square(), 1 - betas[1])
    buf1c = buf1 / (1 - betas[0] ** step)
    buf2c = buf2 / (1 - betas[1] ** step)
    return buf1c / (buf2c.sqrt() + eps)


def _problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    X, y = torch.randn(64, 8), torch.randn(64, 4)
    return net, X, y


def _grads(net, X, y):
    net.zero_grad()
    ((net(X) - y) ** 2).mean().backward()


def test_muon_equals_the_reference_update():
    net, X, y = _problem()
    ref = copy.deepcopy(net)
    opt = Muon(net.parameters(), lr=0.02, weight_decay=0.1, adamw_lr=3e-3)
    state = {}
    for step in range(1, 6):
        _grads(net, X, y)
        opt.step()
        _grads(ref, X, y)
        with torch.no_grad():
            for p in ref.parameters():
                st = state.setdefault(p, {})
                if p.ndim >= 2:
                    st.setdefault("m", torch.zeros_like(p))
                    u = _ref_muon_update(p.grad.clone(), st["m"], beta=0.95)
                    p.mul_(1 - 0.02 * 0.1)
                    p.add_(u.reshape(p.shape), alpha=-0.02)
                else:
                    st.setdefault("b1", torch.zeros_like(p))
                    st.setdefault("b2", torch.zeros_like(p))
                    u = _ref_adam_update(p.grad, st["b1"], st["b2"], step, (0.9, 0.95), 1e-10)
                    p.mul_(1 - 3e-3 * 0.1)
                    p.add_(u, alpha=-3e-3)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert [g["lr"] for g in opt.param_groups] == [0.02, 3e-3]


def test_muon_state_dict_round_trip_and_scheduler():
    net, X, y = _problem(1)
    twin = copy.deepcopy(net)
    opt = Muon(net.parameters(), lr=0.01)
    for _ in range(3):
        _grads(net, X, y)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin.load_state_dict(net.state_dict())
    opt2 = Muon(twin.parameters(), lr=0.5)
    opt2.load_state_dict(saved)
    for _ in range(2):
        for model, o in ((net, opt), (twin, opt2)):
            _grads(model, X, y)
            o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.005, 1.5e-4]
    del sched


def test_muon_stacked_copies_equal_separate_runs():
    nets = [_problem(s)[0] for s in range(3)]
    _, X, y = _problem()
    stacked = [torch.stack([dict(n.named_parameters())[k].detach() for n in nets])
               .requires_grad_() for k, _ in nets[0].named_parameters()]
    opt = Muon([{"params": stacked, "copies": 3}], lr=0.02)
    singles = [Muon(n.parameters(), lr=0.02) for n in nets]
    names = [k for k, _ in nets[0].named_parameters()]
    for _ in range(3):
        params = [dict(zip(names, [w[i] for w in stacked])) for i in range(3)]
        loss = sum(((torch.func.functional_call(nets[0], p, (X,)) - y) ** 2).mean()
                   for p in params)
        for w in stacked:
            w.grad = None
        loss.backward()
        opt.step()
        for n, o in zip(nets, singles):
            _grads(n, X, y)
            o.step()
    for k, w in zip(names, stacked):
        for i, n in enumerate(nets):
            torch.testing.assert_close(w[i], dict(n.named_parameters())[k],
                                       rtol=1e-5, atol=1e-6)


def test_muon_groups_and_bad_arguments():
    net, _, _ = _problem()
    opt = Muon([{"params": net[2].parameters(), "use_muon": False, "lr": 1e-3},
                {"params": net[0].parameters()}])
    assert [(g["use_muon"], g["lr"]) for g in opt.param_groups] == [
        (False, 1e-3), (True, 0.02), (False, 3e-4)]
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        Muon(net.parameters(), lr=-1)
    with pytest.raises(ValueError, match="Invalid momentum value: 1.0"):
        Muon(net.parameters(), momentum=1.0)
    with pytest.raises(ValueError, match="Invalid ns_steps: 0"):
        Muon(net.parameters(), ns_steps=0)
