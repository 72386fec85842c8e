from pathlib import Path

import pytest

import nnopt_utils as nu
from nnopt_utils.report import fmt

ROOT = Path(__file__).resolve().parents[1]


def test_claims_assert_and_table():
    claims = nu.Claims("test")
    claims.check("one is one", 1.0, True, expected="= 1")
    with pytest.raises(AssertionError, match="claim failed: two is three: measured 2"):
        claims.check("two is three", 2, False, expected="= 3")
    claims.check("one is one", 1.0, True, expected="= 1")  # re-run replaces
    df = claims.table().data
    assert list(df["result"]) == ["pass", "FAIL"] and len(claims) == 2


def test_fmt_and_slope():
    assert fmt(0.000123456) == "1.23e-04"
    assert fmt(12345) == "12,345"
    assert fmt(3.14159) == "3.14"
    assert nu.loglog_slope([1, 10, 100], [5, 0.5, 0.05]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="positive"):
        nu.loglog_slope([1, 2], [0, 1])


def test_fmt_no_exponent_below_a_million():
    assert fmt(10700.4) == "10,700"
    assert fmt(999.5) == "1,000"
    assert fmt(123456.0) == "123,000"
    assert fmt(1.5e6) == "1.50e+06"
    assert fmt(12.345) == "12.3"


def test_claims_records_and_keep_going(tmp_path, monkeypatch):
    import json

    import pytest

    from nnopt_utils.report import Claims

    monkeypatch.setenv("NNOPT_CLAIMS_DIR", str(tmp_path))
    claims = Claims("Chapter 9")
    claims.check("holds", 1.0, True, expected="true")
    with pytest.raises(AssertionError, match="claim failed: fails"):
        claims.check("fails", 2.0, False, expected="< 1")
    monkeypatch.setenv("NNOPT_CLAIMS_KEEP_GOING", "1")
    claims.check("fails too", 3.0, False, expected="< 1")  # recorded, not raised
    rows = [json.loads(line) for line in (tmp_path / "Chapter_9.jsonl").read_text().splitlines()]
    assert [(r["claim"], r["passed"]) for r in rows] == [
        ("holds", True), ("fails", False), ("fails too", False)]
    assert rows[0]["chapter"] == "Chapter 9" and rows[2]["measured"] == "3"


def _glued_output(name, text):
    """The output myst_nb.glue(name, text, display=False) writes into a notebook."""
    GLUE_PREFIX = pytest.importorskip("myst_nb.ext.glue").GLUE_PREFIX

    return {"output_type": "display_data",
            "metadata": {"scrapbook": {"name": name, "mime_prefix": GLUE_PREFIX}},
            "data": {GLUE_PREFIX + "text/plain": repr(text)}}


@pytest.mark.parametrize("as_book_build", [True, False])
def test_claims_index_reads_executed_chapters(tmp_path, as_book_build):
    """Records are read where a book build leaves them (myst-nb moves hidden glue outputs to
    <chapter>.glue.json) and from a notebook executed by nbclient alone."""
    import json

    # the book's toolchain (not installed with the package alone)
    nbformat = pytest.importorskip("nbformat")
    extract_glue_data_cell = pytest.importorskip("myst_nb.ext.glue").extract_glue_data_cell

    from nnopt_utils.report import CLAIMS_GLUE_KEY, claims_index

    records = [{"claim": "rate 1 - mu/L", "measured": "0.99", "expected": "< 1", "passed": True,
                "cell": 3},
               {"claim": "diverges above 2/L", "measured": "inf", "expected": "inf",
                "passed": False, "cell": None}]
    nb = nbformat.from_dict({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "# 2. Gradient descent\n"},
        {"cell_type": "markdown", "metadata": {}, "source": "## The rate $1 - \\mu/L$\ntext"},
        {"cell_type": "code", "execution_count": 3, "metadata": {}, "outputs": [],
         "source": "claims.check(...)"},
        {"cell_type": "code", "execution_count": 4, "metadata": {}, "source": "claims.table()",
         "outputs": [_glued_output(CLAIMS_GLUE_KEY, json.dumps(records))]},
    ]})
    folder = tmp_path / "chapters" / "part1"
    folder.mkdir(parents=True)
    if as_book_build:  # what myst_nb.sphinx_ does: glue data out of the cell, into a file
        glued = dict(extract_glue_data_cell(nb.cells[3]))
        assert not nb.cells[3].outputs
        (folder / "02_gd.glue.json").write_text(json.dumps(glued))
    (folder / "02_gd.ipynb").write_text(nbformat.writes(nb))
    index = claims_index(tmp_path)
    assert list(index.claim) == ["rate 1 - mu/L", "diverges above 2/L"]
    assert list(index.result) == ["pass", "FAIL"]
    assert index.chapter[0] == "2. Gradient descent" and index.page[0] == "chapters/part1/02_gd"
    assert index.anchor[0] == "the-rate-1-mu-l" and index.anchor[1] == ""
    with pytest.raises(FileNotFoundError, match="no executed chapters"):
        claims_index(tmp_path / "nothing")


def _parse_myst(text):
    """The docutils tree of ``text`` parsed as the book parses Markdown outputs: MyST with
    the extensions of ``_config.yml`` (dollar math, colon fences, ...)."""
    parser = pytest.importorskip("myst_parser.parsers.docutils_").Parser()
    import docutils.core
    import yaml

    config = ROOT / "_config.yml"
    if not config.exists():  # the installed-package test has no book sources
        pytest.skip("needs the book's _config.yml")
    extensions = yaml.safe_load(config.read_text())["parse"]["myst_enable_extensions"]
    settings = {"report_level": 2, "halt_level": 2, "myst_enable_extensions": extensions}
    return docutils.core.publish_doctree(text, parser=parser, settings_overrides=settings)


def test_markdown_table_is_a_list_table_with_every_cell_escaped():
    import pandas as pd

    nodes = pytest.importorskip("docutils.nodes")  # the book's toolchain (absent when installed)
    raw = ["1. a | b, $x$ <i>y</i> *z*", "- not a list", "% not a comment",
           "{cite}`k` \\alpha $$y$$", "", "::: not a fence &amp; &alpha;"]
    frame = pd.DataFrame({"claim": raw[:3], "value": raw[3:]})
    text = nu.report.markdown_table(frame)
    assert text.startswith("```{list-table}") and ":header-rows: 1" in text
    tree = _parse_myst(text)
    (table,) = tree.findall(nodes.table)
    rows = [[entry.astext() for entry in row.findall(nodes.entry)]
            for row in table.findall(nodes.row)]
    assert rows == [["claim", "value"], [raw[0], raw[3]], [raw[1], raw[4]], [raw[2], raw[5]]]
    for markup in (nodes.emphasis, nodes.strong, nodes.literal, nodes.math, nodes.raw,
                   nodes.enumerated_list, nodes.bullet_list, nodes.reference, nodes.problematic):
        assert not list(table.findall(markup)), markup
    # the widths follow the cells (length + 3 of padding) when they fit in a line
    assert [c["colwidth"] for c in table.findall(nodes.colspec)] == [29, 32]
    given = _parse_myst(nu.report.markdown_table(frame, widths=[3, 1]))
    assert [c["colwidth"] for c in given.findall(nodes.colspec)] == [3, 1]
    with pytest.raises(ValueError, match=r"2 positive integers.*got \[3\]"):
        nu.report.markdown_table(frame, widths=[3])
    for bad in ([3, 0], [2.9, 1], [True, 1]):
        with pytest.raises(ValueError, match="positive integers"):
            nu.report.markdown_table(frame, widths=bad)
    # no rows: a body row of empty cells (docutils needs one); no columns: a clear error
    empty = _parse_myst(nu.report.markdown_table(frame.iloc[:0]))
    assert len(list(empty.findall(nodes.row))) == 2
    with pytest.raises(ValueError, match="no columns"):
        nu.report.markdown_table(pd.DataFrame())
    table = nu.report.Claims("t")
    table.check("c", 1, True)
    shown = table.table()
    assert "<table" in shown._repr_html_()
    assert shown._repr_markdown_().startswith("```{list-table}")


def test_column_widths_fit_a_line_and_keep_what_each_column_needs():
    import pandas as pd

    widths = nu.report._column_widths
    long = " ".join(["word"] * 30)  # 149 characters
    frame = pd.DataFrame({"claim": [long] * 9 + ["x"], "measured": ["[0.125, 0.25]"] * 10,
                          "criterion": [long] * 10, "result": ["pass"] * 10})
    w = widths(frame)
    # the wishes (63, 16, 63, 9) do not fit in 90: each column keeps its need (its header
    # or longest word, + 3: 8, 11, 12, 9) and the rest goes mostly to the long columns
    assert abs(sum(w) - 90) <= 2 and min(w[0], w[2]) > 30
    assert len("measured") + 3 <= w[1] < len("[0.125, 0.25]") + 3
    assert w[3] == len("result") + 3
    # short columns get their typical length (the 90th percentile: the lone "x" is ignored)
    assert widths(frame.iloc[:, 1:2]) == [len("[0.125, 0.25]") + 3]
    assert widths(pd.DataFrame({"a": ["x"] * 10})) == [4]
