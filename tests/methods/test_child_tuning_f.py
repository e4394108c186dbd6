"""Child-tuning_F: the gradient mask keeps a fraction ≈ p of entries, rescaled by 1/p, fresh each
step and reproducible for a seed; the run's seed draws the masks, and they apply after clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import methods
from peftjax.methods.child_tuning import bernoulli_gradient_mask
from peftjax.train.optim import make_optimizer
from peftjax.train import init_state, make_train_step
from tests.helpers import learnable_batch, tiny_model


def _grads():
    return {"base": {"w": jnp.ones((300, 200)), "b": jnp.ones((200,))},
            "added": {}, "head": {"h": jnp.ones((50, 4))}}


def test_mask_rate_and_rescaling():
    p = 0.3
    tx = bernoulli_gradient_mask(p, jax.random.PRNGKey(0))
    out, _ = tx.update(_grads(), tx.init(None))
    w = np.asarray(out["base"]["w"])
    # 16-bit draws: p is rounded to a multiple of 1/65536 and kept entries divided by that rate,
    # so the masked gradient's expectation is the gradient.
    exact = round(p * 65536) / 65536
    assert abs(exact - p) < 1e-5
    assert set(np.unique(w)) <= {0.0, np.float32(1 / exact)}
    rate = np.mean(w != 0)
    assert abs(rate - p) < 0.01, rate          # 60,000 draws: std 0.0019
    assert abs(np.mean(w) - 1.0) < 0.03        # unbiased: E[g ⊙ M / p] = g (std of the mean 0.0064)
    assert np.any(np.asarray(out["head"]["h"]) == 0)   # the reference masks the classifier too
    # every leaf draws its own mask (no two leaves share a pattern), scalars included
    out, _ = tx.update({"a": jnp.ones((64,)), "b": jnp.ones((64,)), "c": jnp.ones(())}, tx.init(None))
    assert not np.array_equal(np.asarray(out["a"]) != 0, np.asarray(out["b"]) != 0)
    assert np.asarray(out["c"]).shape == ()


def test_reserve_p_one_is_plain_fine_tuning():
    tx = bernoulli_gradient_mask(1.0, jax.random.PRNGKey(0))
    out, _ = tx.update(_grads(), tx.init(None))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(_grads())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mask_is_fresh_each_step_and_reproducible_for_a_seed():
    tx = bernoulli_gradient_mask(0.3, jax.random.PRNGKey(7))
    s = tx.init(None)
    a1, s = tx.update(_grads(), s)
    a2, _ = tx.update(_grads(), s)
    assert not np.array_equal(np.asarray(a1["base"]["w"]), np.asarray(a2["base"]["w"]))
    tx_again = bernoulli_gradient_mask(0.3, jax.random.PRNGKey(7))
    b1, _ = tx_again.update(_grads(), tx_again.init(None))
    np.testing.assert_array_equal(np.asarray(a1["base"]["w"]), np.asarray(b1["base"]["w"]))
    other = bernoulli_gradient_mask(0.3, jax.random.PRNGKey(8))
    c1, _ = other.update(_grads(), other.init(None))
    assert not np.array_equal(np.asarray(a1["base"]["w"]), np.asarray(c1["base"]["w"]))
    # jitted update draws the same mask
    d1, _ = jax.jit(tx.update)(_grads(), tx.init(None))
    np.testing.assert_array_equal(np.asarray(a1["base"]["w"]), np.asarray(d1["base"]["w"]))


def test_mask_head_false_leaves_head_gradient_alone():
    tx = bernoulli_gradient_mask(0.3, jax.random.PRNGKey(0), mask_head=False)
    out, _ = tx.update(_grads(), tx.init(None))
    np.testing.assert_array_equal(np.asarray(out["head"]["h"]), 1.0)
    assert np.mean(np.asarray(out["base"]["w"]) != 0) < 0.5


def test_bad_reserve_p_is_refused():
    model, _ = tiny_model("bert")
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="reserve_p"):
            methods.create("child_tuning_f", model, {"reserve_p": p})


def test_one_step_updates_only_unmasked_entries_with_sgd():
    """With plain SGD, an entry whose mask is 0 at step 0 does not move."""
    model, base = tiny_model("bert")
    method = methods.create("child_tuning_f", model, {"reserve_p": 0.3, "seed": 3})
    peft = method.setup(jax.random.PRNGKey(0), base)
    tx = optax.chain(method.gradient_transform(jax.random.PRNGKey(0)), optax.sgd(1e-1))
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(method, tx, seed=0))
    new, _ = step(state, peft.frozen, learnable_batch(model))
    path = "bert.encoder.layer.0.attention.self.query.kernel"
    before = np.asarray(peft.trainable["base"][path])
    after = np.asarray(new.trainable["base"][path])
    moved = np.mean(before != after)
    assert 0.2 < moved < 0.4, moved


def _first_mask(method, seed: int) -> np.ndarray:
    """Entries of the query kernel the optimizer of a run with ``seed`` keeps at step 0."""
    import ml_collections
    from configs.train import train_defaults

    tc = ml_collections.ConfigDict({**train_defaults(), "clip_norm": 0.0, "weight_decay": 0.0,
                                    "warmup_ratio": 0.0, "schedule": "constant"})
    tx, _ = make_optimizer(tc, 10, method, seed)
    path = "bert.encoder.layer.0.attention.self.query.kernel"
    grads = {"base": {path: jnp.ones((32, 32))}, "added": {}, "head": {}}
    params = jax.tree.map(jnp.zeros_like, grads)
    updates, _ = tx.update(grads, tx.init(params), params)
    return np.asarray(updates["base"][path]) != 0


def test_run_seed_draws_the_masks_unless_pinned():
    """Each seed of a comparison draws other masks (was: one fixed seed for every run)."""
    model, _ = tiny_model("bert")
    free = methods.create("child_tuning_f", model, {"reserve_p": 0.3})
    assert not np.array_equal(_first_mask(free, 0), _first_mask(free, 1))
    np.testing.assert_array_equal(_first_mask(free, 1), _first_mask(free, 1))
    pinned = methods.create("child_tuning_f", model, {"reserve_p": 0.3, "seed": 5})
    np.testing.assert_array_equal(_first_mask(pinned, 0), _first_mask(pinned, 1))


def test_mask_applies_after_global_norm_clipping():
    """The reference clips the raw gradient (the Trainer's max_grad_norm) and masks inside its
    AdamW step, so the clipping factor comes from the *unmasked* norm. With Adam's ε far above
    the gradients the update is ≈ -lr·g̃/ε, linear in the masked gradient g̃, which shows the
    order: clip-then-mask keeps entries 0.5·(1/‖g‖)/p; mask-then-clip would give about half."""
    import ml_collections
    from configs.train import train_defaults

    model, _ = tiny_model("bert")
    method = methods.create("child_tuning_f", model, {"reserve_p": 0.3, "seed": 0})
    tc = ml_collections.ConfigDict({**train_defaults(), "clip_norm": 1.0, "eps": 1e6, "learning_rate": 1.0,
                                    "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant"})
    tx, _ = make_optimizer(tc, 10, method, 0)
    g = {"base": {"w": jnp.full((100, 100), 0.5)}, "added": {}, "head": {}}   # ‖g‖ = 50
    params = jax.tree.map(jnp.zeros_like, g)
    updates, _ = tx.update(g, tx.init(params), params)
    u = -np.asarray(updates["base"]["w"]) * 1e6
    kept = u[u != 0]
    assert 0.25 < kept.size / u.size < 0.35
    np.testing.assert_allclose(kept, 0.5 / 50 / 0.3, rtol=1e-3)
