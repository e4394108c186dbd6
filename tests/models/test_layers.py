"""Shared layers: the 16-bit dropout mask and LayerNorm's closed-form VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.models.layers import dropout, keep_mask, layer_norm


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_mask_rate_and_expectation(rate):
    mask, keep = keep_mask(jax.random.PRNGKey(0), (257, 129), rate)  # odd size: packing edge
    assert mask.shape == (257, 129) and mask.dtype == jnp.bool_
    assert abs(keep - (1 - rate)) < 1 / 65536
    assert abs(float(mask.mean()) - keep) < 0.01
    x = jnp.ones((400, 500))
    assert abs(float(dropout(x, rate, jax.random.PRNGKey(1)).mean()) - 1.0) < 0.02


def test_dropout_is_deterministic_per_key_and_identity_at_zero():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
    a = dropout(x, 0.3, jax.random.PRNGKey(5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(dropout(x, 0.3, jax.random.PRNGKey(5))))
    assert not np.array_equal(np.asarray(a), np.asarray(dropout(x, 0.3, jax.random.PRNGKey(6))))
    assert dropout(x, 0.0, jax.random.PRNGKey(5)) is x


def test_layer_norm_vjp_matches_autodiff():
    def reference(x, s, b, eps=1e-12):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + eps) * s + b

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (4, 5, 16)) * 3 + 1
    s, b = jax.random.normal(keys[1], (16,)), jax.random.normal(keys[2], (16,))
    w = jax.random.normal(keys[3], (4, 5, 16))
    ours = lambda x, s, b: jnp.sum(jnp.sin(layer_norm(x, s, b, 1e-12)) * w)
    ref = lambda x, s, b: jnp.sum(jnp.sin(reference(x, s, b)) * w)
    np.testing.assert_allclose(np.asarray(layer_norm(x, s, b, 1e-12)), np.asarray(reference(x, s, b)),
                               atol=1e-5)
    for g1, g2 in zip(jax.grad(ours, (0, 1, 2))(x, s, b), jax.grad(ref, (0, 1, 2))(x, s, b)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-5)
