"""The unrolled Threefry-2x32 and the 16-bit draws built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

from peftjax.models import threefry


def test_threefry2x32_equals_jax_primitive():
    rng = np.random.default_rng(0)
    x1, x2 = (jnp.asarray(rng.integers(0, 2 ** 32, 999, dtype=np.uint64).astype(np.uint32))
              for _ in range(2))
    for seed in (0, 1, 2 ** 31 + 5):
        k = jax.random.key_data(jax.random.PRNGKey(seed))
        want = threefry2x32_p.bind(k[0], k[1], x1, x2)
        got = jax.jit(threefry.threefry2x32)(k[0], k[1], x1, x2)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_uniform_bits16_layout_is_four_quarters_of_one_hash():
    """Element (r, i) is quarter i % 4 of the hash of counter (0, r * ceil(last/4) + i // 4)."""
    key = jax.random.PRNGKey(3)
    k = jax.random.key_data(key)
    shape = (3, 10)  # last dim not a multiple of 4: the padded quarters are dropped
    got = np.asarray(threefry.uniform_bits16(key, shape))
    counters = jnp.arange(3 * 3, dtype=jnp.uint32)
    w1, w2 = (np.asarray(w) for w in threefry.threefry2x32(k[0], k[1], jnp.zeros_like(counters), counters))
    quarters = np.stack([w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16], axis=-1).reshape(3, 12)
    np.testing.assert_array_equal(got, quarters[:, :10].astype(np.uint16))


def test_uniform_bits16_is_uniform_and_key_dependent():
    a = np.asarray(threefry.uniform_bits16(jax.random.PRNGKey(0), (256, 1024)), np.float64)
    b = np.asarray(threefry.uniform_bits16(jax.random.PRNGKey(1), (256, 1024)), np.float64)
    n = a.size
    assert abs(a.mean() / 65535 - 0.5) < 5 * (1 / 12) ** 0.5 / n ** 0.5   # 5 sigma
    assert abs(a.std() / 65535 - (1 / 12) ** 0.5) < 2e-3
    # Each of the 256 high-byte values equally often (chi-square, 255 dof, p ~ 1e-6 bound).
    counts = np.bincount((a.astype(np.int64) >> 8).ravel(), minlength=256)
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    assert chi2 < 380, chi2
    assert np.mean(a == b) < 1e-3
    # Neighbouring quarters of one hash are uncorrelated.
    q = a.reshape(-1, 4) / 65535 - 0.5
    assert abs(np.corrcoef(q[:, 0], q[:, 1])[0, 1]) < 0.01


def test_uniform_bits16_same_under_jit_typed_keys_and_scalars():
    raw = jax.random.PRNGKey(9)
    typed = jax.random.wrap_key_data(raw)
    eager = threefry.uniform_bits16(raw, (5, 7))
    np.testing.assert_array_equal(np.asarray(jax.jit(threefry.uniform_bits16, static_argnums=1)(raw, (5, 7))),
                                  np.asarray(eager))
    np.testing.assert_array_equal(np.asarray(threefry.uniform_bits16(typed, (5, 7))), np.asarray(eager))
    assert threefry.uniform_bits16(raw, ()).shape == ()


def test_non_threefry_keys_are_refused():
    with pytest.raises(ValueError, match="threefry"):
        threefry.uniform_bits16(jax.random.key(0, impl="rbg"), (4,))
    with pytest.raises(ValueError, match=r"uint32\[2\]"):
        threefry.uniform_bits16(jnp.zeros((4,), jnp.uint32), (4,))
