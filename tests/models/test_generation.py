"""KV-cached generation: equal to full recomputation, to transformers' greedy generate, padding-
and hook-aware; logits processing equal to transformers' warpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peftjax.models import build_model, generation, hf_io, hooks
from tests.helpers import assert_greedy_matches, left_padded

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=0.1)
NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random transformers Llama (GQA) saved as safetensors and loaded with hf_io."""
    config = transformers.LlamaConfig(**TINY)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama_gen")
    ref.save_pretrained(folder, safe_serialization=True)
    model, params = hf_io.load_pretrained(str(folder), head="causal_lm")
    return model, params, ref


def test_cached_greedy_equals_recomputation_and_transformers(tiny):
    model, params, ref = tiny
    ids, mask = left_padded()
    cached = assert_greedy_matches(model, params, ref, ids, mask, NEW)
    assert cached.shape == (3, 7 + NEW)
    np.testing.assert_array_equal(cached[:, :7], ids)


def test_left_padding_matches_unpadded_rows(tiny):
    model, params, _ = tiny
    ids, mask = left_padded()
    batched = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=()))
    for row, pad in ((1, 3), (2, 5)):
        alone = np.asarray(generation.generate(model, params, ids[row:row + 1, pad:], None, NEW,
                                               eos_token_id=()))
        np.testing.assert_array_equal(batched[row, 7:], alone[0, 7 - pad:])


def test_sampling_cached_equals_recomputation_and_is_deterministic(tiny):
    model, params, _ = tiny
    ids, mask = left_padded()
    kw = dict(temperature=1.5, top_p=0.9, eos_token_id=())
    rng = jax.random.PRNGKey(7)
    a = np.asarray(generation.generate(model, params, ids, mask, NEW, rng=rng, **kw))
    b = np.asarray(generation.generate(model, params, ids, mask, NEW, rng=rng, **kw))
    full = np.asarray(generation.generate(model, params, ids, mask, NEW, rng=rng, use_cache=False, **kw))
    other = np.asarray(generation.generate(model, params, ids, mask, NEW, rng=jax.random.PRNGKey(8), **kw))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, full)
    assert not np.array_equal(a, other)
    greedy = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=()))
    assert not np.array_equal(a, greedy)
    with pytest.raises(ValueError, match="rng"):
        generation.generate(model, params, ids, mask, NEW, temperature=1.0)


def test_stepwise_api_logits_match_full_forward(tiny):
    """prefill + decode_step give, at every step, the logits of a full forward pass (≤ 1e-5)."""
    model, params, _ = tiny
    ids, mask = left_padded()
    cache = generation.init_cache(model, 3, 7 + NEW)
    logits, cache = jax.jit(lambda p, c: generation.prefill(model, p, ids, mask, c))(params, cache)
    step = jax.jit(lambda p, t, c: generation.decode_step(model, p, t, c))
    step_logits, tokens = [], [ids]
    for _ in range(NEW):
        step_logits.append(logits)
        token = generation.sample_next(logits, None)
        tokens.append(np.asarray(token)[:, None])
        logits, cache = step(params, token, cache)
    tokens = np.concatenate(tokens, 1)
    masks = np.concatenate([mask, np.ones((3, NEW), np.int32)], 1)
    # Causality: one forward over the final sequence holds every step's next-token logits.
    full = model.apply(params, {"input_ids": tokens, "attention_mask": masks})
    worst = float(jnp.max(jnp.abs(jnp.stack(step_logits, 1) - full[:, 6:6 + NEW])))
    print(f"cached vs full-forward logits over {NEW} steps: max|Δ|={worst:.2e}")
    assert worst <= 1e-5
    assert int(cache.index) == 7 + NEW and cache.prefilled and cache.max_len == 7 + NEW
    np.testing.assert_array_equal(np.asarray(cache.next_position), masks.sum(1))
    # generate runs the same loop (greedy).
    out = generation.generate(model, params, ids, mask, NEW, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(out), tokens)


def test_eos_stops_rows_and_pads(tiny):
    model, params, _ = tiny
    ids, mask = left_padded()
    free = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=()))[:, 7:]
    eos = int(free[0, 2])  # row 0 emits this token at step 2
    out = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=eos,
                                         pad_token_id=127))[:, 7:]
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        stop = hits[0] if hits.size else NEW
        np.testing.assert_array_equal(out[row, :stop + 1], free[row, :stop + 1])
        assert (out[row, stop + 1:] == 127).all()
    assert out[0, 2] == eos and (out[0, 3:] == 127).all()


def test_top_p_matches_transformers_warper():
    rs = np.random.RandomState(0)
    logits = rs.randn(4, 50).astype(np.float32) * 3
    for top_p in (0.05, 0.3, 0.9, 0.999):
        ours = np.asarray(generation.top_p_filter(jnp.asarray(logits), top_p))
        warper = transformers.generation.logits_process.TopPLogitsWarper(top_p)
        expected = warper(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
        np.testing.assert_array_equal(ours[~np.isinf(ours)], logits[~np.isinf(expected)])
        kept = jax.nn.softmax(jnp.asarray(logits), -1) * ~np.isinf(ours)
        assert (np.asarray(kept.sum(-1)) >= top_p - 1e-6).all()
    # top_p tiny keeps only the argmax: sampling equals greedy.
    token = generation.sample_next(jnp.asarray(logits), jax.random.PRNGKey(0), temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(token), logits.argmax(-1))
    np.testing.assert_allclose(np.asarray(generation.process_logits(jnp.asarray(logits), 2.0)), logits / 2)


class PromptHook(hooks.Hooks):
    """Prompt tuning: prepends virtual-token embeddings."""

    def __init__(self, prompt):
        self.prompt = prompt

    def embeddings(self, module, embeds, attention_mask, token_type_ids):
        b, n = embeds.shape[0], self.prompt.shape[0]
        prompt = jnp.broadcast_to(self.prompt, (b,) + self.prompt.shape).astype(embeds.dtype)
        mask = jnp.concatenate([jnp.ones((b, n), attention_mask.dtype), attention_mask], 1)
        return jnp.concatenate([prompt, embeds], 1), mask, token_type_ids


class PrefixHook(hooks.Hooks):
    """Prefix tuning: prepends per-layer key/value prefixes (always attended)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def attention_kv(self, module, key, value, mask):
        b, _, kvh, d = key.shape
        layer = int(hooks.site(module).split(".")[2])
        pk, pv = jax.random.normal(jax.random.PRNGKey(self.seed + layer), (2, 1, self.n, kvh, d))
        pk, pv = (jnp.broadcast_to(x, (b, self.n, kvh, d)).astype(key.dtype) for x in (pk, pv))
        pm = jnp.ones(mask.shape[:-1] + (self.n,), bool)
        return (jnp.concatenate([pk, key], 1), jnp.concatenate([pv, value], 1),
                jnp.concatenate([pm, mask], -1))


def test_generation_through_hooks(tiny):
    model, params, _ = tiny
    ids, mask = left_padded()
    prefix = np.array([[5, 17, 33]], np.int32)
    prompt = params["model"]["embed_tokens"]["embedding"][prefix[0]]
    with hooks.use(PromptHook(prompt)):
        cached = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=()))
        full = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=(),
                                              use_cache=False))
    np.testing.assert_array_equal(cached, full)
    assert type(hooks.active()) is hooks.Hooks
    # Virtual tokens equal to real embeddings behave as those tokens placed before the prompt
    # (after the left padding, where a prompt method's tokens sit in attention terms).
    real = np.concatenate([prefix[0], ids[1, 3:]])[None]  # row 1 is left-padded by 3
    expected = np.asarray(generation.generate(model, params, real, None, NEW, eos_token_id=()))
    np.testing.assert_array_equal(cached[1, 7:], expected[0, real.shape[1]:])

    with hooks.use(PrefixHook(2)):
        cached = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=()))
        full = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=(),
                                              use_cache=False))
    np.testing.assert_array_equal(cached, full)
    plain = np.asarray(generation.generate(model, params, ids, mask, NEW, eos_token_id=()))
    assert not np.array_equal(cached, plain)  # the prefixes did act


def test_bf16_cache_and_proxy_style_combination(tiny):
    """bf16 compute keeps a bf16 cache; logits of several models can be combined step-wise."""
    model, params, _ = tiny
    ids, mask = left_padded()
    bf16 = build_model(model.hf_config, head="causal_lm", dtype=jnp.bfloat16)
    cache = generation.init_cache(bf16, 3, 7 + 2)
    assert cache.keys[0].dtype == jnp.bfloat16 and cache.keys[0].shape == (3, 9, 2, 16)
    logits16, cache16 = jax.jit(lambda p, c: generation.prefill(bf16, p, ids, mask, c))(params, cache)
    logits32, _ = jax.jit(lambda p, c: generation.prefill(model, p, ids, mask, c))(
        params, generation.init_cache(model, 3, 9))
    combined = logits32 + (logits16 - logits32)  # proxy tuning: base + (expert - anti-expert)
    token = generation.sample_next(combined, None)
    assert token.shape == (3,) and float(jnp.max(jnp.abs(logits16 - logits32))) < 0.1
