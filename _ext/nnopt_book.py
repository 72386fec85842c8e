"""Sphinx extension of the nnopt book: pages that summarize the whole book are rebuilt on
every build, so they never show an earlier build's claims."""

from __future__ import annotations

# read again on every build, after the chapters (Sphinx reads documents in sorted order)
ALWAYS_READ = ("reference/claims", "intro")


def _always_outdated(app, env, added, changed, removed):
    return [d for d in ALWAYS_READ if d in env.found_docs and d not in added | changed]


def setup(app):
    app.connect("env-get-outdated", _always_outdated)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
