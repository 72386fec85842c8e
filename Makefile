# nnopt: `make book` builds the executed HTML book; `make test` runs every test.
# Both create .venv from requirements.txt on first use (Python >= 3.10 is all they need).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# chapters executed at a time by `make book` and `make test`, each kernel on one thread
# (NNOPT_THREADS=1); JOBS=1 executes them one after another with all threads
JOBS ?= $(shell nproc 2>/dev/null || echo 1)

# Quiet progress bars in executed notebooks (figures use the kernel's inline backend).
export NNOPT_QUIET := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test unit notebooks notebooks-other book-strict html-checks robust \
        test-installed test-browser student pdf bench bench-quick venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Targets run one at a time even under `make -j` (they share _build and its execution cache);
# the chapters themselves run JOBS at a time. tools/execute.py drops the execution cache when
# the library, the requirements or a variable that changes results has changed.
.NOTPARALLEL:

## book: build the HTML book, executing every chapter (cached between builds), JOBS
## chapters at a time
book: $(STAMP)
	$(BIN)/python tools/execute.py --jobs $(JOBS)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

## test: unit and structure tests, a strict book build (it executes every chapter, and a
## failing claim fails it), the student edition, checks of the built pages, and every
## notebook again under nbval on another global seed and the other CPU kernel family
test: unit book-strict student html-checks notebooks-other

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q --ignore=tests/html --ignore=tests/browser


NBVAL := $(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=300 -p no:cacheprovider -q

notebooks: $(STAMP)
	$(NBVAL) chapters

## notebooks-other: nbval again on a fresh global seed and the other CPU kernel family, so
## a claim that holds only by seed or rounding luck fails here
notebooks-other: $(STAMP)
	NNOPT_SEED=1 ATEN_CPU_CAPABILITY=$$($(BIN)/python -c "import torch; \
	  print('avx2' if torch.backends.cpu.get_cpu_capability().lower().startswith('avx512') \
	  else 'default')") NNOPT_THREADS=1 $(NBVAL) -n $(JOBS) --dist loadfile chapters

book-strict: $(STAMP)
	$(BIN)/python tools/execute.py --jobs $(JOBS)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

## student: the book without solutions, in _build/student/html (reuses the execution cache)
student: book
	$(BIN)/python tools/student.py

html-checks: $(STAMP)
	$(BIN)/python -m pytest tests/html -q

## test-browser: every built page in headless Chromium (math, images, console, sidebar);
## screenshots in _build/screenshots/
test-browser: book
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "test-browser needs Chromium: install Debian's package (apt-get install -y chromium)"; \
	  exit 1; }
	@$(BIN)/python -c "import playwright" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet "playwright>=1.40"
	$(BIN)/python -m pytest tests/browser -q

## pdf: the book as a PDF through LaTeX (TeX Live); not part of `make test`
pdf: $(STAMP)
	@command -v latexmk >/dev/null 2>&1 && command -v xelatex >/dev/null 2>&1 && \
	  kpsewhich bbm.sty >/dev/null 2>&1 || { \
	  echo "make pdf needs TeX Live: apt-get install -y texlive-latex-recommended \
	  texlive-latex-extra texlive-fonts-recommended texlive-xetex texlive-fonts-extra latexmk fonts-freefont-otf"; \
	  exit 1; }
	$(BIN)/python tools/execute.py --jobs $(JOBS)
	$(BIN)/jupyter-book build . --builder pdflatex
	@echo "The PDF: $(CURDIR)/_build/latex/nnopt.pdf"

## robust: every chapter across seeds, CPU kernel families and thread counts (a table)
robust: $(STAMP)
	$(BIN)/python tools/robust.py $(CHAPTERS)

## test-installed: the wheel installed into a fresh venv; unit tests and chapter 11 against it
test-installed: $(STAMP)
	PYTHON=$(PYTHON) bash tools/test_installed.sh

# The benchmarks run on one thread, so that their timings mean the same on a busy machine.
# The libraries they compare against are installed with --no-deps: pip must never touch torch.
BENCH_ENV := NNOPT_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

## bench: side-by-side benchmarks against PyHessian and loss-landscapes (checks, then
## interleaved timings); writes bench/results.json and reference/performance.md
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -r bench/requirements.txt
	$(BENCH_ENV) $(BIN)/python bench/run.py

## bench-quick: the benchmarks' correctness checks only, each case once (under a minute)
bench-quick: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -r bench/requirements.txt
	$(BENCH_ENV) $(BIN)/python bench/run.py --quick

clean:
	rm -rf _build
