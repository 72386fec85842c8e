import copy

import pytest
import torch

import nnopt_utils as nu
from nnopt_utils import pruning


def _net(seed=0):
    return nu.mlp(4, [8, 6], 3, seed=seed).double()


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (n,), generator=g)


WEIGHTS = ["0.weight", "2.weight", "4.weight"]


def test_global_magnitude_mask_removes_the_smallest_weights():
    net = _net()
    masks = pruning.magnitude_masks(net, 0.5)
    assert list(masks) == WEIGHTS  # weights only: biases are not pruned by default
    w = {n: p.detach() for n, p in net.named_parameters()}
    every = torch.cat([w[n].abs().reshape(-1) for n in WEIGHTS])
    k = round(0.5 * len(every))
    threshold = every.sort().values[k - 1]  # the oracle: the k smallest of all |w| together
    for n in WEIGHTS:
        assert torch.equal(masks[n], (w[n].abs() > threshold).double())
    s = pruning.sparsity(masks)
    assert s.zeros == k and s.total == len(every) and s.overall == k / len(every)
    assert len(set(s.per_layer.values())) == 3  # global: layers lose different fractions
    # with biases: they join the ranking
    with_bias = pruning.magnitude_masks(net, 0.5, bias=True)
    assert set(with_bias) == {n for n, _ in net.named_parameters()}


def test_layer_scope_and_rounds_of_pruning():
    net = _net()
    masks = pruning.magnitude_masks(net, 0.25, scope="layer")
    w = {n: p.detach() for n, p in net.named_parameters()}
    for n in WEIGHTS:
        m = masks[n]
        assert int((m == 0).sum()) == round(0.25 * w[n].numel())
        assert w[n].abs()[m == 0].max() < w[n].abs()[m == 1].min()
    # a second round removes a quarter of the survivors; pruned entries stay pruned
    second = pruning.magnitude_masks(net, 0.25, scope="layer", previous=masks)
    for n in WEIGHTS:
        alive = int(masks[n].sum())
        assert bool((second[n] <= masks[n]).all())
        assert int(second[n].sum()) == alive - round(0.25 * alive)
        assert w[n].abs()[(second[n] == 0) & (masks[n] == 1)].max() < \
            w[n].abs()[second[n] == 1].min()
    # three global rounds of p leave about (1 - p)^3
    m = None
    for _ in range(3):
        m = pruning.magnitude_masks(net, 0.2, previous=m)
    assert pruning.sparsity(m).overall == pytest.approx(1 - 0.8 ** 3, abs=0.02)


def test_stacked_masks_are_per_copy_masks():
    nets = [_net(s) for s in range(3)]
    stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in nets])
               for n in WEIGHTS}
    for scope in pruning.SCOPES:
        together = pruning.magnitude_masks(stacked, 0.6, scope=scope, stacked=True)
        for i, m in enumerate(nets):
            alone = pruning.magnitude_masks(m, 0.6, scope=scope)
            assert all(torch.equal(together[n][i], alone[n]) for n in WEIGHTS)


def test_conv_weights_and_kinds():
    cnn = nu.small_cnn(1, 3, width=4, seed=0).double()
    conv = pruning.prunable_names(cnn, ["conv"])
    both = pruning.prunable_names(cnn)
    assert conv and all(n.endswith("weight") for n in conv)
    assert len(both) == len(conv) + 1  # and the Linear head
    masks = pruning.magnitude_masks(cnn, 0.3, kinds=["conv"])
    assert list(masks) == conv and masks[conv[0]].shape == cnn[0].weight.shape


def test_random_masks_keep_the_layerwise_sparsity():
    masks = pruning.magnitude_masks(_net(), 0.7)
    r = pruning.random_masks(masks, seed=0)
    assert pruning.sparsity(r).per_layer == pruning.sparsity(masks).per_layer
    assert any(not torch.equal(r[n], masks[n]) for n in WEIGHTS)
    assert all(torch.equal(r[n], pruning.random_masks(masks, seed=0)[n]) for n in WEIGHTS)
    assert any(not torch.equal(r[n], pruning.random_masks(masks, seed=1)[n]) for n in WEIGHTS)
    stacked = {n: torch.stack([masks[n], torch.ones_like(masks[n])]) for n in WEIGHTS}
    rs = pruning.random_masks(stacked, seed=0, stacked=True)
    for n in WEIGHTS:  # per copy
        assert rs[n][0].sum() == masks[n].sum() and bool((rs[n][1] == 1).all())


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
], ids=["adam", "adamw", "sgd_momentum"])
def test_masked_weights_stay_exactly_zero_in_training(make):
    X, y = _data()
    net = _net()
    masks = pruning.magnitude_masks(net, 0.6)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    pruning.apply_masks(net, masks)
    opt = make(net.parameters())
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    for n in WEIGHTS:
        w = net.get_submodule(n.split(".")[0]).weight
        assert bool((w[masks[n] == 0] == 0).all())  # exactly zero
        assert bool((w[masks[n] == 1] != before[n][masks[n] == 1]).all())  # the rest trained
    s = pruning.sparsity(net)
    assert s.zeros == pruning.sparsity(masks).zeros
    out = net(X)
    pruning.remove_masks(net)
    assert [n for n, _ in net.named_parameters()] == list(before)
    assert torch.equal(net(X), out) and pruning.sparsity(net).zeros == s.zeros


def test_masks_with_fit_equal_sweep_masks():
    X, y = _data()
    masks = pruning.magnitude_masks(_net(), 0.5)
    net = pruning.apply_masks(_net(), masks)
    nu.fit(net, (X, y), optimizer="adam", lr=0.05, weight_decay=0.1, steps=15)
    assert pruning.sparsity(net).zeros == pruning.sparsity(masks).zeros
    res = nu.sweep(lambda s: _net(s), (X, y), seeds=[0], optimizer="adam", lr=0.05,
                   weight_decay=0.1, steps=15, masks=masks)
    pruning.remove_masks(net)
    for n, p in net.named_parameters():
        assert torch.allclose(p, res.params[n][0], rtol=1e-10, atol=1e-12)


def _oracle_train(start, masks, X, y, steps):
    """One masked run by fit: the one-model oracle of a sweep copy."""
    net = copy.deepcopy(start)
    if masks is not None:
        pruning.apply_masks(net, masks)
    nu.fit(net, (X, y), lr=0.2, steps=steps)
    return net


def test_imp_with_rewinding_equals_the_one_model_procedure():
    X, y = _data(60)
    rewind, steps = 4, 20
    res = pruning.imp(_net, (X, y), rounds=2, amount=0.5, steps=steps, rewind=rewind,
                      seeds=[0, 1], controls=["reinit", "random"], lr=0.2)
    w_total = sum(dict(_net().named_parameters())[n].numel() for n in WEIGHTS)
    assert res.sparsity.tolist() == pytest.approx([0, 0.5, 0.75], abs=1.5 / w_total)
    assert set(res.metrics) == {"ticket", "reinit", "random"}
    for i, seed in enumerate([0, 1]):
        # theta_k: the dense net after `rewind` steps
        theta_k = _oracle_train(_net(seed), None, X, y, rewind)
        assert all(torch.allclose(p, res.rewound[n][i], rtol=1e-10, atol=1e-12)
                   for n, p in theta_k.named_parameters())
        mask = None
        for r in range(3):
            trained = _oracle_train(theta_k, mask, X, y, steps)
            loss = nu.train.evaluate(trained, X, y)["loss"]
            assert float(res.metrics["ticket"]["train_loss"][r, i]) == pytest.approx(
                loss, rel=1e-9)
            got = {n: res.masks[r][n][i] for n in WEIGHTS}
            if mask is not None:
                assert all(torch.equal(got[n], mask[n]) for n in WEIGHTS)
            # the next round's mask: magnitudes of this round's trained weights
            mask = pruning.magnitude_masks(trained, 0.5, previous=mask)
            if r == 0:  # dense round: the random-mask control is the same run
                assert torch.equal(res.metrics["random"]["train_loss"][0],
                                   res.metrics["ticket"]["train_loss"][0])
    # the reinitialized control: a fresh init (seed 10000 + seed) with the ticket's mask
    fresh = _oracle_train(_net(10_000), None, X, y, rewind)
    trained = _oracle_train(fresh, {n: res.masks[2][n][0] for n in WEIGHTS}, X, y, steps)
    assert float(res.metrics["reinit"]["train_loss"][2, 0]) == pytest.approx(
        nu.train.evaluate(trained, X, y)["loss"], rel=1e-9)
    frame = res.to_frame()
    assert len(frame) == 3 * 3 * 2 and {"round", "sparsity", "variant", "seed",
                                        "train_loss", "train_acc"} <= set(frame.columns)


def test_bad_input():
    net = _net()
    with pytest.raises(ValueError, match=r"amount must be a number in \[0, 1\), got 1.5"):
        pruning.magnitude_masks(net, 1.5)
    with pytest.raises(ValueError, match="unknown scope 'local'; choose one of: global, layer"):
        pruning.magnitude_masks(net, 0.5, scope="local")
    with pytest.raises(ValueError, match=r"unknown layer kinds \['lstm'\]; choose among: "
                                         "linear, conv"):
        pruning.magnitude_masks(net, 0.5, kinds=["lstm"])
    with pytest.raises(ValueError, match=r"unknown parameter names \['9.weight'\]"):
        pruning.magnitude_masks(net, 0.5, names=["9.weight"])
    with pytest.raises(ValueError, match="expected an nn.Module or a dict name -> tensor"):
        pruning.magnitude_masks([1, 2], 0.5)
    masks = pruning.magnitude_masks(net, 0.5)
    with pytest.raises(ValueError, match=r"previous mask '0.weight' has shape \(3,\)"):
        pruning.magnitude_masks(net, 0.5, previous={"0.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"mask '0.weight' has shape \(2, 2\); the parameter "
                                         r"has \(8, 4\)"):
        pruning.apply_masks(_net(), {"0.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="unknown parameter '7.weight'; choose among"):
        pruning.apply_masks(_net(), {"7.weight": masks["0.weight"]})
    with pytest.raises(ValueError, match="masks must be a non-empty dict name -> tensor"):
        pruning.random_masks({})
    X, y = _data()
    with pytest.raises(ValueError, match="rounds must be a non-negative int, got -1"):
        pruning.imp(_net, (X, y), rounds=-1)
    with pytest.raises(ValueError, match=r"unknown controls \['shuffle'\]; choose among: "
                                         "reinit, random"):
        pruning.imp(_net, (X, y), rounds=1, controls=["shuffle"])
    with pytest.raises(ValueError, match="imp sets eval_every itself"):
        pruning.imp(_net, (X, y), rounds=1, eval_every=5)
    with pytest.raises(ValueError, match="seeds must be a non-empty sequence"):
        pruning.imp(_net, (X, y), rounds=1, seeds=[])


def test_imp_names_each_control_in_the_order_given():
    X, y = _data(40)
    kw = dict(rounds=1, amount=0.5, steps=5, seeds=[0], lr=0.2)
    one = pruning.imp(_net, (X, y), controls=("reinit", "random"), **kw)
    two = pruning.imp(_net, (X, y), controls=("random", "reinit"), **kw)
    for c in ("reinit", "random"):
        assert torch.equal(one.metrics[c]["train_loss"], two.metrics[c]["train_loss"])
    assert not torch.equal(one.metrics["reinit"]["train_loss"][1],
                           one.metrics["random"]["train_loss"][1])
    with pytest.raises(ValueError, match="controls must not repeat"):
        pruning.imp(_net, (X, y), controls=("random", "random"), **kw)
