# Every target creates the venv it needs; torch is pinned through constraints.txt.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: venv demo test test-fast lint fuzz coverage-report clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -q torch==2.14.1 torchvision==0.29.1
	$(PIP) -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python recipes/demo.py --out runs/demo

test: venv
	$(BIN)/ruff check routesurgeon tests benchmarks recipes
	$(BIN)/python -m pytest -n 2 -q

test-fast: venv
	$(BIN)/python -m pytest -q -x -m "not slow and not coverage"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy routesurgeon

clean:
	rm -rf $(VENV) runs build *.egg-info
