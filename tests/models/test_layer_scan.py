"""The scanned layer stack (peftjax/models/layer_scan.py) computes what the unrolled one does.

Every method, with its trainable params perturbed away from their init (so a method whose hooks
read the wrong layer's params inside the scan body would show), gives the same loss and
gradients on a 3-layer tiny Llama and on a tiny BERT scanned and unrolled; each
Llama-architecture family (Gemma's alternating windows and RoPE bases picked per layer) likewise; a method whose layers differ is
refused with the layer named; site discovery, decoding, dropout and rematerialisation work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.losses import loss_for
from peftjax.methods.core import Sites
from peftjax.models import build_model, generation
from tests.helpers import METHOD_CONFIGS, TINY, TINY_OVERRIDES, fisher_context, learnable_batch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "bert", "gpt2", "bloom")
# In `make test` (its time budget): LoRA (the linear hook, its merged single-GEMM forward) and
# prefix tuning (the attention hook) on Llama, LoRA on BERT, GPT-2 and T5; Gemma 2's adapters
# and Gemma 3's LoRA (per-layer masks and RoPE tables). Every other method and family under -m slow.
FAST = ("lora", "prefix_tuning")
FAST_FAMILIES = (("gemma2", "adapter"), ("gemma3", "lora"), ("gpt2", "lora"))


def _pair(family: str, layers: int | None = None, **overrides):
    name, head, labels = TINY[family]
    hf = {**model_configs.get(name).hf_config.to_dict(), **TINY_OVERRIDES.get(family, {}), **overrides}
    if layers:
        hf["num_hidden_layers"] = layers
    unrolled = build_model(hf, head=head, num_labels=labels)
    scanned = build_model(hf, head=head, num_labels=labels, scan_layers=True)
    params = traverse_util.flatten_dict(unrolled.init(jax.random.PRNGKey(0)), sep=".")
    return unrolled, scanned, params


def _perturbed(trainable, scale: float = 0.05):
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(7), max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [
        x + scale * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for x, k in zip(leaves, keys)])


def _loss_and_grads(model, method_name: str, params: dict, batch: dict, *, train: bool = False,
                    config: dict | None = None):
    method = methods.create(method_name, model, config or METHOD_CONFIGS[method_name])
    peft = method.setup(jax.random.PRNGKey(1), params, fisher_context(model, batch))
    trainable = _perturbed(peft.trainable)
    loss = loss_for(model.head)

    def f(t):
        return loss(method.apply(t, peft.frozen, peft.state, batch, train=train,
                                 rng=jax.random.PRNGKey(3)), batch)

    jaxpr = str(jax.make_jaxpr(f)(trainable))
    value, grads = jax.jit(jax.value_and_grad(f))(trainable)
    return value, grads, jaxpr


def _assert_same(a, b, atol: float = 1e-5):
    (l0, g0, unrolled_jaxpr), (l1, g1, scanned_jaxpr) = a, b
    assert "scan[" in scanned_jaxpr and "scan[" not in unrolled_jaxpr
    np.testing.assert_allclose(float(l0), float(l1), atol=atol, rtol=0)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("family,method_name", [
    (f, m) if (m in FAST and f == "llama") or (f, m) == ("bert", "lora") else pytest.param(f, m, marks=pytest.mark.slow)
    for f in ("llama", "bert", "gpt2") for m in sorted(METHOD_CONFIGS) if m != "linear_probe"])
def test_every_method_scanned_equals_unrolled(family, method_name):
    # BERT: an encoder (post-LayerNorm blocks, one padding mask for every layer, prompt tuning's
    # longer sequence) under a classification head; GPT-2: fused c_attn, Conv1D layouts.
    unrolled, scanned, params = _pair(family, layers=3)
    batch = learnable_batch(unrolled)
    _assert_same(_loss_and_grads(unrolled, method_name, params, batch),
                 _loss_and_grads(scanned, method_name, params, batch))


@pytest.mark.parametrize("family,method_name", [
    (f, m) if (f, m) in FAST_FAMILIES else pytest.param(f, m, marks=pytest.mark.slow)
    for f in FAMILIES[1:] for m in ("lora", "adapter")])
def test_each_family_scanned_equals_unrolled(family, method_name):
    # Gemma 2 alternates sliding and global layers, Gemma 3 also their RoPE bases: the scan body
    # picks layer i's mask and cos/sin by index.
    unrolled, scanned, params = _pair(family)
    batch = learnable_batch(unrolled)
    _assert_same(_loss_and_grads(unrolled, method_name, params, batch),
                 _loss_and_grads(scanned, method_name, params, batch))


def test_a_method_adapting_layers_differently_is_refused_with_the_layer():
    # Prefix tuning on Gemma 2 keeps each layer's window (sliding or global) as a static setting
    # of its hooks: one scanned body cannot hold both.
    _, scanned, params = _pair("gemma2", layers=2)
    batch = learnable_batch(scanned)
    with pytest.raises(ValueError, match=r"scan_layers: layer 1 .*layer 0.*windows"):
        _loss_and_grads(scanned, "prefix_tuning", params, batch)


def test_families_without_the_option_refuse_it():
    hf = {**model_configs.get("tiny-qwen3-moe").hf_config.to_dict()}
    with pytest.raises(ValueError, match="qwen3_moe family has no scan_layers option; families with "
                                         "it: bert, bloom, gemma2, gemma3, gpt2, llama, mistral, qwen2, qwen3, t5$"):
        build_model(hf, head="causal_lm", scan_layers=True)


@pytest.mark.parametrize("method_name", [
    m if m == "lora" else pytest.param(m, marks=pytest.mark.slow)
    for m in ("lora", "adapter", "prompt_tuning", "prefix_tuning", "ia3", "full")])
def test_t5_scanned_equals_unrolled(method_name):
    # Encoder and decoder: block 0 (the relative position bias table) runs first, blocks 1 … N-1
    # are scanned with the bias it computed; the decoder's blocks cross-attend to the encoder.
    unrolled, scanned, params = _pair("t5", num_layers=3, num_decoder_layers=3)
    batch = learnable_batch(unrolled)
    _assert_same(_loss_and_grads(unrolled, method_name, params, batch),
                 _loss_and_grads(scanned, method_name, params, batch))


def test_gpt2_blocks_scaled_per_layer_are_refused():
    # scale_attn_by_inverse_layer_idx divides layer i's attention scores by i + 1: the blocks
    # differ, so one scanned body cannot serve them.
    unrolled, scanned, params = _pair("gpt2", scale_attn_by_inverse_layer_idx=True)
    batch = learnable_batch(scanned)
    with pytest.raises(ValueError, match="scan_layers: .*scale_attn_by_inverse_layer_idx"):
        _loss_and_grads(scanned, "lora", params, batch)


def test_sites_and_counts_are_the_same():
    # Site discovery traces every layer (the recording hooks run the stack unrolled): a method
    # on the scanned model targets every layer, not the scan body's one.
    unrolled, scanned, _ = _pair("llama", layers=3)
    assert Sites.discover(scanned) == Sites.discover(unrolled)
    for name in ("lora", "adapter", "prefix_tuning"):
        assert methods.count_params(methods.create(name, scanned, METHOD_CONFIGS[name])) == \
            methods.count_params(methods.create(name, unrolled, METHOD_CONFIGS[name]))


def test_cached_decoding_of_a_scanned_model():
    # The KV-cache path stays unrolled (each layer's cache is its own buffer); the prompt's
    # prefill without a cache and greedy decoding give the unrolled model's tokens.
    unrolled, scanned, params = _pair("llama", layers=3)
    tree = traverse_util.unflatten_dict(params, sep=".")
    ids = np.random.default_rng(0).integers(5, 200, size=(2, 6)).astype(np.int32)
    a = generation.generate(unrolled, tree, ids, max_new_tokens=5, eos_token_id=())
    b = generation.generate(scanned, tree, ids, max_new_tokens=5, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(scanned.apply(tree, {"input_ids": ids})),
                               np.asarray(unrolled.apply(tree, {"input_ids": ids})), atol=1e-5)


def test_dropout_and_remat_in_a_scanned_stack():
    # Attention dropout: each layer draws its own mask (fold_in(key, layer)); training mode
    # differs from eval and is deterministic for a key. Rematerialisation wraps the scan body:
    # same loss and gradients as without it.
    _, scanned, params = _pair("llama", layers=3, attention_dropout=0.3)
    batch = learnable_batch(scanned)
    eval_loss, _, _ = _loss_and_grads(scanned, "lora", params, batch)
    t1, g1, _ = _loss_and_grads(scanned, "lora", params, batch, train=True)
    t2, _, _ = _loss_and_grads(scanned, "lora", params, batch, train=True)
    assert np.isfinite(float(t1)) and float(t1) != float(eval_loss) and float(t1) == float(t2)
    name, head, _ = TINY["llama"]
    hf = {**model_configs.get(name).hf_config.to_dict(), **TINY_OVERRIDES["llama"],
          "num_hidden_layers": 3, "attention_dropout": 0.3}
    remat = build_model(hf, head=head, remat="block", scan_layers=True)
    t3, g3, _ = _loss_and_grads(remat, "lora", params, batch, train=True)
    np.testing.assert_allclose(float(t3), float(t1), atol=1e-6)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g3)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@pytest.mark.slow
def test_bert_dropout_in_a_scanned_stack():
    # BERT's hidden and attention dropout inside the body: per-layer keys, deterministic for a key.
    _, scanned, params = _pair("bert", layers=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    batch = learnable_batch(scanned)
    eval_loss, _, _ = _loss_and_grads(scanned, "lora", params, batch)
    t1, _, _ = _loss_and_grads(scanned, "lora", params, batch, train=True)
    t2, _, _ = _loss_and_grads(scanned, "lora", params, batch, train=True)
    assert np.isfinite(float(t1)) and float(t1) != float(eval_loss) and float(t1) == float(t2)


def test_t5_refusal_names_the_blocks_as_t5_numbers_them():
    # T5 scans blocks 1 … N-1 (block 0 holds the position bias): LoRA on block 1's query alone
    # makes block 2 differ from block 1, and the error says so (not "layer 1 … layer 0").
    _, scanned, params = _pair("t5", num_layers=3, num_decoder_layers=3)
    batch = learnable_batch(scanned)
    config = {**METHOD_CONFIGS["lora"], "targets": r"encoder\.block\.1\.layer\.0\.SelfAttention\.q$"}
    with pytest.raises(ValueError, match=r"scan_layers: layer 2 is adapted unlike layer 1 "):
        _loss_and_grads(scanned, "lora", params, batch, config=config)
