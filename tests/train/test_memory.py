"""Memory and compute accounting of a compiled train step on abstract shapes (peftjax/train/memory.py)."""

import functools

import jax
import numpy as np
import pytest

from configs.train import get_config
from peftjax.train import memory


def _config(model="tiny-bert", method="lora", **train):
    c = get_config(f"model={model},method={method}")
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


@functools.lru_cache(maxsize=None)
def _analysis(model="tiny-bert", method="lora", remat="none", optimizer="adamw",
              frozen_dtype="float32", clip_norm=1.0):
    c = _config(model, method, remat=remat, clip_norm=clip_norm)
    return memory.analyze_train_step(c, batch=4, seq=16, optimizer=optimizer, frozen_dtype=frozen_dtype)


def test_lora_accounting_is_consistent():
    r = _analysis()
    b, x = r["bytes"], r["xla"]
    # LoRA r=8 on query,value of 2 tiny-bert layers (hidden 32): 2·2·(32·8 + 8·32) params
    assert r["trainable_params"] == 2 * 2 * (32 * 8 + 8 * 32)
    trainable_values = r["trainable_params"] + r["head_params"]
    assert b["trainable_params"] == 4 * trainable_values          # fp32
    assert b["gradients"] == b["trainable_params"]
    # AdamW: mu and nu per trainable value (+ scalar counters)
    assert 2 * b["trainable_params"] <= b["optimizer_state"] <= 2 * b["trainable_params"] + 64
    assert b["params"] == b["frozen_params"] + b["trainable_params"]
    assert b["params"] == 4 * r["total_params"]                   # nothing else is a param
    # the state is donated: what goes in is reused for what comes out
    assert x["alias_bytes"] >= b["trainable_params"] + b["optimizer_state"]
    assert r["peak_bytes"] == x["argument_bytes"] + x["output_bytes"] + x["temp_bytes"] - x["alias_bytes"]
    assert x["argument_bytes"] >= b["params"] + b["optimizer_state"] + b["batch"]
    assert r["flops"] > 0
    assert r["backend"] == jax.default_backend() and r["head"] == "classification"


@pytest.mark.slow
def test_full_fine_tuning_needs_more_than_lora():
    full, lora = _analysis(method="full"), _analysis()
    assert full["bytes"]["frozen_params"] == 0
    assert full["bytes"]["optimizer_state"] >= 2 * 4 * full["total_params"]
    assert full["peak_bytes"] > lora["peak_bytes"]
    assert full["trainable_params"] == full["total_params"] - full["head_params"]


def test_bf16_frozen_params_sgd_and_remat():
    """One compile (time budget) checks three options against the fp32 / AdamW / no-remat step:
    bf16 frozen params halve the frozen bytes (trainable stay fp32 master weights), SGD keeps no
    state, and rematerialising each block adds its forward to the backward pass (more FLOPs)."""
    r = _analysis(optimizer="sgd", frozen_dtype="bfloat16", remat="block")
    lora = _analysis()
    assert r["bytes"]["frozen_params"] * 2 == lora["bytes"]["frozen_params"]
    assert r["bytes"]["trainable_params"] == lora["bytes"]["trainable_params"]
    assert r["bytes"]["optimizer_state"] == 0
    assert r["xla"]["argument_bytes"] < lora["xla"]["argument_bytes"]
    assert r["remat"] == "block" and lora["remat"] == "none"
    assert r["flops"] > lora["flops"] * 1.2


def test_abstract_batch_shapes():
    from peftjax.models import build_model
    from configs import models

    model = build_model(models.get("tiny-llama").hf_config, head="causal_lm")
    b = memory.abstract_batch(model, 3, 7)
    assert b["input_ids"].shape == (3, 7) and b["labels"].shape == (3, 7) and b["mask"].shape == (3,)
    with pytest.raises(ValueError, match="seq"):
        memory.abstract_batch(model, 3, 1)
    # encoder-decoder: the target side (decoder_* inputs, labels) takes target_seq
    t5 = build_model(models.get("tiny-t5").hf_config, head="seq2seq_lm")
    b = memory.abstract_batch(t5, 2, 9, target_seq=4)
    assert b["input_ids"].shape == (2, 9) and b["decoder_input_ids"].shape == (2, 4)
    assert b["labels"].shape == (2, 4)


def test_bad_arguments_are_refused():
    c = _config()
    with pytest.raises(NotImplementedError, match="mesh"):
        memory.analyze_train_step(c, mesh=object())
    with pytest.raises(ValueError, match="adamw"):
        memory.analyze_train_step(c, optimizer="lion")
    with pytest.raises(ValueError, match="float32"):
        memory.analyze_train_step(c, frozen_dtype="float16")
    # data-driven trainable sets (Child-tuning_D's Fisher mask) need concrete weights
    with pytest.raises(NotImplementedError, match="concrete"):
        memory.analyze_train_step(_config(method="child_tuning_d"), batch=2, seq=4)
    c.train.remat = "everything"
    with pytest.raises(ValueError, match="block_dots"):
        memory.analyze_train_step(c, batch=2, seq=4)


def test_tree_bytes():
    tree = {"a": np.zeros((3, 4), np.float32), "b": jax.ShapeDtypeStruct((5,), jax.numpy.bfloat16)}
    assert memory.tree_bytes(tree) == 48 + 10


def test_remat_policies_keep_the_gradients():
    """Rematerialisation changes what is stored, never the result: tiny-bert's gradients under
    ``block_dots`` equal those without remat (``block`` is checked on Llama in tests/models)."""
    from configs import models
    from peftjax.models import build_model
    from peftjax.models.layers import remat_name

    hf = models.get("tiny-bert").hf_config
    plain = build_model(hf, head="classification", num_labels=3)
    dots = build_model(hf, head="classification", num_labels=3, remat="block_dots")
    params = plain.init(jax.random.PRNGKey(0))
    batch = plain.dummy_batch(2, 8)

    def grad(model):
        loss = lambda p: jax.numpy.sum(model.apply(p, batch) ** 2)
        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(dots))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert remat_name(True) == "block" and remat_name(False) == "none"


@pytest.mark.slow   # a compile (~5 s); the llama2-7b rows in experiments/memory_table exercise it too
def test_quantized_base_is_accounted_packed():
    """model.quant=nf4 (double quant): each frozen backbone kernel (in, out) is stored as
    in_p/2·out bytes of packed codes + in_p/64·out 8-bit absmax codes + 4 bytes per 256 of them
    + a 4-byte offset (in_p: in rounded up to 64); everything else as before."""
    from flax import traverse_util

    from peftjax import methods
    from peftjax.models import build_model

    c = _config()
    c.model.quant = "nf4"
    r = memory.analyze_train_step(c, batch=4, seq=16)
    lora = _analysis()
    assert r["quant"] == "nf4 + double quant" and lora["quant"] == "none"
    model, _ = memory.build_abstract(c, None)
    method = methods.create("lora", model, {k: v for k, v in c.method.to_dict().items() if k != "name"})
    saved = 0
    for path, v in traverse_util.flatten_dict(model.abstract_params(), sep=".").items():
        site = path.rpartition(".")[0]
        if path.endswith(".kernel") and site in method.sites.backbone_linear:
            n_in, n_out = v.shape
            nb = -(-n_in // 64)
            stored = nb * 32 * n_out + nb * n_out + 4 * -(-nb * n_out // 256) + 4
            saved += 4 * n_in * n_out - stored
    assert saved > 0
    assert r["bytes"]["frozen_params"] == lora["bytes"]["frozen_params"] - saved
    assert r["bytes"]["trainable_params"] == lora["bytes"]["trainable_params"]
