# nnopt: `make book` builds the executed HTML book; `make test` runs every test.
# Both create .venv from requirements.txt on first use (Python >= 3.10 is all they need).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Quiet progress bars in executed notebooks (figures use the kernel's inline backend).
export NNOPT_QUIET := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test unit notebooks book-strict venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

## book: build the HTML book, executing every chapter (cached between builds)
book: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

## test: unit and structure tests, every notebook under nbval, and a strict book build
test: unit notebooks book-strict

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

notebooks: $(STAMP)
	$(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=300 -p no:cacheprovider chapters -q

book-strict: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

clean:
	rm -rf _build
