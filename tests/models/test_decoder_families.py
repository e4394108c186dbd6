"""Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 (text): parity with transformers' PyTorch models, generation, save back.

Each family gets a tiny random transformers checkpoint written by the test (fp32, eager
attention) whose config exercises what the family adds to Llama: Qwen2's q/k/v biases and tied
embeddings, Qwen3's per-head q/k norms and a head_dim != hidden / heads, and sliding windows
shorter than the sequences (Mistral's on every layer, Qwen's on the layers from
``max_window_layers`` on, Gemma 2's on even layers), and Gemma 2's scaled embeddings,
zero-centred sandwich norms, query_pre_attn_scalar and soft-caps small enough to bite, Gemma 3's
q/k norms and two RoPE configs (local / global). Logits are compared on padded batches at real tokens (max |Δ| <=
1e-4), cached greedy generation against full recomputation and transformers' ``generate``, and
the folder ``hf_io.save_pretrained`` writes is loaded back by transformers.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from peftjax.models import build_model, generation, hf_io, hooks
from tests.helpers import assert_greedy_matches, left_padded
from tests.models.test_llama import max_delta, padded_batch, positions_from, run, torch_logits

TOL = 1e-4
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.1)
# Windows of 4-5 slots: shorter than the 12-token batches and the 7 + 8 generated tokens.
CONFIGS = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                   tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=32, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=4)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # Two RoPE configs: linear interpolation on the global layer, another base on the local one.
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}
# Settings with every window at least as long as the sequences (the released configs).
NO_WINDOW = {"qwen2": {"use_sliding_window": False}, "qwen3": {"use_sliding_window": False},
             "mistral": {"sliding_window": None}, "gemma2": {"sliding_window": 4096},
             "gemma3": {"sliding_window": 4096}}
FAMILIES = sorted(CONFIGS)


def hf_config(family: str, **overrides):
    config_cls, _, extra = CONFIGS[family]
    config = config_cls(**{**SMALL, **extra, **overrides})
    config._attn_implementation = "eager"
    return config


def hf_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = CONFIGS[family][1](hf_config(family, **overrides)).eval()
    with torch.no_grad():  # transformers zero-initialises biases: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(f"{family}_tiny")
    ref = hf_model(family)
    ref.save_pretrained(folder, safe_serialization=True)
    model, params = hf_io.load_pretrained(str(folder), head="causal_lm")
    return family, ref, model, params


def test_padded_batch_parity_names_and_save_back(checkpoint, tmp_path):
    family, ref, model, params = checkpoint
    assert model.family.name == family
    c = model.config
    windows = [c.attention_window(i) for i in range(c.num_hidden_layers)]
    assert windows == {"qwen2": [None, 4], "qwen3": [None, 5], "mistral": [4, 4],
                       "gemma2": [4, None], "gemma3": [4, None]}[family]
    ropes = [(r.rope_theta, r.rope_type) for r in map(c.rope_for_layer, range(c.num_hidden_layers))]
    assert ropes == ([(100.0, "default"), (1e6, "linear")] if family == "gemma3"
                     else [(c.rope_theta, "default")] * 2)
    names = {hf_io.hf_name(p)[0] for p in hf_io.flatten(params)}
    assert names == set(ref.state_dict()) - ({"lm_head.weight"} if c.tie_word_embeddings else set())
    ids, mask = padded_batch(128)
    batch = {"input_ids": ids, "attention_mask": mask}
    ours = np.asarray(run(model, params, batch))
    delta = max_delta(ours, torch_logits(ref, ids, mask, positions_from(mask)), mask)
    print(f"{family} parity padded batch (sliding windows {windows}): max|Δ|={delta:.2e}")
    assert delta <= TOL
    # The window matters here: without it the logits differ.
    off = {k: v for k, v in model.hf_config.to_dict().items() if k != "layer_types"}
    full = build_model(off | {"sliding_window": 1000}, head="causal_lm")
    assert all((full.config.attention_window(i) or 1000) == 1000 for i in range(c.num_hidden_layers))
    assert np.abs(np.asarray(run(full, params, batch)) - ours)[mask.astype(bool)].max() > 1e-3
    if family == "gemma2":  # and so do the soft-caps
        uncapped = build_model(model.hf_config.to_dict() | {"attn_logit_softcapping": None,
                                                           "final_logit_softcapping": None},
                               head="causal_lm")
        assert np.abs(np.asarray(run(uncapped, params, batch)) - ours)[mask.astype(bool)].max() > 1e-3

    hf_io.save_pretrained(model, params, str(tmp_path / "back"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"),
                                                             attn_implementation="eager").eval()
    assert type(back) is type(ref)
    delta = max_delta(ours, torch_logits(back, ids, mask, positions_from(mask)), mask)
    assert delta <= TOL


@pytest.mark.parametrize("checkpoint", [f if f in ("qwen2", "mistral") else
                                        pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
                         indirect=True)
def test_full_attention_parity(checkpoint):
    """The released configs' setting: no window shorter than the sequence (Qwen's
    use_sliding_window false, Mistral v0.3's sliding_window null, Gemma 2's 4096); untied here."""
    family = checkpoint[0]
    ref = hf_model(family, seed=1, tie_word_embeddings=False, **NO_WINDOW[family])
    model = build_model(ref.config, head="causal_lm")
    params, _ = hf_io.params_from_tensors(model, {k: v.numpy() for k, v in ref.state_dict().items()})
    assert all((model.config.attention_window(i) or 4096) == 4096 for i in range(2))
    ids, mask = padded_batch(128, seed=3)
    delta = max_delta(run(model, params, {"input_ids": ids, "attention_mask": mask}),
                      torch_logits(ref, ids, mask, positions_from(mask)), mask)
    print(f"{family} parity full attention: max|Δ|={delta:.2e}")
    assert delta <= TOL


NEW = 8
# Generation is the same code for every family (the Llama model's cache and masks): `make test`
# runs it on Mistral (a window on every layer) and Gemma 3 (local / global layers, two RoPE
# configs, q/k norms); the other families under -m slow (time budget).
GENERATION_FAST = ("mistral", "gemma3")
generation_families = pytest.mark.parametrize(
    "checkpoint", [f if f in GENERATION_FAST else pytest.param(f, marks=pytest.mark.slow)
                   for f in FAMILIES], indirect=True)


@generation_families
def test_cached_greedy_equals_recomputation_and_transformers(checkpoint):
    family, ref, model, params = checkpoint
    ids, mask = left_padded()
    assert_greedy_matches(model, params, ref, ids, mask, NEW)


@generation_families
def test_cached_logits_equal_full_forward(checkpoint):
    """prefill + decode_step logits equal one forward over the final sequence (≤ 1e-5): the
    window hides the same slots in the cache as in the full pass."""
    family, _, model, params = checkpoint
    ids = np.random.RandomState(2).randint(3, 128, (2, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    cache = generation.init_cache(model, 2, 6 + NEW)
    logits, cache = jax.jit(lambda p, c: generation.prefill(model, p, ids, mask, c))(params, cache)
    step = jax.jit(lambda p, t, c: generation.decode_step(model, p, t, c))
    collected, tokens = [], [ids]
    for _ in range(NEW):
        collected.append(np.asarray(logits))
        token = generation.sample_next(logits, None)
        tokens.append(np.asarray(token)[:, None])
        logits, cache = step(params, token, cache)
    seq = np.concatenate(tokens, 1)
    masks = np.concatenate([mask, np.ones((2, NEW), np.int32)], 1)
    full = np.asarray(run(model, params, {"input_ids": seq, "attention_mask": masks}))
    worst = float(np.abs(np.stack(collected, 1) - full[:, 5:5 + NEW]).max())
    print(f"{family} cached vs full-forward logits over {NEW} steps: max|Δ|={worst:.2e}")
    assert worst <= 1e-5


def test_sequence_classification_parity(checkpoint):
    family = checkpoint[0]
    cls = getattr(transformers, {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral",
                                  "gemma2": "Gemma2", "gemma3": "Gemma3Text"}[family]
                  + "ForSequenceClassification")
    torch.manual_seed(0)
    ref = cls(hf_config(family, num_labels=3, pad_token_id=0)).eval()
    model = build_model(ref.config, head="classification", num_labels=3)
    params, fresh = hf_io.params_from_tensors(model, {k: v.numpy() for k, v in ref.state_dict().items()})
    assert fresh == [] and model.head_prefixes == ("score",)
    ids, mask = padded_batch(128)
    ours = np.asarray(run(model, params, {"input_ids": ids, "attention_mask": mask}))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions_from(mask))).logits.numpy()
    delta = float(np.abs(ours - expected).max())
    print(f"{family} parity sequence classification: max|Δ|={delta:.2e}")
    assert delta <= TOL


def test_hook_sites_cover_the_new_weights(checkpoint):
    family, _, model, params = checkpoint
    recorder = hooks.Recorder()
    with hooks.use(recorder):
        jax.eval_shape(lambda p: model.apply(p, model.dummy_batch()), params)
    linear = [c for c in recorder.calls if c["point"] == "linear"]
    assert [c["site"] for c in linear[:7]] == [f"model.layers.0.{s}" for s in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    biased = {c["site"].rpartition(".")[2] for c in linear if c["has_bias"]}
    assert biased == ({"q_proj", "k_proj", "v_proj"} if family == "qwen2" else set())
    flat = hf_io.flatten(params)
    if family in ("qwen3", "gemma3"):
        d = model.config.head_dim
        assert flat["model.layers.0.self_attn.q_norm.scale"].shape == (d,)
        assert flat["model.layers.1.self_attn.k_norm.scale"].shape == (d,)
    else:
        assert not any("q_norm" in k for k in flat)


def test_config_errors_are_clear():
    from peftjax.models import qwen2

    class Hf:  # a config object as transformers' (which validates layer_types itself)
        num_hidden_layers, sliding_window, layer_types = 2, 4, ["full_attention", "chunked_attention"]

    with pytest.raises(ValueError, match="unsupported layer_types"):
        qwen2.layer_pattern(Hf())
    Hf.layer_types, Hf.sliding_window = ["sliding_attention"] * 2, None
    with pytest.raises(ValueError, match="sliding_window is not set"):
        qwen2.layer_pattern(Hf())
    del Hf.layer_types
    Hf.sliding_window, Hf.max_window_layers = 4, 1   # older transformers: derived as v5 does
    assert qwen2.layer_pattern(Hf()) == (4, ("full_attention", "sliding_attention"))
