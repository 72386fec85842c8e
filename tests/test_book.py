"""Structure of the book: toc <-> notebooks, clean notebooks, chapter anatomy, citations."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").rglob("*.ipynb"))
CHAPTERS = [p for p in CHAPTERS if ".ipynb_checkpoints" not in p.parts]
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        for ch in part.get("chapters", []):
            files.append(ch["file"])
            files += [s["file"] for s in ch.get("sections", [])]
    return files


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def bib_keys() -> list[str]:
    return re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text(), re.M)


def test_there_are_chapters():
    assert CHAPTERS, "no notebooks under chapters/"


def test_toc_matches_notebooks():
    listed = set(toc_files())
    for f in listed:
        assert any((ROOT / (f + ext)).exists() for ext in ("", ".ipynb", ".md")), f"toc lists missing {f}"
    on_disk = {str(p.relative_to(ROOT).with_suffix("")) for p in CHAPTERS}
    assert on_disk - listed == set(), f"notebooks missing from _toc.yml: {sorted(on_disk - listed)}"


def test_chapter_numbers_are_unique_and_ordered():
    numbers = [int(p.name[:2]) for p in CHAPTERS]
    assert len(numbers) == len(set(numbers)), f"duplicate chapter numbers: {numbers}"
    toc_numbers = [int(Path(f).name[:2]) for f in toc_files() if f.startswith("chapters/")]
    assert toc_numbers == sorted(toc_numbers), f"_toc.yml lists chapters out of order: {toc_numbers}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    for cell in load(path)["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name}: committed outputs"
            assert cell.get("execution_count") is None, f"{path.name}: execution counts"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_anatomy(path):
    cells = load(path)["cells"]
    md = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    code = [c for c in cells if c["cell_type"] == "code"]
    assert cells[0]["cell_type"] == "markdown" and source(cells[0]).startswith("# "), \
        f"{path.name}: must open with a '# Title' markdown cell"
    assert "Survey" in source(cells[0]) or "survey" in source(cells[0]), \
        f"{path.name}: the opening cell must name the survey sections it covers"
    setup = code[0]
    assert "nu.setup(" in source(setup) and "hide-input" in tags(setup), \
        f"{path.name}: first code cell must be the hide-input setup cell calling nu.setup()"
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert f"git+{repo}" in source(setup), \
        f"{path.name}: the setup cell must install nnopt_utils from {repo}"
    checks = [c for c in code if "remove-cell" in tags(c) and "claims.check(" in source(c)]
    assert len(checks) >= 3, f"{path.name}: needs check cells (tag remove-cell, claims.check)"
    n_ex = len(re.findall(r"```\{exercise\}", md))
    n_sol = len(re.findall(r"```\{solution\}", md))
    assert n_ex >= 3, f"{path.name}: needs at least 3 exercises, has {n_ex}"
    assert n_sol >= n_ex, f"{path.name}: {n_ex} exercises but {n_sol} solutions"
    assert "What this chapter verified" in md, f"{path.name}: missing the verified-claims table"
    assert any("claims.table()" in source(c) for c in code), \
        f"{path.name}: the verified table must be built by claims.table()"
    assert re.search(r"\{prf:(theorem|lemma|proposition)\}", md), \
        f"{path.name}: needs at least one typeset theorem, lemma or proposition"
    assert "{prf:proof}" in md, f"{path.name}: needs at least one typeset proof"


def test_bib_keys_unique():
    keys = bib_keys()
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    assert not dupes, f"duplicate keys in references.bib: {dupes}"


def test_every_cite_key_exists():
    keys = set(bib_keys())
    sources = [(p, "\n".join(source(c) for c in load(p)["cells"])) for p in CHAPTERS]
    sources += [(p, p.read_text()) for p in ROOT.glob("*.md")]
    missing = []
    for p, text in sources:
        for group in CITE.findall(text):
            missing += [(p.name, k.strip()) for k in group.split(",") if k.strip() not in keys]
    assert not missing, f"cite keys not in references.bib: {missing}"


PRIVATE = re.compile(r"\b(?:nu|nnopt_utils)(?:\.\w+)*\._\w+|from nnopt_utils[\w.]* import .*\b_\w+")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapters_use_only_public_names(path):
    code = "\n".join(source(c) for c in load(path)["cells"] if c["cell_type"] == "code")
    assert not PRIVATE.findall(code), f"{path.name} reaches into private names: {PRIVATE.findall(code)}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_code_cells_fit_88_columns(path):
    """Code a reader sees (every cell the page shows, collapsed or not) fits the column."""
    shown = [c for c in load(path)["cells"] if c["cell_type"] == "code"
             and not {"remove-cell", "remove-input"} & set(tags(c))]
    long = [line for c in shown for line in source(c).splitlines() if len(line) > 88]
    assert not long, f"{path.name}: shown code lines over 88 columns: {long[:3]}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_numbers_come_from_the_toolchain(path):
    """Chapter and section numbers are added by the numbered toc, never typed by hand."""
    md = "\n".join(source(c) for c in load(path)["cells"] if c["cell_type"] == "markdown")
    typed = re.findall(r"^#{1,3} \d+(?:\.\d+)*\.? .*$", md, re.M)
    assert not typed, f"{path.name}: hand-numbered headings: {typed}"


def test_parts_are_numbered():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = [p for p in toc["parts"] if any(c["file"].startswith("chapters/") for c in p["chapters"])]
    assert parts and all(p.get("numbered") for p in parts), "every part of chapters is numbered"


RAW_SEED = re.compile(r"torch\.(?:Generator\([^)]*\)\.)?manual_seed\(")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapters_draw_through_the_global_seed(path):
    """Every random draw of a chapter shifts with NNOPT_SEED: no raw torch seeding."""
    code = "\n".join(source(c) for c in load(path)["cells"] if c["cell_type"] == "code")
    assert not RAW_SEED.findall(code), f"{path.name}: seeds torch directly; use nu.generator"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_setup_cell_honours_the_install_source(path):
    setup = next(c for c in load(path)["cells"] if c["cell_type"] == "code")
    assert "NNOPT_INSTALL_SOURCE" in source(setup), f"{path.name}: setup cell ignores it"


PY_ROLE = re.compile(r"\{py:(func|class|mod|meth|data)\}`(?:[^`<]*<)?~?([\w.]+)>?`")
LIBRARY_MENTION = re.compile(r"(?<![}\w])`((?:nu|nnopt_utils)\.[A-Za-z_][\w.]*)(?:\(\))?`")


def _api_modules() -> set[str]:
    pages = (ROOT / "reference" / "api").glob("*.md")
    return {m for p in pages for m in re.findall(r"automodule:: ([\w.]+)", p.read_text())}


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_library_links_resolve_to_the_api_reference(path):
    """Each {py:...} role names an object of a module the API reference documents (Sphinx
    would otherwise drop the link silently), and a chapter links the first time its prose
    names a library object."""
    import importlib
    import inspect

    documented = _api_modules()
    markdown = [source(c) for c in load(path)["cells"] if c["cell_type"] == "markdown"]
    linked = set()
    for kind, target in PY_ROLE.findall("\n".join(markdown)):
        module, _, name = target.rpartition(".") if kind != "mod" else (target, "", "")
        while module and module not in documented and "." in module:  # a method: Class.meth
            module, _, outer = module.rpartition(".")
            name = f"{outer}.{name}"
        assert module in documented, f"{path.name}: {target} is not in a documented module"
        obj = importlib.import_module(module)
        for part in filter(None, name.split(".")):
            obj = getattr(obj, part, None)
            assert obj is not None, f"{path.name}: {target} does not exist"
        if kind == "mod":
            assert inspect.ismodule(obj)
        else:
            assert obj.__module__ == module, (
                f"{path.name}: link {target} where it is defined ({obj.__module__})")
        linked.add(target)
    # the first mention of a library object in the prose is a link; later ones may be plain
    shown = set()
    token = re.compile(PY_ROLE.pattern.replace("(?:[^`<]*<)?", "([^`<]*<)?") + "|"
                       + LIBRARY_MENTION.pattern)
    for text in markdown:
        for m in token.finditer(text):
            if m.group(0).startswith("{py:"):
                shown.add((m.group(2) or "").rstrip(" <").rstrip("()"))
            else:
                assert m.group(4) in shown, (
                    f"{path.name}: the first mention of `{m.group(4)}` should link to the API "
                    f"reference, e.g. {{py:func}}`{m.group(4)} <nnopt_utils.module.name>`")


def test_bibliography_parses():
    """references.bib is valid BibTeX (a missing brace stops the whole book build)."""
    from pybtex.database import parse_file

    entries = parse_file(str(ROOT / "references.bib"), bib_format="bibtex").entries
    assert len(entries) == len(bib_keys())


UNBRACED_MACRO = re.compile(r"[_^]\\(Loss|E|R|N|norm|abs|inner|Hess|grad|argmin|Var|tr|diag|rank)\b")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_macro_subscripts_are_braced(path):
    """`\\rho_\\Loss` renders in MathJax but stops LaTeX (the macro expands to several tokens):
    a book macro in a sub- or superscript needs braces, `\\rho_{\\Loss}`."""
    text = "\n".join(source(c) for c in load(path)["cells"] if c["cell_type"] == "markdown")
    assert not UNBRACED_MACRO.findall(text), (
        f"{path.name}: brace these: {sorted(set(m.group(0) for m in UNBRACED_MACRO.finditer(text)))}")


def test_parallel_execution_runs_every_chapter_of_the_toc():
    import importlib.util

    spec = importlib.util.spec_from_file_location("execute", ROOT / "tools" / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    expected = [ROOT / f"{f}.ipynb" for f in toc_files() if f.startswith("chapters/")]
    assert execute.chapters() == expected
    assert len(expected) == len(list((ROOT / "chapters").glob("*/*.ipynb")))
    with pytest.raises(SystemExit):  # argparse: --jobs must be positive
        execute.main(["--jobs", "0"])


def test_parallel_execution_reports_failed_chapters_and_keys_the_cache(tmp_path, monkeypatch,
                                                                       capsys):
    """A failing chapter (a raised error, a dead kernel) is named and not cached, the others
    are, the exit status is 1; a changed library or result variable empties the cache."""
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location("execute", ROOT / "tools" / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    monkeypatch.setitem(sys.modules, "execute", execute)  # the worker processes import it
    (tmp_path / "chapters").mkdir()
    (tmp_path / "nnopt_utils").mkdir()
    (tmp_path / "nnopt_utils" / "a.py").write_text("x = 1\n")
    (tmp_path / "requirements.txt").write_text("torch\n")
    (tmp_path / "_config.yml").write_text("execute:\n  timeout: 60\n")
    codes = {"good": "import os\nassert 'NNOPT_CLAIMS_KEEP_GOING' not in os.environ",
             "fails": "raise AssertionError('claim failed: x')",
             "dies": "import os\nos._exit(1)"}
    for name, code in codes.items():
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nbformat.write(nb, tmp_path / "chapters" / f"{name}.ipynb")
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n"
        + "".join(f"  - file: chapters/{n}\n" for n in codes))
    monkeypatch.setattr(execute, "ROOT", tmp_path)
    monkeypatch.setattr(execute, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("NNOPT_CLAIMS_KEEP_GOING", "1")
    assert execute.main(["--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAILED chapters/fails.ipynb" in out and "claim failed: x" in out
    assert "FAILED chapters/dies.ipynb" in out
    assert "2 of 3 chapters failed" in out and "\n" in out
    from jupyter_cache import get_cache

    cached = {Path(r.uri).name for r in get_cache(str(tmp_path / "cache")).list_project_records()}
    assert cached == {"good.ipynb"}
    # the cache key follows the library and the variables that change results
    key = execute.cache_key({})
    assert execute.cache_key({"NNOPT_SEED": "1"}) != key
    (tmp_path / "nnopt_utils" / "a.py").write_text("x = 2\n")
    assert execute.cache_key({}) != key
