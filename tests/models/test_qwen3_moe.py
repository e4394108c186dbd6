"""Qwen3-MoE: parity with transformers' PyTorch model (logits, gradients, the load-balancing
loss), generation, checkpoints with one tensor per expert stacked on load and split on save.

The tiny random checkpoint (written by the test, fp32, eager attention) has 6 experts with 2
routed per token, a dense middle layer (``mlp_only_layers``), q/k norms, head_dim != hidden /
heads and a sliding window shorter than the sequences (Qwen3-MoE applies it to every layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peftjax.models import build_model, hf_io, hooks, moe, registry
from tests.helpers import assert_greedy_matches, left_padded
from tests.models.test_llama import max_delta, padded_batch, positions_from, run, torch_logits

TOL = 1e-4
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
             max_position_embeddings=64, initializer_range=0.1, use_sliding_window=True,
             sliding_window=5)


def hf_config(**overrides):
    config = transformers.Qwen3MoeConfig(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    return config


def hf_model(seed: int = 0, cls=transformers.Qwen3MoeForCausalLM, **overrides):
    torch.manual_seed(seed)
    model = cls(hf_config(**overrides)).eval()
    with torch.no_grad():   # transformers initialises norms to 1: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe_tiny")
    ref = hf_model()
    ref.save_pretrained(folder, safe_serialization=True)
    model, params = hf_io.load_pretrained(str(folder), head="causal_lm")
    return str(folder), ref, model, params


def test_padded_batch_parity_stacked_experts_and_save_back(checkpoint, tmp_path):
    folder, ref, model, params = checkpoint
    c = model.config
    assert model.family.name == "qwen3_moe"
    assert [c.is_sparse(i) for i in range(3)] == [True, False, True]
    assert [c.attention_window(i) for i in range(3)] == [5, 5, 5]
    flat = hf_io.flatten(params)
    # Experts stacked in the flax layout (E, in, out); the dense layer keeps its SwiGLU.
    assert flat["model.layers.0.mlp.experts.gate_up_proj"].shape == (6, 64, 48)
    assert flat["model.layers.2.mlp.experts.down_proj"].shape == (6, 24, 64)
    assert flat["model.layers.0.mlp.gate.kernel"].shape == (64, 6)
    assert flat["model.layers.1.mlp.gate_proj.kernel"].shape == (64, 96)
    # Expert 3's up_proj is the second half of its stacked gate_up columns, transposed.
    up = ref.model.layers[0].mlp.experts.gate_up_proj.detach().numpy()[3, 24:]
    np.testing.assert_array_equal(np.asarray(flat["model.layers.0.mlp.experts.gate_up_proj"])[3, :, 24:], up.T)

    ids, mask = padded_batch(128)
    batch = {"input_ids": ids, "attention_mask": mask}
    ours = np.asarray(run(model, params, batch))
    delta = max_delta(ours, torch_logits(ref, ids, mask, positions_from(mask)), mask)
    print(f"qwen3_moe parity padded batch (window 5, top-2 of 6 experts): max|Δ|={delta:.2e}")
    assert delta <= TOL

    # Saved as the Hub keeps it: one Linear per expert, the same names transformers writes.
    hf_io.save_pretrained(model, params, str(tmp_path / "back"))
    saved = set(hf_io.tensor_index(str(tmp_path / "back")))
    assert saved == set(hf_io.tensor_index(folder))
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in saved
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"),
                                                             attn_implementation="eager").eval()
    assert type(back) is type(ref)
    assert max_delta(ours, torch_logits(back, ids, mask, positions_from(mask)), mask) <= TOL


def test_unnormalised_top_k_and_no_window_parity():
    """``norm_topk_prob=False`` (the transformers default): the raw top-k probabilities weigh the
    experts; without a window, full causal attention."""
    ref = hf_model(seed=1, norm_topk_prob=False, use_sliding_window=False, mlp_only_layers=[])
    model = build_model(ref.config, head="causal_lm")
    assert not model.config.norm_topk_prob and model.config.sliding_window is None
    params, _ = hf_io.params_from_tensors(model, _hub_tensors(ref))
    ids, mask = padded_batch(128, seed=3)
    delta = max_delta(run(model, params, {"input_ids": ids, "attention_mask": mask}),
                      torch_logits(ref, ids, mask, positions_from(mask)), mask)
    print(f"qwen3_moe parity unnormalised top-k, full attention: max|Δ|={delta:.2e}")
    assert delta <= TOL


def _hub_tensors(ref) -> dict[str, np.ndarray]:
    """The model's tensors as a Hub checkpoint names them (one Linear per expert)."""
    out = {}
    for k, v in ref.state_dict().items():
        v = v.detach().numpy()
        if k.endswith("experts.gate_up_proj"):
            half = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :half]
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, half:]
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            out[k] = v
    return out


def test_cached_greedy_equals_recomputation_and_transformers(checkpoint):
    _, ref, model, params = checkpoint
    ids, mask = left_padded()
    assert_greedy_matches(model, params, ref, ids, mask, 8)


def test_sequence_classification_parity():
    ref = hf_model(cls=transformers.Qwen3MoeForSequenceClassification, num_labels=3, pad_token_id=0)
    model = build_model(ref.config, head="classification", num_labels=3)
    params, fresh = hf_io.params_from_tensors(model, _hub_tensors(ref))
    assert fresh == [] and model.head_prefixes == ("score",)
    ids, mask = padded_batch(128)
    ours = np.asarray(run(model, params, {"input_ids": ids, "attention_mask": mask}))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions_from(mask))).logits.numpy()
    assert float(np.abs(ours - expected).max()) <= TOL


def _labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Real tokens whose predecessor is real: a left-padded row's first real token would be
    predicted from a pad slot, whose (fully masked) attention each library fills differently
    (transformers' eager path attends uniformly to every slot), so it is left out."""
    labels = np.where(mask.astype(bool), ids, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100
    labels[:, 0] = -100
    return labels.astype(np.int32)


def _lm_loss_torch(ref, ids, mask, **kw):
    labels = torch.tensor(_labels(ids, mask)).long()
    return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               position_ids=torch.tensor(positions_from(mask)), labels=labels, **kw)


def test_gradients_match_torch(checkpoint):
    """Training, not only the forward pass: the LM loss's gradients w.r.t. the stacked experts
    (through the grouped matmuls), the router and attention equal PyTorch autograd's."""
    from peftjax.losses import loss_for

    _, ref, model, params = checkpoint
    ids, mask = padded_batch(128, seed=5)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
             "labels": _labels(ids, mask), "mask": np.ones(3, bool)}
    loss_fn = loss_for("causal_lm")
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(model.apply(p, batch), batch)))(params)
    ref.zero_grad()
    out = _lm_loss_torch(ref, ids, mask)
    out.loss.backward()
    assert abs(float(loss) - float(out.loss)) <= 1e-5
    g = hf_io.flatten(grads)
    experts = ref.model.layers[2].mlp.experts
    pairs = {
        "model.layers.2.mlp.experts.gate_up_proj": experts.gate_up_proj.grad.numpy().transpose(0, 2, 1),
        "model.layers.2.mlp.experts.down_proj": experts.down_proj.grad.numpy().transpose(0, 2, 1),
        "model.layers.0.mlp.gate.kernel": ref.model.layers[0].mlp.gate.weight.grad.numpy().T,
        "model.layers.0.self_attn.q_proj.kernel": ref.model.layers[0].self_attn.q_proj.weight.grad.numpy().T,
    }
    for path, expected in pairs.items():
        worst = float(np.abs(np.asarray(g[path]) - expected).max())
        scale = float(np.abs(expected).max())
        print(f"grad {path}: max|Δ|={worst:.2e} (max |g| {scale:.2e})")
        assert worst <= 1e-5 + 1e-4 * scale


def test_load_balancing_loss_matches_transformers(checkpoint):
    """With ``output_router_logits`` the train step's objective gains router_aux_loss_coef · the
    Switch load-balancing loss over the real tokens, as transformers adds it."""
    folder, _, _, _ = checkpoint
    ref = hf_model(output_router_logits=True, router_aux_loss_coef=0.05)
    model = build_model(ref.config, head="causal_lm")
    params, _ = hf_io.params_from_tensors(model, _hub_tensors(ref))
    ids, mask = padded_batch(128, seed=7)
    with torch.no_grad():
        out = _lm_loss_torch(ref, ids, mask)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}
    with registry.collect_aux_losses() as aux:
        model.apply(params, batch, train=True)
    assert len(aux) == 1
    expected = 0.05 * float(out.aux_loss)
    print(f"aux loss ours {float(aux[0]):.6f} transformers {expected:.6f}")
    assert abs(float(aux[0]) - expected) <= 1e-6
    # Outside a collecting block, or not training, nothing is added.
    with registry.collect_aux_losses() as aux:
        model.apply(params, batch, train=False)
    assert aux == []


def test_train_step_adds_the_aux_loss():
    from peftjax import methods
    from peftjax.train import steps
    import optax

    ref = hf_model(output_router_logits=True, router_aux_loss_coef=0.5)
    model = build_model(ref.config, head="causal_lm")
    params, _ = hf_io.params_from_tensors(model, _hub_tensors(ref))
    ids, mask = padded_batch(128, seed=2)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
             "labels": _labels(ids, mask), "mask": np.ones(3, bool)}
    method = methods.create("full", model, {})
    peft = method.setup(jax.random.PRNGKey(0), hf_io.flatten(params))
    tx = optax.sgd(0.0)
    step = jax.jit(steps.make_train_step(method, tx))
    _, metrics = step(steps.init_state(peft.trainable, peft.state, tx), peft.frozen, batch)
    with torch.no_grad():
        expected = _lm_loss_torch(ref, ids, mask)
    assert abs(float(metrics["aux_loss"]) - 0.5 * float(expected.aux_loss)) <= 1e-6
    assert abs(float(metrics["loss"]) - float(expected.loss - 0.5 * expected.aux_loss)) <= 1e-5


def test_hook_sites_and_grouped_products(checkpoint):
    """The router is a linear site (every linear method can adapt it); the expert matrices are
    grouped sites with their expert count; the grouped product equals a loop over experts."""
    _, _, model, params = checkpoint
    recorder = hooks.Recorder()
    with hooks.use(recorder):
        jax.eval_shape(lambda p: model.apply(p, model.dummy_batch()), params)
    linear = {c["site"] for c in recorder.calls if c["point"] == "linear"}
    grouped = {c["site"]: c for c in recorder.calls if c["point"] == "grouped_linear"}
    assert "model.layers.0.mlp.gate" in linear and "model.layers.1.mlp.gate_proj" in linear
    assert "model.layers.1.mlp.gate" not in linear
    assert set(grouped) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 2)
                            for p in ("gate_up_proj", "down_proj")}
    assert grouped["model.layers.0.mlp.experts.gate_up_proj"]["experts"] == 6


@pytest.mark.parametrize("rows,experts,tile", [(9, 3, None), (64, 6, 8), (300, 16, None), (40, 4, 128)])
def test_grouped_matmul_forms_equal_a_loop_over_experts(rows, experts, tile):
    """``ragged_dot`` and the CPU's tiled scan (any tile size, empty experts, a tile larger than
    every group) equal a loop over experts, and so do their gradients."""
    rs = np.random.RandomState(rows)
    x = jnp.asarray(rs.randn(rows, 12), jnp.float32)
    w = jnp.asarray(rs.randn(experts, 12, 5), jnp.float32)
    sizes = np.bincount(rs.randint(0, max(1, experts - 1), rows), minlength=experts)   # last one empty
    starts = np.concatenate([[0], np.cumsum(sizes)])
    loop = np.concatenate([np.asarray(x[a:b] @ w[e]) for e, (a, b) in enumerate(zip(starts, starts[1:]))])
    gs = jnp.asarray(sizes, jnp.int32)
    forms = {"ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, gs),
             "tiled": lambda x, w: moe.tiled_grouped_matmul(x, w, gs, tile)}
    grads = {}
    for name, f in forms.items():
        np.testing.assert_allclose(np.asarray(jax.jit(f)(x, w)), loop, atol=1e-5, err_msg=name)
        grads[name] = jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(grads["ragged_dot"], grads["tiled"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_moe_layer_is_the_same_with_either_grouped_matmul(checkpoint, monkeypatch):
    _, _, model, params = checkpoint
    ids, mask = padded_batch(128, seed=4)
    batch = {"input_ids": ids, "attention_mask": mask}
    out = {}
    for mode in ("ragged_dot", "tiled"):
        monkeypatch.setattr(moe, "GROUPED_MATMUL", mode)
        out[mode] = np.asarray(jax.jit(lambda p: model.apply(p, batch))(params))
    assert max_delta(out["ragged_dot"], out["tiled"], mask) <= 1e-5


def test_checkpoint_errors_name_the_expert_tensors(checkpoint):
    _, ref, model, _ = checkpoint
    tensors = _hub_tensors(ref)
    del tensors["model.layers.2.mlp.experts.4.up_proj.weight"]
    tensors["model.layers.0.mlp.experts.1.down_proj.weight"] = np.zeros((64, 23), np.float32)
    with pytest.raises(hf_io.CheckpointError) as err:
        hf_io.params_from_tensors(model, tensors)
    message = str(err.value)
    assert "model.layers.2.mlp.experts.4.up_proj.weight" in message
    assert "model.layers.0.mlp.experts.1.down_proj.weight: checkpoint (64, 23), model expects (64, 24)" in message


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="num_experts_per_tok <= num_experts"):
        build_model({**hf_config().to_dict(), "num_experts_per_tok": 7}, head="causal_lm")


def test_quantize_on_load_stacks_and_quantizes_each_expert_stack(checkpoint):
    """QLoRA's quantize-on-load (``model.quant``): each expert stack is assembled from its Hub
    tensors and quantized as it is placed; the frozen tree equals quantizing after loading, bit
    for bit."""
    from peftjax import methods
    from peftjax.models import quant
    from peftjax.train import quantize

    folder, _, model, params = checkpoint
    method = methods.create("lora", model, {"rank": 2})
    qcfg = quantize.QuantConfig("nf4")
    transforms = quantize.on_load(method, model, qcfg)
    assert "model.layers.2.mlp.experts.gate_up_proj" in transforms
    assert "model.layers.0.mlp.gate.kernel" not in transforms          # routers stay float
    loaded, _ = hf_io.params_from_tensors(model, hf_io.tensor_index(folder), transforms=transforms)
    assert quant.is_quantized(hf_io.flatten(loaded)["model.layers.0.mlp.experts.down_proj"])
    after = quantize.setup(method, jax.random.PRNGKey(0), hf_io.flatten(params), None, qcfg).frozen
    during = quantize.setup(method, jax.random.PRNGKey(0), hf_io.flatten(loaded), None, qcfg).frozen
    assert set(after) == set(during)
    for k in after:
        for a, b in zip(jax.tree.leaves(after[k]), jax.tree.leaves(during[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
