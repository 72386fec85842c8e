"""Execute the book's chapters several at a time, into the execution cache the build reads.

``jupyter-book build`` executes chapters one after another. Run first, this script executes
them ``--jobs`` at a time, each kernel on one thread when there are several
(``NNOPT_THREADS=1`` unless the variable is set), and stores every executed chapter in ``_build/.jupyter_cache``; the build
then finds each chapter there and only renders it. A chapter that fails here is not
stored, so the build executes it once more and reports the failing cell with its traceback.
Chapters already in the cache (same code) are skipped.

    python tools/execute.py --jobs 2
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"


def chapters() -> list[Path]:
    """The chapter notebooks in the order of ``_toc.yml``."""
    files: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8")))
    paths = [ROOT / f"{f}.ipynb" for f in files if f.startswith("chapters/")]
    return [p for p in paths if p.exists()]


def _execute(path: Path, timeout: int) -> tuple[Path, str, float, str | None]:
    from jupyter_cache.executors.utils import single_nb_execution

    nb = nbformat.read(path, as_version=4)
    result = single_nb_execution(nb, cwd=str(path.parent), timeout=timeout,
                                 allow_errors=False)
    return path, nbformat.writes(result.nb), result.time, result.exc_string


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="chapters executed at a time (default: the number of CPUs)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive int, got {args.jobs}")

    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    CACHE.mkdir(parents=True, exist_ok=True)
    cache = get_cache(str(CACHE))
    todo = []
    for path in chapters():
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            todo.append(path)
    print(f"executing {len(todo)} chapters, {args.jobs} at a time", flush=True)
    if args.jobs > 1:  # kernels side by side share the cores: one thread each
        os.environ.setdefault("NNOPT_THREADS", "1")  # the kernels inherit it
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_execute, path, args.timeout) for path in todo]
        for future in as_completed(futures):
            path, text, seconds, error = future.result()
            name = path.relative_to(ROOT).as_posix()
            if error is not None:
                print(f"FAILED {name} ({seconds:.0f} s); the build runs it again and "
                      f"stops there:\n{error[-2000:]}", flush=True)
                continue
            record = cache.add_nb_to_project(str(path))
            cache.cache_notebook_bundle(
                CacheBundleIn(nbformat.reads(text, as_version=4), record.uri,
                              data={"execution_seconds": seconds}),
                check_validity=False, overwrite=True)
            print(f"{seconds:6.1f} s  {name}", flush=True)
    return 0  # a failed chapter fails the build that follows, with its traceback


if __name__ == "__main__":
    sys.exit(main())
