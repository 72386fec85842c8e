"""Run configuration: seeds, threads, device, plotting theme and the size profile.

Every chapter starts with ``device = nu.setup(seed=0)``. That one call makes a run
reproducible (Python, NumPy and torch generators seeded; deterministic algorithms where
torch offers them), picks the device and installs the book's plotting theme.

The global seed ``NNOPT_SEED`` (default 0) shifts every random draw of a run: every seed a
chapter or the library turns into random numbers passes through :func:`derived_seed`, so
``NNOPT_SEED=3 make book`` reruns the whole book on fresh randomness, while ``NNOPT_SEED=0``
draws exactly the seeds written in the chapters.

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
    "base_seed",
    "derived_seed",
    "generator",
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


def base_seed() -> int:
    """The global seed, read from the ``NNOPT_SEED`` environment variable (default 0)."""
    value = os.environ.get("NNOPT_SEED", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise ValueError(f"NNOPT_SEED must be a non-negative int, got {value!r}")
    return int(value)


#: the stride between global seeds; a prime larger than any seed a chapter writes, so the
#: seeds of two different global seeds never coincide
SEED_STRIDE = 1_000_003


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def derived_seed(seed: int) -> int:
    """The seed actually used for a seed ``seed`` written in a chapter or passed to the library:
    ``seed + SEED_STRIDE * NNOPT_SEED``.

    With ``NNOPT_SEED`` unset (or 0) it is ``seed`` itself. Distinct ``seed`` values stay
    distinct, and equal ones stay equal (two networks built with ``seed=0`` are still the same
    network), so every experiment keeps its structure and only its randomness changes.
    """
    return _check_seed(seed) + SEED_STRIDE * base_seed()


def generator(seed: int, device: str | torch.device | None = None) -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derived_seed` ``(seed)``: the one way the book
    and the library turn a seed into random numbers."""
    g = torch.Generator() if device is None else torch.Generator(device=device)
    return g.manual_seed(derived_seed(seed))


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) with :func:`derived_seed` ``(seed)``; return
    a fresh generator seeded the same way."""
    seed = derived_seed(seed)
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
    off = ("", "0", "false", "no", "off")
    return not any(os.environ.get(k, "").strip().lower() not in off for k in quiet)


def setup(
    seed: int = 0,
    *,
    threads: int | None = None,
    device: str | None = None,
    deterministic: bool = True,
    flush_denormal: bool = True,
    theme: bool = True,
) -> torch.device:
    """Prepare a chapter run and return the device to use.

    Parameters
    ----------
    seed: seeds Python, NumPy and torch (shifted by ``NNOPT_SEED``, see :func:`derived_seed`).
    threads: torch intra-op threads; default: ``NNOPT_THREADS`` if set, else all cores up to 8.
        On a machine busy with other work, 1 thread avoids oversubscription stalls.
    device: ``auto`` (default), ``cpu``, ``cuda`` or ``mps``; also read from ``NNOPT_DEVICE``.
    deterministic: ask torch for deterministic algorithms where it has them (warn otherwise);
        ``False`` turns them off again.
    flush_denormal: flush subnormal floats to zero (see below).
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
    # Subnormal floats are 100x slower on most CPUs; weights that decay towards zero in long
    # runs would otherwise crawl. Flushing sets every value below the smallest normal number
    # (about 1.2e-38 in float32, 2.2e-308 in float64) to 0: the book's measurements of
    # vanishing quantities stay far above that, and one that needs less passes False.
    torch.set_flush_denormal(bool(flush_denormal))
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    dev = get_device(device)
    if theme:
        from .plotting import set_theme

        set_theme()
    return dev
