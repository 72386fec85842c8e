"""Claims, checks and numbers woven into the prose.

A chapter states claims; each is measured and then checked here::

    claims = nu.Claims("Chapter 3")
    claims.check("gradient = 2^(L-1)|e|, L=1..50", max_rel_err, max_rel_err < 1e-12,
                 expected="< 1e-12")

``check`` raises ``AssertionError`` when the condition is false, so a check cell fails the
notebook run (nbval, the book build) the moment a claim stops holding. At the end of the
chapter ``claims.table()`` renders the "What this chapter verified" table from the same
records, so the table can never disagree with the checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["Claims", "glue", "loglog_slope", "fmt"]


def fmt(value: Any, digits: int = 3) -> str:
    """Format a measured value for prose and tables (floats to ``digits`` significant digits)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{max(digits - 1, 0)}e}"
        return f"{v:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    return str(value)


def glue(name: str, value: Any, display: bool = False, digits: int = 3) -> Any:
    """Store ``value`` under ``name`` for ``{glue:text}`name``` references in the prose.

    Scalars are glued as formatted text (see :func:`fmt`); figures and DataFrames as they
    are. Outside a book build (for example in Colab without ``myst_nb``) this only returns
    the value, so chapters run anywhere.
    """
    shown = value
    if isinstance(value, (int, float, np.number, torch.Tensor, bool, np.bool_)):
        shown = fmt(value, digits)
    try:
        from myst_nb import glue as _glue
    except ImportError:  # pragma: no cover - depends on the reader's environment
        return value
    _glue(name, shown, display=display)
    return value


def loglog_slope(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (the exponent of a power law)."""
    x = np.asarray(torch.as_tensor(x, dtype=torch.float64).cpu(), dtype=float)
    y = np.asarray(torch.as_tensor(y, dtype=torch.float64).cpu(), dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two 1-D arrays of equal length >= 2, got shapes {x.shape}, {y.shape}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("loglog_slope needs positive x and y")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


@dataclass
class Claim:
    claim: str
    measured: str
    expected: str
    passed: bool


@dataclass
class Claims:
    """The claims a chapter checks, in order; see the module docstring."""

    chapter: str = ""
    records: list[Claim] = field(default_factory=list)

    def check(self, claim: str, measured: Any, condition: bool, expected: str = "") -> None:
        """Record ``claim`` with its measured value and assert ``condition``."""
        passed = bool(condition)
        record = Claim(claim, fmt(measured), expected, passed)
        # a re-run of the same check cell replaces its earlier record, in place
        names = [r.claim for r in self.records]
        if claim in names:
            self.records[names.index(claim)] = record
        else:
            self.records.append(record)
        if not passed:
            raise AssertionError(
                f"claim failed: {claim}: measured {record.measured}, expected {expected or 'true'}"
            )

    def table(self):
        """The "What this chapter verified" table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "claim": r.claim,
                    "measured": r.measured,
                    "criterion": r.expected,
                    "result": "pass" if r.passed else "FAIL",
                }
                for r in self.records
            ]
        ).style.hide(axis="index").format(escape="html")

    def __len__(self) -> int:
        return len(self.records)
