"""Suite-wide settings.

XLA's CPU backend spends most of a tiny model's test time in LLVM optimisation of the compiled
code; the tests run each program a handful of times, so they compile at optimisation level 0
(2-3x faster compiles, same numerics: the parity tests run under it). Benchmarks never import
this file. A user's explicit XLA_FLAGS win.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
