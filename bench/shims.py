"""What PyHessian 0.1 needs to run on current torch, and one hook for the correctness checks.

* ``legacy_eig``: ``hessian.density()`` diagonalizes its Lanczos tridiagonal matrix with
  ``torch.eig(T, eigenvectors=True)``, removed in torch 2.0. Inside this context ``torch.eig``
  is a stand-in with the old return convention (eigenvalues as ``(n, 2)`` real and imaginary
  parts, eigenvectors as columns) computed by ``torch.linalg.eigh``, which is exact for the
  symmetric tridiagonal matrix PyHessian builds. Used for every PyHessian density, timed or
  not; it changes no arithmetic of PyHessian's Lanczos loop.
* ``start_vector``: ``density()`` draws its start vector with ``torch.randint_like`` (one call
  per parameter tensor). For the correctness check only, this context makes those calls return
  the pieces of a given vector, so that PyHessian and nnopt_utils run Lanczos from the same
  start and their quadratures can be compared node by node. It is never active while timing.
* ``quiet``: PyHessian calls ``loss.backward(create_graph=True)``, on which torch warns about a
  reference cycle between parameters and their gradients; the benchmark clears the gradients
  after every use, so the warning is silenced.
"""

from __future__ import annotations

import contextlib
import warnings

import torch


def _eig(T: torch.Tensor, eigenvectors: bool = False):
    vals, vecs = torch.linalg.eigh(T)
    pairs = torch.stack([vals, torch.zeros_like(vals)], dim=1)
    return pairs, (vecs if eigenvectors else torch.empty(0, dtype=T.dtype))


@contextlib.contextmanager
def legacy_eig():
    had = hasattr(torch, "eig")
    old = getattr(torch, "eig", None)
    torch.eig = _eig
    try:
        yield
    finally:
        if had:
            torch.eig = old
        else:
            del torch.eig


@contextlib.contextmanager
def start_vector(pieces: list[torch.Tensor]):
    """Make the next ``len(pieces)`` calls of ``torch.randint_like`` return ``pieces``."""
    original = torch.randint_like
    queue = list(pieces)

    def fake(p, *args, **kwargs):
        if not queue:
            return original(p, *args, **kwargs)
        v = queue.pop(0)
        if v.shape != p.shape:
            raise AssertionError(f"start_vector: piece of shape {tuple(v.shape)} for a "
                                 f"parameter of shape {tuple(p.shape)}")
        return v.clone().to(p)

    torch.randint_like = fake
    try:
        yield
    finally:
        torch.randint_like = original
        if queue:
            raise AssertionError(f"start_vector: {len(queue)} pieces were not used")


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*create_graph=True.*")
        yield
