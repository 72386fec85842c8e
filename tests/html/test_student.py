"""The student edition keeps every exercise and shows no solution."""

from __future__ import annotations

from pathlib import Path

from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[2]
BOOK = ROOT / "_build" / "html"
STUDENT = ROOT / "_build" / "student" / "html"


def _read(html_dir: Path) -> tuple[list[str], list[str], str]:
    """Exercise texts, solution texts and the whole text of the chapter pages."""
    exercises, solutions, text = [], [], []
    for page in sorted(html_dir.glob("chapters/**/*.html")):
        main = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser").find("main")
        exercises += [" ".join(e.get_text(" ").split()) for e in main.select("div.exercise")]
        solutions += [" ".join(e.get_text(" ").split()) for e in main.select("div.solution")]
        text.append(" ".join(main.get_text(" ").split()))
    return exercises, solutions, " ".join(text)


def test_student_edition_has_exercises_and_no_solutions():
    assert (STUDENT / "index.html").exists(), f"no student edition at {STUDENT}; run `make student`"
    exercises, solutions, _ = _read(BOOK)
    assert exercises and solutions, "the book itself shows no exercises or solutions"
    student_exercises, student_solutions, student_text = _read(STUDENT)
    assert len(student_exercises) == len(exercises)
    assert student_solutions == []
    # the body of every solution (past its title line) is absent from the student pages
    leaked = [s[:80] for s in solutions if len(s) > 120 and s[60:160] in student_text]
    assert not leaked, "solution text in the student edition:\n" + "\n".join(leaked)
