"""Llama family: parity with transformers' PyTorch LlamaForCausalLM, checkpoints, hooks, sizes.

Tiny random checkpoints are written with transformers/torch (fp32, eager attention), loaded with
``hf_io`` and compared on padded batches at the real-token positions (max |Δ| <= 1e-4).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peftjax.models import build_model, hf_io, hooks, llama

TOL = 1e-4
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.1)


def hf_config(**overrides) -> transformers.LlamaConfig:
    kwargs = dict(SMALL)
    kwargs.update(overrides)
    config = transformers.LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def hf_model(config, cls=transformers.LlamaForCausalLM, seed: int = 0):
    torch.manual_seed(seed)
    return cls(config).eval()


def from_torch(model: torch.nn.Module, head: str = "causal_lm", **kwargs):
    """Our model + params from a torch model's state dict (the hf_io name mapping, no disk)."""
    ours = build_model(model.config, head=head, **kwargs)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params, fresh = hf_io.params_from_tensors(ours, tensors)
    assert fresh == []
    return ours, params


def padded_batch(vocab: int, batch: int = 3, length: int = 12, seed: int = 0):
    """Row 0 full, row 1 left-padded by 4, row 2 right-padded by 3."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, :4] = 0
    mask[2, length - 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def positions_from(mask: np.ndarray) -> np.ndarray:
    """What our model uses by default and transformers' generate computes for padded rows."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def torch_logits(model, ids, mask, positions=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if positions is None else {"position_ids": torch.tensor(positions)}
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    return out.logits.numpy()


_JITTED: dict = {}


def run(model, params, batch, *, train: bool = False, rng=None):
    """``model.apply`` under jit (op-by-op dispatch is much slower on CPU). Compiled once per
    (model, train, active hooks): jax's own cache cannot see which hooks are active."""
    key = (model, train, hooks.active())
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, b, r: model.apply(p, b, train=train, rng=r))
    return _JITTED[key](params, batch, rng)


def max_delta(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours) - ref)[np.asarray(mask).astype(bool)].max())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_tiny")
    model = hf_model(hf_config())
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder), model


def test_checkpoint_parity_padded_batch(checkpoint):
    folder, ref_model = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    assert model.family.name == "llama" and model.config.num_key_value_heads == 2
    ids, mask = padded_batch(model.config.vocab_size)
    ours = run(model, params, {"input_ids": ids, "attention_mask": mask})
    assert ours.shape == (3, 12, 128) and ours.dtype == jnp.float32
    delta = max_delta(ours, torch_logits(ref_model, ids, mask, positions_from(mask)), mask)
    print(f"parity padded batch (GQA, untied): max|Δ|={delta:.2e}")
    assert delta <= TOL
    # Rows without left padding also match transformers' default positions (arange).
    rows = [0, 2]
    delta = max_delta(np.asarray(ours)[rows], torch_logits(ref_model, ids[rows], mask[rows]), mask[rows])
    assert delta <= TOL


def test_param_names_follow_hugging_face(checkpoint):
    folder, ref_model = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    names = {hf_io.hf_name(p)[0] for p in hf_io.flatten(params)}
    assert names == set(ref_model.state_dict())
    assert "model.layers.1.self_attn.k_proj.weight" in names and "lm_head.weight" in names
    assert model.head_prefixes == () and model.backbone_prefix == "model"


def test_tied_embeddings_parity():
    ref = hf_model(hf_config(tie_word_embeddings=True))
    model, params = from_torch(ref)
    assert "lm_head" not in params
    ids, mask = padded_batch(128)
    delta = max_delta(run(model, params, {"input_ids": ids, "attention_mask": mask}),
                      torch_logits(ref, ids, mask, positions_from(mask)), mask)
    print(f"parity tied embeddings: max|Δ|={delta:.2e}")
    assert delta <= TOL


ROPE_VARIANTS = {
    "llama3": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=16)),
    "linear": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    # max_position_embeddings 8 < sequence length 12, so the NTK base actually changes.
    "dynamic": dict(max_position_embeddings=8,
                    rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    "yarn": dict(max_position_embeddings=64,
                 rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                      original_max_position_embeddings=16)),
    # head_dim 32 != hidden 64 / 4 heads
    "head_dim": dict(head_dim=32),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_variants_and_head_dim_parity(variant):
    ref = hf_model(hf_config(**ROPE_VARIANTS[variant]))
    model, params = from_torch(ref)
    if variant == "head_dim":
        assert model.config.head_dim == 32
        assert params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape == (64, 128)
    else:
        assert model.config.rope_type == variant
    ids, mask = padded_batch(128)
    ours = run(model, params, {"input_ids": ids, "attention_mask": mask})
    delta = max_delta(ours, torch_logits(ref, ids, mask, positions_from(mask)), mask)
    print(f"parity rope/{variant}: max|Δ|={delta:.2e}")
    assert delta <= TOL
    if variant != "head_dim":  # the inverse frequencies are transformers' to float32 rounding
        rotary = ref.model.rotary_emb
        if variant == "dynamic":
            with torch.no_grad():
                rotary(torch.zeros(1), torch.arange(12)[None])  # grows its inv_freq to length 12
            ours_inv, _ = llama.rope_inv_freq(model.config, 12)
        else:
            ours_inv, scale = llama.rope_inv_freq(model.config)
            assert scale == pytest.approx(rotary.attention_scaling)
        np.testing.assert_allclose(np.asarray(ours_inv), rotary.inv_freq.numpy(), rtol=1e-6)


def test_config_from_v4_and_v5_rope_forms():
    v4 = dict(model_type="llama", hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
              rope_scaling={"type": "linear", "factor": 2.0})
    c4 = build_model(v4).config
    assert (c4.rope_theta, c4.rope_type, c4.rope_param("factor")) == (500000.0, "linear", 2.0)

    class OldConfig:  # a transformers-4 style object: rope_theta + rope_scaling attributes
        hidden_size, num_attention_heads, rope_theta = 64, 4, 1e6
        rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        eos_token_id = [128001, 128009]

    c = llama.LlamaConfig.from_hf(OldConfig())
    assert c.rope_theta == 1e6 and c.rope_type == "llama3" and c.eos_token_id == (128001, 128009)
    assert c.head_dim == 16 and c.num_key_value_heads == 4
    hash(c)  # static-argument friendly
    c5 = llama.LlamaConfig.from_hf(hf_config())
    assert (c5.rope_theta, c5.rope_type, c5.rope_scaling) == (10000.0, "default", ())
    with pytest.raises(ValueError, match="rope_type"):
        llama.LlamaConfig.from_hf(type("C", (), {"rope_scaling": {"rope_type": "mrope-x"}})())


def test_save_load_roundtrip_bit_exact_and_sharded(checkpoint, tmp_path):
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    hf_io.save_pretrained(model, params, str(tmp_path / "one"))
    _, again = hf_io.load_pretrained(str(tmp_path / "one"), head="causal_lm")
    flat, flat_again = hf_io.flatten(params), hf_io.flatten(again)
    assert flat.keys() == flat_again.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat_again[k]), err_msg=k)
    # transformers reads our folder back too.
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "one")).eval()
    ids, mask = padded_batch(128)
    delta = max_delta(run(model, params, {"input_ids": ids, "attention_mask": mask}),
                      torch_logits(ref, ids, mask, positions_from(mask)), mask)
    assert delta <= TOL

    hf_io.save_pretrained(model, params, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    assert len(hf_io.safetensors_files(str(tmp_path / "sharded"))) > 2
    _, sharded = hf_io.load_pretrained(str(tmp_path / "sharded"), head="causal_lm")
    for k, v in hf_io.flatten(sharded).items():
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=k)


def test_bare_model_and_classification_head(checkpoint):
    folder, _ = checkpoint
    lm, lm_params = hf_io.load_pretrained(folder, head="causal_lm")
    base = build_model(lm.hf_config, head="none")
    assert base.backbone_prefix == "" and base.head_prefixes == ()
    assert jax.tree_util.tree_structure(base.abstract_params()) == \
        jax.tree_util.tree_structure(lm_params["model"])
    ids, mask = padded_batch(128)
    hidden = run(base, lm_params["model"], {"input_ids": ids, "attention_mask": mask})
    assert hidden.shape == (3, 12, 64)
    # The LM head is the tied-or-not projection of exactly these hidden states.
    logits = run(lm, lm_params, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(np.asarray(hidden @ lm_params["lm_head"]["kernel"]), np.asarray(logits),
                               atol=1e-5)

    config = hf_config(num_labels=3, pad_token_id=0)
    ref = hf_model(config, transformers.LlamaForSequenceClassification)
    model, params = from_torch(ref, head="classification", num_labels=3)
    assert model.head_prefixes == ("score",)
    ours = run(model, params, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions_from(mask))).logits.numpy()
    delta = float(np.abs(np.asarray(ours) - expected).max())
    print(f"parity sequence classification: max|Δ|={delta:.2e}")
    assert ours.shape == (3, 3) and delta <= TOL


def test_seven_billion_abstract_param_count():
    llama2_7b = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    start = time.perf_counter()
    abstract = build_model(llama2_7b, head="causal_lm").abstract_params()
    leaves = jax.tree_util.tree_leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 6_738_415_616
    assert time.perf_counter() - start < 30


def test_hook_sites(checkpoint):
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    recorder = hooks.Recorder()
    with hooks.use(recorder):
        jax.eval_shape(lambda p: model.apply(p, model.dummy_batch()), params)
    linear = [c["site"] for c in recorder.calls if c["point"] == "linear"]
    assert linear[:7] == [f"model.layers.0.{s}" for s in
                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert linear[-1] == "lm_head" and len(linear) == 15
    kv = [c for c in recorder.calls if c["point"] == "attention_kv"]
    assert [c["site"] for c in kv] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert (kv[0]["kv_heads"], kv[0]["head_dim"]) == (2, 16)
    assert [(c["site"], c["kind"]) for c in recorder.calls if c["point"] == "block_output"][:2] == [
        ("model.layers.0.self_attn", "attention"), ("model.layers.0.mlp", "ffn")]
    assert [c["site"] for c in recorder.calls if c["point"] == "embeddings"] == ["model"]


class PromptHook(hooks.Hooks):
    """Prompt tuning: prepends fixed virtual-token embeddings."""

    def __init__(self, prompt):  # (n, hidden)
        self.prompt = prompt

    def embeddings(self, module, embeds, attention_mask, token_type_ids):
        b = embeds.shape[0]
        prompt = jnp.broadcast_to(self.prompt, (b,) + self.prompt.shape).astype(embeds.dtype)
        mask = jnp.concatenate([jnp.ones((b, self.prompt.shape[0]), attention_mask.dtype), attention_mask], 1)
        return jnp.concatenate([prompt, embeds], 1), mask, token_type_ids


def test_prompt_hook_equals_prepended_tokens(checkpoint):
    """Virtual tokens equal to real token embeddings give the logits of the concatenated input."""
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    rs = np.random.RandomState(1)
    prefix, ids = rs.randint(3, 128, (1, 3)), rs.randint(3, 128, (2, 6))
    prompt = params["model"]["embed_tokens"]["embedding"][prefix[0]]
    with hooks.use(PromptHook(prompt)):
        hooked = run(model, params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert hooked.shape == (2, 6, 128)
    full = run(model, params, {"input_ids": np.concatenate([np.repeat(prefix, 2, 0), ids], 1)})
    np.testing.assert_allclose(np.asarray(hooked), np.asarray(full)[:, 3:], atol=1e-5)


def test_remat_bf16_and_dropout(checkpoint):
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    ids, mask = padded_batch(128)
    batch = {"input_ids": ids, "attention_mask": mask}
    rematted = build_model(model.hf_config, head="causal_lm", remat=True)

    def grad(m):
        return jax.jit(jax.grad(lambda p: jnp.mean(m.apply(p, batch) ** 2)))(params)

    for a, b in zip(jax.tree_util.tree_leaves(grad(model)), jax.tree_util.tree_leaves(grad(rematted))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    bf16 = build_model(model.hf_config, head="causal_lm", dtype=jnp.bfloat16)
    logits16 = run(bf16, params, batch)  # fp32 params, bf16 compute
    assert logits16.dtype == jnp.float32
    delta = max_delta(logits16, np.asarray(run(model, params, batch)), mask)
    print(f"bf16 compute vs fp32: max|Δ|={delta:.2e}")
    assert delta < 0.1

    dropped = build_model(hf_config(attention_dropout=0.5), head="causal_lm")
    a = run(dropped, params, batch, train=True, rng=jax.random.PRNGKey(0))
    b = run(dropped, params, batch, train=True, rng=jax.random.PRNGKey(0))
    c = run(dropped, params, batch, train=True, rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(run(model, params, batch)))
