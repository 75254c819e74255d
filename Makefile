# Set-up is two commands: `make sweep` (the main job) and `make test`. Each builds what it needs.
# Python 3.11 where it is installed, else python3 (3.11 or newer: the install checks)
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install data sweep lint test test-fast benchmark gpu-check dashboard clean

install: $(STAMP)

# torch is pinned in pyproject.toml; pip finds the CPU build where its config offers one
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Debian's dataset-fashion-mnist is the offline source of Fashion-MNIST; installed when we are root and lack it
data: install
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -f data/fashion-mnist/train-images-idx3-ubyte.gz ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	    || echo "apt-get install dataset-fashion-mnist failed; the official mirror will be tried"; fi
	$(PY) -m project.data

sweep: data
	$(PY) experiments/sweep.py $(ARGS)

# the shape of the code: ruff's lint and format, mypy on project/, and the layers of pyproject.toml
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: data lint
	$(PY) -m pytest $(ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(ARGS)

benchmark: data
	$(PY) experiments/tools/benchmark.py $(ARGS)

# on a machine with a CUDA GPU: the GPU tests (skipped without one), then the benchmark on the GPU
gpu-check: data
	$(PY) -m pytest tests/test_gpu.py -v -rs $(ARGS)
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	    $(PY) experiments/tools/benchmark.py --device cuda --repeats 1 --cases house-prices-5fold-mlp,house-prices-5fold-mlp-generic,fashion-mnist-cnn-5fold-epoch; \
	else echo "no CUDA GPU here: the benchmark on the GPU is skipped"; fi

# Optuna's own UI on a study (default: the House Prices sweep's): STUDY=fashion-mnist make dashboard
STUDY ?= house-prices
dashboard: install
	$(VENV)/bin/optuna-dashboard sqlite:///experiments/outputs/$(STUDY)/optuna.db --host 127.0.0.1 --port 8080

clean:
	rm -rf $(VENV) experiments/outputs mlflow.db mlartifacts .pytest_cache
