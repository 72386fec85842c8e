"""Claims, checks and numbers woven into the prose.

A chapter states claims; each is measured and then checked here::

    claims = nu.Claims("Chapter 3")
    claims.check("gradient = 2^(L-1)|e|, L=1..50", max_rel_err, max_rel_err < 1e-12,
                 expected="< 1e-12")

``check`` raises ``AssertionError`` when the condition is false, so a check cell fails the
notebook run (nbval, the book build) the moment a claim stops holding. At the end of the
chapter ``claims.table()`` renders the "What this chapter verified" table from the same
records, so the table can never disagree with the checks.

Two environment variables serve runs over many environments (``make robust``) and the
book's claims index:

* ``NNOPT_CLAIMS_DIR``: every check also appends its record, as one JSON line, to
  ``<dir>/<chapter>.jsonl``;
* ``NNOPT_CLAIMS_KEEP_GOING=1``: a failed check is recorded and reported on stderr instead of
  raised, so one run reports every failing claim of a chapter by name.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["Claims", "Table", "markdown_table", "glue", "loglog_slope", "fmt", "claims_index", "CLAIMS_GLUE_KEY"]

#: the glue key under which ``Claims.table()`` publishes a chapter's records for the book's
#: claims index (see :func:`claims_index`)
CLAIMS_GLUE_KEY = "nnopt_claims"


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
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.{max(digits - 1, 0)}e}"
        text = f"{v:.{digits}g}"
        if "e" in text:  # 10700.0 -> "10,700", not "1.07e+04": no exponent below a million
            return f"{float(text):,.0f}"
        return text
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


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _write_record(chapter: str, record: "Claim") -> None:
    """Append ``record`` to ``$NNOPT_CLAIMS_DIR/<chapter>.jsonl`` when that variable is set."""
    folder = os.environ.get("NNOPT_CLAIMS_DIR", "").strip()
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "_", chapter).strip("_") or "claims"
    with open(os.path.join(folder, f"{name}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"chapter": chapter, **asdict(record)}) + "\n")


@dataclass
class Claim:
    claim: str
    measured: str
    expected: str
    passed: bool
    cell: int | None = None  # the execution count of the cell that checked it, if known


def _execution_count() -> int | None:
    """The execution count of the running notebook cell (None outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with every notebook kernel
        return None
    shell = get_ipython()
    return getattr(shell, "execution_count", None) if shell is not None else None


def _markdown_cell(value) -> str:
    """``value`` as the text of one Markdown table cell: one line, every character that
    Markdown, MyST or HTML would read as markup escaped, and no list or heading start."""
    text = " ".join(str(value).split())
    text = re.sub(r"([\\`*_{}\[\]<>()#+!|$~^&])", r"\\\1", text)  # & : no HTML entity
    # at the start of a cell: no list ("- x"), comment ("% x") or fence (":::")
    text = re.sub(r"^([-=%:])", r"\\\1", text)
    return re.sub(r"^(\d+)([.)])", r"\1\\\2", text)  # "1. Intro" is not an ordered list


def _column_widths(frame: "pd.DataFrame", line: int = 90) -> list[int]:
    """Relative column widths, in characters, for a table wrapped to ``line`` characters.

    Each column needs its header and its longest word (up to 12 characters) plus 3 for
    the padding between columns, and would like its typical cell (the 90th percentile of
    the lengths, up to 60). When the wishes do not fit in ``line``, every column gets its
    need and the rest of the line is shared in proportion to what each still wants.
    """
    need, want = [], []
    for name in frame.columns:
        cells = [" ".join(str(v).split()) for v in frame[name]]
        lengths = sorted(map(len, cells))
        typical = lengths[math.ceil(0.9 * (len(lengths) - 1))] if lengths else 0
        word = max((len(w) for c in cells for w in c.split()), default=0)
        need.append(max(len(str(name)), min(word, 12), 1) + 3)
        want.append(max(need[-1], min(typical, 60) + 3))
    if sum(want) <= line:
        return want
    spare, extra = line - sum(need), sum(w - n for w, n in zip(want, need))  # extra > 0 here
    if spare <= 0:
        return need
    return [n + round(spare * (w - n) / extra) for w, n in zip(want, need)]


def markdown_table(frame: "pd.DataFrame", widths: Sequence[int] | None = None) -> str:
    """``frame`` as a MyST ``list-table`` with a header row and relative column ``widths``
    (default: from the cells' lengths), every cell escaped (no markup, no math, no HTML).

    Unlike a pipe table, a ``list-table`` with widths wraps its columns in the PDF, so a long
    table stays within the page.
    """
    columns = [str(c) for c in frame.columns]
    if not columns:
        raise ValueError("the frame has no columns: a table needs at least one")
    if widths is None:
        widths = _column_widths(frame)
    widths = list(widths)
    if len(widths) != len(columns) or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1
            for w in widths):
        raise ValueError(f"widths must be {len(columns)} positive integers, one per column "
                         f"{columns}; got {widths}")
    lines = ["```{list-table}", ":header-rows: 1", ":widths: " + " ".join(map(str, widths)),
             ""]
    rows = list(frame.itertuples(index=False)) or [[""] * len(columns)]  # a body is required
    for row in [columns, *rows]:
        cells = [_markdown_cell(v) for v in row]
        lines += [f"* - {cells[0]}".rstrip()] + [f"  - {c}".rstrip() for c in cells[1:]]
    return "\n".join(lines + ["```"])


class Table:
    """A table that shows as HTML in the book and in notebooks, and as a MyST ``list-table``
    in the PDF (which shows no HTML); ``data`` is the DataFrame."""

    def __init__(self, data: "pd.DataFrame"):
        self.data = data

    def _repr_html_(self) -> str:
        return self.data.style.hide(axis="index").format(escape="html").to_html()

    def _repr_markdown_(self) -> str:
        return markdown_table(self.data)

    def __repr__(self) -> str:
        return self.data.to_string(index=False)


@dataclass
class Claims:
    """The claims a chapter checks, in order; see the module docstring."""

    chapter: str = ""
    records: list[Claim] = field(default_factory=list)

    def check(self, claim: str, measured: Any, condition: bool, expected: str = "") -> None:
        """Record ``claim`` with its measured value and assert ``condition``."""
        passed = bool(condition)
        record = Claim(claim, fmt(measured), expected, passed, _execution_count())
        # a re-run of the same check cell replaces its earlier record, in place
        names = [r.claim for r in self.records]
        if claim in names:
            self.records[names.index(claim)] = record
        else:
            self.records.append(record)
        _write_record(self.chapter, record)
        if not passed:
            message = (f"claim failed: {claim}: measured {record.measured}, "
                       f"expected {expected or 'true'}")
            if _flag("NNOPT_CLAIMS_KEEP_GOING"):
                print(message, file=sys.stderr)
                return
            raise AssertionError(message)

    def table(self) -> "Table":
        """The "What this chapter verified" table (claim, measured, criterion, result).

        In a book build it also publishes the records (glue key :data:`CLAIMS_GLUE_KEY`, not
        displayed), from which the page "Every claim in this book" is built.
        """
        import pandas as pd

        glue(CLAIMS_GLUE_KEY, json.dumps([asdict(r) for r in self.records]))
        return Table(pd.DataFrame(
            [
                {
                    "claim": r.claim,
                    "measured": r.measured,
                    "criterion": r.expected,
                    "result": "pass" if r.passed else "FAIL",
                }
                for r in self.records
            ],
            columns=["claim", "measured", "criterion", "result"],
        ))

    def __len__(self) -> int:
        return len(self.records)


def _heading_id(markdown_heading: str) -> str:
    """The HTML id Sphinx gives a section titled ``markdown_heading`` (inline math and
    markup reduced to their text, as docutils does)."""
    import unicodedata

    text = re.sub(r"^#+\s*", "", markdown_heading.strip())
    text = re.sub(r"\{[a-z:]+\}`([^`]*)`", r"\1", text)   # roles keep their content
    text = text.replace("`", "").replace("$", "").replace("*", "")
    # docutils.nodes.make_id: ASCII, lower case, runs of other characters -> "-", no
    # leading digits or hyphens
    text = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-z0-9]+", "-", " ".join(text.split()))
    return re.sub(r"^[-0-9]+|-+$", "", text)


def claims_index(executed: str | os.PathLike) -> "pd.DataFrame":
    """Every claim of every chapter, read from the executed notebooks under ``executed``.

    A book build writes each executed chapter to ``_build/jupyter_execute/``, and the data
    glued by its cells to ``<chapter>.glue.json`` beside it; each chapter's ``claims.table()``
    cell publishes its records there (glue key :data:`CLAIMS_GLUE_KEY`).
    Returns one row per claim: ``chapter`` (its title), ``page`` (the chapter's path without
    suffix), ``section`` and ``anchor`` (the section whose check cell asserted it), ``claim``,
    ``measured``, ``criterion`` and ``result``. Raises ``FileNotFoundError`` when the folder
    holds no executed chapter.
    """
    import ast
    from pathlib import Path

    import pandas as pd

    root = Path(executed)
    notebooks = sorted(root.glob("chapters/**/*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no executed chapters under {root}; build the book first")
    rows = []
    for path in notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        title, section, anchor, records, sections = path.stem, "", "", [], {}
        # myst-nb moves hidden glue outputs out of the notebook into <name>.glue.json
        glue_file = path.with_suffix(".glue.json")
        if glue_file.exists():
            saved = json.loads(glue_file.read_text(encoding="utf-8")).get(CLAIMS_GLUE_KEY)
            if saved is not None:
                records = json.loads(ast.literal_eval(saved["data"]["text/plain"]))
        for cell in nb["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] == "markdown":
                for line in src.splitlines():
                    if line.startswith("# ") and title == path.stem:
                        title = line[2:].strip()
                    elif line.startswith("## "):
                        section, anchor = line[3:].strip(), _heading_id(line)
                continue
            sections[cell.get("execution_count")] = (section, anchor)
            for out in cell.get("outputs", []):
                meta = out.get("metadata", {}).get("scrapbook", {})
                if meta.get("name") == CLAIMS_GLUE_KEY:  # a notebook executed outside myst-nb
                    prefix = meta.get("mime_prefix", "")
                    records = json.loads(ast.literal_eval(out["data"][prefix + "text/plain"]))
        page = path.relative_to(root).with_suffix("").as_posix()
        for r in records:
            sec, anc = sections.get(r.get("cell"), ("", ""))
            rows.append({"chapter": title, "page": page, "section": sec, "anchor": anc,
                         "claim": r["claim"], "measured": r["measured"],
                         "criterion": r["expected"], "result": "pass" if r["passed"] else "FAIL"})
    return pd.DataFrame(rows, columns=["chapter", "page", "section", "anchor", "claim",
                                       "measured", "criterion", "result"])
