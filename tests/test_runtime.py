"""peftjax.runtime: the allocator setting that keeps freed host memory (no per-step page faults)."""

import os
import subprocess
import sys

import pytest

from peftjax import runtime
from tests.helpers import ROOT

# A jitted step with ~64 MB of temporaries, run 6 times; prints minor page faults per run.
PROBE = """
import resource, sys
import peftjax, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(jnp.outer(x, x) * 2.0).sum(axis=0) + jnp.exp(jnp.outer(x, x)).sum(axis=1))
x = jnp.linspace(0.0, 1.0, 4096)
jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    jax.block_until_ready(f(x))
print(peftjax.runtime.state, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6)
"""


def probe(mode: str) -> tuple[str, float]:
    env = dict(os.environ, PEFTJAX_MALLOC=mode, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return out[-2], float(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_mode_removes_the_per_step_page_faults():
    keep_state, keep_faults = probe("keep")
    system_state, system_faults = probe("system")
    assert (keep_state, system_state) == ("keep", "system")
    # glibc's defaults mmap the 64 MB temporaries afresh each call (16k 4 KiB pages).
    assert system_faults > 8000, system_faults
    assert keep_faults < 1000, keep_faults


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(runtime.ENV, "fast")
    with pytest.raises(ValueError, match="valid: keep, system"):
        runtime.keep_freed_host_memory()
