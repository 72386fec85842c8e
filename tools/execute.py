"""Execute the book's chapters several at a time, into the execution cache the build reads.

``jupyter-book build`` executes chapters one after another. Run first, this script executes
them ``--jobs`` at a time, each kernel on one thread when there are several
(``NNOPT_THREADS=1`` unless the variable is set), and stores every executed chapter in
``_build/.jupyter_cache``; the build then finds each chapter there and only renders it.

* Chapters already in the cache (same code) are skipped. The cache keys on a notebook's
  code only, but outputs also depend on the library, the requirements and the variables
  that change results (``NNOPT_SCALE``, ``NNOPT_SEED``, ``ATEN_CPU_CAPABILITY``,
  ``NNOPT_DEVICE``), so the whole cache is dropped when any of them changes.
* A chapter that fails (a failed claim, an error, a dead kernel) is not stored; it is
  reported by name with its traceback, the other chapters still run, and the exit status
  is 1.
* The kernels never see ``NNOPT_CLAIMS_KEEP_GOING`` or ``NNOPT_CLAIMS_DIR``: a failed claim
  must fail the chapter here, not be cached as a success.

    python tools/execute.py --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"
#: the variables that change a chapter's outputs (part of the cache key)
RESULT_VARIABLES = ("NNOPT_SCALE", "NNOPT_SEED", "ATEN_CPU_CAPABILITY", "NNOPT_DEVICE")
#: variables that would let a failed claim pass, removed from the kernels' environment
REMOVED_VARIABLES = ("NNOPT_CLAIMS_KEEP_GOING", "NNOPT_CLAIMS_DIR")


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


def cache_key(environ=os.environ) -> str:
    """What the cached outputs depend on besides a notebook's code: the library's sources,
    the requirements and :data:`RESULT_VARIABLES`."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "nnopt_utils").glob("*.py")) + [ROOT / "requirements.txt"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name in RESULT_VARIABLES:
        digest.update(f"{name}={environ.get(name, '')}\0".encode())
    return digest.hexdigest()[:24]


def open_cache(key: str):
    """The execution cache, emptied first when it was filled under another ``key``."""
    from jupyter_cache import get_cache

    stamp = CACHE / "nnopt-key"
    if not stamp.exists() or stamp.read_text().strip() != key:
        if CACHE.exists():
            print("library, requirements or settings changed: every chapter will be "
                  "executed again", flush=True)
            shutil.rmtree(CACHE)
        CACHE.mkdir(parents=True)
        stamp.write_text(key + "\n")
    return get_cache(str(CACHE))


def _execute(path: Path, timeout: int) -> tuple[Path, str, float, str | None]:
    """Execute one chapter; any failure (a cell's error, a dead kernel) is returned as text."""
    try:
        from jupyter_cache.executors.utils import single_nb_execution

        nb = nbformat.read(path, as_version=4)
        result = single_nb_execution(nb, cwd=str(path.parent), timeout=timeout,
                                     allow_errors=False)
        return path, nbformat.writes(result.nb), result.time, result.exc_string
    except Exception:  # noqa: BLE001 - reported with the chapter's name by the caller
        return path, "", 0.0, traceback.format_exc()


def _config_timeout() -> int:
    """The per-cell timeout of ``_config.yml`` (``execute.timeout``), as the build uses."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    return int((config.get("execute") or {}).get("timeout", 300))


def _default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Execute the book's chapters several at a time into the build's "
                    "execution cache; exit status 1 if any chapter fails.")
    parser.add_argument("--jobs", type=int, default=_default_jobs(),
                        help="chapters executed at a time (default: the CPUs available); "
                             "with more than one, each kernel runs on one thread")
    parser.add_argument("--timeout", type=int, default=None,
                        help="seconds per cell (default: execute.timeout of _config.yml)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive int, got {args.jobs}")
    timeout = _config_timeout() if args.timeout is None else args.timeout
    if timeout < 1:
        parser.error(f"--timeout must be a positive number of seconds, got {timeout}")

    from jupyter_cache.base import CacheBundleIn

    for name in REMOVED_VARIABLES:
        if os.environ.pop(name, None) is not None:
            print(f"note: {name} is not passed to the chapters (a failed claim must fail "
                  f"the build)", flush=True)
    cache = open_cache(cache_key())
    todo = []
    for path in chapters():
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            todo.append(path)
    print(f"executing {len(todo)} chapters, {args.jobs} at a time", flush=True)
    if args.jobs > 1:  # kernels side by side share the cores: one thread each
        for name in ("NNOPT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, "1")  # the kernels inherit them
    failed = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_execute, path, timeout): path for path in todo}
        for future in as_completed(futures):
            name = futures[future].relative_to(ROOT).as_posix()
            try:
                _, text, seconds, error = future.result()
            except Exception:  # noqa: BLE001 - the worker process itself died
                text, seconds, error = "", 0.0, traceback.format_exc()
            if error is not None:
                failed.append(name)
                print(f"FAILED {name} ({seconds:.0f} s):\n{error}", flush=True)
                continue
            record = cache.add_nb_to_project(str(futures[future]))
            cache.cache_notebook_bundle(
                CacheBundleIn(nbformat.reads(text, as_version=4), record.uri,
                              data={"execution_seconds": seconds}),
                check_validity=False, overwrite=True)
            print(f"{seconds:6.1f} s  {name}", flush=True)
    if failed:
        print(f"{len(failed)} of {len(todo)} chapters failed: {', '.join(failed)}",
              flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
