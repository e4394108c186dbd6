"""Methods on a quantized frozen base (``model.quant``): every applicable method trains on tiny
models whose frozen matrices are NF4 (double quant) or int8, the quantized tensors stay bit for
bit what they were, methods that train whole matrices are refused, an adapter saves and loads
against the quantized base, and the quantized base itself round-trips through safetensors.

``make test`` trains LoRA on the tiny Llama (NF4); every other method × {Llama, BERT} × {NF4, int8}
runs under ``-m slow`` (int8's numerics are in make test: tests/models/test_quant.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import methods
from peftjax.methods import saving
from peftjax.models import quant
from peftjax.train import init_state, make_train_step, quantize
from tests.helpers import METHOD_CONFIGS, fisher_context, learnable_batch, tiny_model

STEPS = 25
FAST_STEPS = 15   # make test's LoRA case: enough for its loss to fall below 0.9x
LR = {"vera": 1e-1, "prefix_tuning": 5e-2, "prompt_tuning": 3e-2, "adalora": 5e-2,
      "child_tuning_d": 3e-3}
# Every method trains some frozen-whole matrices except these, refused with this reason.
REFUSED = {"full": "trains every weight matrix", "child_tuning_f": "trains every weight matrix",
           "fishmask": "trains entries of every weight"}
# Data-dependent: Child-tuning_D's selection reaches every matrix of the tiny Llama (on the tiny
# BERT some stay whole and are quantized).
REFUSED_ON = {("child_tuning_d", "llama"): "trains entries of every weight"}
FAST = {("lora", "llama", "nf4")}


@functools.lru_cache(maxsize=None)
def train(method_name: str, family: str, kind: str, double_quant: bool = True):
    model, base = tiny_model(family)
    method = methods.create(method_name, model, METHOD_CONFIGS[method_name])
    qcfg = quantize.QuantConfig(kind, double_quant)
    peft = quantize.setup(method, jax.random.PRNGKey(1), base, fisher_context(model), qcfg)
    before = jax.tree.map(np.array, peft.frozen)
    tx = optax.adam(LR.get(method_name, 1e-2))
    transform = method.gradient_transform(jax.random.PRNGKey(2))
    if transform is not None:
        tx = optax.chain(transform, tx)
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(method, tx, seed=0))
    batch = learnable_batch(model)
    losses = []
    steps = FAST_STEPS if (method_name, family, kind) in FAST else STEPS
    for _ in range(steps):
        state, metrics = step(state, peft.frozen, batch)
        losses.append(float(metrics["loss"]))
    return model, base, method, peft, before, state, losses


CASES = [pytest.param(m, f, k, marks=() if (m, f, k) in FAST else pytest.mark.slow)
         for m in sorted(METHOD_CONFIGS) if m not in REFUSED and m != "linear_probe"
         for f in ("llama", "bert") for k in ("nf4", "int8") if (m, f) not in REFUSED_ON]


@pytest.mark.parametrize("method_name,family,kind", CASES)
def test_method_trains_on_a_quantized_base(method_name, family, kind):
    model, base, method, peft, before, state, losses = train(method_name, family, kind)
    quantized = {k: v for k, v in peft.frozen.items() if quant.is_quantized(v)}
    assert quantized and {v.kind for v in quantized.values()} == {kind}
    # embeddings, norms, biases and the head stay float; the LM head is not quantized
    assert not any("embed" in k or "norm" in k or "lm_head" in k for k in quantized)
    assert losses[-1] < 0.9 * losses[0], losses
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(peft.frozen)):
        np.testing.assert_array_equal(np.asarray(b), a)     # quantized once, never touched
    assert all(k.endswith(".kernel") for k in quantized)
    summary = quantize.summary(peft.frozen)
    assert summary["quantized_bytes"] < summary["float_bytes"] / (3 if kind == "nf4" else 1.9)


@pytest.mark.parametrize("method_name,family", [
    pytest.param(m, f, marks=pytest.mark.slow) if m in ("fishmask", "child_tuning_d") else (m, f)
    for m, f in [(m, "bert") for m in sorted(REFUSED)] + sorted(REFUSED_ON)])
def test_methods_that_train_every_matrix_are_refused(method_name, family):
    model, base = tiny_model(family)
    method = methods.create(method_name, model, METHOD_CONFIGS[method_name])
    reason = REFUSED.get(method_name) or REFUSED_ON[method_name, family]
    with pytest.raises(ValueError, match=reason + ".*use model.quant=none"):
        quantize.setup(method, jax.random.PRNGKey(1), base, fisher_context(model),
                       quantize.QuantConfig("nf4"))


def test_bad_quant_settings_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid: none | int8 | nf4"):
        quantize.QuantConfig("nf2")
    with pytest.raises(ValueError, match="valid: True | False"):
        quantize.QuantConfig("nf4", double_quant="yes")
    with pytest.raises(ValueError, match=r"model.quant_matmul='triton' is invalid; valid: auto \| xla \| fused"):
        quantize.QuantConfig("nf4", matmul="triton")


def test_the_configured_matmul_path_holds_where_the_steps_trace():
    """model.quant_matmul reaches the run's jitted steps (quantize.traced): fused forces the Pallas
    kernel on this CPU, auto keeps XLA's path here (see tests/models/test_quant_matmul.py)."""
    from configs.train import get_config

    config = get_config("model=tiny-llama,method=lora")
    assert config.model.quant_matmul == "auto"   # every model config has the field
    model, base = tiny_model("llama")
    method = methods.create("lora", model, METHOD_CONFIGS["lora"])
    peft = quantize.setup(method, jax.random.PRNGKey(1), base, fisher_context(model),
                          quantize.QuantConfig("nf4"))
    tx = optax.sgd(0.1)
    state = init_state(peft.trainable, peft.state, tx)
    batch = learnable_batch(model)
    for matmul, fused in (("fused", True), ("xla", False), ("auto", False)):
        step = quantize.traced(make_train_step(method, tx, seed=0), quantize.QuantConfig("nf4", matmul=matmul))
        assert ("pallas_call" in str(jax.make_jaxpr(step)(state, peft.frozen, batch))) == fused


def test_base_rewriting_init_quantizes_the_residual():
    """PiSSA decomposes the float W0; its residual W0 - s·A₀B₀ is what is quantized."""
    model, base = tiny_model("llama")
    method = methods.create("lora", model, {**METHOD_CONFIGS["lora"], "init": "pissa"})
    float_peft = method.setup(jax.random.PRNGKey(1), base)
    peft = quantize.setup(method, jax.random.PRNGKey(1), base, None, quantize.QuantConfig("nf4"))
    path = "model.layers.0.self_attn.q_proj.kernel"
    q = peft.frozen[path]
    assert quant.is_quantized(q)
    reference = quant.quantize(float_peft.frozen[path], "nf4", True)
    np.testing.assert_array_equal(np.asarray(q.data), np.asarray(reference.data))


def test_adapter_and_quantized_base_save_and_load(tmp_path):
    model, base, method, peft, before, state, _ = train("lora", "llama", "nf4")
    # the quantized base: one safetensors file, packed codes and absmaxes, read back bit for bit
    size = quantize.save_base(str(tmp_path / "base.safetensors"), peft.frozen)
    loaded = quantize.load_base(str(tmp_path / "base.safetensors"))
    assert set(loaded) == set(peft.frozen)
    for k, v in peft.frozen.items():
        assert quant.is_quantized(v) == quant.is_quantized(loaded[k]), k
        for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(loaded[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
    assert size < sum(np.asarray(v).nbytes for v in base.values())
    # the adapter holds the trainable tree alone; on the loaded quantized base it is the same model
    saving.save_adapter(str(tmp_path / "adapter"), method, state.trainable, state.method_state)
    m2, trainable, mstate, _ = saving.load_adapter(str(tmp_path / "adapter"), model)
    # a pre-quantized base is used as it is (no requantization) whatever model.quant says
    peft2 = quantize.setup(m2, jax.random.PRNGKey(1), {**loaded, **peft.trainable["head"]}, None,
                           quantize.QuantConfig())
    for k in peft.frozen:
        for a, b in zip(jax.tree.leaves(peft.frozen[k]), jax.tree.leaves(peft2.frozen[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
    batch = learnable_batch(model)
    out = lambda meth, tr, fr, st: np.asarray(jax.jit(
        lambda tr, fr, st: meth.apply(tr, fr, st, batch))(tr, fr, st))
    np.testing.assert_array_equal(out(method, state.trainable, peft.frozen, state.method_state),
                                  out(m2, trainable, peft2.frozen, mstate))
    with pytest.raises(ValueError, match="already quantized as nf4"):
        quantize.setup(m2, jax.random.PRNGKey(1), loaded, None, quantize.QuantConfig("int8"))


def test_quantized_weights_and_scales_shard_by_the_kernels_rule():
    """On the (2,2,2) mesh: packed codes and per-block absmaxes follow the kernel's rule (Llama's
    q_proj: in over fsdp, out over tensor), a dim that does not divide is replicated, double
    quantization's second level is replicated, int8's per-output absmaxes follow ``out``."""
    from jax.sharding import PartitionSpec as P

    from peftjax.parallel import mesh as mesh_lib
    from peftjax.parallel.shard import per_device_bytes, plan

    model, base = tiny_model("llama")
    method = methods.create("lora", model, METHOD_CONFIGS["lora"])
    amesh = mesh_lib.abstract_mesh("2,2,2")
    path = "model.layers.0.self_attn.q_proj.kernel"            # (32, 32): in padded to 64
    for kind in ("nf4", "int8"):
        peft = quantize.setup(method, jax.random.PRNGKey(1), base, None, quantize.QuantConfig(kind))
        state = init_state(peft.trainable, peft.state, optax.adam(1e-3))
        sh = plan(method, amesh, state, peft.frozen)
        assert sh.placements["frozen"][path].spec == P("fsdp", "tensor")
        q, s = peft.frozen[path], sh.frozen[path]
        assert s.data.spec == P("fsdp", "tensor")               # (32, 32) packed pairs
        if kind == "nf4":
            assert s.scale.spec == P(None, "tensor")             # (1, 32): one block along in
            assert s.scale2.spec == P() and s.offset.spec == P()
        else:
            assert s.scale.spec == P("tensor")                   # one absmax per output
        assert per_device_bytes(q, s) < sum(np.asarray(x).nbytes for x in jax.tree.leaves(q))
        # the shardings tree matches the frozen tree leaf for leaf (jit's in_shardings)
        assert jax.tree.structure(peft.frozen) == jax.tree.structure(
            sh.frozen, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


@pytest.mark.slow
def test_quantized_base_trains_on_the_2_2_2_mesh_like_on_one_device():
    """8 forced host devices (a subprocess: the device count is fixed when XLA starts)."""
    from tests.parallel.test_sharding import run_script

    run = run_script("quantized_train.py")
    for kind in ("nf4", "int8"):
        curves = run[kind]["losses"]
        np.testing.assert_allclose(curves["2,2,2"], curves["1"], rtol=1e-5, err_msg=kind)
        assert curves["1"][-1] < curves["1"][0]
    # q_proj (32, 32): packed codes (32, 32) split over fsdp (in) and tensor (out)
    assert run["nf4"]["shard_shapes"]["data"] == [[16, 16]]
    assert run["int8"]["shard_shapes"]["scale"] == [[16]]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_on_load_gives_the_base_quantize_after_load_gives(kind):
    """A real checkpoint with model.quant set: its frozen matrices come out of the loader
    already quantized (the float base never whole on the host), and the method's setup on
    them gives bit for bit the frozen tree the quantize-after-load path gives."""
    from configs.train import get_config
    from peftjax.train.compose import build

    config = get_config("model=all-MiniLM-L6-v2,method=lora,task=tweet_sentiment")
    _, _, _, method, float_base = build(config, with_tokenizer=False)
    config.model.quant = kind
    _, _, _, method_q, loaded = build(config, with_tokenizer=False)
    paths = quantize.quantizable_paths(method_q, list(loaded), quantize.config_of(config))
    assert len(paths) == 36 and all(quant.is_quantized(loaded[p]) for p in paths)
    assert not any(quant.is_quantized(v) for k, v in loaded.items() if k not in paths)
    qcfg = quantize.config_of(config)
    on_load = quantize.setup(method_q, jax.random.PRNGKey(1), loaded, None, qcfg)
    after = quantize.setup(method, jax.random.PRNGKey(1), float_base, None, qcfg)
    flat = lambda t: {k: np.asarray(v) for k, v in  # noqa: E731
                      jax.tree_util.tree_flatten_with_path(t)[0]}
    a, b = flat(on_load.frozen), flat(after.frozen)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    a, b = flat(on_load.trainable), flat(after.trainable)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_the_loop_on_a_quantized_checkpoint_and_load_run_give_the_evaluated_model(tmp_path):
    """End to end: model.quant=nf4 on a checkpoint (quantized as it is loaded), trained by the
    loop; result.json says what was quantized, and load_run rebuilds the frozen tree the run
    trained against (quantized at the same paths), so evaluating it reproduces the run's test
    metrics."""
    from configs.train import get_config
    from peftjax.models import build_model, hf_io
    from peftjax.train import load_run, train_and_evaluate
    from peftjax.train.loop import encode_splits, evaluate
    from peftjax.train.steps import make_eval_step

    config = get_config("model=tiny-bert,method=lora,task=tweet_sentiment")
    model = build_model(config.model.hf_config.to_dict(), head="none")
    hf_io.save_pretrained(model, model.init(jax.random.PRNGKey(3)), str(tmp_path / "ckpt"))
    config.model.checkpoint = str(tmp_path / "ckpt")
    config.model.quant = "nf4"
    config.data_dir = str(tmp_path / "tfds")
    for k, v in dict(steps=4, batch_size=8, eval_batch_size=16, train_limit=32, eval_limit=32,
                     eval_every=2, checkpoint_every=2, log_every=1, progress=False).items():
        config.train[k] = v
    result = train_and_evaluate(config, str(tmp_path / "run"))
    q = result["quantization"]
    # 2 layers × (q, k, v, o, FFN in, FFN out) + the pooler (outside the task head, frozen)
    assert q["setting"] == "nf4 + double quant" and q["quantized_matrices"] == 13
    assert q["quantized_bytes"] < q["float_bytes"] / 4
    run = load_run(str(tmp_path / "run"))
    paths = [k for k, v in run.frozen.items() if quant.is_quantized(v)]
    assert len(paths) == 13
    encoded = encode_splits(run.config, run.task, run.tokenizer)
    metrics = evaluate(jax.jit(make_eval_step(run.method, 0)), run.trainable, run.frozen, run.state,
                       encoded["test"], run.config.train.eval_batch_size, run.task,
                       run.config.train.get("bucket_multiple", 0))
    assert metrics == pytest.approx(result["metrics"]["test"], abs=1e-6)


@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_qlora_on_a_mixture_of_experts(kind):
    """Qwen3-MoE: the stacked experts are quantized (expert by expert) with the attention and
    dense-FFN kernels, the routers stay float; LoRA trains on q/v and, with target_parameters, on
    the quantized experts themselves; the quantized model computes what its dequantized floats
    compute (forward and gradients), and the quantized tensors never change; the experts shard
    over fsdp as their float rule says."""
    from jax.sharding import PartitionSpec as P

    from peftjax.parallel import mesh as mesh_lib
    from peftjax.parallel.shard import plan

    model, base = tiny_model("qwen3_moe")
    batch = learnable_batch(model)
    # LoRA on q/v and on the quantized experts at once: q/v alone on a quantized base is what
    # every other family's test trains (tests/train/test_quantize.py above).
    config = {**METHOD_CONFIGS["lora"], "target_parameters": "mlp.experts.gate_up_proj,mlp.experts.down_proj"}
    method = methods.create("lora", model, config)
    peft = quantize.setup(method, jax.random.PRNGKey(1), base, None, quantize.QuantConfig(kind))
    frozen = peft.frozen
    assert quant.is_quantized(frozen["model.layers.0.mlp.experts.gate_up_proj"])
    assert frozen["model.layers.0.mlp.experts.down_proj"].shape == (4, 16, 32)
    assert not quant.is_quantized(frozen["model.layers.0.mlp.gate.kernel"])      # router
    assert quant.is_quantized(frozen["model.layers.1.mlp.down_proj.kernel"])      # dense FFN
    before = jax.tree.map(np.array, frozen)
    tx = optax.adam(1e-2)
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(method, tx, seed=0))
    losses = []
    for _ in range(FAST_STEPS):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    for k, v in frozen.items():
        for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(before[k])):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=k)
    floats = quant.dequantize_tree(frozen)
    run = lambda fr: jax.jit(lambda t: method.apply(t, fr, state.method_state, batch))
    np.testing.assert_allclose(run(frozen)(state.trainable), run(floats)(state.trainable), atol=1e-5)
    loss = lambda fr: jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(method.apply(t, fr, state.method_state, batch)))))
    for a, b in zip(jax.tree.leaves(loss(frozen)(state.trainable)), jax.tree.leaves(loss(floats)(state.trainable))):
        # Gradients up to ~1e2 summed over tokens in another order: fp32 rounding is ~1e-5 in
        # absolute terms, so the absolute tolerance follows the gradient's scale.
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-7 * max(1.0, np.abs(b).max()))
    sh = plan(method, mesh_lib.abstract_mesh("2,2,2"), state, frozen)
    stack = sh.frozen["model.layers.0.mlp.experts.gate_up_proj"]
    assert stack.data.spec == (P("fsdp", "tensor") if kind == "nf4" else P("fsdp", None, "tensor"))
