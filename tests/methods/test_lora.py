"""LoRA specifics: PEFT's initialisation, scaling (plain and rsLoRA), merge/unmerge, dropout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from tests.helpers import learnable_batch, tiny_model


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def test_default_init_is_kaiming_uniform_a_and_zero_b(bert):
    model, base = bert
    m = methods.create("lora", model, {"rank": 8})
    added = m.init(jax.random.PRNGKey(0), base, methods.InitContext())
    a = np.asarray(added["bert.encoder.layer.0.attention.self.query.lora_A"])
    b = np.asarray(added["bert.encoder.layer.0.attention.self.query.lora_B"])
    assert a.shape == (32, 8) and b.shape == (8, 32)
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not b.any()


def test_gaussian_init_std_is_one_over_rank():
    cfg = model_configs.get("bert-base-uncased").hf_config
    from peftjax.models import build_model

    model = build_model(cfg)
    m = methods.create("lora", model, {"rank": 4, "init": "gaussian"})
    site = "encoder.layer.0.attention.self.query"
    a = m.init_site(jax.random.PRNGKey(0), site, jnp.zeros((768, 768), jnp.float32))["lora_A"]
    assert abs(float(jnp.std(a)) - 0.25) < 0.01


def test_adapted_model_starts_equal_to_base(bert):
    model, base = bert
    m = methods.create("lora", model, {"rank": 4})
    peft = m.setup(jax.random.PRNGKey(0), base)
    batch = learnable_batch(model)
    plain = model.apply(traverse_util.unflatten_dict(base, sep="."), batch)
    adapted = m.apply(peft.trainable, peft.frozen, peft.state, batch)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(adapted))


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(bert, rslora, expected):
    m = methods.create("lora", bert[0], {"rank": 4, "alpha": 16.0, "use_rslora": rslora})
    assert m.scaling == expected


def test_update_is_scaled_low_rank_product(bert):
    """h = x W0 + s x A B, checked against the explicit formula on one layer."""
    model, base = bert
    m = methods.create("lora", model, {"rank": 2, "alpha": 6.0, "targets": r"layer\.0\.attention\.self\.query$"})
    peft = m.setup(jax.random.PRNGKey(0), base)
    site = m.targets[0]
    rng = np.random.default_rng(0)
    added = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in peft.trainable["added"].items()}
    merged = m.merge(base, added, {})
    expected = base[site + ".kernel"] + 3.0 * added[site + ".lora_A"] @ added[site + ".lora_B"]
    np.testing.assert_allclose(np.asarray(merged[site + ".kernel"]), np.asarray(expected), atol=1e-6)
    untouched = [k for k in base if k != site + ".kernel"]
    assert all(merged[k] is base[k] for k in untouched)


def test_dropout_applies_only_in_training(bert):
    model, base = bert
    m = methods.create("lora", model, {"rank": 4, "dropout": 0.5})
    peft = m.setup(jax.random.PRNGKey(0), base)
    added = jax.tree.map(lambda x: x + 0.5, peft.trainable["added"])
    trainable = {**peft.trainable, "added": added}
    batch = learnable_batch(model)
    # Model dropout off is not possible in train mode, so compare two rngs: train differs, eval not.
    e1 = m.apply(trainable, peft.frozen, {}, batch, train=False)
    e2 = m.apply(trainable, peft.frozen, {}, batch, train=False)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    t1 = m.apply(trainable, peft.frozen, {}, batch, train=True, rng=jax.random.PRNGKey(1))
    t2 = m.apply(trainable, peft.frozen, {}, batch, train=True, rng=jax.random.PRNGKey(2))
    assert not np.allclose(np.asarray(t1), np.asarray(t2))


def test_low_rank_linear_equals_factored_form_and_skips_frozen_weight_gradient():
    from peftjax.methods.lora import low_rank_linear

    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x, w = jax.random.normal(k[0], (4, 7, 16)), jax.random.normal(k[1], (16, 12))
    a, b, g = jax.random.normal(k[2], (16, 3)), jax.random.normal(k[3], (3, 12)), jax.random.normal(k[4], (4, 7, 12))
    factored = lambda x, w, a, b: jnp.sum((x @ w + (x @ a) @ b) * g)
    merged = lambda x, w, a, b: jnp.sum(low_rank_linear(x, w, a, b) * g)
    np.testing.assert_allclose(merged(x, w, a, b), factored(x, w, a, b), rtol=1e-5)
    for want, got in zip(jax.grad(factored, (0, 1, 2, 3))(x, w, a, b), jax.grad(merged, (0, 1, 2, 3))(x, w, a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # Differentiating A and B only, W0's gradient xᵀ dy (2·28·16·12 flops) is not computed.
    flops = lambda argnums: jax.jit(jax.grad(merged, argnums)).lower(x, w, a, b).compile().cost_analysis()["flops"]
    assert flops((1, 2, 3)) - flops((2, 3)) >= 2 * 28 * 16 * 12


def test_merged_forward_only_without_dropout_in_float32_for_plain_lora(bert):
    model, _ = bert
    x32, k32 = jnp.zeros((2, 4), jnp.float32), jnp.zeros((4, 4), jnp.float32)
    plain = methods.create("lora", model, {"rank": 4})
    assert plain.merged_forward(x32, k32, train=True)
    assert not plain.merged_forward(x32.astype(jnp.bfloat16), k32, train=True)
    dropped = methods.create("lora", model, {"rank": 4, "dropout": 0.1})
    assert not dropped.merged_forward(x32, k32, train=True) and dropped.merged_forward(x32, k32, train=False)
