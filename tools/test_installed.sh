#!/usr/bin/env bash
# Test nnopt_utils as users install it (a wheel, as `pip install git+...` on Colab builds one):
# build the wheel, install it into a fresh venv, and from a temporary directory that holds no
# source tree run the unit tests and chapter 11 (which starts worker processes) against it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nnopt-installed.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

echo "== building the wheel from the project's files only"
# a copy of the files git tracks or would track: a stale build/ or egg-info in the checkout
# must not reach the wheel
mkdir "$WORK/src"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | \
    (cd "$ROOT" && xargs -0 cp --parents -t "$WORK/src" 2>/dev/null || true)
test -f "$WORK/src/pyproject.toml" || { echo "could not copy the project's files"; exit 1; }
"$ROOT/.venv/bin/python" -m pip wheel --quiet --no-deps -w "$WORK/dist" "$WORK/src"
wheel=$(ls "$WORK"/dist/nnopt_utils-*.whl)
echo "   $(basename "$wheel")"

echo "== fresh venv: $TORCH_SPEC, then the wheel with its declared dependencies"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --upgrade pip
"$WORK/venv/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$WORK/venv/bin/python" -m pip install --quiet "${wheel}[test]" ipykernel

echo "== the package imports from the install, not from the source tree"
"$WORK/venv/bin/python" -P - "$ROOT" <<'PY'
import os, sys
root = os.path.realpath(sys.argv[1])
import nnopt_utils
where = os.path.realpath(nnopt_utils.__file__)
assert not where.startswith(root + os.sep), f"imported from the source tree: {where}"
assert "site-packages" in where, where
nnopt_utils.distributed, nnopt_utils.signal, nnopt_utils.hessian  # lazy modules load
print(f"   nnopt_utils {nnopt_utils.__version__} from {os.path.dirname(where)}")
PY

echo "== unit tests against the install"
cp -r "$ROOT/tests" "$WORK/tests"
rm -rf "$WORK/tests/html" "$WORK/tests/browser" "$WORK/tests/test_book.py" \
       "$WORK/tests/test_docstrings.py"   # these read the book's sources
NNOPT_QUIET=1 "$WORK/venv/bin/python" -P -m pytest -q -ra -p no:cacheprovider --rootdir "$WORK" \
    -c /dev/null "$WORK/tests"

echo "== chapter 11 (torch.distributed workers) against the install"
cp "$ROOT/chapters/part3_optimizers/11_large_batch.ipynb" "$WORK/"
NNOPT_QUIET=1 "$WORK/venv/bin/python" -P -m pytest -q -p no:cacheprovider --rootdir "$WORK" \
    -c /dev/null --nbval-lax --nbval-cell-timeout=300 "$WORK/11_large_batch.ipynb"
echo "== the Colab path: a fresh kernel without nnopt_utils runs a chapter's setup cell"
# The setup cell installs the package when it is missing; NNOPT_INSTALL_SOURCE points it at
# this checkout instead of the repository URL.
"$PYTHON" -m venv "$WORK/colab"
"$WORK/colab/bin/python" -m pip install --quiet --upgrade pip
"$WORK/colab/bin/python" -m pip install --quiet "$TORCH_SPEC" ipykernel nbclient
if "$WORK/colab/bin/python" -c "import nnopt_utils" 2>/dev/null; then
  echo "the Colab venv must start without nnopt_utils"; exit 1
fi
NNOPT_QUIET=1 NNOPT_INSTALL_SOURCE="$WORK/src" "$WORK/colab/bin/python" -P - \
    "$ROOT/chapters/part1_foundations/01_problem_formulation.ipynb" "$WORK/colab" <<'PY'
import sys
import nbformat
from nbclient import NotebookClient
path, venv = sys.argv[1], sys.argv[2]
nb = nbformat.read(path, as_version=4)
code = [c for c in nb.cells if c.cell_type == "code"]
probe = nbformat.v4.new_code_cell(
    "import nnopt_utils, os\n"
    "print(os.path.realpath(nnopt_utils.__file__))\n"
    "print(type(device).__name__, len(claims))")
nb.cells = [code[0], probe]  # the setup cell, then a probe of what it left behind
NotebookClient(nb, timeout=600, kernel_name="python3").execute()
out = "".join(o.get("text", "") for o in nb.cells[1].outputs)
print("   " + out.replace("\n", "\n   ").rstrip())
import os
assert out.startswith(os.path.realpath(venv) + os.sep), f"nnopt_utils not installed into the venv: {out}"
assert "device 0" in out, out
PY
echo "== the installed package passed"
