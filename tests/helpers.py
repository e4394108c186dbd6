"""Shared test fixtures: tiny random models of each family, learnable batches, count formulas."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import numpy as np
from flax import traverse_util

from configs import models as model_configs
from peftjax.models import build_model


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *args: str, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python scripts/<script> args...`` from the repository root, as a user runs it: with the
    suite's environment (XLA flags, the shared compilation cache) but not PYTHONPATH, since a
    script must find peftjax by itself (scripts/_bootstrap.py); ``env`` adds variables."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, os.path.join("scripts", script), *args], cwd=ROOT,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def load_file_module(path: str, name: str):
    """The Python file at ``path`` (absolute, or relative to the repository root) imported as
    module ``name``: for the experiments' scripts and config files, which are not in a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a subprocess: the suite's (tests/conftest.py), plus a forced host device
    count where the subprocess needs several devices (fixed when its backend starts)."""
    flags = os.environ.get("XLA_FLAGS", "")
    return f"--xla_force_host_platform_device_count={devices} {flags}".strip() if devices else flags


FAMILIES = ("bert", "llama")
# GPT-2 and BLOOM run a representative subset of the contract matrix in `make test` (time budget):
# LoRA on the fused q/k/v layer (the PEFT default target: c_attn, query_key_value), adapters
# (block_output) on GPT-2, prompt tuning on BLOOM (virtual tokens enter before the embedding
# LayerNorm and shift the ALiBi positions). Every other method runs on them under `-m slow`
# (tests/methods/test_contract.py).
DECODER_SUBSETS = {"gpt2": ("lora", "adapter"), "bloom": ("lora", "prompt_tuning"),
                   # Llama-architecture families: one cell each in `make test` where the family
                   # differs from Llama (Qwen2's q/k/v biases: BitFit; Qwen3's q/k norms under
                   # LoRA on q/v; Mistral's sliding window with prefix keys), the rest under -m slow.
                   "qwen2": ("bitfit",), "qwen3": ("lora",), "mistral": ("prefix_tuning",),
                   # Gemma 2: adapters read each block's output after its post-norm.
                   "gemma2": ("adapter",), "gemma3": ("ia3",),
                   # Qwen3-MoE: LoRA (its default q/v targets) and full fine-tuning (gradients
                   # through the grouped expert matmuls and the router).
                   "qwen3_moe": ("lora", "full")}
TINY = {"bert": ("tiny-bert", "classification", 3), "llama": ("tiny-llama", "causal_lm", None),
        "gpt2": ("tiny-gpt2", "causal_lm", None), "bloom": ("tiny-bloom", "causal_lm", None),
        "t5": ("tiny-t5", "seq2seq_lm", None), "qwen2": ("tiny-qwen2", "causal_lm", None),
        "qwen3": ("tiny-qwen3", "causal_lm", None), "mistral": ("tiny-mistral", "causal_lm", None),
        "gemma2": ("tiny-gemma2", "causal_lm", None), "gemma3": ("tiny-gemma3", "causal_lm", None),
        "qwen3_moe": ("tiny-qwen3-moe", "causal_lm", None)}
# The encoder-decoder family runs a representative subset of the contract matrix (time budget):
# full, LoRA, prompt tuning (encoder input), Houlsby adapters. BitFit has nothing to train on T5
# (no biases): tests/models/test_t5.py checks it is refused.
SEQ2SEQ_FAMILIES = {"t5": ("full", "lora", "prompt_tuning", "adapter")}
# The contract tests need no tokenizer, so the decoder gets a small vocabulary and a larger init:
# with hidden 32, 30k tokens and N(0, 0.02) weights, a frozen LM head bounds every logit by ~1 and
# no adapter could move the loss measurably.
TINY_OVERRIDES = {"llama": {"vocab_size": 256, "initializer_range": 0.2},
                  "gpt2": {"vocab_size": 256, "initializer_range": 0.2, "resid_pdrop": 0.0,
                           "embd_pdrop": 0.0, "attn_pdrop": 0.0},
                  "bloom": {"vocab_size": 256, "initializer_range": 0.2},
                  "t5": {"vocab_size": 256, "dropout_rate": 0.0},
                  "qwen2": {"vocab_size": 256, "initializer_range": 0.2},
                  "qwen3": {"vocab_size": 256, "initializer_range": 0.2},
                  "mistral": {"vocab_size": 256, "initializer_range": 0.2},
                  "gemma2": {"vocab_size": 256, "initializer_range": 0.2},
                  "gemma3": {"vocab_size": 256, "initializer_range": 0.2},
                  "qwen3_moe": {"vocab_size": 256, "initializer_range": 0.2}}

# Small configurations of every registered method for the contract matrix.
METHOD_CONFIGS: dict[str, dict] = {
    "full": {},
    "lora": {"rank": 4, "alpha": 8.0},
    "bitfit": {},
    "adapter": {"bottleneck": 8},
    "prompt_tuning": {"num_virtual_tokens": 4, "init": "vocab"},
    "dora": {"rank": 4, "alpha": 8.0},
    # 25 contract steps: warm-up 5, budget shrinks over steps 6..15 (masking every 2), fixed after.
    "adalora": {"init_r": 4, "target_r": 2, "alpha": 8.0, "tinit": 5, "tfinal": 10, "deltaT": 2,
                "total_step": 25},
    "dylora": {"rank": 4, "alpha": 8.0},
    "vera": {"rank": 64},
    "child_tuning_f": {"reserve_p": 0.3},
    # Fisher from the learnable batch (fisher_context); a tenth of the tiny models' params.
    "fishmask": {"keep_ratio": 0.1, "num_examples": 8, "progress": False},
    "child_tuning_d": {"reserve_p": 0.3, "progress": False},
    # The plain (folded) prefixes: the count the method reports is the tree it trains. The
    # reparameterisation MLP is exercised in tests/methods/test_prefix_tuning.py.
    "prefix_tuning": {"num_virtual_tokens": 4, "prefix_projection": False},
    "linear_probe": {},
    "ia3": {},   # PEFT's per-model-type targets and feedforward modules
    "olora": {"rank": 4, "alpha": 8.0},
    "hira": {"rank": 4},
    "ln_tuning": {},   # PEFT's norm modules (BERT: every LayerNorm)
    "lora_plus": {"rank": 4, "alpha": 8.0, "lr_ratio": 16.0},
    "lora_fa": {"rank": 4, "alpha": 8.0},
    # Gradient from the learnable batch (fisher_context), two backward passes of 4 rows.
    "lora_ga": {"rank": 4, "alpha": 8.0, "num_examples": 8, "batch_size": 4, "progress": False},
}


@functools.lru_cache(maxsize=None)
def _tiny(family: str):
    name, head, labels = TINY[family]
    hf_config = {**model_configs.get(name).hf_config.to_dict(), **TINY_OVERRIDES.get(family, {})}
    model = build_model(hf_config, head=head, num_labels=labels)
    params = model.init(jax.random.PRNGKey(0))
    return model, traverse_util.flatten_dict(params, sep=".")


def tiny_model(family: str):
    """(model, flat params) of the family's tiny random model (cached; do not mutate)."""
    model, flat = _tiny(family)
    return model, dict(flat)


def learnable_batch(model, batch: int = 8, seq: int = 12, seed: int = 0) -> dict:
    """A fixed batch with a learnable target (a classifier can fit it, an LM can memorise it)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 200, size=(batch, seq)).astype(np.int32)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids), "mask": np.ones((batch,), bool)}
    if "token_type_ids" in model.input_names:
        out["token_type_ids"] = np.zeros_like(ids)
    if model.head == "causal_lm":
        labels = ids.copy()
        labels[:, : seq // 2] = -100  # prompt tokens are masked out of the loss
        out["labels"] = labels
    elif model.head == "seq2seq_lm":  # text-to-text: a class word read from the input, then a
        # fixed phrase (learnable by every method, prompt tuning included), then padding
        labels = np.tile(np.arange(20, 26, dtype=np.int32), (batch, 1))
        labels[:, 0] = 10 + ids[:, 1] % 3
        labels[:, -1] = -100  # a padded target position, out of the loss
        out["labels"] = labels
    elif model.head == "regression":
        out["labels"] = (ids[:, 1] % 7).astype(np.float32) / 7
    else:
        out["labels"] = (ids[:, 1] % model.num_labels).astype(np.int32)
    return out


def fisher_context(model, batch: dict | None = None):
    """An InitContext whose training set is ``learnable_batch`` (for Fisher-mask methods)."""
    from peftjax.methods.core import InitContext
    from peftjax.losses import params_loss_fn

    batch = batch if batch is not None else learnable_batch(model)
    n = len(batch["input_ids"])
    return InitContext(train_batches=lambda: iter([batch]), loss_fn=params_loss_fn(model),
                       num_train_examples=n)


def tree_size(tree) -> int:
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


def formula_count(method, base: dict) -> int:
    """Each method's trainable-parameter formula, written independently of its code."""
    sites = method.sites
    non_head = {k: v for k, v in base.items() if not sites.is_head(k)}
    name = method.name
    if name in ("full", "child_tuning_f"):  # Child-tuning_F trains every base param
        return tree_size(non_head)
    if name == "linear_probe":  # the head alone, reported apart
        return 0
    if name == "lora":
        r = method.config.rank
        return sum(r * (sites.linear[s]["in_features"] + sites.linear[s]["out_features"])
                   for s in method.targets)
    if name == "dora":  # LoRA plus one magnitude per output unit
        r = method.config.rank
        return sum(r * (sites.linear[s]["in_features"] + sites.linear[s]["out_features"])
                   + sites.linear[s]["out_features"] for s in method.targets)
    if name == "adalora":  # P (out x r), Q (r x in) and the r singular values, at init_r
        r = method.config.init_r
        return sum(r * (sites.linear[s]["in_features"] + sites.linear[s]["out_features"] + 1)
                   for s in method.targets)
    if name == "dylora":  # LoRA at r_max
        r = method.config.rank
        return sum(r * (sites.linear[s]["in_features"] + sites.linear[s]["out_features"])
                   for s in method.targets)
    if name == "vera":  # d (r) and b (out) per layer; the shared A/B are frozen
        return sum(method.config.rank + sites.linear[s]["out_features"] for s in method.targets)
    if name == "ln_tuning":  # each targeted norm's scale (and bias: LayerNorm, not RMSNorm)
        return sum(tree_size(v) for k, v in non_head.items()
                   if k.rpartition(".")[0] in method.modules and k.endswith((".scale", ".bias")))
    if name == "hira":  # A (in x r) and B (r x out): LoRA's count for a Hadamard update
        r = method.config.rank
        return sum(r * (sites.linear[s]["in_features"] + sites.linear[s]["out_features"])
                   for s in method.targets)
    if name == "olora":  # LoRA's A (in x r) and B (r x out); the QR init adds nothing trainable
        r = method.config.rank
        return sum(r * (sites.linear[s]["in_features"] + sites.linear[s]["out_features"])
                   for s in method.targets)
    if name == "lora_plus":  # LoRA's A and B; the ratio changes learning rates, not params
        r = method.config.rank
        return sum(r * (sites.linear[s]["in_features"] + sites.linear[s]["out_features"])
                   for s in method.targets)
    if name == "lora_fa":  # B (r x out) only: A is frozen method state
        return sum(method.config.rank * sites.linear[s]["out_features"] for s in method.targets)
    if name == "lora_ga":  # LoRA's A (in x r) and B (r x out); the gradient init adds nothing
        r = method.config.rank
        return sum(r * (sites.linear[s]["in_features"] + sites.linear[s]["out_features"])
                   for s in method.targets)
    if name == "ia3":  # one vector per target: its input size at feedforward targets, else its output
        return sum(sites.linear[s]["in_features"] if s in method.feedforward
                   else sites.linear[s]["out_features"] for s in method.targets)
    if name == "fishmask":  # round(ratio x all params), the head inside the budget
        k = int(round(method.config.keep_ratio * tree_size(base)))
        return k - (tree_size(base) - tree_size(non_head)) if method.config.head_in_budget else k
    if name == "child_tuning_d":  # outside the layers whole, round(p x layer params) inside
        import re

        layer = {k: v for k, v in non_head.items() if re.search(r"\.(layers?|h)\.\d+\.", k)}
        return tree_size(non_head) - tree_size(layer) + int(round(method.config.reserve_p
                                                                   * tree_size(layer)))
    if name == "bitfit":
        return tree_size({k: v for k, v in non_head.items() if k.endswith(".bias")})
    if name == "adapter":
        total = 0
        for s in method.targets:
            d = sites.blocks[s]["hidden"]
            m = method.config.bottleneck
            total += 2 * m * d + d + m
        return total
    if name == "prompt_tuning":
        (info,) = sites.embeddings.values()
        return method.config.num_virtual_tokens * info["hidden"]
    if name == "prefix_tuning":  # a key and a value prefix of p positions at every layer
        return sum(2 * method.config.num_virtual_tokens * v["kv_heads"] * v["head_dim"]
                   for v in sites.attention.values())
    raise KeyError(f"no count formula for method {name!r}: add one to tests/helpers.py")


def left_padded(seed: int = 0, batch: int = 3, length: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask of a decoder batch: row 0 full, row 1 left-padded by 3, row 2 by 5."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 128, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def assert_greedy_matches(model, params, ref, ids: np.ndarray, mask: np.ndarray, new: int) -> np.ndarray:
    """Cached greedy generation equals full recomputation and transformers' ``generate`` on the
    same (left-padded) batch, token for token; returns the generated ids."""
    import torch
    import transformers

    from peftjax.models import generation

    cached = np.asarray(generation.generate(model, params, ids, mask, new, eos_token_id=()))
    full = np.asarray(generation.generate(model, params, ids, mask, new, eos_token_id=(), use_cache=False))
    np.testing.assert_array_equal(cached, full)
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask, dtype=torch.long),
                                generation_config=transformers.GenerationConfig(
                                    max_new_tokens=new, do_sample=False, pad_token_id=0,
                                    eos_token_id=None, bos_token_id=None)).numpy()
    np.testing.assert_array_equal(cached, expected)
    return cached
