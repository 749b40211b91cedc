# The two commands of the README: `make demo` (the demo config on the embedded default setting: local Ray,
# Fashion-MNIST, a local folder, end to end) and `make test`.
# Both create .venv on first use and install Fashion-MNIST when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CONFIG ?= jobs/configs/fmnist-demo.yaml
PYTEST_ARGS ?=

.PHONY: setup data demo test test-fast check bench rehearsal clean-demo

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

# Two test processes (pytest-xdist), each taking whole modules: a module's Ray, cluster and fixtures stay in one
# process. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup data
	$(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: setup data
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The quick loop (about a minute on 2 cores): the algorithms, data, configs, storage, docs and cluster files,
# none of the tests that run stages on Ray. `make test` stays the full suite CI runs.
CHECK_TESTS := tests/algo tests/data tests/stages/test_commit_retry.py tests/stages/test_host_claims.py \
	tests/stages/test_image_sets.py tests/test_config.py tests/test_config_reference.py tests/test_docs.py \
	tests/test_storage.py tests/test_stats.py tests/test_estimate.py tests/test_lease.py \
	tests/test_imagenet_configs.py tests/test_teachers.py tests/test_worker_memory.py tests/test_import_graph.py \
	tests/orchestration/test_cluster_files.py tests/orchestration/test_cluster_readme.py \
	tests/orchestration/test_stopping.py tests/orchestration/test_status_watch.py tests/test_bad_input_cli.py
check: setup data
	$(BIN)/python -m pytest -q -m "not slow" --ignore=tests/data/test_index_requests.py $(CHECK_TESTS) $(PYTEST_ARGS)

bench: setup data
	$(BIN)/python bench/run_all.py

# The full-shape ImageNet rehearsal (1000 classes, IPC 50, 224 px, on a moto S3 server): about an hour here.
rehearsal: setup
	$(BIN)/python bench/rehearsal.py --shape full
