"""T5 family: parity with transformers' PyTorch T5/mT5, generation, checkpoints, hooks, sizes.

Two tiny random checkpoints made with transformers/torch (fp32, eager attention): T5 v1.0 (ReLU
FFN, head tied to ``shared``, decoder output rescaled) and mT5 (gated-GELU, untied ``lm_head``).
Logits are compared on padded encoder and decoder batches (max |Δ| <= 1e-4), greedy generation
token for token against ``generate``, and a save goes back into transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.models import build_model, hf_io, hooks, t5
from peftjax.losses import seq2seq_lm_loss
from tests.helpers import tiny_model

TOL = 1e-4
SMALL = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
             dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
VARIANTS = {
    "t5_v1_0": (transformers.T5Config, transformers.T5ForConditionalGeneration, dict(feed_forward_proj="relu")),
    "mt5": (transformers.MT5Config, transformers.MT5ForConditionalGeneration,
            dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}


def make_hf(variant: str):
    config_cls, model_cls, extra = VARIANTS[variant]
    config = config_cls(**SMALL, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    if variant == "mt5":  # transformers builds it tied; give it the separate head mT5 checkpoints have
        model.lm_head.weight = torch.nn.Parameter(torch.randn(SMALL["vocab_size"], SMALL["d_model"]))
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    """(variant, torch model, our model, our params, jitted apply)."""
    hf = make_hf(request.param)
    ours = build_model(hf.config, head="seq2seq_lm")
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params, fresh = hf_io.params_from_tensors(ours, tensors)
    assert fresh == []
    return request.param, hf, ours, params, jax.jit(ours.apply)


def batch(seed: int = 0):
    """Encoder rows: full, right-padded, left-padded; decoder rows: full, right-padded, full."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(2, SMALL["vocab_size"], (3, 26))
    mask = np.ones_like(ids)
    mask[1, 18:] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    dec = rs.randint(2, SMALL["vocab_size"], (3, 23))
    dec_mask = np.ones_like(dec)
    dec_mask[1, 15:] = 0
    return ids, mask, dec, dec_mask


def test_config_reads_the_t5_variants(pair):
    variant, hf, ours, params, _ = pair
    c = ours.config
    flat = traverse_util.flatten_dict(params, sep=".")
    if variant == "t5_v1_0":
        assert (c.dense_act_fn, c.is_gated_act, c.tie_word_embeddings, c.scale_decoder_outputs) == \
            ("relu", False, True, True)
        assert "lm_head.kernel" not in flat and "encoder.block.0.layer.1.DenseReluDense.wi.kernel" in flat
    else:
        assert (c.dense_act_fn, c.is_gated_act, c.tie_word_embeddings, c.scale_decoder_outputs) == \
            ("gelu_new", True, False, False)
        assert "lm_head.kernel" in flat and "decoder.block.2.layer.2.DenseReluDense.wi_1.kernel" in flat
    # Only block 0 of each stack owns a relative-position table; cross-attention has none.
    tables = sorted(p for p in flat if "relative_attention_bias" in p)
    assert tables == ["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.embedding",
                      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.embedding"]
    n_hf = sum(p.numel() for p in hf.parameters())  # tied tensors counted once, as we store them
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == n_hf


def test_logits_match_transformers_with_padding(pair):
    variant, hf, ours, params, apply = pair
    ids, mask, dec, dec_mask = batch()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
    out = np.asarray(apply(params, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
                                    "decoder_attention_mask": dec_mask}))
    assert out.shape == ref.shape == (3, 23, SMALL["vocab_size"])
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_teacher_forcing_loss_matches_transformers(pair):
    """labels → decoder inputs shifted right (start token, -100 → pad); HF's mean token loss."""
    variant, hf, ours, params, apply = pair
    ids, mask, dec, _ = batch(1)
    labels = dec.copy()
    labels[0, 16:] = -100
    labels[2, 9:] = -100
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    shifted = np.asarray(t5.shift_right(labels, ours.config.decoder_start_token_id, ours.config.pad_token_id))
    np.testing.assert_array_equal(shifted, hf._shift_right(torch.tensor(labels)).numpy())
    # Same shapes and keys as the padding test: the compiled forward is reused.
    logits = apply(params, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": shifted,
                            "decoder_attention_mask": np.ones_like(shifted)})
    np.testing.assert_allclose(np.asarray(logits), ref.logits.numpy(), atol=TOL, rtol=0)
    b = {"labels": labels, "mask": np.ones(3, bool)}
    np.testing.assert_allclose(float(seq2seq_lm_loss(logits, b)), float(ref.loss), atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(pair):
    variant, hf, ours, params, _ = pair
    ids, mask, _, _ = batch(2)
    n = 7
    with torch.no_grad():
        # use_cache=False: transformers' own cache cannot hold more decoder than encoder layers
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                          do_sample=False, num_beams=1, use_cache=False).numpy()
    out = np.asarray(t5.generate(ours, params, ids, mask, max_new_tokens=n))
    assert out.shape == (3, n + 1) and (out[:, 0] == 0).all()  # decoder start token first
    padded = np.zeros_like(out)  # transformers stops early when every row hit eos; we pad
    padded[:, :ref.shape[1]] = ref
    np.testing.assert_array_equal(out, padded)


def test_save_back_loads_in_transformers(pair, tmp_path):
    variant, hf, ours, params, apply = pair
    hf_io.save_pretrained(ours, params, str(tmp_path / "ckpt"))
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    ids, mask, dec, dec_mask = batch(3)
    with torch.no_grad():
        ref = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
    out = apply(params, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
                         "decoder_attention_mask": dec_mask})
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)
    assert (back.lm_head.weight is back.shared.weight) == (variant == "t5_v1_0")


def test_checkpoint_without_lm_head_ties_it_to_shared():
    """A checkpoint transformers saved from a tied model has no lm_head.weight: we load shared."""
    hf = make_hf("mt5")
    ours = build_model(hf.config, head="seq2seq_lm")
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    params, fresh = hf_io.params_from_tensors(ours, tensors)
    assert fresh == []
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), tensors["shared.weight"].T)


@pytest.mark.slow
def test_dropout_only_in_training_and_seeded(pair):
    variant, hf, ours, params, apply = pair
    if variant != "mt5":
        pytest.skip("one variant suffices: the dropout sites are shared")
    ids, mask, dec, _ = batch(4)
    b = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
         "decoder_attention_mask": np.ones_like(dec)}  # the padding test's keys: eval compiled once
    run = jax.jit(lambda p, r: ours.apply(p, b, train=True, rng=r))
    a, a2, c = run(params, jax.random.PRNGKey(0)), run(params, jax.random.PRNGKey(0)), run(params, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(apply(params, b)))


def test_sampling_is_seeded_and_respects_eos(pair):
    """Seeded sampling; the KV cache gives exactly what recomputing the decoder gives."""
    variant, hf, ours, params, _ = pair
    if variant != "mt5":
        pytest.skip("one variant suffices: generation does not depend on the FFN or the head")
    ids, mask, _, _ = batch(5)
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, eos_token_id=(5, 7, 11, 13))
    a = np.asarray(t5.generate(ours, params, ids, mask, rng=jax.random.PRNGKey(0), **kw))
    b = np.asarray(t5.generate(ours, params, ids, mask, rng=jax.random.PRNGKey(0), **kw))
    c = np.asarray(t5.generate(ours, params, ids, mask, rng=jax.random.PRNGKey(0), use_cache=False, **kw))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    for row in a[:, 1:]:
        ends = np.flatnonzero(np.isin(row, kw["eos_token_id"]))
        if ends.size:  # everything after the first eos is padding
            assert (row[ends[0] + 1:] == 0).all()
    with pytest.raises(ValueError, match="rng"):
        t5.generate(ours, params, ids, mask, max_new_tokens=2, temperature=1.0)


def test_hook_sites_and_prompt_tuning_on_the_encoder():
    model, base = tiny_model("t5")  # tiny-t5 (shared with the method contract)
    sites = methods.core.Sites.discover(model)
    assert list(sites.embeddings) == ["encoder"]
    assert {"encoder.block.0.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention",
            "decoder.block.1.layer.1.EncDecAttention"} <= set(sites.attention)
    kinds = {s: v["kind"] for s, v in sites.blocks.items()}
    assert kinds["encoder.block.0.layer.0.SelfAttention"] == "attention"
    assert kinds["decoder.block.0.layer.1.EncDecAttention"] == "cross_attention"
    assert kinds["decoder.block.0.layer.2.DenseReluDense"] == "ffn"
    lora = methods.create("lora", model, {"rank": 2})  # default targets: q and v, PEFT's for T5
    assert len(lora.targets) == 2 * 2 + 2 * 2 * 2 and all(s.endswith((".q", ".v")) for s in lora.targets)

    pt = methods.create("prompt_tuning", model, {"num_virtual_tokens": 3, "init": "vocab"})
    peft = pt.setup(jax.random.PRNGKey(1), base)
    prompt = peft.trainable["added"]["encoder.prompt_embeddings"]
    shared = np.asarray(base["shared.embedding"])
    assert all((np.abs(shared - np.asarray(row)).max(axis=1) == 0).any() for row in prompt)  # vocab rows
    ids, mask, _, _ = batch(6)
    ids = ids % 256
    fwd = jax.jit(lambda t, b: pt.apply(t, peft.frozen, peft.state, b))
    out = fwd(peft.trainable, {"input_ids": ids, "attention_mask": mask, "labels": ids[:, :4]})
    assert out.shape == (3, 4, model.config.vocab_size)  # logits follow the decoder, not the prompt
    with hooks.use(pt.hooks(peft.trainable["added"], peft.state, train=False, rng=None)):
        params = traverse_util.unflatten_dict(pt.effective_base(peft.trainable, peft.frozen, peft.state), sep=".")
        gen = np.asarray(t5.generate(model, params, ids, mask, max_new_tokens=4, eos_token_id=()))
    # Cached generation under the prompt == teacher forcing under the prompt (extended encoder mask).
    forced = fwd(peft.trainable, {"input_ids": ids, "attention_mask": mask, "labels": gen[:, 1:]})
    np.testing.assert_array_equal(np.asarray(forced).argmax(-1), gen[:, 1:])


def test_bitfit_is_refused_on_t5():
    model = build_model(model_configs.get("tiny-t5").hf_config.to_dict(), head="seq2seq_lm")
    with pytest.raises(ValueError, match="no bias"):
        methods.create("bitfit", model, {})


def test_named_configs_and_published_counts():
    """mt0-large LoRA r=8 on q, v (PEFT README): 2,359,296 of 1,231,940,608; prompt tuning with 5
    tokens on T5-XXL (Lester et al. Fig. 2): 20,480. Abstract shapes only."""
    def model(name):
        cfg = model_configs.get(name)
        assert cfg.name == name
        return build_model(cfg.hf_config.to_dict(), head="seq2seq_lm")

    counts = methods.count_params(methods.create("lora", model("mt0-large"), {"rank": 8}))
    assert (counts["trainable_params"], counts["total_params"]) == (2_359_296, 1_231_940_608)
    counts = methods.count_params(methods.create("prompt_tuning", model("t5-xxl"), {"num_virtual_tokens": 5}))
    assert counts["trainable_params"] == 20_480
    for name, (d, ff, heads, act, tied) in {"t5-base": (768, 3072, 12, "relu", True),
                                            "T0_3B": (2048, 5120, 32, "gelu_new", False),
                                            "mt0-xxl": (4096, 10240, 64, "gelu_new", False)}.items():
        c = build_model(model_configs.get(name).hf_config.to_dict(), head="seq2seq_lm").config
        assert (c.d_model, c.d_ff, c.num_heads, c.dense_act_fn, c.tie_word_embeddings) == (d, ff, heads, act, tied)


def test_text_to_text_scoring_picks_the_likeliest_class_words(pair):
    """The eval step scores each class's words as decoder targets (one encoder input) and picks
    the class with the highest summed log-likelihood."""
    from peftjax.train.steps import make_eval_step

    variant, hf, ours, params, apply = pair
    if variant != "mt5":
        pytest.skip("one variant suffices")
    method = methods.create("full", ours, {})
    peft = method.setup(jax.random.PRNGKey(0), traverse_util.flatten_dict(params, sep="."))
    ids, mask, _, _ = batch(7)
    cands = []
    for k in range(3):
        c = np.full((3, 23), -100, np.int32)
        c[:, 0], c[:, 1] = 30 + k, 1 + k * np.arange(3)
        cands.append(c)
    b = {"input_ids": ids, "attention_mask": mask, "mask": np.ones(3, bool),
         **{f"cand{k}_labels": c for k, c in enumerate(cands)}}
    preds = np.asarray(jax.jit(make_eval_step(method, lm_classes=3))(
        peft.trainable, peft.frozen, peft.state, b)["predictions"])
    scores = []
    for c in cands:  # reference: the padding test's compiled forward on the shifted targets
        logits = np.asarray(apply(params, {"input_ids": ids, "attention_mask": mask,
                                           "decoder_input_ids": np.asarray(t5.shift_right(c, 0, 0)),
                                           "decoder_attention_mask": np.ones_like(c)}), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        valid = c != -100
        scores.append((np.take_along_axis(logp, np.where(valid, c, 0)[..., None], -1)[..., 0] * valid).sum(-1))
    np.testing.assert_array_equal(preds, np.stack(scores, -1).argmax(-1))


@pytest.mark.slow
def test_text_to_text_classification_through_the_loop(tmp_path):
    """tweet_sentiment as text-to-text on tiny-t5: the encoder reads the prompt, the decoder's
    targets are the class words; evaluation scores every class's words (T0-style)."""
    from configs.train import get_config
    from peftjax.train import train_and_evaluate
    from peftjax.train.compose import build
    from peftjax.train.loop import encode_splits

    config = get_config("model=tiny-t5,method=lora,task=tweet_sentiment")
    config.data_dir = str(tmp_path / "tfds")
    for k, v in dict(steps=4, batch_size=8, eval_batch_size=16, train_limit=32, eval_limit=16,
                     eval_every=4, checkpoint_every=4, log_every=2, progress=False).items():
        config.train[k] = v
    task, model, tokenizer, method, _ = build(config, with_weights=False)
    assert model.head == "seq2seq_lm"
    enc = encode_splits(config, task, tokenizer)["test"]
    words = [tokenizer(name, add_special_tokens=False)["input_ids"] for name in task.label_names]
    for row, c in zip(enc["labels"], enc["class_labels"]):
        assert list(row[row != -100]) == words[c]  # the class's words are the decoder targets
    assert all(f"cand{k}_labels" in enc for k in range(task.num_labels))
    assert not any(k.startswith("cand0_input") for k in enc)  # the encoder input is shared

    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert result["format"] == "lm" and result["trainable_params"] == 8 * 64 * 12  # r(in+out), 12 q/v
    assert 0.0 <= result["metrics"]["test"]["accuracy"] <= 1.0


def test_lora_and_prompt_adapters_load_in_peft_with_equal_logits(pair, tmp_path):
    """Exported as SEQ_2_SEQ_LM adapters, PEFT adapts the same modules (q, v of every attention)
    and prepends the same prompt to the encoder: logits agree to 1e-4."""
    import copy

    import peft

    from peftjax.interop import export_adapter

    variant, hf, ours, params, _ = pair
    if variant != "mt5":
        pytest.skip("one variant suffices")
    ids, mask, dec, dec_mask = batch(8)
    b = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}
    flat = traverse_util.flatten_dict(params, sep=".")
    for name, cfg in (("lora", {"rank": 2, "alpha": 4.0}), ("prompt_tuning", {"num_virtual_tokens": 3})):
        method = methods.create(name, ours, cfg)
        p = method.setup(jax.random.PRNGKey(0), flat)
        rs = np.random.RandomState(0)
        added = {k: np.asarray(v) + (0.3 * rs.standard_normal(v.shape).astype(np.float32)
                                     if not k.endswith("lora_A") else 0) for k, v in p.trainable["added"].items()}
        p = p._replace(trainable={**p.trainable, "added": added})
        export_adapter(method, p.trainable, str(tmp_path / name), base_model_name_or_path="tiny")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / name)).eval()
        with torch.no_grad():
            ref = loaded(**{k: torch.tensor(v) for k, v in b.items()}).logits.numpy()
        out = np.asarray(jax.jit(lambda t: method.apply(t, p.frozen, p.state, b))(p.trainable))
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0, err_msg=name)
