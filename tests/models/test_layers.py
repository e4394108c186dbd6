"""Shared layers: the 16-bit dropout mask and the closed-form VJPs of LayerNorm and exact GELU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.models.layers import dot_rows, dropout, gelu_exact, keep_mask, layer_norm


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_exact_matches_the_erf_formula_and_its_autodiff(dtype):
    """Forward: ½x(1 + erf(x/√2)) as PyTorch writes it (≤ 1e-6 from jax's erfc form); backward:
    the closed form Φ(x) + x φ(x) against autodiff, tails included."""
    x = (jax.random.normal(jax.random.PRNGKey(0), (4, 257)) * 4).astype(dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 257)).astype(dtype)
    erf_form = lambda x: (0.5 * x.astype(jnp.float32) * (1 + jax.lax.erf(x.astype(jnp.float32) / 2 ** 0.5))).astype(dtype)
    np.testing.assert_array_equal(np.asarray(gelu_exact(x), np.float32), np.asarray(erf_form(x), np.float32))
    np.testing.assert_allclose(np.asarray(gelu_exact(x.astype(jnp.float32))),
                               np.asarray(jax.nn.gelu(x.astype(jnp.float32), approximate=False)), atol=1e-6)
    ours = jax.grad(lambda x: jnp.sum((gelu_exact(x) * w).astype(jnp.float32)))(x)
    theirs = jax.grad(lambda x: jnp.sum((erf_form(x) * w).astype(jnp.float32)))(x)
    assert ours.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=tol, rtol=tol)


def test_dot_rows_is_jnp_dot_with_the_same_gradients():
    """The row-flattened product (the form whose weight gradient XLA:CPU runs as one 2-D product)
    is the same function as ``jnp.dot`` on (batch, seq, n) inputs, values and both gradients."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (3, 5, 8))
    w = jax.random.normal(kw, (8, 6))
    g = jax.random.normal(kg, (3, 5, 6))
    y, vjp = jax.vjp(dot_rows, x, w)
    y_ref, vjp_ref = jax.vjp(jnp.dot, x, w)
    assert y.shape == (3, 5, 6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert dot_rows(x[0, 0], w).shape == (6,)   # a single row keeps its rank
