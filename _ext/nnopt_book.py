"""Sphinx extension of the nnopt book.

* Pages that summarize the whole book are rebuilt on every build, so they never show an
  earlier build's claims.
* Every page gets each script once (sphinx-thebe registers its configuration script twice
  under Jupyter Book, and the second ``const`` declaration is an error in the browser).
* The theme's colour mode has a valid default ("auto": the reader's system setting).
* The book's own styles (``static/nnopt.css``: the claims index fits the content column).
"""

from __future__ import annotations

from pathlib import Path

# read again on every build, after the chapters (Sphinx reads documents in sorted order)
ALWAYS_READ = ("reference/claims", "intro")


def _always_outdated(app, env, added, changed, removed):
    return [d for d in ALWAYS_READ if d in env.found_docs and d not in added | changed]


def _script_key(script) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    # the same script registered twice may carry filename None once and "" once
    return (getattr(script, "filename", str(script)) or "", attributes.get("body"))


def _page_context(app, pagename, templatename, context, doctree):
    if not context.get("default_mode"):  # the theme's layout reads this context variable
        context["default_mode"] = "auto"
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def _add_static(app):
    app.config.html_static_path.append(str(Path(__file__).parent / "static"))


def setup(app):
    app.connect("builder-inited", _add_static)
    app.add_css_file("nnopt.css")
    app.connect("env-get-outdated", _always_outdated)
    app.connect("html-page-context", _page_context, priority=900)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
