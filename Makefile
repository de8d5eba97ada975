# chemscale: `make study` runs the study, `make test` runs the tests. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL := $(VENV)/share/jupyter/kernels/chemscale/kernel.json
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_ARGS ?=
PROFILE ?= cpu
export PYTHONHASHSEED := 0

.PHONY: setup study smoke test lab bench lint clean

setup: $(STAMP) $(KERNEL)

# pip, not uv/poetry: they ignore the on-disk CPU torch build and download CUDA wheels.
# schnetpack and molsets go in --no-deps (see requirements-nodeps.txt for why).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The `chemscale` Jupyter kernel (this venv's Python) for Lab, papermill and nbmake; Lab's autosave off in the venv.
$(KERNEL): $(STAMP)
	$(BIN)/python -m chemscale.study --setup-jupyter

study: setup  ## every notebook with the cpu profile (PROFILE=gpu on a GPU server)
	$(BIN)/python -m chemscale.study --profile $(PROFILE)

smoke: setup
	$(BIN)/python -m chemscale.study --profile smoke

# Notebooks run on a fresh runs folder (no finished run is reused) and end with checks that fail them.
# The per-cell timeout leaves room for a busy machine: notebook 01's sweep cell took 31 min at load 9 on 2 cores.
test: setup  ## notebooks stripped, unit tests, then every notebook under nbmake (defaults = smoke profile)
	$(BIN)/nbstripout --verify --keep-id notebooks/*.ipynb
	$(BIN)/python -m pytest -q --durations=15 tests
	tmp=$$(mktemp -d) && CHEMSCALE_RUNS=$$tmp/runs CHEMSCALE_FIGURES=$$tmp/figures \
	  $(BIN)/python -m pytest -q --nbmake --nbmake-timeout=3600 notebooks; rc=$$?; rm -rf $$tmp; exit $$rc

# Rooted at the repository (executed notebooks in runs/ can be opened; terminals start here), opened on notebooks/.
lab: setup
	$(BIN)/python -m jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
	  --MultiKernelManager.default_kernel_name=chemscale $(ALLOW_ROOT) $(LAB_ARGS)

bench: setup
	$(BIN)/python -m chemscale.bench chemgpt
	$(BIN)/python -m chemscale.bench ff

lint: setup
	$(BIN)/nbstripout --verify --keep-id notebooks/*.ipynb

clean:
	rm -rf runs/notebooks runs/smoke_*
