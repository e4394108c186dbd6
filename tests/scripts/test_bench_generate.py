"""Smoke test of scripts/bench_generate.py on tiny-llama: both sides decode the same tokens.

Timings on a shared machine are noise; what is checked is the report's shape and that peftjax's
cached greedy decoding and transformers' ``generate`` (with PEFT's LoRA layers, and merged)
choose the same tokens from the same weights.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_tiny_llama_base_lora_and_merged_decode_the_same_tokens():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "scripts/bench_generate.py", "--model=tiny-llama", "--batch=2",
                           "--prompt=8", "--new=6", "--rank=4", "--repeats=1", "--threads=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [r["setting"] for r in out["settings"]] == ["base", "lora_unmerged", "lora_merged"]
    for row in out["settings"]:
        assert row["agreement"] == 1.0, row
        assert row["peftjax_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
        assert abs(row["ratio"] - row["transformers_s"] / row["peftjax_s"]) < 1e-12
