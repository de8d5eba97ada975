# chemscale: `make study` runs the study, `make test` runs the tests. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= cpu
export PYTHONHASHSEED := 0

.PHONY: setup study smoke test lab bench lint clean

setup: $(STAMP)

# pip, not uv/poetry: they ignore the on-disk CPU torch build and download CUDA wheels.
# schnetpack and molsets go in --no-deps (see requirements-nodeps.txt for why).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

study: setup  ## every notebook with the cpu profile (PROFILE=gpu on a GPU server)
	$(BIN)/python -m chemscale.study --profile $(PROFILE)

smoke: setup
	$(BIN)/python -m chemscale.study --profile smoke

test: setup  ## notebooks stripped, unit tests, then every notebook under nbmake (defaults = smoke profile)
	$(BIN)/nbstripout --verify --keep-id notebooks/*.ipynb
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbmake --nbmake-timeout=900 notebooks

lab: setup
	$(BIN)/python -m jupyter lab --notebook-dir=notebooks

bench: setup
	$(BIN)/python -m chemscale.bench chemgpt
	$(BIN)/python -m chemscale.bench ff

lint: setup
	$(BIN)/nbstripout --verify --keep-id notebooks/*.ipynb

clean:
	rm -rf runs/notebooks runs/smoke_*
