"""scripts/bench_dense_backward.py: both forms timed; the rows form keeps the cotangent untransposed."""

from __future__ import annotations

import json

from tests.helpers import run_script


def test_both_forms_are_timed_and_the_rows_form_has_no_transposed_cotangent():
    proc = run_script("bench_dense_backward.py", "--rows=4,16", "--features=32,48", "--steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["input"] == [4, 16, 32] and out["kernel"] == [32, 48]
    assert set(out["forms"]) == {"jnp.dot", "dot_rows"}
    assert all(f["backward_ms"] > 0 for f in out["forms"].values())
    assert out["forms"]["dot_rows"]["transposed_cotangent_arrays"] == 0
