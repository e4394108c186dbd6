"""Smoke test of scripts/bench_vs_peft.py on tiny-bert: both sides run the same LoRA step.

Timings on a shared CI machine are noise, so only the report's shape and the agreement of the
two sides' trainable counts are checked; the ratio is measured by hand (experiments/speed/README
and the script's docstring say how). The runs are ``slow`` (a benchmark's smoke runs, 10-15 s
each on 2 cores; tests/interop/test_train_parity.py checks in ``make test`` that the two sides
train the same steps); ``make test`` checks that the script starts and refuses what it cannot
compare.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from peftjax import host
from tests.helpers import run_script


def run(*args: str) -> subprocess.CompletedProcess:
    return run_script("bench_vs_peft.py", *args)


def _check_rows(rows: list[dict], methods: str) -> None:
    assert [r["method"] for r in rows] == methods.split(",")
    for r in rows:   # the script refuses unequal counts; each side trained something
        assert r["trainable_values"] > 0 and r["peftjax_step_s"] > 0 and r["peft_step_s"] > 0
        assert r["peftjax_compile_s"] > 0


@pytest.mark.slow
def test_tiny_bert_lora_both_sides():
    # One run (each costs an interpreter with jax, torch and peft): LoRA, and the PEFT sides
    # built other than from a LoraConfig: AdaLoRA (its update_and_allocate in the step), prefix
    # tuning (the written-out classification forward; the MLP's values counted).
    methods = "lora,adalora,prefix_tuning"
    proc = run("--model=tiny-bert", f"--methods={methods}", "--batch=2", "--seq=8", "--steps=2",
               "--warmup=1", "--threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["torch_threads"] == 1 and out["jax_threads"] >= 1
    assert out["backend"] == "cpu" and set(out["versions"]) == {"jax", "torch", "transformers", "peft"}
    # The machine: a ratio holds for the CPU it was measured on (peftjax.host).
    assert out["host"]["label"] == host.label() and out["host"]["cpu"] == host.cpu()
    assert out["host"]["xla_matmul_gflops"] > 0 and out["host"]["torch_matmul_gflops"] > 0
    _check_rows(out["methods"], methods)
    row = out["methods"][0]
    # LoRA r=8 on query,value of 2 layers (hidden 32) + the 3-way classifier (32*3 + 3)
    assert row["trainable_params"] == 2 * 2 * (32 * 8 + 8 * 32)
    assert row["trainable_values"] == row["trainable_params"] + 32 * 3 + 3
    assert len(row["peftjax_step_s_all"]) == len(row["peft_step_s_all"]) == 2
    assert abs(row["ratio"] - row["peftjax_step_s"] / row["peft_step_s"]) < 1e-12


@pytest.mark.parametrize("model,head,expected", [
    # LoRA r=8 on q_proj, v_proj of 2 layers (hidden 32, 4 heads, 2 kv heads of 8: v is 32 -> 16)
    pytest.param("tiny-llama", "causal_lm", 2 * (8 * (32 + 32) + 8 * (32 + 16)), marks=pytest.mark.slow),
    # LoRA on T5's q, v (self- and cross-attention): the count is checked against peft's by the script
    pytest.param("tiny-t5", "seq2seq_lm", None, marks=pytest.mark.slow),
])
def test_decoders_and_encoder_decoders_train_the_same_lm_step(model, head, expected):
    """--head=causal_lm / seq2seq_lm: transformers' ForCausalLM / ForSeq2SeqLM on the PyTorch
    side, the batch as its own target; both sides train the same values (the script refuses
    otherwise)."""
    proc = run(f"--model={model}", f"--head={head}", "--methods=lora", "--batch=2", "--seq=8",
               "--steps=2", "--warmup=1", "--threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["head"] == head
    (row,) = out["methods"]
    assert row["trainable_values"] == row["trainable_params"] > 0   # no task head: the LM head is pretrained
    if expected is not None:
        assert row["trainable_params"] == expected
    assert row["peftjax_step_s"] > 0 and row["peft_step_s"] > 0


def test_methods_without_a_peft_counterpart_are_refused():
    proc = run("--model=tiny-bert", "--methods=lora,fishmask")
    assert proc.returncode != 0
    assert "fishmask" in proc.stderr and "lora, rslora, dora" in proc.stderr


@pytest.mark.slow
def test_every_method_peft_has_runs_both_sides():
    methods = "rslora,dora,pissa,olora,lora_ga,vera,hira,ia3,prompt_tuning,ln_tuning,bitfit,full"
    proc = run("--model=tiny-bert", f"--methods={methods}", "--batch=2", "--seq=8", "--steps=1",
               "--warmup=0", "--threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_rows(json.loads(proc.stdout)["methods"], methods)
