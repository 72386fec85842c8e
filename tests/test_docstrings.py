"""Every public docstring of the library is valid reStructuredText after napoleon, as the
API reference renders it (a malformed one is a warning, and the strict book build fails)."""

from __future__ import annotations

import importlib
import inspect
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted({m for p in (ROOT / "reference" / "api").glob("*.md")
                  for m in re.findall(r"automodule:: ([\w.]+)", p.read_text())})
SPHINX_ROLES = ("func", "class", "mod", "meth", "attr", "data", "exc", "obj", "math", "ref",
                "cite", "doc", "py:func", "py:class", "py:mod", "py:meth", "py:data")


SPHINX_DIRECTIVES = ("attribute", "method", "math", "rubric", "seealso", "versionadded",
                     "deprecated", "autosummary", "code-block")


class _AnyOptions(dict):
    def __missing__(self, key):
        from docutils.parsers.rst import directives

        return directives.unchanged


def _make_any_directive():
    from docutils import nodes
    from docutils.parsers.rst import Directive

    class AnyDirective(Directive):
        """Stands in for a Sphinx directive: its content is parsed as ordinary text."""

        has_content = True
        optional_arguments = 10
        final_argument_whitespace = True
        option_spec = _AnyOptions()

        def run(self):
            node = nodes.container()
            self.state.nested_parse(self.content, self.content_offset, node)
            return [node]

    return AnyDirective


def _docstrings(module_name: str):
    module = importlib.import_module(module_name)
    yield module_name, inspect.getdoc(module) or ""
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{module_name}.{name}", inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member):
                    yield f"{module_name}.{name}.{attr}", inspect.getdoc(member) or ""


@pytest.mark.parametrize("module_name", MODULES)
def test_docstrings_render_without_warnings(module_name):
    from docutils.core import publish_doctree
    from docutils.parsers.rst import directives, roles
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import NumpyDocstring

    def literal(name, rawtext, text, lineno, inliner, options=None, content=None):
        from docutils import nodes

        return [nodes.literal(rawtext, text)], []

    maths: list[str] = []

    def math(name, rawtext, text, lineno, inliner, options=None, content=None):
        maths.append(text)  # LaTeX receives this text: a stray backquote stops the PDF
        return literal(name, rawtext, text, lineno, inliner, options, content)

    for role in SPHINX_ROLES:
        roles.register_local_role(role, math if role == "math" else literal)
    any_directive = _make_any_directive()
    for name in SPHINX_DIRECTIVES:
        directives.register_directive(name, any_directive)
    config = Config(napoleon_numpy_docstring=True, napoleon_google_docstring=False)
    problems = []
    for where, doc in _docstrings(module_name):
        text = str(NumpyDocstring(doc, config, what="function"))
        stream = io.StringIO()
        publish_doctree(text, settings_overrides={"warning_stream": stream, "report_level": 2,
                                                  "halt_level": 5})
        problems += [f"{where}: {line}" for line in stream.getvalue().splitlines() if line]
        problems += [f"{where}: a backquote inside :math:`{m}`" for m in maths if "`" in m]
        maths.clear()
    assert not problems, "\n".join(problems)
