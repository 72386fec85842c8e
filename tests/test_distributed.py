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

import pytest
import torch
import torch.distributed as dist

import nnopt_utils.distributed as D
from nnopt_utils.train import LOSSES

psutil = pytest.importorskip("psutil")


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
