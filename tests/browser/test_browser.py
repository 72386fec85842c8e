"""Every page of the built book in headless Chromium, as a reader's browser shows it.

``make test-browser`` runs this after a book build. Pages are served from ``_build/html`` on
a loopback port, with no other network; for each page the test fails on a MathJax error or
a formula left untypeset, an image that did not load, a console error, a failed request, or
a sidebar that does not list every chapter, and it saves a screenshot to
``_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
PAGES = sorted(p.relative_to(HTML).as_posix() for p in HTML.glob("**/*.html")
               if p.parts[len(HTML.parts)] not in ("_static", "_sources", "_images"))
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chapters() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [c["file"] + ".html" for part in toc["parts"] for c in part["chapters"]]


@pytest.fixture(scope="module")
def server():
    assert (HTML / "index.html").exists(), f"no built book at {HTML}; run `make book` first"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the test reports failures itself
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "Chromium not found: install Debian's `chromium` package (or set CHROMIUM)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


# After MathJax has typeset the page: error nodes, formulas left as raw TeX, broken images.
PROBE = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const math = [...document.querySelectorAll('main .math')];
  return {
    mathjax: !!(window.MathJax && MathJax.version),
    errors: [...document.querySelectorAll('mjx-merror, .MathJax_Error, merror')]
              .map(e => e.textContent.slice(0, 80)),
    untypeset: math.filter(e => !e.querySelector('mjx-container'))
                   .map(e => e.textContent.slice(0, 80)),
    formulas: math.length,
    broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))
              .map(i => i.getAttribute('src')),
    sidebar: [...document.querySelectorAll('nav.bd-docs-nav a.reference.internal')]
               .map(a => new URL(a.href).pathname),
  };
}"""


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(page, server, browser):
    problems: list[str] = []
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    tab.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    tab.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    tab.goto(f"{server}/{page}", wait_until="networkidle")
    found = tab.evaluate(PROBE)
    SHOTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(SHOTS / (page.replace("/", "__")[:-5] + ".png")), full_page=False)
    tab.close()
    if found["formulas"]:
        assert found["mathjax"], f"{page}: MathJax did not load"
    problems += [f"MathJax error: {e}" for e in found["errors"]]
    problems += [f"formula not typeset: {e}" for e in found["untypeset"]]
    problems += [f"image did not load: {src}" for src in found["broken"]]
    listed = {p.lstrip("/") for p in found["sidebar"]}
    missing = [c for c in chapters() if c not in listed]
    if page != "search.html" and page != "genindex.html":
        problems += [f"sidebar lacks {c}" for c in missing]
    assert not problems, f"{page}:\n" + "\n".join(problems)
