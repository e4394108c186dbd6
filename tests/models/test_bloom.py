"""BLOOM family: parity with transformers' PyTorch BLOOM (LM and classification heads), ALiBi slopes
(non-power-of-two head counts), the per-head fused query_key_value, cached and greedy generation,
a prefix at the attention_kv hook, hook sites and the published bloomz-7b1 size.

Tiny random checkpoints are written with transformers/torch (fp32), loaded with ``hf_io`` and
compared on padded batches at the real-token positions (max |Δ| <= 1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.bloom import modeling_bloom

from configs import models as model_configs
from peftjax import methods
from peftjax.models import bloom, build_model, generation, hf_io, hooks
from tests.models.test_llama import max_delta, padded_batch, run

TOL = 1e-4
VOCAB = 128
# 6 heads: ALiBi's slopes for a non-power-of-two head count (4 + 2 interleaved extra slopes).
SMALL = dict(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.1,
             bos_token_id=1, eos_token_id=2)


def hf_config(**overrides) -> transformers.BloomConfig:
    config = transformers.BloomConfig(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    return config


def hf_model(config, cls=transformers.BloomForCausalLM, seed: int = 0):
    torch.manual_seed(seed)
    return cls(config).eval()


def from_torch(model: torch.nn.Module, head: str = "causal_lm", **kwargs):
    ours = build_model(model.config, head=head, **kwargs)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params, fresh = hf_io.params_from_tensors(ours, tensors)
    assert fresh == []
    return ours, params


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bloom_tiny")
    model = hf_model(hf_config())
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder), model


def test_checkpoint_parity_left_and_right_padding(checkpoint):
    folder, ref = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    assert model.family.name == "bloom" and "lm_head" not in params   # tied to word_embeddings
    ids, mask = padded_batch(VOCAB)  # row 1 left-padded, row 2 right-padded
    ours = run(model, params, {"input_ids": ids, "attention_mask": mask})
    assert ours.shape == (3, 12, VOCAB) and ours.dtype == jnp.float32
    delta = max_delta(ours, torch_logits(ref, ids, mask), mask)
    print(f"bloom parity padded batch (6 heads): max|Δ|={delta:.2e}")
    assert delta <= TOL
    names = {hf_io.hf_name(p, model.family)[0] for p in hf_io.flatten(params)}
    assert names == {k for k in ref.state_dict() if k != "lm_head.weight"}


def test_alibi_slopes_and_bias_match_transformers():
    for n in range(1, 41):
        np.testing.assert_allclose(bloom.alibi_slopes(n),
                                   modeling_bloom._get_alibi_slopes(n, torch.device("cpu")).numpy(),
                                   rtol=2e-7, err_msg=f"{n} heads")   # fp32 pow: 1 ulp
    _, mask = padded_batch(VOCAB)
    expected = modeling_bloom.build_alibi_tensor(torch.tensor(mask), 6, torch.float32).numpy()
    ours = np.asarray(bloom.alibi_bias(jnp.asarray(mask), 6))   # (B, H, 1, K)
    np.testing.assert_allclose(ours.reshape(expected.shape), expected, rtol=1e-7)


def test_fused_qkv_is_split_per_head(checkpoint):
    """query_key_value's output is [heads, 3, head_dim]: head h's query is rows 3·h·d..(3h+1)·d."""
    folder, ref = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    w = ref.state_dict()["transformer.h.0.self_attention.query_key_value.weight"].numpy()   # (3·H·d, hidden)
    kernel = np.asarray(params["transformer"]["h"]["0"]["self_attention"]["query_key_value"]["kernel"])
    np.testing.assert_array_equal(kernel, w.T)
    x = np.random.RandomState(0).randn(1, 1, 48).astype(np.float32)
    qkv = (x @ kernel).reshape(1, 1, 6, 3, 8)
    np.testing.assert_allclose(qkv[0, 0, 1, 0], x[0, 0] @ w[24:32].T, rtol=1e-5)   # head 1, query


def test_post_layernorm_residual_and_untied_head_parity():
    ref = hf_model(hf_config(apply_residual_connection_post_layernorm=True, tie_word_embeddings=False,
                             n_head=4))
    model, params = from_torch(ref)
    assert params["lm_head"]["kernel"].shape == (48, VOCAB)
    ids, mask = padded_batch(VOCAB)
    delta = max_delta(run(model, params, {"input_ids": ids, "attention_mask": mask}),
                      torch_logits(ref, ids, mask), mask)
    print(f"bloom parity post-LN residual, untied, 4 heads: max|Δ|={delta:.2e}")
    assert delta <= TOL


def test_sequence_classification_picks_last_non_pad_token():
    config = hf_config(num_labels=3, pad_token_id=0)
    ref = hf_model(config, transformers.BloomForSequenceClassification)
    model, params = from_torch(ref, head="classification", num_labels=3)
    assert model.head_prefixes == ("score",)
    ids, mask = padded_batch(VOCAB)
    ours = run(model, params, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    delta = float(np.abs(np.asarray(ours) - expected).max())
    print(f"bloom parity sequence classification: max|Δ|={delta:.2e}")
    assert ours.shape == (3, 3) and delta <= TOL


def _prompt(ids_shape, seed=3):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, ids_shape)
    mask = np.ones_like(ids)
    mask[1, :2] = 0   # left padding, the batched-generation layout
    ids[mask == 0] = 0
    return ids, mask


def test_cached_and_greedy_generation_match_recomputation_and_transformers(checkpoint):
    folder, ref = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    ids, mask = _prompt((2, 6))
    kw = dict(max_new_tokens=6, eos_token_id=(), pad_token_id=0)
    cached = generation.generate(model, params, ids, mask, **kw)
    recomputed = generation.generate(model, params, ids, mask, use_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(recomputed))
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(cached), expected.numpy())


class Prefix(hooks.Hooks):
    """Prefix tuning's shape of intervention: p fixed keys/values before every layer's own."""

    def __init__(self, keys, values):   # (p, heads, d)
        self.keys, self.values = keys, values

    def attention_kv(self, module, key, value, mask):
        b, p = key.shape[0], self.keys.shape[0]
        k = jnp.broadcast_to(self.keys, (b,) + self.keys.shape).astype(key.dtype)
        v = jnp.broadcast_to(self.values, (b,) + self.values.shape).astype(value.dtype)
        ones = jnp.ones(mask.shape[:3] + (p,), bool)
        return jnp.concatenate([k, key], 1), jnp.concatenate([v, value], 1), jnp.concatenate([ones, mask], -1)


def test_prefix_keys_get_alibi_positions_and_cache_equals_recomputation(checkpoint):
    """ALiBi is taken from the mask the attention_kv hook returns: prefix keys are positions
    0..p-1 and the tokens follow, with and without the KV cache."""
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    rs = np.random.RandomState(5)
    hook = Prefix(jnp.asarray(rs.randn(3, 6, 8), jnp.float32), jnp.asarray(rs.randn(3, 6, 8), jnp.float32))
    ids, mask = _prompt((2, 5))
    with hooks.use(hook):
        full = jax.jit(lambda p: model.apply(p, {"input_ids": ids, "attention_mask": mask}))(params)

        @jax.jit
        def stepwise(p):
            cache = generation.init_cache(model, 2, 5)
            logits, cache = model.module.apply({"params": p}, ids[:, :3], mask[:, :3], cache=cache)
            out = [logits]
            for t in (3, 4):
                logits, cache = model.module.apply({"params": p}, ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
                out.append(logits)
            return jnp.concatenate(out, 1)

        cached = stepwise(params)
    assert max_delta(cached, np.asarray(full), mask) <= 1e-5
    plain = run(model, params, {"input_ids": ids, "attention_mask": mask})
    assert max_delta(full, np.asarray(plain), mask) > 1e-3   # the prefix does change the output


def test_save_back_loads_in_transformers(checkpoint, tmp_path):
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    hf_io.save_pretrained(model, params, str(tmp_path / "out"))
    ref = transformers.BloomForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = padded_batch(VOCAB)
    delta = max_delta(run(model, params, {"input_ids": ids, "attention_mask": mask}),
                      torch_logits(ref, ids, mask), mask)
    assert delta <= TOL


def test_hook_sites_and_positions_refused(checkpoint):
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    recorder = hooks.Recorder()
    with hooks.use(recorder):
        jax.eval_shape(lambda p: model.apply(p, model.dummy_batch()), params)
    linear = [c["site"] for c in recorder.calls if c["point"] == "linear"]
    assert linear == [f"transformer.h.{i}.{s}" for i in range(2) for s in
                      ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                       "mlp.dense_4h_to_h")]
    assert [c["site"] for c in recorder.calls if c["point"] == "attention_kv"] == [
        "transformer.h.0.self_attention", "transformer.h.1.self_attention"]
    assert [(c["site"], c["kind"]) for c in recorder.calls if c["point"] == "block_output"][:2] == [
        ("transformer.h.0.self_attention", "attention"), ("transformer.h.0.mlp", "ffn")]
    assert [c["site"] for c in recorder.calls if c["point"] == "embeddings"] == ["transformer"]
    # Rematerialised blocks trace (train=True is a static argument of each block).
    for policy in (True, "block_dots"):   # every layers.REMAT_POLICIES name is honoured
        rematted = build_model(model.hf_config, head="causal_lm", remat=policy)
        grads = jax.eval_shape(jax.grad(lambda p: rematted.apply(
            p, rematted.dummy_batch(), train=True, rng=jax.random.PRNGKey(0)).sum()), params)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="remat"):
        build_model(model.hf_config, head="causal_lm", remat="sometimes").init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="ALiBi"):
        model.apply(params, model.dummy_batch(), positions=jnp.zeros((1, 8), jnp.int32))


def test_bloomz_7b1_has_the_published_size():
    model = build_model(model_configs.get("bloomz-7b1").hf_config.to_dict(), head="causal_lm")
    leaves = jax.tree_util.tree_leaves(model.abstract_params())
    assert sum(int(np.prod(x.shape)) for x in leaves) == 7_069_016_064
    # PEFT's default LoRA target on BLOOM is the fused query_key_value: 30·8·(4096 + 12288).
    lora = methods.create("lora", model, {"rank": 8})
    assert list(lora.targets) == [f"transformer.h.{i}.self_attention.query_key_value" for i in range(30)]
    assert methods.count_params(lora)["trainable_params"] == 3_932_160
