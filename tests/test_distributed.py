"""Tests of nnopt_utils.distributed: launching real worker processes, failures, timeouts,
clean-up, DDP = single-process SGD, compressor byte counts, torchrun, large-batch helpers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import psutil  # declared in requirements.txt and the test extra: missing, it fails, not skips
import pytest
import torch
import torch.distributed as dist

import nnopt_utils.distributed as D
from nnopt_utils.train import LOSSES


# --- worker functions (module level, so the workers can import them) --------------------

def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("deliberate failure in rank one")
    dist.barrier()  # rank 0 blocks here until the launcher kills it
    return rank


def _hang(rank, world):
    time.sleep(600)


def _pid_and_byte_counts(rank, world, d):
    """The worker's pid, an all-reduce of the ranks, and every compressor once on a random
    vector: (pid, sum of ranks, gradient, [(name, bytes, aggregate, memory), ...])."""
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    g = torch.randn(d, generator=torch.Generator().manual_seed(rank))
    out = []
    for comp in (D.Dense(), D.SignMajority(), D.TopK(0.05), D.TopK(0.05, error_feedback=True),
                 D.QSGD(levels=4)):
        agg = comp(g)
        out.append((type(comp).__name__, comp.bytes_sent, agg, comp.memory))
    return os.getpid(), float(t), g, out


# --- helpers -------------------------------------------------------------------------------

def _children() -> set[int]:
    """Live child processes of this test process, except multiprocessing's resource tracker
    (one per Python process, started by the first spawn and kept for reuse)."""
    kids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                kids.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return kids


D_COMP = 203


@pytest.fixture(scope="module")
def comm_run():
    before = _children()
    results = D.launch(_pid_and_byte_counts, 2, args=(D_COMP,), timeout=60)
    return before, results


# --- launching -----------------------------------------------------------------------------

def test_launch_returns_rank_ordered_results_and_leaves_no_process(comm_run):
    before, results = comm_run
    assert [r[1] for r in results] == [1.0, 1.0]            # the all-reduce really ran
    pids = [r[0] for r in results]
    assert len(set(pids)) == 2 and os.getpid() not in pids  # two separate processes
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    assert _children() <= before


def test_worker_failure_raises_with_traceback_and_cleans_up():
    before = _children()
    with pytest.raises(D.WorkerError) as info:
        D.launch(_fail_on_rank_one, 2, timeout=60)
    err = info.value
    assert err.rank == 1
    assert "ValueError: deliberate failure in rank one" in str(err)
    assert "Traceback" in err.worker_traceback and "_fail_on_rank_one" in err.worker_traceback
    assert _children() <= before


def test_hung_worker_is_killed_at_timeout():
    before = _children()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 6 s"):
        D.launch(_hang, 2, timeout=6)
    assert time.monotonic() - start < 30
    assert _children() <= before


def test_launch_validates_arguments():
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        D.launch(_hang, 2, backend="mpi")
    with pytest.raises(ValueError, match="world_size"):
        D.launch(_hang, 0)
    with pytest.raises(ValueError, match="timeout"):
        D.launch(_hang, 2, timeout=-1)


# --- DDP and compression -------------------------------------------------------------------

def test_ddp_equals_single_process_sgd_and_byte_counts():
    torch.manual_seed(0)
    X, y = torch.randn(96, 5, dtype=torch.float64), torch.randint(0, 3, (96,))
    cfg = D.RunConfig(mode="ddp", hidden=(8,), lr=0.3, steps=12, batch_size=8,
                      dtype="float64", return_params=True, eval_every=4)
    before = _children()
    rec = D.train_distributed([cfg], X, y, world_size=3, timeout=120)[0]
    assert _children() <= before
    # single process: SGD on the union of the three workers' batches at each step
    model = D.build_model(cfg, 5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    shards = [D.shard_batches(96, r, 3, 8, 12, seed=0) for r in range(3)]
    for parts in zip(*shards):
        idx = torch.cat(parts)
        opt.zero_grad()
        LOSSES["cross_entropy"](model(X[idx]), y[idx]).backward()
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(rec["params"][k], v, rtol=1e-10, atol=1e-12)
    d = sum(p.numel() for p in model.parameters())
    assert rec["bytes"][-1] == 12 * 8 * d          # float64 all-reduce of d entries per step
    assert rec["rounds"][-1] == 12


def test_compressors_bytes_and_aggregates(comm_run):
    d, world = D_COMP, 2
    results = comm_run[1]
    grads = torch.stack([r[2] for r in results])
    for i, (name, sent, agg, memory) in enumerate(results[0][3]):
        assert all(torch.equal(agg, r[3][i][2]) for r in results)   # all workers agree
        if name == "Dense":
            assert sent == 4 * d
            torch.testing.assert_close(agg, grads.mean(0))
        elif name == "SignMajority":
            assert sent == math.ceil(d / 8)
            assert torch.equal(agg, torch.sign(torch.sign(grads).sum(0)))
        elif name == "TopK":
            k = round(0.05 * d)
            assert sent == 8 * k
            dense = torch.zeros(world, d)
            for w in range(world):
                idx = grads[w].abs().topk(k).indices
                dense[w, idx] = grads[w, idx]
            torch.testing.assert_close(agg, dense.mean(0))
            if memory is not None:                  # error feedback keeps what was dropped
                torch.testing.assert_close(memory, grads[0] - dense[0])
        else:  # QSGD: levels k/s of the norm, unbiased rounding between neighbours
            assert sent == 4 + d
            assert (agg.abs() <= grads.norm(dim=1).max() + 1e-5).all()


def test_qsgd_is_unbiased_and_bits_roundtrip():
    q = D.QSGD(levels=2)
    v = torch.randn(50, generator=torch.Generator().manual_seed(1))
    mean = torch.stack([q.decode(q.encode(v), 50) for _ in range(4000)]).mean(0)
    assert (mean - v).abs().max() < 0.1
    s = D.SignMajority()
    torch.testing.assert_close(s.decode(s.encode(v), 50), torch.where(v >= 0, 1.0, -1.0))
    with pytest.raises(ValueError, match="unknown compressor 'gzip'"):
        D.make_compressor("gzip")
    with pytest.raises(ValueError, match="ratio"):
        D.TopK(ratio=0.0)
    with pytest.raises(ValueError, match="unknown mode 'async'"):
        D.RunConfig(mode="async").validate()


# --- torchrun --------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed next to this Python")
def test_torchrun_entry_point():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "nnopt_utils.distributed",
           "--mode", "local_sgd", "--H", "4", "--steps", "40", "--lr", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
    assert summary["world_size"] == 2 and summary["rounds"] == 10
    assert summary["final_loss"] < summary["initial_loss"]


# --- large-batch helpers -------------------------------------------------------------------

def test_optimal_step_and_noise_scale():
    eta = D.optimal_step([1, 10, 10**6], beta=4.0, lam1=0.5)
    torch.testing.assert_close(eta, torch.tensor([0.25, 10 / 8.5, 1e6 / (4 + 0.5 * (1e6 - 1))],
                                                 dtype=torch.float64))
    # noise scale: tr(cov)/|mean|^2 for a dense oracle
    g = torch.randn(400, 7, dtype=torch.float64) + 0.3
    G = g.mean(0)
    cov = (g - G).T @ (g - G) / 400
    assert abs(D.gradient_noise_scale(g) - float(torch.trace(cov) / G.dot(G))) < 1e-10
    with pytest.raises(ValueError, match="positive"):
        D.optimal_step(1, beta=0.0, lam1=1.0)


def test_least_squares_steps_full_batch_matches_gd():
    # batch = whole data with replacement is noisy; with n = 1 the batch is exact GD on 1 sample
    X = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2.0], dtype=torch.float64)
    # loss(w) = (2 w_1 - 2)^2 / 2; GD with step eta: residual scales by (1 - 4 eta) per step
    steps = D.least_squares_sgd_steps(X, y, [1, 3], torch.tensor([[0.125], [0.125]]),
                                      steps=50, reps=2, target=1e-4)
    expected = math.log(1e-4) / (2 * math.log(0.5))        # loss scales by 1/4 per step
    torch.testing.assert_close(steps, torch.full((2, 2, 1), expected, dtype=torch.float64))


# --- local SGD, sharding, the exact second-moment recursion ---------------------------------

def _local_sgd_by_hand(cfg: D.RunConfig, X, y, world: int):
    """Local SGD simulated in one process: the final (averaged) parameters and the loss of the
    workers' average at every evaluation step."""
    models = [D.build_model(cfg, X.shape[1], int(y.max()) + 1) for _ in range(world)]
    opts = [torch.optim.SGD(m.parameters(), lr=cfg.lr) for m in models]
    shards = [D.shard_batches(len(X), r, world, cfg.batch_size, cfg.steps, seed=cfg.seed,
                              sharding=cfg.sharding) for r in range(world)]
    loss_fn = LOSSES[cfg.loss]

    def average():
        return {k: torch.stack([m.state_dict()[k] for m in models]).mean(0)
                for k in models[0].state_dict()}

    def loss_of(params):
        probe = D.build_model(cfg, X.shape[1], int(y.max()) + 1)
        probe.load_state_dict(params)
        with torch.no_grad():
            return float(loss_fn(probe(X), y))

    losses = {0: loss_of(average())}
    for t, parts in enumerate(zip(*shards), start=1):
        for m, o, idx in zip(models, opts, parts):
            o.zero_grad()
            loss_fn(m(X[idx]), y[idx]).backward()
            o.step()
        if t % cfg.H == 0 or t == cfg.steps:
            avg = average()
            for m in models:
                m.load_state_dict(avg)
        if t % cfg.eval_every == 0 or t == cfg.steps:
            losses[t] = loss_of(average())
    return average(), losses


def test_local_sgd_ends_with_the_average_when_H_does_not_divide_steps():
    # 5 steps with H = 3: averaged after step 3 and, since 3 does not divide 5, after step 5
    X = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    cfg = D.RunConfig(mode="local_sgd", H=3, hidden=(6,), lr=0.5, steps=5, batch_size=4,
                      dtype="float64", return_params=True, eval_every=3)
    rec = D.train_distributed([cfg], X, y, world_size=2, timeout=120)[0]
    params, losses = _local_sgd_by_hand(cfg, X, y, 2)
    for k, v in params.items():
        torch.testing.assert_close(rec["params"][k], v, rtol=1e-10, atol=1e-12)
    assert rec["rounds"][-1] == 2                 # after steps 3 and 5
    d = sum(v.numel() for v in params.values())
    assert rec["bytes"][-1] == 2 * 8 * d          # two float64 all-reduces of d entries
    torch.testing.assert_close(torch.tensor(rec["loss"]),
                               torch.tensor([losses[t] for t in rec["step"]]))


def test_local_sgd_records_the_average_between_rounds_with_heterogeneous_shards():
    # eval_every = 10 with H = 50 (any combination works); contiguous shards of sorted labels
    g = torch.Generator().manual_seed(2)
    y, order = torch.randint(0, 4, (80,), generator=g).sort()
    X = torch.randn(80, 3, dtype=torch.float64, generator=g) + y[:, None].double()
    cfg = D.RunConfig(mode="local_sgd", H=50, hidden=(5,), lr=0.2, steps=30, batch_size=5,
                      dtype="float64", eval_every=10, sharding="contiguous", return_params=True)
    rec = D.train_distributed([cfg], X, y, world_size=2, timeout=120)[0]
    params, losses = _local_sgd_by_hand(cfg, X, y, 2)
    assert rec["step"] == [0, 10, 20, 30] and rec["rounds"] == [0, 0, 0, 1]
    torch.testing.assert_close(torch.tensor(rec["loss"]),
                               torch.tensor([losses[t] for t in rec["step"]]))
    for k, v in params.items():
        torch.testing.assert_close(rec["params"][k], v, rtol=1e-10, atol=1e-12)


def test_shard_batches_strided_and_contiguous():
    n, world = 11, 3
    for sharding in D.SHARDINGS:
        seen = [torch.cat(list(D.shard_batches(n, r, world, 2, 20, sharding=sharding))).unique()
                for r in range(world)]
        assert sorted(torch.cat(seen).tolist()) == list(range(n))      # disjoint, complete
        if sharding == "strided":
            assert all((s % world == r).all() for r, s in enumerate(seen))
        else:                                                          # blocks of 4, 4, 3
            assert [s.tolist() for s in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    with pytest.raises(ValueError, match="unknown sharding 'random'"):
        next(D.shard_batches(n, 0, world, 2, 1, sharding="random"))
    with pytest.raises(ValueError, match="unknown sharding 'random'"):
        D.RunConfig(sharding="random").validate()


def test_expected_steps_match_gd_and_brute_force_expectation():
    # one sample: the batch is always the same, SGD is GD, as in the sampled version
    X = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    steps = D.least_squares_expected_steps(X, torch.tensor([-1.0, 0.0], dtype=torch.float64),
                                           [1, 3], torch.tensor([[0.125], [0.125]]), steps=50,
                                           target=1e-4)
    torch.testing.assert_close(steps, torch.full((2, 1), math.log(1e-4) / (2 * math.log(0.5)),
                                                 dtype=torch.float64))
    # three samples, batches of two: average the loss over all 9^3 index sequences
    X = torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.8, -0.7]], dtype=torch.float64)
    e0, eta = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.6
    H = X.T @ X / 3
    level = [0.5 * float(e0 @ H @ e0)]
    errors = [e0]
    for _ in range(3):
        errors = [(torch.eye(2, dtype=torch.float64)
                   - eta * (torch.outer(X[i], X[i]) + torch.outer(X[j], X[j])) / 2) @ e
                  for e in errors for i in range(3) for j in range(3)]
        level.append(sum(0.5 * float(e @ H @ e) for e in errors) / len(errors))
    t = next(k for k, v in enumerate(level) if v < 0.3 * level[0])     # first step below
    lp, ln = math.log(level[t - 1] / level[0]), math.log(level[t] / level[0])
    expected = t - 1 + (lp - math.log(0.3)) / (lp - ln)
    got = D.least_squares_expected_steps(X, e0, [2], torch.tensor([[eta]]), steps=3, target=0.3)
    torch.testing.assert_close(got, torch.tensor([[expected]], dtype=torch.float64))
    with pytest.raises(ValueError, match="target"):
        D.least_squares_expected_steps(X, e0, [2], torch.tensor([[eta]]), steps=3, target=2.0)
