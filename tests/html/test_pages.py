"""Checks of the built HTML book, as a reader sees it: no raw markup, no stray outputs.

Run after the book is built (``make test`` builds it first); these tests fail, rather than
skip, when ``_build/html`` is missing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from bs4 import BeautifulSoup, NavigableString

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
PAGES = sorted(HTML.glob("chapters/**/*.html")) + [HTML / "index.html"]

# Text inside these elements is code or math, where $, \command and {role} belong.
SKIP_TAGS = {"script", "style", "code", "pre", "kbd", "samp", "tt", "textarea", "mjx-container",
             "math", "svg"}
SKIP_CLASSES = {"math", "highlight", "cell_input", "MathJax", "MathJax_Preview", "pre"}
RAW = re.compile(
    r"\$"                                   # a dollar sign the math parser left behind
    r"|\\[A-Za-z]{2,}"                      # a LaTeX command: \hat, \mathbb, \leftarrow
    r"|\{[a-z]+(?::[a-z-]+)*\}`"            # a role the parser did not see: {cite}`...`
    r"|^\s*:?[a-z]+:`|```"                  # a directive or fence printed as text
)


def _skipped(node) -> bool:
    for parent in node.parents:
        if parent.name in SKIP_TAGS:
            return True
        if SKIP_CLASSES & set(parent.get("class", []) or []):
            return True
    return False


def raw_fragments(html: str) -> list[str]:
    """Text outside code and math elements that still contains raw markup."""
    soup = BeautifulSoup(html, "html.parser")
    main = soup.find("main") or soup
    found = []
    for node in main.find_all(string=True):
        if not isinstance(node, NavigableString) or type(node) is not NavigableString:
            continue  # comments, doctype
        text = str(node)
        if RAW.search(text) and not _skipped(node):
            found.append(text.strip()[:120])
    return found


def _bare_value(text: str) -> bool:
    """Whether an execute-result text is a bare value (a number, a tuple, a repr) rather than
    something meant to be shown."""
    text = text.strip()
    if re.match(r"^(<\w[^>]*>|\[<.*>\]|Text\(.*\)|\(<.*>\))$", text, re.S):
        return True  # <Figure ...>, [<matplotlib.lines.Line2D ...>], Text(0.5, 1.0, '...')
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    return isinstance(value, (int, float, complex, bool, str, bytes, tuple, list, type(None)))


def stray_outputs(html: str) -> list[str]:
    """Execute results (a cell's last expression) that show a bare value."""
    soup = BeautifulSoup(html, "html.parser")
    found = []
    for out in soup.select("div.cell_output div.output.text_plain"):
        text = out.get_text()
        if _bare_value(text):
            found.append(text.strip()[:120])
    return found


def test_book_is_built():
    assert (HTML / "index.html").exists(), f"no built book at {HTML}; run `make book` first"
    assert len(PAGES) > 1, f"no chapter pages under {HTML / 'chapters'}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_no_raw_markup(page):
    fragments = raw_fragments(page.read_text(encoding="utf-8"))
    assert not fragments, f"{page.name}: raw markup outside math and code:\n" + "\n".join(fragments)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_no_stray_outputs(page):
    values = stray_outputs(page.read_text(encoding="utf-8"))
    assert not values, f"{page.name}: bare values shown as cell outputs:\n" + "\n".join(values)


def test_the_checks_catch_what_they_look_for():
    """The detectors themselves: each finds the defect it names and passes clean markup."""
    broken = ('<main><p>and keeps running averages \\hat\\mu \\leftarrow (1-m) $</p>'
              '<p>where {cite}`ma2018power` it equals</p></main>')
    assert len(raw_fragments(broken)) == 2
    clean = ('<main><p>Text <span class="math notranslate nohighlight">\\(\\hat\\mu\\)</span>'
             '</p><div class="highlight"><pre>x = "$5"</pre></div></main>')
    assert raw_fragments(clean) == []
    out = ('<div class="cell_output docutils container"><div class="output text_plain '
           'highlight-myst-ansi notranslate"><div class="highlight"><pre>{}</pre></div></div>'
           '</div>')
    for shown in ("0.31167723599253766", "(8.3e-16, 6.6e-14)", "16",
                  "&lt;Figure size 640x480 with 1 Axes&gt;"):
        assert stray_outputs(out.format(shown)), shown
    assert stray_outputs(out.format("   lr  loss\n0  0.1  2.3")) == []


def test_claims_index_lists_every_chapter_with_working_links():
    page = HTML / "reference" / "claims.html"
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    links = soup.select("main table a[href]")
    assert len(links) >= 100, f"the claims index lists only {len(links)} claims"
    chapters = {a["href"].split("#")[0] for a in links}
    on_disk = {"../" + p.relative_to(HTML).as_posix() for p in HTML.glob("chapters/**/*.html")}
    assert chapters == on_disk, f"chapters without claims in the index: {on_disk - chapters}"
    ids: dict[str, set[str]] = {}
    for a in links:
        target, _, anchor = a["href"].partition("#")
        if not anchor:
            continue
        if target not in ids:
            html = (page.parent / target).resolve().read_text(encoding="utf-8")
            ids[target] = {e["id"] for e in BeautifulSoup(html, "html.parser").select("[id]")}
        assert anchor in ids[target], f"{a.get_text()!r} links to a missing section {a['href']}"
    results = [tr.find_all("td")[-1].get_text() for tr in soup.select("main tbody tr")]
    assert set(results) == {"pass"}, "the claims index shows failing claims"
