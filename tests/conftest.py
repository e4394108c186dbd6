"""Suite-wide settings.

XLA's CPU backend spends most of a tiny model's test time compiling; the tests run each program
a handful of times, so they compile for compile speed (``XLA_TEST_FLAGS``): optimisation level
0 (2-3x faster compiles) and the classic elemental IR emitters instead of the MLIR fusion
emitters, without LLVM's expensive passes (the tiny Llama's LoRA train step: 1.2 -> 0.30 s to
compile), in one LLVM module rather than split for parallel code generation (0.32 -> 0.23 s:
the split's threads only contend with the other worker's on 2 cores). Same numerics: the parity
tests against PyTorch run under them. Benchmarks never import this file. A user's explicit
XLA_FLAGS win; subprocesses that force a device count add it to these (``tests.helpers.xla_flags``).

Many tests compile the very same programs: every loop test trains the same tiny model with the
same method, every resume test compiles what the uninterrupted run compiled, and the scripts
the tests start as subprocesses compile what an earlier test did in-process. So the suite runs
with JAX's persistent compilation cache (the one the grid uses for its cells), in a folder made
for this run and shared by the xdist workers and their subprocesses (through
$JAX_COMPILATION_CACHE_DIR, which they inherit): a program compiled once is loaded afterwards
(tests/train/test_failures.py: 186 -> 102 s on 2 cores). It starts empty in every run, so a
test never depends on what an earlier run left, and is removed at the end. A user's own
$JAX_COMPILATION_CACHE_DIR wins and is kept.
"""

import os
import shutil
import tempfile

import pytest

XLA_TEST_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                  "--xla_llvm_disable_expensive_passes=true --xla_cpu_parallel_codegen_split_count=1")
os.environ.setdefault("XLA_FLAGS", XLA_TEST_FLAGS)

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_MADE_HERE = "PEFTJAX_TEST_CACHE_MADE"   # set by the process that made the folder (and removes it)


def pytest_configure(config: pytest.Config) -> None:
    # The controller runs this before it starts the xdist workers, so they inherit the folder.
    if _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="peftjax-test-jax-cache-")
        os.environ[_MADE_HERE] = str(os.getpid())
        # Cache every program: the tiny models' compiles are short but many.
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get(_MADE_HERE) == str(os.getpid()):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.hookimpl(trylast=True)   # after `-m` has deselected: only the files that will run count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Longest test files first (tests/durations.py says why); a stable sort keeps each file's
    # tests in their order, so module fixtures are still built once per file.
    from tests import durations

    order = durations.longest_first([item.nodeid for item in items], durations.load())
    rank = {name: k for k, name in enumerate(order)}
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])
