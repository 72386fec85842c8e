"""Run every chapter under nbval across seeds, CPU kernel families and thread counts.

A claim of the book must hold on any CPU (torch's AVX2 and AVX-512 float kernels round
differently), any thread count and any global seed. This script executes each chapter in
each of these environments:

* the machine's own CPU kernels with ``NNOPT_SEED`` = 0, 1 and 2;
* every other kernel family the machine can run (``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512
  machine, and ``default``, the non-vectorized kernels), with ``NNOPT_SEED=0``;
* ``NNOPT_THREADS=1``.

Every check records its result (``NNOPT_CLAIMS_DIR``) and a failed claim does not stop the
chapter (``NNOPT_CLAIMS_KEEP_GOING``), so the table below lists, for each chapter and
environment, the claims passed out of those checked, and every failure is reported by name.
A cell that raises for another reason is reported as an error. Exit status 1 if anything
failed.

    python tools/robust.py                       # the whole matrix
    python tools/robust.py --envs seed=1,default chapters/part2_spectrum/04_initialization.ipynb

The matrix does not inherit ``ATEN_CPU_CAPABILITY``, ``NNOPT_SEED`` or ``NNOPT_THREADS`` from
the caller: each environment sets exactly what its name says. A chapter that records no
claim at all is reported as an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


#: the variables the matrix sets itself; the caller's values are not inherited
MATRIX_VARIABLES = ("ATEN_CPU_CAPABILITY", "NNOPT_SEED", "NNOPT_THREADS")


def base_environment() -> dict[str, str]:
    """The caller's environment without :data:`MATRIX_VARIABLES`."""
    return {k: v for k, v in os.environ.items() if k not in MATRIX_VARIABLES}


def own_capability() -> str:
    """The CPU kernel family torch picks on this machine by itself ('avx512', 'avx2', ...),
    read in a fresh process, whatever ``ATEN_CPU_CAPABILITY`` this one was started with."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
    out = subprocess.run([sys.executable, "-c", code], env=base_environment(),
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def environments() -> dict[str, dict[str, str]]:
    """The matrix: name -> the variables set on top of :func:`base_environment`."""
    own = own_capability()
    envs = {f"seed={s}": {"NNOPT_SEED": str(s)} for s in (0, 1, 2)}
    others = (["avx2"] if own.startswith("avx512") else []) + (["default"] if own != "default" else [])
    for cap in others:
        envs[cap] = {"ATEN_CPU_CAPABILITY": cap, "NNOPT_SEED": "0"}
    envs["threads=1"] = {"NNOPT_THREADS": "1", "NNOPT_SEED": "0"}
    return envs


def run_chapter(nb: Path, extra: dict[str, str], timeout: float) -> dict:
    """Execute one notebook under nbval; return its claims, failures, errors and time."""
    with tempfile.TemporaryDirectory(prefix="nnopt-claims-") as folder:
        env = {**base_environment(), "NNOPT_QUIET": "1", "NNOPT_CLAIMS_DIR": folder,
               "NNOPT_CLAIMS_KEEP_GOING": "1", **extra}
        cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-cell-timeout=300",
               "-p", "no:cacheprovider", "-q", "-rf", str(nb)]
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=timeout)
            log, status = out.stdout + out.stderr, out.returncode
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout or b""
            if isinstance(partial, bytes):
                partial = partial.decode(errors="replace")
            log, status = f"timed out after {timeout:g} s\n{partial}", -1
        seconds = time.perf_counter() - start
        records = []
        for path in Path(folder).glob("*.jsonl"):
            records += [json.loads(line) for line in path.read_text().splitlines() if line]
    errors = sorted(set(re.findall(r"FAILED \S+::(Cell \d+)", log)))
    if status not in (0, 1) or (status == 1 and not errors):
        errors.append(f"pytest exit status {status}")
    if not records and not errors:
        errors.append("no claim recorded (is every check a claims.check?)")
    return {"passed": sum(r["passed"] for r in records), "total": len(records),
            "failures": [r for r in records if not r["passed"]], "errors": errors,
            "seconds": seconds, "log_tail": log[-3000:] if errors else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: every chapter)")
    parser.add_argument("--envs", default=None, type=lambda text: text.split(","),
                        help="comma-separated names of the environments to run, for "
                             "example seed=1,default (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per chapter")
    parser.add_argument("--json", type=Path, default=ROOT / "_build" / "robust.json",
                        help="where to write the full results")
    args = parser.parse_args(argv)
    envs = environments()
    if args.envs:
        unknown = [e for e in args.envs if e not in envs]
        if unknown:
            parser.error(f"unknown environments {unknown}; choose from: {', '.join(envs)}")
        envs = {name: envs[name] for name in args.envs}
    notebooks = args.notebooks or sorted((ROOT / "chapters").rglob("[0-9]*.ipynb"))
    notebooks = [nb.resolve() for nb in notebooks if ".ipynb_checkpoints" not in nb.parts]

    results: dict[str, dict[str, dict]] = {}
    for name, extra in envs.items():
        for nb in notebooks:
            r = run_chapter(nb, extra, args.timeout)
            results.setdefault(nb.stem, {})[name] = r
            flag = "ok" if not (r["failures"] or r["errors"]) else "FAILED"
            print(f"[{name}] {nb.stem}: {r['passed']}/{r['total']} claims, "
                  f"{r['seconds']:.0f} s {flag}", flush=True)
            for f in r["failures"]:
                print(f"    claim failed: {f['claim']}: measured {f['measured']}, "
                      f"expected {f['expected']}", flush=True)
            for e in r["errors"]:
                print(f"    error in {e}", flush=True)

    names = list(envs)
    width = max(len(stem) for stem in results) + 2
    print("\nClaims passed / checked (seconds), chapter x environment")
    print("chapter".ljust(width) + "".join(n.rjust(16) for n in names))
    bad = False
    for stem, row in results.items():
        cells = []
        for n in names:
            r = row[n]
            mark = "" if not (r["failures"] or r["errors"]) else " !"
            bad |= bool(mark)
            cells.append(f"{r['passed']}/{r['total']} ({r['seconds']:.0f}){mark}".rjust(16))
        print(stem.ljust(width) + "".join(cells))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{'FAILURES above (marked !)' if bad else 'all green'}; details in {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
