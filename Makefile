# The two commands of the README: `make demo` (the demo config on the embedded default setting: local Ray,
# Fashion-MNIST, a local folder, end to end) and `make test`.
# Both create .venv on first use and install Fashion-MNIST when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CONFIG ?= jobs/configs/fmnist-demo.yaml
PYTEST_ARGS ?=

.PHONY: setup data demo test test-fast bench rehearsal clean-demo

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = "0" ]; then \
		apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	elif command -v sudo >/dev/null; then \
		sudo apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist (as root)"; exit 2; \
	fi

demo: setup data
	$(BIN)/prism-ray run $(CONFIG)

test: setup data
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup data
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup data
	$(BIN)/python bench/run_all.py

# The full-shape ImageNet rehearsal (1000 classes, IPC 50, 224 px, on a moto S3 server): about an hour here.
rehearsal: setup
	$(BIN)/python bench/rehearsal.py --shape full
