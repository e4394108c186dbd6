"""Smoke test of scripts/bench_generate.py on tiny-llama: both sides decode the same tokens.

Timings on a shared machine are noise; what is checked is the report's shape and that peftjax's
cached greedy decoding and transformers' ``generate`` (with PEFT's LoRA layers, and merged)
choose the same tokens from the same weights. That run is ``slow`` (a benchmark's smoke run, 12 s
on 2 cores; tests/models/test_generation.py checks cached decoding against transformers in
``make test``); ``make test`` checks that the script starts and refuses a bad flag.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import run_script


def run(*args: str) -> subprocess.CompletedProcess:
    return run_script("bench_generate.py", *args)


def test_unknown_settings_are_refused_with_the_valid_ones():
    proc = run("--model=tiny-llama", "--settings=base,lora_fused")
    assert proc.returncode != 0
    assert "lora_fused" in proc.stderr and "base, lora_unmerged, lora_merged" in proc.stderr


@pytest.mark.slow
def test_tiny_llama_base_lora_and_merged_decode_the_same_tokens():
    proc = run("--model=tiny-llama", "--batch=2", "--prompt=8", "--new=6", "--rank=4", "--repeats=1",
               "--threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [r["setting"] for r in out["settings"]] == ["base", "lora_unmerged", "lora_merged"]
    for row in out["settings"]:
        assert row["agreement"] == 1.0, row
        assert row["peftjax_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
        assert abs(row["ratio"] - row["transformers_s"] / row["peftjax_s"]) < 1e-12
