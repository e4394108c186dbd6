"""scripts/bench.py on tiny-llama: the row's fields, the chosen head and ``--profile_dir``'s op
profile (timings on a shared machine are noise; the report's shape and its bookkeeping are
what is checked)."""

from __future__ import annotations

import json
import os

from tests.helpers import run_script


def test_bad_head_is_refused_with_the_family_heads():
    proc = run_script("bench.py", "--model=tiny-llama", "--head=seq2seq_lm", "--methods=lora")
    assert proc.returncode != 0
    assert "--head=seq2seq_lm" in proc.stderr and "causal_lm" in proc.stderr


def test_tiny_llama_causal_lm_rows_with_an_op_profile(tmp_path):
    proc = run_script("bench.py", "--model=tiny-llama", "--head=causal_lm", "--methods=lora,full",
                      "--batch=2", "--seq=16", "--steps=2", "--warmup=1",
                      f"--profile_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [r["method"] for r in rows] == ["lora", "full"]
    for r in rows:
        assert r["head"] == "causal_lm" and r["train_step_s"] > 0 and r["flops"] > 0
        prof = r["op_profile"]
        assert os.path.exists(prof["trace"]) and prof["trace"].startswith(str(tmp_path / r["method"]))
        assert prof["by_kind_ms"]["matmul"] > 0 and prof["overlap"] > 0
        assert all(t["source"].startswith("jit(step_fn)") or not t["source"] for t in prof["top"])
    # A frozen base kernel has no weight gradient: full fine-tuning multiplies more than LoRA.
    assert rows[1]["flops"] > rows[0]["flops"]
