"""GPT-2 family: parity with transformers' PyTorch GPT-2 (LM and classification heads), the Conv1D
layout through checkpoints, cached and greedy generation, hook sites, and the published sizes.

Tiny random checkpoints are written with transformers/torch (fp32, eager attention), loaded with
``hf_io`` and compared on padded batches at the real-token positions (max |Δ| <= 1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import models as model_configs
from peftjax import methods
from peftjax.models import build_model, generation, gpt2, hf_io, hooks
from tests.models.test_llama import max_delta, padded_batch, positions_from, run

TOL = 1e-4
VOCAB = 128
SMALL = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
             bos_token_id=1, eos_token_id=2)


def hf_config(**overrides) -> transformers.GPT2Config:
    config = transformers.GPT2Config(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    return config


def hf_model(config, cls=transformers.GPT2LMHeadModel, seed: int = 0):
    torch.manual_seed(seed)
    return cls(config).eval()


def from_torch(model: torch.nn.Module, head: str = "causal_lm", **kwargs):
    ours = build_model(model.config, head=head, **kwargs)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params, fresh = hf_io.params_from_tensors(ours, tensors)
    assert fresh == []
    return ours, params


def torch_logits(model, ids, mask, positions=None) -> np.ndarray:
    kw = {} if positions is None else {"position_ids": torch.tensor(positions)}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2_tiny")
    model = hf_model(hf_config())
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder), model


def test_checkpoint_parity_left_and_right_padding(checkpoint):
    folder, ref = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    assert model.family.name == "gpt2" and "lm_head" not in params  # tied to wte
    ids, mask = padded_batch(VOCAB)  # row 1 left-padded, row 2 right-padded
    ours = run(model, params, {"input_ids": ids, "attention_mask": mask})
    assert ours.shape == (3, 12, VOCAB) and ours.dtype == jnp.float32
    delta = max_delta(ours, torch_logits(ref, ids, mask, positions_from(mask)), mask)
    print(f"gpt2 parity padded batch: max|Δ|={delta:.2e}")
    assert delta <= TOL
    rows = [0, 2]  # without left padding our default positions are transformers' arange
    assert max_delta(np.asarray(ours)[rows], torch_logits(ref, ids[rows], mask[rows]), mask[rows]) <= TOL


def test_conv1d_weights_are_not_transposed(checkpoint):
    folder, ref = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    sd = ref.state_dict()
    layer = params["transformer"]["h"]["0"]
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        mod, sub = name.split(".")
        np.testing.assert_array_equal(np.asarray(layer[mod][sub]["kernel"]),
                                      sd[f"transformer.h.0.{name}.weight"].numpy())
    assert layer["attn"]["c_attn"]["kernel"].shape == (64, 192)
    names = {hf_io.hf_name(p, model.family)[0] for p in hf_io.flatten(params)}
    assert names == {k for k in sd if k != "lm_head.weight"}   # lm_head is tied


def test_untied_head_and_layer_scaled_attention_parity():
    ref = hf_model(hf_config(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True, n_inner=80,
                             activation_function="gelu"))
    model, params = from_torch(ref)
    assert params["lm_head"]["kernel"].shape == (64, VOCAB)
    ids, mask = padded_batch(VOCAB)
    delta = max_delta(run(model, params, {"input_ids": ids, "attention_mask": mask}),
                      torch_logits(ref, ids, mask, positions_from(mask)), mask)
    print(f"gpt2 parity untied/scaled/n_inner: max|Δ|={delta:.2e}")
    assert delta <= TOL


def test_sequence_classification_picks_last_non_pad_token():
    config = hf_config(num_labels=3, pad_token_id=0)
    ref = hf_model(config, transformers.GPT2ForSequenceClassification)
    model, params = from_torch(ref, head="classification", num_labels=3)
    assert model.head_prefixes == ("score",) and "bias" not in params["score"]
    ids, mask = padded_batch(VOCAB)  # padding holds pad id 0, real tokens >= 3
    ours = run(model, params, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions_from(mask))).logits.numpy()
    delta = float(np.abs(np.asarray(ours) - expected).max())
    print(f"gpt2 parity sequence classification: max|Δ|={delta:.2e}")
    assert ours.shape == (3, 3) and delta <= TOL
    regression = build_model(config, head="regression")
    assert run(regression, jax.tree.map(lambda x: x[..., :1] if x.shape[-1] == 3 else x, params),
               {"input_ids": ids, "attention_mask": mask}).shape == (3, 1)


def test_cached_and_greedy_generation_match_recomputation_and_transformers(checkpoint):
    folder, ref = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    rs = np.random.RandomState(3)
    ids = rs.randint(3, VOCAB, (2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0   # left padding, the batched-generation layout
    ids[mask == 0] = 0
    kw = dict(max_new_tokens=6, eos_token_id=(), pad_token_id=0)
    cached = generation.generate(model, params, ids, mask, **kw)
    recomputed = generation.generate(model, params, ids, mask, use_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(recomputed))
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(cached), expected.numpy())


def test_save_back_loads_in_transformers(checkpoint, tmp_path):
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    hf_io.save_pretrained(model, params, str(tmp_path / "out"))
    _, again = hf_io.load_pretrained(str(tmp_path / "out"), head="causal_lm")
    for k, v in hf_io.flatten(params).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(hf_io.flatten(again)[k]), err_msg=k)
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = padded_batch(VOCAB)
    delta = max_delta(run(model, params, {"input_ids": ids, "attention_mask": mask}),
                      torch_logits(ref, ids, mask, positions_from(mask)), mask)
    assert delta <= TOL


def test_hook_sites_and_prompt_equals_prepended_tokens(checkpoint):
    folder, _ = checkpoint
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    recorder = hooks.Recorder()
    with hooks.use(recorder):
        jax.eval_shape(lambda p: model.apply(p, model.dummy_batch()), params)
    linear = [c["site"] for c in recorder.calls if c["point"] == "linear"]
    assert linear == [f"transformer.h.{i}.{s}" for i in range(2)
                      for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert [c["site"] for c in recorder.calls if c["point"] == "attention_kv"] == [
        "transformer.h.0.attn", "transformer.h.1.attn"]
    assert [(c["site"], c["kind"]) for c in recorder.calls if c["point"] == "block_output"][:2] == [
        ("transformer.h.0.attn", "attention"), ("transformer.h.0.mlp", "ffn")]
    assert [c["site"] for c in recorder.calls if c["point"] == "embeddings"] == ["transformer"]
    # Rematerialised blocks trace (train=True is a static argument of each block).
    for policy in (True, "block_dots"):   # every layers.REMAT_POLICIES name is honoured
        rematted = build_model(model.hf_config, head="causal_lm", remat=policy)
        grads = jax.eval_shape(jax.grad(lambda p: rematted.apply(
            p, rematted.dummy_batch(), train=True, rng=jax.random.PRNGKey(0)).sum()), params)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="remat"):
        build_model(model.hf_config, head="causal_lm", remat="sometimes").init(jax.random.PRNGKey(0))

    class Prompt(hooks.Hooks):  # virtual tokens equal to real token embeddings
        def embeddings(self, module, embeds, attention_mask, token_type_ids):
            b = embeds.shape[0]
            p = jnp.broadcast_to(prompt, (b,) + prompt.shape)
            return (jnp.concatenate([p, embeds], 1),
                    jnp.concatenate([jnp.ones((b, 3), attention_mask.dtype), attention_mask], 1), None)

    rs = np.random.RandomState(1)
    prefix, ids = rs.randint(3, VOCAB, (1, 3)), rs.randint(3, VOCAB, (2, 6))
    prompt = params["transformer"]["wte"]["embedding"][prefix[0]]
    with hooks.use(Prompt()):
        hooked = jax.jit(lambda p: model.apply(p, {"input_ids": ids}))(params)
    full = run(model, params, {"input_ids": np.concatenate([np.repeat(prefix, 2, 0), ids], 1),
                               "attention_mask": np.ones((2, 9), np.int32)})
    np.testing.assert_allclose(np.asarray(hooked), np.asarray(full)[:, 3:], atol=1e-5)


@pytest.mark.parametrize("name,expected", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                           ("gpt2-large", 774_030_080)])
def test_named_configs_have_the_published_sizes(name, expected):
    model = build_model(model_configs.get(name).hf_config.to_dict(), head="causal_lm")
    leaves = jax.tree_util.tree_leaves(model.abstract_params())
    assert sum(int(np.prod(x.shape)) for x in leaves) == expected
    if name == "gpt2":  # PEFT's default LoRA target on GPT-2 is the fused c_attn: 12·8·(768+2304)
        lora = methods.create("lora", model, {"rank": 8})
        assert list(lora.targets) == [f"transformer.h.{i}.attn.c_attn" for i in range(12)]
        assert methods.count_params(lora)["trainable_params"] == 294_912


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="add_cross_attention"):
        gpt2.GPT2Config.from_hf(hf_config(add_cross_attention=True))
    c = gpt2.GPT2Config.from_hf(hf_config())
    model = build_model(hf_config(), head="causal_lm")
    with pytest.raises(ValueError, match="exceed n_positions=64"):
        jax.eval_shape(lambda r: model.init(r, model.dummy_batch(seq=65)), jax.random.PRNGKey(0))
    assert (c.n_inner, c.head_dim, c.num_key_value_heads, c.eos_token_id) == (256, 16, 4, (2,))
    hash(c)
