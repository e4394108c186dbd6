"""peftjax.losses: the one next-token log-likelihood against its definition."""

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.data.lm import IGNORE
from peftjax.losses import causal_lm_loss, sequence_log_likelihood, token_log_likelihood


def _reference(logits, labels):
    """log p(label_{t+1} | ≤ t) from logits[:, :-1] and labels[:, 1:], IGNORE left out."""
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1)
    nxt = np.asarray(labels)[:, 1:]
    valid = nxt != IGNORE
    picked = np.take_along_axis(np.asarray(logp), np.where(valid, nxt, 0)[..., None], -1)[..., 0]
    return picked, valid


def test_shifted_log_likelihood_matches_the_definition_and_skips_the_last_position():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
    labels = np.array([[1, 2, 3, 4, 5], [IGNORE, IGNORE, 6, 0, IGNORE]], np.int32)
    logp, valid = token_log_likelihood(logits, labels)
    want, want_valid = _reference(logits, labels)
    assert logp.shape == valid.shape == (2, 5)
    assert not np.asarray(valid)[:, -1].any()   # the last position predicts nothing
    np.testing.assert_array_equal(np.asarray(valid)[:, :-1], want_valid)
    np.testing.assert_allclose(np.asarray(logp)[:, :-1][want_valid], want[want_valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sequence_log_likelihood(logits, labels), (want * want_valid).sum(-1),
                               rtol=1e-5, atol=1e-5)
    batch = {"labels": labels, "mask": np.array([True, True])}
    np.testing.assert_allclose(causal_lm_loss(logits, batch), -want[want_valid].mean(), rtol=1e-5)


def test_unshifted_log_likelihood_aligns_logits_with_labels():
    logits = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 4))
    labels = np.array([[3, IGNORE, 1]], np.int32)
    logp, valid = token_log_likelihood(logits, labels, shift=False)
    want = jax.nn.log_softmax(logits, axis=-1)[0, jnp.arange(3), jnp.array([3, 0, 1])]
    np.testing.assert_array_equal(valid, [[True, False, True]])
    np.testing.assert_allclose(np.asarray(logp)[0, [0, 2]], np.asarray(want)[[0, 2]], rtol=1e-6)
