"""Run configuration: seeds, threads, device, plotting theme and the size profile.

Every chapter starts with ``device = nu.setup(seed=0)``. That one call makes a run
reproducible (Python, NumPy and torch generators seeded; deterministic algorithms where
torch offers them), picks the device and installs the book's plotting theme.

The size profile ``NNOPT_SCALE`` selects how large the experiments are:

* ``default`` -- what the book shows and what CI tests; every chapter runs in at most
  60 s on two CPU cores;
* ``full`` -- larger widths, more seeds and steps for readers with a GPU or patience.
"""

from __future__ import annotations

import os
import random
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "SCALES",
    "scale",
    "by_scale",
    "seed_everything",
    "get_device",
    "setup",
    "progress_enabled",
]

SCALES = ("default", "full")
T = TypeVar("T")


def scale() -> str:
    """The active size profile, read from the ``NNOPT_SCALE`` environment variable."""
    value = os.environ.get("NNOPT_SCALE", "default").strip().lower() or "default"
    if value not in SCALES:
        raise ValueError(f"unknown NNOPT_SCALE {value!r}; choose one of: {', '.join(SCALES)}")
    return value


def by_scale(default: T, full: T) -> T:
    """Return ``default`` or ``full`` according to the active profile.

    >>> by_scale(default=256, full=4096)  # doctest: +SKIP
    256
    """
    return full if scale() == "full" else default


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a fresh ``torch.Generator``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


_DEVICES = ("auto", "cpu", "cuda", "mps")


def get_device(name: str | None = None) -> torch.device:
    """Resolve a device name; ``None`` reads ``NNOPT_DEVICE`` and defaults to ``auto``.

    ``auto`` picks CUDA when available, otherwise the CPU. (Apple's MPS is opt-in, because
    several ``torch.func`` transforms used in the book are incomplete there.)
    """
    name = (name or os.environ.get("NNOPT_DEVICE", "auto")).strip().lower()
    if name not in _DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of: {', '.join(_DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but torch.backends.mps.is_available() is False")
    return torch.device(name)


def progress_enabled() -> bool:
    """Whether progress bars are shown: not under CI, pytest/nbval or a book build."""
    quiet = ("CI", "NNOPT_QUIET", "PYTEST_CURRENT_TEST")
    return not any(os.environ.get(k, "").strip() not in ("", "0", "false") for k in quiet)


def setup(
    seed: int = 0,
    *,
    threads: int | None = None,
    device: str | None = None,
    deterministic: bool = True,
    theme: bool = True,
) -> torch.device:
    """Prepare a chapter run and return the device to use.

    Parameters
    ----------
    seed: seeds Python, NumPy and torch.
    threads: torch intra-op threads; default: ``NNOPT_THREADS`` if set, else all cores up to 8.
        On a machine busy with other work, 1 thread avoids oversubscription stalls.
    device: ``auto`` (default), ``cpu``, ``cuda`` or ``mps``; also read from ``NNOPT_DEVICE``.
    deterministic: ask torch for deterministic algorithms where it has them (warn otherwise).
    theme: install the book's plotting theme (:func:`nnopt_utils.plotting.set_theme`).
    """
    scale()  # validate NNOPT_SCALE early, with a clear message
    seed_everything(seed)
    if threads is None:
        env = os.environ.get("NNOPT_THREADS", "").strip()
        if env and not env.isdigit():
            raise ValueError(f"NNOPT_THREADS must be a positive int, got {env!r}")
        threads = int(env) if env else min(os.cpu_count() or 1, 8)
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    torch.set_num_threads(threads)
    # Subnormal floats (below ~1e-308 in float64) are 100x slower on most CPUs; weights that
    # decay towards zero in long runs would otherwise crawl. Flushing them changes no result.
    torch.set_flush_denormal(True)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    dev = get_device(device)
    if theme:
        from .plotting import set_theme

        set_theme()
    return dev
