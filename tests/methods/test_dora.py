"""DoRA specifics: magnitude init, the detached column norm, PEFT's dropout path, counts, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from peftjax import methods
from peftjax.methods import lora
from peftjax.methods.dora import column_norm
from peftjax.models.layers import keep_mask
from tests.helpers import learnable_batch, tiny_model

SITE = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def _random_added(peft, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(v + scale * rng.normal(size=v.shape), jnp.float32)
            for k, v in peft.trainable["added"].items()}


def test_magnitude_starts_at_column_norms_per_output_unit(bert):
    model, base = bert
    m = methods.create("dora", model, {"rank": 4})
    peft = m.setup(jax.random.PRNGKey(0), base)
    kernel = np.asarray(base[SITE + ".kernel"])                  # (in, out)
    mag = np.asarray(peft.trainable["added"][SITE + ".lora_magnitude"])
    assert mag.shape == (kernel.shape[1],)
    np.testing.assert_allclose(mag, np.linalg.norm(kernel, axis=0), rtol=1e-6)  # torch norm(W, dim=1)
    plain = model.apply(traverse_util.unflatten_dict(base, sep="."), learnable_batch(model))
    adapted = m.apply(peft.trainable, peft.frozen, peft.state, learnable_batch(model))
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(plain), atol=1e-5)


def _manual(x, kernel, bias, a, b, mag, s, detach=True):
    w = kernel + s * a @ b
    norm = jnp.linalg.norm(w, axis=0)
    if detach:
        norm = jax.lax.stop_gradient(norm)
    return (x @ w) * (mag / norm) + bias


def test_norm_is_detached_gradient_matches_manual_formula(bert):
    model, base = bert
    m = methods.create("dora", model, {"rank": 4, "alpha": 8.0})
    peft = m.setup(jax.random.PRNGKey(0), base)
    added = _random_added(peft)
    kernel, bias = base[SITE + ".kernel"], base[SITE + ".bias"]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, kernel.shape[0])), jnp.float32)
    probe = jnp.asarray(np.random.default_rng(2).normal(size=(5, kernel.shape[1])), jnp.float32)

    def ours(ad):
        y = x @ kernel + bias
        return jnp.sum(probe * _forward(m, None, x, y, kernel, bias, ad, train=False))

    def manual(ad, detach=True):
        return jnp.sum(probe * _manual(x, kernel, bias, ad[SITE + ".lora_A"], ad[SITE + ".lora_B"],
                                       ad[SITE + ".lora_magnitude"], m.scaling, detach))

    np.testing.assert_allclose(float(ours(added)), float(manual(added)), rtol=1e-5)
    g_ours, g_manual = jax.grad(ours)(added), jax.grad(manual)(added)
    g_attached = jax.grad(lambda ad: manual(ad, detach=False))(added)
    for k in (SITE + ".lora_A", SITE + ".lora_B", SITE + ".lora_magnitude"):
        np.testing.assert_allclose(np.asarray(g_ours[k]), np.asarray(g_manual[k]), rtol=1e-4, atol=1e-5)
    # the detachment matters: with the norm in the graph the gradient of A differs
    assert not np.allclose(np.asarray(g_ours[SITE + ".lora_A"]), np.asarray(g_attached[SITE + ".lora_A"]),
                           atol=1e-4)


def _forward(m, module, x, y, kernel, bias, added, train):
    """One targeted layer through the variant surface (what the LoRA hook calls)."""
    params = lora.site_params(added, [SITE])[SITE]
    call = lora.LinearCall(module, SITE, x, y, kernel, bias, train)
    return m.forward(call, params, m.forward_context({}, train=train, rng=None))


class _FakeModule:
    def make_rng(self, name):
        return jax.random.PRNGKey(7)


def test_dropout_follows_peft(bert):
    """Training with dropout: y + (m/n - 1)·x̃ W0 + (m/n)·s·x̃ A B, y from the clean input."""
    model, base = bert
    m = methods.create("dora", model, {"rank": 4, "dropout": 0.5})
    peft = m.setup(jax.random.PRNGKey(0), base)
    added = _random_added(peft)
    kernel, bias = base[SITE + ".kernel"], base[SITE + ".bias"]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, kernel.shape[0])), jnp.float32)
    y = x @ kernel + bias
    got = _forward(m, _FakeModule(), x, y, kernel, bias, added, train=True)
    mask, keep = keep_mask(jax.random.PRNGKey(7), x.shape, 0.5)  # the project's dropout draw
    xd = jnp.where(mask, x / keep, 0)
    a, b, mag = added[SITE + ".lora_A"], added[SITE + ".lora_B"], added[SITE + ".lora_magnitude"]
    scale = mag / jnp.linalg.norm(kernel + m.scaling * a @ b, axis=0)
    expected = y + (scale - 1) * (xd @ kernel) + scale * m.scaling * (xd @ a @ b)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores(bert):
    model, base = bert
    m = methods.create("dora", model, {"rank": 4})
    peft = m.setup(jax.random.PRNGKey(0), base)
    trainable = {**peft.trainable, "added": _random_added(peft)}
    batch = learnable_batch(model)
    unmerged = m.apply(trainable, peft.frozen, peft.state, batch)
    merged = m.merged_params(trainable, peft.frozen, peft.state)
    plain = model.apply(traverse_util.unflatten_dict(merged, sep="."), batch)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(unmerged), atol=1e-5)
    # merged columns have norm |m|
    np.testing.assert_allclose(np.asarray(column_norm(merged[SITE + ".kernel"])),
                               np.abs(np.asarray(trainable["added"][SITE + ".lora_magnitude"])), rtol=1e-5)
    back = m.unmerge(merged, trainable["added"], peft.state)
    np.testing.assert_allclose(np.asarray(back[SITE + ".kernel"]), np.asarray(base[SITE + ".kernel"]),
                               atol=1e-5)


def test_counts_add_one_magnitude_per_output_unit(bert):
    model, _ = bert
    lora = methods.count_params(methods.create("lora", model, {"rank": 4}))
    dora = methods.count_params(methods.create("dora", model, {"rank": 4}))
    # tiny-bert: 2 layers x (query, value) x 32 outputs
    assert dora["trainable_params"] - lora["trainable_params"] == 2 * 2 * 32
