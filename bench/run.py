"""Side-by-side benchmarks: nnopt_utils against the libraries a reader would use instead
(PyHessian 0.1, loss-landscapes 3.0.6, and plain torch loops).

Every case first checks that both sides compute the same quantity, against a dense, exact or
converged reference, and records the accuracy each side reached; then it times both sides,
interleaved (ours, theirs, theirs, ours, ...), and reports medians of ``time.perf_counter``.

    python bench/run.py            # checks, timings, bench/results.json, reference/performance.md
    python bench/run.py --quick    # the checks only, each case once; exit status 1 on a mismatch

The problem: an MLP 64-128-128-10 (ReLU, float32) trained briefly on 2,000 inputs: the 1,797
scikit-learn digits (standardized) plus 203 of them drawn again (seeded) with Gaussian noise of
standard deviation 0.1 added, so that the data are real images at the requested size.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

for _var in ("NNOPT_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("NNOPT_QUIET", "1")
os.environ["NNOPT_SEED"] = "0"  # the same problem and the same random choices on every run

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import nnopt_utils as nu  # noqa: E402
from nnopt_utils import hessian as hs  # noqa: E402
from nnopt_utils import landscape as ls  # noqa: E402

import shims  # noqa: E402

THREADS = int(os.environ["NNOPT_THREADS"])
torch.set_num_threads(THREADS)
criterion = nn.functional.cross_entropy


# --------------------------------------------------------------------------------------
# the problem


def problem(n: int = 2000, seed: int = 0):
    """2,000 inputs of dimension 64 and an MLP 64-128-128-10 after 150 steps of SGD."""
    ds = nu.data.digits(test_frac=0.0)
    X, y = ds.X, ds.y
    gen = nu.config.generator(seed)
    idx = torch.randint(0, len(X), (n - len(X),), generator=gen)
    X = torch.cat([X, X[idx] + 0.1 * torch.randn(len(idx), X.shape[1], generator=gen)])
    y = torch.cat([y, y[idx]])
    model = nu.mlp(64, [128, 128], 10, seed=seed)
    nu.fit(model, (X, y), lr=0.1, steps=150, batch_size=128, seed=seed, progress=False)
    model.eval()
    with torch.no_grad():
        out = model(X)
        loss, acc = float(criterion(out, y)), float((out.argmax(1) == y).float().mean())
    return model, X, y, {"train_loss": loss, "train_acc": acc}


def as_float64(model, X):
    return copy.deepcopy(model).double(), X.double()


def flat(model, X, y):
    return hs.flat_function(model, criterion, X, y)


def pyhessian_for(model, X, y):
    from pyhessian import hessian

    model.zero_grad(set_to_none=True)  # PyHessian adds to any gradient already there
    return hessian(model, criterion, data=(X, y), cuda=False)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    """One comparison: the two timed callables (and optional ``variants``, timed alongside
    for context), the goal as a minimum speed-up (their time / our time), the correctness
    ``checks`` (name -> passed), the ``accuracy`` each side reached against ``reference``, and
    ``explain(result) -> str``, a note for the page written from the measured numbers."""

    name: str
    ours_label: str
    theirs_label: str
    goal: str
    min_speedup: float
    ours: Callable[[], object]
    theirs: Callable[[], object]
    reference: str = ""
    accuracy: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)
    explain: Callable[[dict], str] = lambda r: ""


def count_calls(module, name: str):
    """Wrap ``module.name`` to count its calls; returns (counter dict, undo)."""
    original = getattr(module, name)
    counter = {"calls": 0}

    def wrapped(*args, **kwargs):
        counter["calls"] += 1
        return original(*args, **kwargs)

    setattr(module, name, wrapped)
    return counter, lambda: setattr(module, name, original)


# the top eigenvalue: both sides set to reach the same relative accuracy (EIG_TARGET) against
# a converged float64 Lanczos. PyHessian's power iteration needs a tighter stopping tolerance
# than its default 1e-3 to get there: its test (the relative change between two iterates)
# stops while the error is still about 3x the tolerance here, because the top eigenvalues
# lie close together. Our tolerance bounds the residual, and the eigenvalue error is far
# smaller (residual^2 / gap).
EIG_TARGET = 1e-3
OURS_EIG_TOL = 1e-2
THEIRS_EIG_TOL = 1e-4


def _hvp_cost_note(r: dict) -> str:
    return ("Both sides build the gradient's graph once and differentiate through it again "
            "for each Hessian-vector product (ours: `hessian.hvp_operator`); see the "
            "Hessian-vector product row for what one product costs.")


def case_eigenvalue(ctx) -> Case:
    import pyhessian  # noqa: F401 (its package attribute `hessian` is the class, not the module)

    ph = sys.modules["pyhessian.hessian"]
    model, X, y = ctx["model"], ctx["X"], ctx["y"]
    m64, X64 = as_float64(model, X)
    ref = hs.lanczos(*flat(m64, X64, y), 1, tol=1e-10, iters=400)
    lam = float(ref.eigenvalues[0])

    def ours():
        return hs.top_eigenvalue(*flat(model, X, y), tol=OURS_EIG_TOL)

    def theirs():
        torch.manual_seed(0)
        with shims.quiet():
            h = pyhessian_for(model, X, y)
            value = h.eigenvalues(tol=THEIRS_EIG_TOL)[0][0]
        model.zero_grad(set_to_none=True)
        return value

    ours_run = hs.lanczos(*flat(model, X, y), 1, tol=OURS_EIG_TOL)
    eo = rel(float(ours_run.eigenvalues[0]), lam)
    counter, undo = count_calls(ph, "hessian_vector_product")
    try:
        et = rel(theirs(), lam)
    finally:
        undo()
    products = {"ours": ours_run.iterations, "theirs": counter["calls"]}

    def explain(r):
        text = (f"Tolerances: ours `tol={OURS_EIG_TOL:g}` (relative residual), PyHessian "
                f"`tol={THEIRS_EIG_TOL:g}` (relative change; its default 1e-3 leaves an "
                f"error above {EIG_TARGET:g} here). Lanczos used {products['ours']} "
                f"Hessian-vector products, the power iteration {products['theirs']}.")
        if not r["met"]:
            text += " " + _hvp_cost_note(r)
        return text

    return Case(
        "top Hessian eigenvalue", "`hessian.top_eigenvalue`", "PyHessian `eigenvalues()`",
        f"same relative error (at most {EIG_TARGET:g}); 5x faster", 5.0, ours, theirs,
        reference=f"Lanczos in float64 to a relative residual of 1e-10 "
                  f"({ref.iterations} iterations)",
        accuracy={"lambda_max": lam, "ours_rel_error": eo, "theirs_rel_error": et,
                  "ours_products": products["ours"], "theirs_products": products["theirs"]},
        checks={"reference converged": ref.converged, "ours within target": eo <= EIG_TARGET,
                "theirs within target": et <= EIG_TARGET},
        explain=explain)


def case_trace(ctx) -> Case:
    model, X, y = ctx["model"], ctx["X"], ctx["y"]
    # exactness on a subproblem small enough for the definition sum_i e_i^T H e_i
    small = nu.mlp(64, [16, 16], 10, seed=1).double()
    Xs, ys = X[:200].double(), y[:200]
    t_small = hs.exact_trace(small, Xs, ys)
    t_def = hs.hvp_trace(*flat(small, Xs, ys))
    m64, X64 = as_float64(model, X)
    t64 = hs.exact_trace(m64, X64, y)

    def ours():
        return hs.exact_trace(model, X, y)

    def theirs():
        torch.manual_seed(0)
        with shims.quiet():
            samples = pyhessian_for(model, X, y).trace(maxIter=100, tol=0.0)  # all 100 probes
        model.zero_grad(set_to_none=True)
        return samples

    t32 = ours()
    samples = torch.tensor(theirs(), dtype=torch.float64)
    mean, se = float(samples.mean()), float(samples.std()) / math.sqrt(len(samples))
    z = abs(mean - t64) / se

    def explain(r):
        text = (f"PyHessian's estimate is {mean:.4g} with a standard error of {se:.2g} "
                f"({100 * se / abs(mean):.1f}%) after {len(samples)} Rademacher probes "
                f"(`trace(maxIter=100, tol=0)`: its default `tol=1e-3` on the change of the "
                f"running mean stops after a handful of probes); the exact trace is "
                f"{t64:.6g}, {z:.1f} standard errors away.")
        if not r["met"]:
            text += (" `exact_trace` costs one forward pass and one vector-Jacobian product "
                     "per class (10 here, batched in one `vmap`); PyHessian's 100 probes are "
                     "100 products through one cached gradient graph.")
        return text

    return Case(
        "Hessian trace", "`hessian.exact_trace`", "PyHessian `trace()`, 100 probes",
        "exact; 30x faster", 30.0, ours, theirs,
        reference="the definition, the sum of `e_i^T H e_i` over all coordinates, on a "
                  "64-16-16-10 net in float64; `exact_trace` in float64 on the benchmark net",
        accuracy={"trace": t64, "ours_rel_error": rel(t32, t64),
                  "ours_rel_error_small_net": rel(t_small, t_def),
                  "theirs_rel_error": rel(mean, t64), "theirs_rel_stderr": se / abs(mean),
                  "theirs_z": z},
        checks={"ours exact on the small net": rel(t_small, t_def) <= 1e-10,
                "ours float32 = float64": rel(t32, t64) <= 1e-4,
                "theirs CI holds the trace": z <= 4.0},
        explain=explain)


DENSITY_STEPS, DENSITY_PROBES = 100, 1


def _smoothed(nodes, weights, grid, sigma):
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    k = torch.exp(-0.5 * ((grid[:, None] - nodes[None]) / sigma) ** 2)
    return (k * weights).sum(1) / (sigma * math.sqrt(2 * math.pi))


def case_density(ctx) -> Case:
    model, X, y = ctx["model"], ctx["X"], ctx["y"]
    f, theta = flat(model, X, y)
    P = theta.numel()
    # the same start vector for both: ours draws it from generator(seed); PyHessian is handed
    # the same vector through shims.start_vector (a check only; never while timing)
    seed = 0
    v = torch.randn(1, P, generator=nu.config.generator(seed))[0]
    pieces = [c.view(p.shape) for c, p in
              zip(torch.split(v, [p.numel() for p in model.parameters()]), model.parameters())]
    ours_sd = hs.spectral_density(f, theta, steps=DENSITY_STEPS, probes=1, seed=seed)
    with shims.quiet(), shims.legacy_eig(), shims.start_vector(pieces):
        nodes_t, weights_t = pyhessian_for(model, X, y).density(iter=DENSITY_STEPS, n_v=1)
    model.zero_grad(set_to_none=True)
    nodes_o, weights_o = ours_sd.nodes[0], ours_sd.weights[0]
    nodes_t = torch.tensor(nodes_t[0], dtype=torch.float64)
    weights_t = torch.tensor(weights_t[0], dtype=torch.float64)
    # the same grid and smoothing for both; L1 distance between the two densities (0 to 2)
    lo, hi = float(nodes_o.min()), float(nodes_o.max())
    sigma = 0.01 * (hi - lo)
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 4000, dtype=torch.float64)
    d_o = _smoothed(nodes_o, weights_o, grid, sigma)
    d_t = _smoothed(nodes_t, weights_t, grid, sigma)
    l1 = float(torch.trapezoid((d_o - d_t).abs(), grid))
    # the converged reference: Gauss quadrature with k nodes is exact for degree < 2k, so
    # sum_j w_j tau_j^m = u^T H^m u (u = v / norm(v)), here computed by HVPs in float64
    m64, X64 = as_float64(model, X)
    f64, th64 = flat(m64, X64, y)
    u = (v / v.norm()).double()
    moments, w = [], u
    for _ in range(4):
        w = hs.hvp(f64, th64, w)
        moments.append(float(u @ w))

    def moment_error(nodes, weights):
        return max(rel(float((weights * nodes ** m).sum()), moments[m - 1]) for m in (1, 2, 4))

    err_o, err_t = moment_error(nodes_o, weights_o), moment_error(nodes_t, weights_t)

    def ours():
        return hs.spectral_density(*flat(model, X, y), steps=DENSITY_STEPS,
                                   probes=DENSITY_PROBES)

    def theirs():
        with shims.quiet(), shims.legacy_eig():
            out = pyhessian_for(model, X, y).density(iter=DENSITY_STEPS, n_v=DENSITY_PROBES)
        model.zero_grad(set_to_none=True)
        return out

    def explain(r):
        text = ("For the check both sides start Lanczos from the same vector, and their "
                "smoothed densities (the same grid and Gaussian width) are compared. "
                "PyHessian 0.1 calls `torch.eig`, removed in torch 2.0; the benchmark "
                "supplies it (`bench/shims.py`).")
        if not r["met"]:
            text += (f" Both sides run {DENSITY_STEPS} Hessian-vector products. "
                     + _hvp_cost_note(r))
        return text

    return Case(
        "spectral density", "`hessian.spectral_density`", "PyHessian `density()`",
        f"the same density ({DENSITY_STEPS} steps, {DENSITY_PROBES} probe); faster", 1.0, ours,
        theirs,
        reference="the quadrature's moments `u^T H^m u` (m = 1, 2, 4) from float64 "
                  "Hessian-vector products, from the same start vector `u`",
        accuracy={"L1_between_densities": l1, "ours_moment_rel_error": err_o,
                  "theirs_moment_rel_error": err_t},
        checks={"same density (L1 <= 0.05)": l1 <= 0.05, "ours moments": err_o <= 1e-3,
                "theirs moments": err_t <= 1e-3},
        explain=explain)


GRID = 21
SURFACE_CHUNK = 32  # for comparison: larger batches of grid points


def _their_directions(model, seed: int):
    """Replay loss-landscapes' random_plane directions (the same global seed, the same calls),
    as dicts keyed like named_parameters: its per-step directions."""
    from loss_landscapes.model_interface.model_parameters import orthogonal_to, rand_u_like
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    start = wrap_model(m).get_module_parameters()
    d1 = rand_u_like(start)
    d2 = orthogonal_to(d1)
    d1.filter_normalize_(start)
    d2.filter_normalize_(start)
    for d in (d1, d2):  # as random_plane(distance=1, steps=GRID)
        d.mul_((start.model_norm() / 1 / GRID) / d.model_norm())
    names = [n for n, _ in model.named_parameters()]
    return [{n: t.detach().clone() for n, t in zip(names, d.parameters)} for d in (d1, d2)]


def case_surface(ctx) -> Case:
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    model, X, y = ctx["model"], ctx["X"], ctx["y"]
    metric = Loss(criterion, X, y)
    seed = 0

    def theirs():
        torch.manual_seed(seed)
        return loss_landscapes.random_plane(model, metric, distance=1, steps=GRID,
                                            normalization="filter", deepcopy_model=True)

    dirs = [ls.filter_normalized_direction(model, seed=s) for s in (1, 2)]

    def ours():
        return ls.surface(model, (X, y), dirs, grid=GRID)

    def ours_chunked():
        return ls.surface(model, (X, y), dirs, grid=GRID, chunk_size=SURFACE_CHUNK)

    theirs_grid = torch.tensor(theirs(), dtype=torch.float64)
    # where loss-landscapes evaluates: row i lies i - GRID/2 steps along d1; along d2 the
    # rows alternate between the offsets j - GRID/2 + 1 (even i) and j - GRID/2 (odd i).
    # Our surface evaluates those same points with its own code.
    e1, e2 = _their_directions(model, seed)
    xs = torch.arange(GRID, dtype=torch.float32) - GRID / 2
    ys = torch.arange(GRID + 1, dtype=torch.float32) - GRID / 2
    on_theirs = ls.surface(model, (X, y), (e1, e2), grid=(xs, ys)).loss.double()
    expect = torch.stack([on_theirs[i, 1:] if i % 2 == 0 else on_theirs[i, :-1]
                          for i in range(GRID)])
    same = float(((theirs_grid - expect).abs() / expect.abs()).max())
    s = ours()
    with torch.no_grad():
        loss0 = float(criterion(model(X), y))
    centre = float(s.loss[GRID // 2, GRID // 2])
    nearest = float(theirs_grid[GRID // 2, GRID // 2])

    def explain(r):
        chunked = r["variants"].get(f"ours, chunk_size={SURFACE_CHUNK}")
        text = (f"loss-landscapes' grid is not centred on the model: its rows lie at "
                f"{-GRID / 2:g} to {GRID / 2 - 1:g} steps along the first direction, and "
                f"along the second the even rows are shifted by one step against the odd ones, "
                f"so with {GRID} points per axis the model itself is never evaluated (its "
                f"middle value is {nearest:.4g} against the model's loss {loss0:.4g}). Its "
                f"values equal the loss at those points (checked by evaluating them with "
                f"`landscape.surface`).")
        if not r["met"]:
            n = GRID * GRID
            text += (f" Both sides run the same {n} forward passes of {len(X)} inputs: "
                     f"{_fmt(r['ours_s'] / n)} per grid point for our batched evaluation (a "
                     f"`vmap` of `functional_call` over the grid points) against "
                     f"{_fmt(r['theirs_s'] / n)} for loss-landscapes' plain forward passes; "
                     + ("at this size, on one thread, batching the grid costs time rather "
                        "than saving it." if r["ours_s"] > r["theirs_s"] else
                        "both sides do the same arithmetic, so 2x would take fewer "
                        "operations than these exact forward passes."))
            if chunked:
                text += (f" With `chunk_size={SURFACE_CHUNK}` grid points per batch instead of "
                         f"the default ({8192 // len(X)} here) ours takes {_fmt(chunked)} "
                         f"({r['theirs_s'] / chunked:.2f}x).")
        return text

    return Case(
        f"{GRID}x{GRID} loss surface", "`landscape.surface`", "`loss_landscapes.random_plane`",
        "the model at the centre; 2x faster", 2.0, ours, theirs,
        reference="the model's own loss at the centre; loss-landscapes' grid re-evaluated "
                  "at the points where it evaluates",
        accuracy={"model_loss": loss0, "ours_centre_rel_error": rel(centre, loss0),
                  "theirs_values_rel_error": same, "theirs_middle_rel_error": rel(nearest, loss0)},
        checks={"ours centre = model loss": rel(centre, loss0) <= 1e-6,
                "theirs = loss at its points": same <= 1e-4},
        variants={f"ours, chunk_size={SURFACE_CHUNK}": ours_chunked},
        explain=explain)


def case_hvp(ctx) -> Case:
    model, X, y = ctx["model"], ctx["X"], ctx["y"]
    f, theta = flat(model, X, y)
    v = torch.randn(theta.shape, generator=nu.config.generator(3))
    v = v / v.norm()  # a unit step h v stays clear of most ReLU kinks
    params = list(model.parameters())
    vs = [c.view(p.shape) for c, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    m64, X64 = as_float64(model, X)
    f64, th64 = flat(m64, X64, y)
    v64 = v.double()
    hv64 = hs.hvp(f64, th64, v64)
    # an independent reference: central differences of float64 gradients
    g = torch.func.grad(f64)
    h = 1e-6
    fd = (g(th64 + h * v64) - g(th64 - h * v64)) / (2 * h)
    fd_err = float((hv64 - fd).norm() / fd.norm())
    ours_err = float((hs.hvp_operator(f, theta)(v).double() - hv64).norm() / hv64.norm())
    scratch_err = float((hs.hvp(f, theta, v).double() - hv64).norm() / hv64.norm())
    grad64 = g(th64)

    operator = hs.hvp_operator(f, theta)  # the gradient's graph, built once

    def ours():
        return operator(v)

    def from_scratch():
        return hs.hvp(f, theta, v)

    def theirs():
        return torch.autograd.grad(criterion(model(X), y), params)

    def double_backward():
        gr = torch.autograd.grad(criterion(model(X), y), params, create_graph=True)
        return torch.autograd.grad(gr, params, grad_outputs=vs)

    grad32 = torch.cat([t.reshape(-1) for t in theirs()]).double()
    grad_err = float((grad32 - grad64).norm() / grad64.norm())
    db_err = float((torch.cat([t.reshape(-1) for t in double_backward()]).double() - hv64).norm()
                   / hv64.norm())

    def explain(r):
        var = r["variants"]
        db, sc = var.get("double backward"), var.get("hvp from scratch")
        text = ("The speed-up here is a gradient's time over one Hessian-vector product's, "
                "for a product through the gradient's graph built once "
                "(`hessian.hvp_operator`, as PyHessian does; building it costs one gradient "
                "with `create_graph=True`, once for all the products at a point).")
        if db and sc:
            text += (f" For comparison, `hessian.hvp`, which starts from scratch for a single "
                     f"product (forward-over-reverse through `torch.func`), takes {_fmt(sc)}, "
                     f"{sc / r['theirs_s']:.1f} gradients, and double backward "
                     f"(reverse-over-reverse, the graph built each time) {_fmt(db)}, "
                     f"{db / r['theirs_s']:.1f} gradients.")
        return text

    return Case(
        "Hessian-vector product", "`hessian.hvp_operator`",
        "one gradient (`torch.autograd.grad`)",
        "at most 2 gradients (speed-up 0.5)", 0.5, ours, theirs,
        reference="the float64 product, itself checked against central differences of "
                  "float64 gradients",
        accuracy={"float64_hvp_vs_fd": fd_err, "ours_rel_error": ours_err,
                  "from_scratch_rel_error": scratch_err,
                  "gradient_rel_error": grad_err, "double_backward_rel_error": db_err},
        checks={"float64 HVP = finite differences": fd_err <= 1e-6,
                "ours = float64 HVP": ours_err <= 1e-4, "gradient = float64": grad_err <= 1e-4,
                "hvp from scratch = float64 HVP": scratch_err <= 1e-4,
                "double backward = float64 HVP": db_err <= 1e-4},
        variants={"double backward": double_backward, "hvp from scratch": from_scratch},
        explain=explain)


SWEEP_N, SWEEP_STEPS, SWEEP_BATCH = 16, 100, 64


def case_sweep(ctx) -> Case:
    X, y = ctx["X"], ctx["y"]

    def build(seed):
        return nu.mlp(64, [32, 32], 10, seed=seed)

    def ours():
        return nu.sweep(build, (X, y), seeds=range(SWEEP_N), lr=0.1, steps=SWEEP_STEPS,
                        batch_size=SWEEP_BATCH)

    def theirs():
        models = []
        for s in range(SWEEP_N):
            m = build(s)
            nu.fit(m, (X, y), lr=0.1, steps=SWEEP_STEPS, batch_size=SWEEP_BATCH, seed=0,
                   progress=False)
            models.append(m)
        return models

    res, models = ours(), theirs()
    err = 0.0
    for i, m in enumerate(models):
        for n, p in m.named_parameters():
            err = max(err, float((res.params[n][i] - p.detach()).abs().max()
                                 / p.detach().abs().max()))
    return Case(
        f"{SWEEP_N} small-MLP trainings", "`nu.sweep`", f"{SWEEP_N} runs of `nu.fit`",
        "4x faster", 4.0, ours, theirs,
        reference=f"the separate runs' final parameters (MLP 64-32-32-10, seeds 0 to "
                  f"{SWEEP_N - 1}, {SWEEP_STEPS} SGD steps, batch {SWEEP_BATCH})",
        accuracy={"max_rel_param_difference": err},
        checks={"same final parameters": err <= 1e-4},
        explain=lambda r: "Both sides train on the same mini-batches; the vectorized run "
                          "matches every separate run to float32 rounding.")


# --------------------------------------------------------------------------------------
# the neural tangent kernel and weight matching

NTK_N, NTK_WIDTH, NTK_REF = 200, 256, 40


def case_ntk(ctx) -> Case:
    """The empirical NTK of an MLP against the torch.func tutorial's Jacobian contraction."""
    from torch.func import functional_call, jacrev, vmap

    from nnopt_utils import ntk

    X = ctx["X"][:NTK_N]
    net = nu.mlp(64, [NTK_WIDTH, NTK_WIDTH], 10, seed=1).eval()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(p, x):
        return functional_call(net, p, (x.unsqueeze(0),)).squeeze(0)

    # "Method 1: Jacobian contraction" of the torch.func NTK tutorial, as described there
    def theirs():
        jac1 = vmap(jacrev(fnet_single), (None, 0))(params, X)
        jac1 = [j.flatten(2) for j in jac1.values()]
        jac2 = jac1  # the kernel of X with itself
        result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2)
                              for j1, j2 in zip(jac1, jac2)])
        return result.sum(0)

    def ours():
        return ntk.empirical_ntk(net, X)

    # reference: the kernel of the first NTK_REF inputs in float64, by per-sample Jacobians
    sub = X[:NTK_REF].double()
    ref = ntk.empirical_ntk(copy.deepcopy(net).double(), sub, method="jacobian")
    a, b = ours()[:NTK_REF, :NTK_REF].double(), theirs()[:NTK_REF, :NTK_REF].double()
    eo = float((a - ref).norm() / ref.norm())
    et = float((b - ref).norm() / ref.norm())
    P = sum(p.numel() for p in params.values())
    return Case(
        f"empirical NTK, N = {NTK_N}, 10 outputs", "`ntk.empirical_ntk`",
        "torch.func tutorial, Jacobian contraction (method 1)",
        "the same kernel; 20x faster", 20.0, ours, theirs,
        reference=f"the kernel of the first {NTK_REF} inputs in float64 (per-sample "
                  f"Jacobians), MLP 64-{NTK_WIDTH}-"
                  f"{NTK_WIDTH}-10 ({P} parameters), {NTK_N} digits",
        accuracy={"ours_rel_error": eo, "theirs_rel_error": et},
        checks={"ours = float64 kernel": eo <= 1e-5, "theirs = float64 kernel": et <= 1e-5},
        explain=lambda r: (
            "The tutorial's method materializes every per-sample Jacobian, N x 10 x P "
            f"numbers ({NTK_N * 10 * P * 4 / 2**20:.0f} MiB here), and contracts them; "
            "the MLP path of `empirical_ntk` uses the layer structure instead: per layer, "
            "the Gram matrix of the backpropagated output vectors times the Gram matrix of "
            "the layer's inputs, from one forward and one backward sweep of the batch."))


RELU_N, RELU_DEPTH = 2000, 3


def _numpy_relu_ntk(X, depth, sigma_w2=2.0, sigma_b2=0.0):
    """The arc-cosine recursion of Arora et al. (2019), one NumPy step per layer."""
    import numpy as np

    d = X.shape[1]
    sigma = sigma_w2 * (X @ X.T) / d + sigma_b2
    theta = sigma.copy()
    for _ in range(depth):
        diag = np.sqrt(np.diag(sigma))
        norm = np.outer(diag, diag)
        rho = np.clip(sigma / norm, -1.0, 1.0)
        np.fill_diagonal(rho, 1.0)  # a point with itself
        angle = np.arccos(rho)
        dot = sigma_w2 * (np.pi - angle) / (2 * np.pi)
        sigma = sigma_w2 / (2 * np.pi) * norm * (np.sin(angle) + (np.pi - angle) * rho) \
            + sigma_b2
        theta = theta * dot + sigma
    return theta


def case_relu_ntk(ctx) -> Case:
    from nnopt_utils import ntk

    X = ctx["X"].double()[:RELU_N]
    Xn = X.numpy()

    def ours():
        return ntk.relu_ntk(X, depth=RELU_DEPTH)

    def theirs():
        return _numpy_relu_ntk(Xn, RELU_DEPTH)

    a, b = ours(), torch.from_numpy(theirs())
    diff = float((a - b).abs().max() / b.abs().max())
    # an independent check of both: the depth-1 closed form (2/d)(x.x' k0 + |x||x'| k1)
    x = X[:50]
    nrm = x.norm(dim=1)
    cos = ((x @ x.T) / torch.outer(nrm, nrm)).clamp(-1, 1).fill_diagonal_(1.0)
    ang = torch.arccos(cos)
    closed = 2 / x.shape[1] * ((x @ x.T) * (math.pi - ang) / math.pi + torch.outer(nrm, nrm)
                               * (torch.sin(ang) + (math.pi - ang) * cos) / math.pi)
    d1 = float((ntk.relu_ntk(x, depth=1) - closed).abs().max() / closed.abs().max())
    return Case(
        f"analytic ReLU NTK, N = {RELU_N}, depth {RELU_DEPTH}", "`ntk.relu_ntk`",
        "the same recursion in NumPy, one step per layer", "equal to 1e-10; faster", 1.0,
        ours, theirs,
        reference="the depth-1 closed form (2/d)(x.x' k0 + |x||x'| k1) for both, float64",
        accuracy={"ours_vs_numpy_max_rel": diff, "depth1_closed_form_rel": d1},
        checks={"equal to 1e-10": diff <= 1e-10, "depth 1 = closed form": d1 <= 1e-12},
        explain=lambda r: (
            "Both sides run the same elementwise recursion on N x N matrices, so neither "
            "can be much faster than the other on one thread; the comparison checks that "
            "the library's kernel is the textbook recursion to 1e-10."))


ALIGN_WIDTH = 512


def _reference_weight_matching(pa, pb, layers, seed=0, max_iter=100):
    """Weight matching (Ainsworth, Hayase and Srinivasa, 2023, Algorithm 2) as their
    reference code runs it: a dict of permutations, layers in a random order each sweep, one
    linear assignment per hidden layer, until no permutation changes."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    n_hidden = len(layers) - 1
    perms = [np.arange(pa[f"{layers[i]}.weight"].shape[0]) for i in range(n_hidden)]
    A = {k: v.detach().double().numpy() for k, v in pa.items()}
    B = {k: v.detach().double().numpy() for k, v in pb.items()}
    for _ in range(max_iter):
        changed = False
        for i in rng.permutation(n_hidden):
            w_in, w_out = layers[i], layers[i + 1]
            prev = perms[i - 1] if i > 0 else None
            nxt = perms[i + 1] if i + 1 < n_hidden else None
            Wb_in = B[f"{w_in}.weight"] if prev is None else B[f"{w_in}.weight"][:, prev]
            C = A[f"{w_in}.weight"] @ Wb_in.T + np.outer(A[f"{w_in}.bias"], B[f"{w_in}.bias"])
            Wb_out = B[f"{w_out}.weight"] if nxt is None else B[f"{w_out}.weight"][nxt]
            C += A[f"{w_out}.weight"].T @ Wb_out
            _, col = linear_sum_assignment(C, maximize=True)
            if not np.array_equal(col, perms[i]):
                perms[i], changed = col, True
        if not changed:
            break
    return perms


def case_align(ctx) -> Case:
    X, y = ctx["X"], ctx["y"]
    nets = [nu.mlp(64, [ALIGN_WIDTH] * 3, 10, seed=s) for s in (0, 1)]
    for m in nets:
        nu.fit(m, (X, y), lr=0.05, steps=30, batch_size=256, seed=0, progress=False)
    a, b = nets
    pa = dict(a.named_parameters())
    pb = dict(b.named_parameters())
    layers = [n.rsplit(".", 1)[0] for n in pa if n.endswith(".weight")]

    def ours():
        return ls.align(a, b)

    def theirs():
        return _reference_weight_matching(pa, pb, layers)

    aligned = ours()
    perms = theirs()
    with torch.no_grad():
        same_fn = float((aligned(X) - b(X)).abs().max() / b(X).abs().max())
    # the permutation ours applied, read off the aligned copy's rows
    pal = dict(aligned.named_parameters())
    same_perm = True
    for i, w in enumerate(layers[:-1]):
        Wb, Wal = pb[f"{w}.weight"].detach(), pal[f"{w}.weight"].detach()
        if i > 0:
            Wb = Wb[:, torch.as_tensor(perms[i - 1])]
        same_perm &= bool(torch.equal(Wal, Wb[torch.as_tensor(perms[i])]))
    # the matching objective sum_k <A_k, P(B)_k> that weight matching maximizes: ours must
    # reach the reference's (a copy of model_b left unpermuted would keep the function too)
    permuted = {}
    for i, w in enumerate(layers):
        W, bias = pb[f"{w}.weight"].detach(), pb[f"{w}.bias"].detach()
        if i > 0:
            W = W[:, torch.as_tensor(perms[i - 1])]
        if i < len(layers) - 1:
            W, bias = W[torch.as_tensor(perms[i])], bias[torch.as_tensor(perms[i])]
        permuted[f"{w}.weight"], permuted[f"{w}.bias"] = W, bias

    def objective(q):
        return sum(float((pa[k].detach().double() * q[k].detach().double()).sum()) for k in pa)

    obj_ours, obj_theirs, obj_none = objective(pal), objective(permuted), objective(pb)
    return Case(
        f"weight matching, 3 hidden layers of {ALIGN_WIDTH}", "`landscape.align`",
        "the reference algorithm (layers in random order, `linear_sum_assignment`)",
        "the same permutation; no slower", 1.0, ours, theirs,
        reference="the aligned network computes the same function as model_b",
        accuracy={"aligned_vs_b_max_rel": same_fn, "same_permutation": same_perm,
                  "objective_ours": obj_ours, "objective_reference": obj_theirs,
                  "objective_unpermuted": obj_none},
        checks={"same function": same_fn <= 1e-5,
                "objective at least the reference's (to 0.1%)":
                    obj_ours >= obj_theirs - 1e-3 * abs(obj_theirs),
                "objective above the unpermuted one": obj_ours > obj_none},
        explain=lambda r: (
            "Both sides solve the same linear assignment problems; "
            + ("they reach the same permutation. " if same_perm else
               "they visit the layers in different random orders and reach different "
               "fixed points of the alternation (weight matching is a heuristic); both "
               "permute model_b without changing its function. ")
            + "The time is dominated by `linear_sum_assignment` on 512 x 512 matrices."))


CASES = [case_eigenvalue, case_trace, case_density, case_surface, case_hvp, case_sweep,
         case_ntk, case_relu_ntk, case_align]


# --------------------------------------------------------------------------------------
# timing and reports


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: list[Callable], reps: int) -> list[float]:
    """Median seconds of ``reps`` runs of each callable, run in turn (forwards on even
    repetitions, backwards on odd ones, so that no side always runs first)."""
    times = [[] for _ in fns]
    for r in range(reps):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(timed(fns[i]))
    return [statistics.median(t) for t in times]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": load,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "pyhessian": version("pyhessian"),
            "loss_landscapes": version("loss-landscapes")}


def _fmt(x: float) -> str:
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def _acc(acc: dict) -> str:
    parts = []
    for k, v in acc.items():
        if isinstance(v, float):
            parts.append(f"{k.replace('_', ' ')} {v:.2g}")
        elif isinstance(v, int):
            parts.append(f"{k.replace('_', ' ')} {v}")
    return "; ".join(parts)


def table(results: list[dict]) -> str:
    rows = ["| case | ours | theirs | speed-up | goal | met | accuracy |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['case']} | {r['ours']}: {_fmt(r['ours_s'])} | {r['theirs']}: "
                    f"{_fmt(r['theirs_s'])} | {r['ratio']:.2f}x | {r['goal']} | "
                    f"{'yes' if r['met'] else 'no'} | {_acc(r['accuracy'])} |")
    return "\n".join(rows)


def performance_page(report: dict) -> str:
    m, p = report["machine"], report["problem"]
    lines = [
        "# Performance", "",
        "How the library's implementations compare with what a reader would otherwise reach "
        "for: PyHessian for Hessian eigenvalues, traces and spectral densities, "
        "loss-landscapes for 2-D loss surfaces, and plain PyTorch for Hessian-vector "
        "products and for training many small networks.", "",
        "Every case first checks that both sides compute the same quantity, against a dense, "
        "exact or converged reference, and records the accuracy each side reached. Then the "
        f"two sides run in turn, {report['reps']} times each, and the table gives the median "
        "times. The speed-up is the other side's time divided by ours: above 1, ours is "
        "faster. A goal that is not met is reported as measured, with the reason below.", "",
        "## The problem", "",
        f"An MLP 64-128-128-10 ({p['parameters']} parameters, ReLU, float32) trained for 150 "
        f"steps of SGD to a training loss of {p['train_loss']:.3f} (accuracy "
        f"{p['train_acc']:.3f}), on {p['inputs']} inputs: the 1797 scikit-learn digits, "
        "standardized, and 203 of them drawn again with Gaussian noise (standard deviation "
        "0.1) added.", "",
        "## Results", "",
        table(report["results"]), "",
        "## Case by case", "",
    ]
    for r in report["results"]:
        lines += [f"**{r['case']}.** Reference: {r['reference']}. {r['note']}", ""]
    lines += [
        "## The machine", "",
        f"- CPU: {m['cpu']} (PyTorch kernels: {m['cpu_capability']})",
        f"- threads: {m['threads']} of {m['cores']} cores; load average when the timings "
        f"ended: {m['load_average_1min']:.1f} (the two sides run in turn, so both see "
        "the same load on average)",
        f"- PyTorch {m['torch']}, Python {m['python']}, PyHessian {m['pyhessian']}, "
        f"loss-landscapes {m['loss_landscapes']}",
        f"- date of the run: {report['date']}", "",
        "## Running it again", "",
        "`make bench` installs the two libraries (`bench/requirements.txt`) into the "
        "project's virtual environment, runs every case and rewrites `bench/results.json` and "
        "this page. `make bench-quick` runs the correctness checks only.", "",
    ]
    return "\n".join(lines)


def _case_names() -> dict[str, Callable]:
    """Each case's short name (``eigenvalue``, ``trace``, ...) and its function."""
    return {make.__name__.removeprefix("case_"): make for make in CASES}


def main(argv=None) -> int:
    names = _case_names()
    ap = argparse.ArgumentParser(
        description="Side-by-side benchmarks of nnopt_utils against the libraries a reader "
                    "would use instead: correctness checks first, then interleaved timings.")
    ap.add_argument("--quick", action="store_true", help="correctness checks only, once")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per side (>= 1)")
    ap.add_argument("--only", default=None, choices=sorted(names),
                    help="run one case only; the results go to the terminal (and to --out "
                         "if given), never to the committed results or page")
    ap.add_argument("--out", default=None,
                    help="the results as JSON (default: bench/results.json)")
    ap.add_argument("--page", default=None,
                    help="the Performance page (default: reference/performance.md)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if not args.only:
        args.out = args.out or str(ROOT / "bench" / "results.json")
        args.page = args.page or str(ROOT / "reference" / "performance.md")
    t_start = time.perf_counter()
    model, X, y, stats = problem()
    ctx = {"model": model, "X": X, "y": y}
    results, failed = [], []
    for make in [names[args.only]] if args.only else CASES:
        t0 = time.perf_counter()
        case = make(ctx)
        bad = [k for k, ok in case.checks.items() if not ok]
        status = "ok" if not bad else "MISMATCH: " + ", ".join(bad)
        print(f"{case.name}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
        for k, v in case.accuracy.items():
            print(f"    {k}: {v:.3g}" if isinstance(v, float) else f"    {k}: {v}")
        if bad:
            failed.append(case.name)
        if args.quick:
            continue
        labels = list(case.variants)
        ours_s, theirs_s, *var_s = interleaved(
            [case.ours, case.theirs, *case.variants.values()], args.reps)
        result = {"case": case.name, "ours": case.ours_label, "theirs": case.theirs_label,
                  "ours_s": ours_s, "theirs_s": theirs_s, "ratio": theirs_s / ours_s,
                  "ratio_means": "their time / our time", "goal": case.goal,
                  "min_speedup": case.min_speedup,
                  "met": bool(not bad and theirs_s / ours_s >= case.min_speedup),
                  "variants": dict(zip(labels, var_s)), "checks": case.checks,
                  "reference": case.reference, "accuracy": case.accuracy}
        result["note"] = case.explain(result)
        results.append(result)
        print(f"    ours {_fmt(ours_s)}, theirs {_fmt(theirs_s)}, speed-up "
              f"{theirs_s / ours_s:.2f}x" + "".join(f"; {k} {_fmt(t)}" for k, t in
                                                      zip(labels, var_s)), flush=True)
    elapsed = time.perf_counter() - t_start
    if args.quick:
        print(f"checks {'FAILED: ' + ', '.join(failed) if failed else 'passed'} "
              f"in {elapsed:.0f} s")
        return 1 if failed else 0
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "reps": args.reps, "seconds": elapsed,
              "problem": {"model": "MLP 64-128-128-10, ReLU, float32", "inputs": len(X),
                          "parameters": sum(p.numel() for p in model.parameters()), **stats},
              "results": results}
    print()
    print(table(results))
    if failed:  # timings of sides that disagree mean nothing: nothing is written
        print(f"\n{elapsed:.0f} s in all; checks FAILED: {', '.join(failed)}; nothing written")
        return 1
    written = []
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        written.append(args.out)
    if args.page:
        Path(args.page).write_text(performance_page(report))
        written.append(args.page)
    print(f"\n{elapsed:.0f} s in all; wrote {', '.join(written) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
