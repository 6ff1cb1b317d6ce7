# `make run` and `make test` do all set-up on a fresh machine: .venv, the project, the offline data set.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STEP    ?= large_kernel
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data run test test-slow test-all lint sweep figure benchmark complexity clean gpu-wheels gpu-check

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist when missing and apt is usable (as root, or via sudo -n).
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	    ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || echo "note: could not apt-get dataset-fashion-mnist; runs will try to download it or use data.root"; \
	  else echo "note: no apt-get; set data.root to a Fashion-MNIST folder (or let torchvision download it)"; fi; \
	fi

run: setup
	$(BIN)/python run_ablation.py step=$(STEP)

# two workers on a 2-core machine (tests pin torch to one thread each); a file's tests stay on one worker.
# make test: everything but the tests marked slow (several processes or epochs each: DDP, SLURM, signals, sweeps,
# the GPU check's dry run, inductor); make test-slow: those; make test-all: both; CI (.ci/run) runs test, test-slow.
PYTEST  := $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=10

test: setup
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

test-slow: setup
	$(PYTEST) -m slow

test-all: setup
	$(BIN)/ruff check .
	$(PYTEST)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

sweep: setup
	$(BIN)/python run_ablation.py -m +sweep=roadmap

complexity: setup
	$(BIN)/python -m ablations.complexity --regime r50

# The prepared GPU check (docs/gpu.md): gpu-wheels here fills .whl/ and .data/ (both git-ignored, carried to the GPU
# machine); gpu-check there installs them and runs every GPU stage within GPU_CHECK_MINUTES, results into $OUT.
gpu-wheels: setup
	$(BIN)/python scripts/gpu_wheels.py

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
