"""Build the student edition: the book with every exercise kept and every solution removed.

It builds the same sources with sphinx-exercise's ``hide_solutions`` switched on, reusing the
execution cache of the main build (so no chapter runs twice), into ``_build/student/``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "student"


def main() -> int:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["title"] = config["title"] + " (student edition)"
    config.setdefault("sphinx", {}).setdefault("config", {})["hide_solutions"] = True
    config.setdefault("execute", {})["cache"] = str(ROOT / "_build" / ".jupyter_cache")
    # paths of local extensions are read relative to the config file: make them absolute
    local = config["sphinx"].get("local_extensions") or {}
    config["sphinx"]["local_extensions"] = {name: str((ROOT / path).resolve())
                                            for name, path in local.items()}
    sphinx_config = config["sphinx"]["config"]
    sphinx_config["html_extra_path"] = [str((ROOT / p).resolve())
                                        for p in sphinx_config.get("html_extra_path", [])]
    html = config.get("html") or {}
    if html.get("favicon"):
        html["favicon"] = str((ROOT / html["favicon"]).resolve())
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "_config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    work = OUT / "work"
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT),
           "--config", str(path), "--path-output", str(work), "--warningiserror", "--keep-going"]
    status = subprocess.call(cmd, cwd=ROOT)
    if status:
        return status
    html = OUT / "html"
    shutil.rmtree(html, ignore_errors=True)
    shutil.move(str(work / "_build" / "html"), str(html))
    shutil.rmtree(work, ignore_errors=True)
    print(f"The student edition: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
