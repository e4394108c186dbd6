"""The optimizer chain: clipping, a method's gradient transform, AdamW, then learning-rate
multipliers on the updates (LoRA+ as a config)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.train import train_defaults
from peftjax import methods
from peftjax.train.optim import make_optimizer, parse_lr_mults
from tests.helpers import tiny_model

A = "bert.encoder.layer.0.attention.self.query.lora_A"
B = "bert.encoder.layer.0.attention.self.query.lora_B"


def _cfg(**kw):
    return ml_collections.ConfigDict({**train_defaults(), "warmup_ratio": 0.0, "learning_rate": 1e-3,
                                      "weight_decay": 0.01, **kw})


def _tree(rng, scale=1.0):
    a, b = jax.random.split(rng)
    return {"base": {}, "head": {},
            "added": {A: scale * jax.random.normal(a, (32, 4)), B: scale * jax.random.normal(b, (4, 32))}}


def _updates(cfg, method=None, steps=3):
    """Updates of ``steps`` AdamW steps on the same params and gradient sequence."""
    tx, _ = make_optimizer(cfg, 100, method)
    params = _tree(jax.random.PRNGKey(0))
    state = tx.init(params)
    out = []
    for t in range(steps):
        grads = _tree(jax.random.PRNGKey(10 + t), 0.1)
        updates, state = tx.update(grads, state, params)
        out.append(updates)
    return out


def test_lora_plus_as_a_config_scales_b_updates_by_the_ratio():
    """LoRA+ (Hayou et al. 2024): B's learning rate = ratio × A's. As a post-optimizer multiplier
    the whole AdamW update of B (decoupled weight decay included) is ratio × the plain one; A is
    unchanged. A multiplier on the gradient before Adam would do nothing (Adam normalises it)."""
    plain = _updates(_cfg())
    plus = _updates(_cfg(lr_mults="lora_B$=16"))
    for p, q in zip(plain, plus):
        np.testing.assert_allclose(np.asarray(q["added"][B]), 16 * np.asarray(p["added"][B]), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(q["added"][A]), np.asarray(p["added"][A]))


def test_method_multipliers_come_after_the_config_rules():
    model, _ = tiny_model("bert")

    class Plus(type(methods.create("lora", model, {"rank": 4}))):
        def lr_multipliers(self):
            return (("lora_B$", 4.0), ("lora_A$", 2.0))

    method = Plus(methods.create("lora", model, {"rank": 4}).config, model)
    plain = _updates(_cfg(), steps=1)[0]["added"]
    got = _updates(_cfg(lr_mults="lora_A$=3"), method, steps=1)[0]["added"]
    np.testing.assert_allclose(np.asarray(got[B]), 4 * np.asarray(plain[B]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[A]), 3 * np.asarray(plain[A]), rtol=1e-6)  # config wins


@pytest.mark.parametrize("bad", ["lora_B$", "lora_B$=x", "(=2", "lora_B$=-1", "lora_B$=inf"])
def test_bad_lr_mults_are_refused(bad):
    with pytest.raises(ValueError, match="lr_mults"):
        parse_lr_mults(bad)


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), float("inf")])
def test_non_positive_or_non_finite_learning_rate_is_refused(lr):
    with pytest.raises(ValueError, match="train.learning_rate"):
        make_optimizer(_cfg(learning_rate=lr), 10)


@pytest.mark.parametrize("accum", [1, 2])
def test_gradient_transform_receives_the_method_state_with_and_without_accumulation(accum):
    """The train step calls ``update(..., method_state=)``; the chain (and gradient
    accumulation's MultiSteps around it) hands it to the method's gradient transform."""
    import optax

    seen = []

    class Reader(type(methods.create("lora", tiny_model("bert")[0], {"rank": 4}))):
        def gradient_transform(self, rng):
            def update(updates, state, params=None, *, method_state=None, **extra):
                seen.append(method_state)
                return updates, state

            return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    method = Reader(Reader.Config(rank=4), tiny_model("bert")[0])
    tx, _ = make_optimizer(_cfg(grad_accum_steps=accum), 10, method)
    params = _tree(jax.random.PRNGKey(0))
    optax.with_extra_args_support(tx).update(params, tx.init(params), params,
                                             method_state={"marker": jnp.ones(())})
    assert seen and all(s is not None and "marker" in s for s in seen)
