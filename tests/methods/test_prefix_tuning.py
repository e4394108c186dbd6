"""Prefix tuning: exact counts on real architectures, folding, padding, the KV cache, HF PEFT parity.

The shared contract (tests/methods/test_contract.py) covers the plain prefixes; this file covers
the reparameterisation MLP (training through it, folding it away) and the decoding paths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.methods import saving
from peftjax.models import build_model, generation, hooks
from peftjax.train import init_state, make_train_step
from tests.helpers import learnable_batch, tiny_model

NEW = 6


@functools.lru_cache(maxsize=None)
def abstract_model(name: str, head: str, num_labels: int | None = None):
    return build_model(model_configs.get(name).hf_config.to_dict(), head=head, num_labels=num_labels)


def abstract_count(model_name: str, head: str, method: str, config: dict, num_labels=None):
    m = methods.create(method, abstract_model(model_name, head, num_labels), config)
    return m, methods.count_params(m)


@pytest.mark.parametrize("p", [10, 30])
def test_count_on_llama2_7b_and_roberta_base(p):
    m, counts = abstract_count("llama2-7b", "causal_lm", "prefix_tuning", {"num_virtual_tokens": p})
    L, kv_heads, head_dim = 32, 32, 128
    assert counts["trainable_params"] == 2 * L * p * (kv_heads * head_dim)     # after folding
    d = kv_heads * head_dim   # training: embedding + Linear(d, d) + Linear(d, 2Ld), PEFT's shape
    assert m.training_params() == p * d + d * d + d + d * 2 * L * d + 2 * L * d
    m, counts = abstract_count("roberta-base", "classification", "prefix_tuning",
                               {"num_virtual_tokens": p, "encoder_hidden_size": 512}, num_labels=3)
    assert counts["trainable_params"] == 2 * 12 * p * 768
    assert m.training_params() == p * 768 + 768 * 512 + 512 + 512 * 2 * 12 * 768 + 2 * 12 * 768


def test_prefix_heads_follow_grouped_query_attention():
    model, _ = tiny_model("llama")           # 4 query heads, 2 key/value heads, head_dim 8
    m = methods.create("prefix_tuning", model, {"num_virtual_tokens": 3, "prefix_projection": False})
    added = m.init(jax.random.PRNGKey(0), None, methods.InitContext())
    assert {v.shape for v in added.values()} == {(3, 2, 8)}
    table = m.prefix_table(added)          # PEFT's (p, 2·L·d) layout, and back
    assert table.shape == (3, 2 * 2 * 16)
    np.testing.assert_array_equal(table[:, 16:32].reshape(3, 2, 8),
                                  added["model.layers.0.self_attn.prefix_value"])
    assert all(np.array_equal(v, added[k]) for k, v in m._split(table).items())
    assert methods.count_params(m)["trainable_params"] == 2 * 2 * 3 * 2 * 8


def test_prompt_tuning_100_tokens_on_llama2_7b():
    _, counts = abstract_count("llama2-7b", "causal_lm", "prompt_tuning",
                               {"num_virtual_tokens": 100, "init": "random"})
    assert counts["trainable_params"] == 409_600


@pytest.mark.parametrize("cfg,field", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"encoder_hidden_size": -1}, "encoder_hidden_size"),
    ({"prefix_projection": "yes"}, "prefix_projection"),
])
def test_bad_config_names_field(cfg, field):
    model, _ = tiny_model("bert")
    with pytest.raises(ValueError, match=f"prefix_tuning.{field}="):
        methods.create("prefix_tuning", model, cfg)


@pytest.fixture(scope="module", params=["bert", "llama"])
def trained(request):
    """The MLP-reparameterised method trained a few steps on a tiny model of each family."""
    model, base = tiny_model(request.param)
    m = methods.create("prefix_tuning", model, {"num_virtual_tokens": 4, "encoder_hidden_size": 16})
    peft = m.setup(jax.random.PRNGKey(1), base)
    batch = learnable_batch(model)
    tx = optax.adam(1e-2)
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(m, tx, seed=0))
    losses = []
    for _ in range(12):
        state, metrics = step(state, peft.frozen, batch)
        losses.append(float(metrics["loss"]))
    return m, peft, state, batch, losses


def test_trains_through_the_mlp(trained):
    m, peft, state, _, losses = trained
    assert losses[-1] < 0.9 * losses[0], losses
    real = sum(int(np.prod(v.shape)) for v in peft.trainable["added"].values())
    assert real == m.training_params() > methods.count_params(m)["trainable_params"]
    for name in ("embedding", "transform.0.kernel", "transform.2.kernel"):
        key = f"prefix_encoder.{name}"
        assert not np.array_equal(state.trainable["added"][key], peft.trainable["added"][key]), key


def test_folding_keeps_outputs_and_saves_plain_prefixes(trained, tmp_path):
    m, peft, state, batch, _ = trained
    out = m.apply(state.trainable, peft.frozen, state.method_state, batch)
    folded, trainable = m.folded(), m.fold_trainable(state.trainable)
    assert not folded.config.prefix_projection
    assert sum(int(np.prod(v.shape)) for v in trainable["added"].values()) == \
        methods.count_params(m)["trainable_params"]
    np.testing.assert_allclose(folded.apply(trainable, peft.frozen, {}, batch), out, atol=1e-6)
    # The prefixes are the MLP's output, split per layer as PEFT's past_key_values (L, 2, kvh, hd).
    a = state.trainable["added"]
    g = lambda n: np.asarray(a[f"prefix_encoder.{n}"], np.float64)
    table = np.tanh(g("embedding") @ g("transform.0.kernel") + g("transform.0.bias")) \
        @ g("transform.2.kernel") + g("transform.2.bias")
    kv = table.reshape(4, len(m.layers), 2, m.kv_heads, m.head_dim)
    np.testing.assert_allclose(trainable["added"][f"{m.layers[-1]}.prefix_value"], kv[:, -1, 1], atol=1e-5)
    # Saved adapters hold the folded prefixes only, and load as the plain-prefix method.
    saving.save_adapter(str(tmp_path), m, state.trainable, state.method_state)
    loaded, tree, _, frozen = saving.load_adapter(str(tmp_path), m.model, tiny_model(
        "llama" if m.model.head == "causal_lm" else "bert")[1])
    assert not loaded.config.prefix_projection
    assert set(tree["added"]) == set(trainable["added"])
    np.testing.assert_allclose(loaded.apply(tree, frozen, {}, batch), out, atol=1e-6)


def test_padding_does_not_change_a_row(trained):
    """Prefix columns are always visible, pads never: a padded row equals the row alone."""
    m, peft, state, batch, _ = trained
    ids = np.asarray(batch["input_ids"][:2])
    mask = np.ones_like(ids)
    mask[1, 8:] = 0                    # right padding (classification / training layout)
    run = lambda b: np.asarray(jax.jit(lambda t, b: m.apply(t, peft.frozen, {}, b))(state.trainable, b))
    padded = {**{k: v[:2] for k, v in batch.items() if k in ("input_ids", "token_type_ids")},
              "attention_mask": mask}
    alone = {k: v[1:2, :8] for k, v in padded.items()}
    out, ref = run(padded), run(alone)
    if out.ndim == 3:   # causal LM: the valid positions
        out = out[:, :8]
    np.testing.assert_allclose(out[1:2], ref, atol=1e-5)


# --------------------------------------------------------------------------- generation


def _generator(m, frozen, use_cache: bool, temperature: float = 0.0):
    """One compiled generate under the method's hooks (jax cannot see hooks in its cache key)."""
    @jax.jit
    def gen(trainable, ids, mask, rng):
        params = traverse_util.unflatten_dict(m.effective_base(trainable, frozen, {}), sep=".")
        with hooks.use(m.hooks(trainable["added"], {}, train=False, rng=None)):
            return generation.generate(m.model, params, ids, mask, NEW, eos_token_id=(),
                                       temperature=temperature, rng=rng, use_cache=use_cache)
    return lambda t, ids, mask, rng=None: np.asarray(gen(t, ids, mask, rng))


def test_cached_generation_equals_recomputation_and_is_seeded(trained):
    m, peft, state, _, _ = trained
    if m.model.head != "causal_lm":
        pytest.skip("generation is for the decoder")
    rs = np.random.RandomState(0)
    ids = rs.randint(5, 200, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0                    # left padding (batched generation layout)
    t, frozen = state.trainable, peft.frozen
    cached, full = _generator(m, frozen, True), _generator(m, frozen, False)
    greedy = cached(t, ids, mask)
    np.testing.assert_array_equal(greedy, full(t, ids, mask))
    alone = cached(t, ids[1:, 3:], np.ones((1, 4), np.int32))   # the padded row unpadded
    np.testing.assert_array_equal(greedy[1, 7:], alone[0, 4:])
    sampled = _generator(m, frozen, True, 1.0)
    a = sampled(t, ids, mask, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(a, sampled(t, ids, mask, jax.random.PRNGKey(3)))
    assert not np.array_equal(a, sampled(t, ids, mask, jax.random.PRNGKey(4)))

    # Step by step: every cached step's logits equal one full forward over the final sequence,
    # and the prefixes never enter the cache (it holds exactly the real slots).
    params = traverse_util.unflatten_dict(m.effective_base(t, frozen, {}), sep=".")
    bound = m.hooks(t["added"], {}, train=False, rng=None)

    @jax.jit
    def prefill(ids, cache):
        with hooks.use(bound):
            return generation.prefill(m.model, params, ids, mask, cache)

    @jax.jit
    def step(tok, cache):
        with hooks.use(bound):
            return generation.decode_step(m.model, params, tok, cache)

    logits, cache = prefill(ids, generation.init_cache(m.model, 2, 7 + NEW))
    steps = [logits]
    for tok in greedy[:, 7:-1].T:
        logits, cache = step(jnp.asarray(tok), cache)
        steps.append(logits)
    assert cache.max_len == 7 + NEW and int(cache.index) == 7 + NEW - 1
    full_mask = np.concatenate([mask, np.ones((2, NEW - 1), np.int32)], 1)
    whole = jax.jit(lambda t: m.apply(t, frozen, {}, {"input_ids": greedy[:, :-1],
                                                      "attention_mask": full_mask}))(t)
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(whole)[:, 6:], atol=1e-5)
    plain = jax.jit(lambda: m.model.apply(params, {"input_ids": greedy[:, :-1],
                                                                  "attention_mask": full_mask}))()
    assert float(jnp.max(jnp.abs(plain - whole))) > 1e-3   # the prefixes do act


# --------------------------------------------------------------------------- HF PEFT parity


def test_matches_hf_peft_prefix_tuning_on_gqa_llama(tmp_path):
    """Same weights in PEFT's PrefixEncoder (prefix_projection=True) and ours: logits ≤ 1e-4.

    PEFT hands the prefixes to transformers as a p-long ``past_key_values`` cache, so by default
    transformers numbers the real tokens from p; we number them from 0 (the prefixes are not
    tokens). Both ways are checked: PEFT's prefix cache with positions from 0 against our
    default, and PEFT's default forward against ours given positions from p.
    """
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peftjax.models import hf_io

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.1)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = hf_io.load_pretrained(str(tmp_path), head="causal_lm")
    p = 3
    m = methods.create("prefix_tuning", model, {"num_virtual_tokens": p, "encoder_hidden_size": 24})
    pp = m.setup(jax.random.PRNGKey(2), hf_io.flatten(params))
    pm = peft.get_peft_model(ref, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=True,
        encoder_hidden_size=24)).eval()
    enc = pm.prompt_encoder["default"]
    a = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in pp.trainable["added"].items()}
    with torch.no_grad():
        enc.embedding.weight.copy_(a["prefix_encoder.embedding"])
        for i in (0, 2):
            enc.transform[i].weight.copy_(a[f"prefix_encoder.transform.{i}.kernel"].T)
            enc.transform[i].bias.copy_(a[f"prefix_encoder.transform.{i}.bias"])
    rs = np.random.RandomState(1)
    ids = rs.randint(3, 128, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0                    # right padding
    batch = {"input_ids": ids, "attention_mask": mask}
    t_ids, t_mask = (torch.from_numpy(x.astype(np.int64)) for x in (ids, mask))
    valid = mask.astype(bool)
    delta = lambda x, y: float(np.abs(np.asarray(x) - y)[valid].max())

    ours = m.apply(pp.trainable, pp.frozen, pp.state, batch)
    with torch.no_grad():           # PEFT's prefix cache, tokens at positions 0..8
        cache = pm.get_prompt(batch_size=2)
        theirs = ref(input_ids=t_ids, past_key_values=cache, position_ids=torch.arange(9)[None],
                     attention_mask=torch.cat([torch.ones(2, p, dtype=torch.long), t_mask], 1)).logits
    assert delta(ours, theirs.numpy()) <= 1e-4

    shifted = m.apply(pp.trainable, pp.frozen, pp.state, batch,
                      positions=jnp.broadcast_to(jnp.arange(p, p + 9), (2, 9)))
    with torch.no_grad():           # PEFT's own forward (tokens at positions p..p+8)
        theirs = pm(input_ids=t_ids, attention_mask=t_mask).logits.numpy()
    assert delta(shifted, theirs) <= 1e-4
    assert delta(ours, theirs) > 1e-3   # the numbering does matter (prefix keys are unrotated)


@pytest.mark.parametrize("window", [None, 6])
def test_matches_hf_peft_on_sliding_window_layers(window, tmp_path):
    """Mistral with a window shorter than prefix + sequence: PEFT's prefixes are the cache's first
    p slots, so the window stops reaching them W - p tokens in; ours do the same (``windowed``,
    the default). Right-padded batch, PEFT's own forward (positions from p); cached greedy
    decoding equals recomputation with the windowed prefixes."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peftjax.models import hf_io

    config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, initializer_range=0.1,
                                        sliding_window=window)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.MistralForCausalLM(config).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = hf_io.load_pretrained(str(tmp_path), head="causal_lm")
    p, n = 3, 9
    m = methods.create("prefix_tuning", model, {"num_virtual_tokens": p, "prefix_projection": False})
    pp = m.setup(jax.random.PRNGKey(2), hf_io.flatten(params))
    pm = peft.get_peft_model(ref, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(
            torch.from_numpy(np.asarray(m.prefix_table(pp.trainable["added"]))))
    ids = np.random.RandomState(1).randint(3, 128, (2, n)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    positions = jnp.broadcast_to(jnp.arange(p, p + n), (2, n))
    ours = np.asarray(m.apply(pp.trainable, pp.frozen, pp.state, batch, positions=positions))
    with torch.no_grad():
        theirs = pm(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
    delta = float(np.abs(ours - theirs)[mask.astype(bool)].max())
    print(f"prefix tuning vs PEFT, Mistral window {window}: max|Δ| {delta:.2e}")
    assert delta <= 1e-4
    always = methods.create("prefix_tuning", model, {"num_virtual_tokens": p, "prefix_projection": False,
                                                     "windowed": False})
    other = np.asarray(always.apply(pp.trainable, pp.frozen, pp.state, batch, positions=positions))
    gap = np.abs(other - ours).max(axis=(0, 2))
    if window is None:
        assert gap.max() == 0
    else:   # the same until token W - p, different after (the prefixes left the window)
        assert gap[:window - p].max() == 0 and gap[window - p:].min() > 1e-3

    if window is not None:
        gen = _generator(m, pp.frozen, True)
        full = _generator(m, pp.frozen, False)
        left = np.ones_like(ids[:, :7])
        left[1, :2] = 0
        np.testing.assert_array_equal(gen(pp.trainable, ids[:, :7], left), full(pp.trainable, ids[:, :7], left))
