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

echo "== building the wheel"
"$ROOT/.venv/bin/python" -m pip wheel --quiet --no-deps -w "$WORK/dist" "$ROOT"
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
rm -rf "$WORK/tests/html" "$WORK/tests/browser" "$WORK/tests/test_book.py"   # these read the book's sources
NNOPT_QUIET=1 "$WORK/venv/bin/python" -P -m pytest -q -p no:cacheprovider --rootdir "$WORK" \
    -c /dev/null "$WORK/tests"

echo "== chapter 11 (torch.distributed workers) against the install"
cp "$ROOT/chapters/part3_optimizers/11_large_batch.ipynb" "$WORK/"
NNOPT_QUIET=1 "$WORK/venv/bin/python" -P -m pytest -q -p no:cacheprovider --rootdir "$WORK" \
    -c /dev/null --nbval-lax --nbval-cell-timeout=300 "$WORK/11_large_batch.ipynb"
echo "== the installed package passed"
