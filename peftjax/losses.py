"""Task losses and the one next-token log-likelihood; every batch carries ``mask`` (bool, per
row): padded rows count for nothing.

Why this sits below ``peftjax.methods`` and ``peftjax.train``: methods need a loss too (the
Fisher information of FishMask and Child-tuning_D is the squared gradient of the task loss), and
decoding-time methods (proxy-tuning, ICL) score class words with the same log-likelihood the
training loop's evaluation uses. One definition (``token_log_likelihood``) serves the LM losses,
the evaluation's summed NLL and verbaliser scoring, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from peftjax.data.lm import IGNORE  # label id outside the loss (prompt, BOS and padding tokens)


def _row_weights(batch) -> jax.Array:
    return batch["mask"].astype(jnp.float32)


def classification_loss(logits, batch) -> jax.Array:
    w = _row_weights(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def regression_loss(scores, batch) -> jax.Array:
    w = _row_weights(batch)
    err = jnp.square(scores[..., 0].astype(jnp.float32) - batch["labels"].astype(jnp.float32))
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)


def token_log_likelihood(logits: jax.Array, labels: jax.Array, shift: bool = True
                         ) -> tuple[jax.Array, jax.Array]:
    """``(log p(label_t), valid_t)`` per position, both ``(batch, T)``.

    ``shift``: position t predicts token t+1 (decoder-only, as transformers shifts the labels;
    the last position predicts nothing and is not valid);
    False for encoder-decoder logits, which already align with their labels. ``valid`` is False
    where the label is ``IGNORE`` (there the log-probability is of token 0 and must not count).
    The log-softmax runs in float32 whatever the compute dtype: a bf16 log-partition loses the
    small differences between class words.
    """
    if shift:
        # Labels move left (the last position gets IGNORE) rather than the logits right: slicing
        # (batch, T, vocab) logits copies them, and their gradient is padded back (two full-size
        # copies of the largest array of an LM step: ~20 ms of op time in a trace of the small
        # Llama's 0.9 s LoRA step).
        labels = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    valid = labels != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         jnp.where(valid, labels, 0))
    return -ce, valid


def sequence_log_likelihood(logits: jax.Array, labels: jax.Array, shift: bool = True) -> jax.Array:
    """Σ_t log p(label_t) per row over the labelled positions (verbaliser scoring)."""
    logp, valid = token_log_likelihood(logits, labels, shift)
    return jnp.sum(logp * valid, axis=-1)


def lm_nll(logits: jax.Array, batch: dict, shift: bool) -> tuple[jax.Array, jax.Array]:
    """``(Σ NLL, number of tokens)`` over the labelled tokens of the batch's real rows."""
    logp, valid = token_log_likelihood(logits, batch["labels"], shift)
    valid = valid & batch["mask"][:, None]
    return -jnp.sum(logp * valid), jnp.sum(valid)


def causal_lm_loss(logits, batch) -> jax.Array:
    """Next-token cross-entropy on tokens whose label is not ``IGNORE`` (prompt tokens masked):
    the mean over the batch's labelled tokens. ``labels`` aligns with ``input_ids``; position t
    predicts token t+1, as transformers shifts."""
    nll, tokens = lm_nll(logits, batch, shift=True)
    return nll / jnp.maximum(tokens, 1)


def seq2seq_lm_loss(logits, batch) -> jax.Array:
    """Encoder-decoder (teacher forcing) cross-entropy on decoder ``labels`` that are not
    ``IGNORE``. The logits already align with ``labels`` (the decoder read them shifted right,
    with the decoder start token first), so there is no shift; the mean over the batch's real
    target tokens, as transformers' T5 loss."""
    nll, tokens = lm_nll(logits, batch, shift=False)
    return nll / jnp.maximum(tokens, 1)


LOSSES = {"classification": classification_loss, "regression": regression_loss,
          "causal_lm": causal_lm_loss, "seq2seq_lm": seq2seq_lm_loss}


def loss_for(head: str):
    try:
        return LOSSES[head]
    except KeyError:
        raise ValueError(f"no loss for head {head!r}; heads with a loss: {', '.join(LOSSES)}") from None


def params_loss_fn(model: Any) -> Callable[[dict, dict], jax.Array]:
    """``(flat base params, batch) -> scalar task loss`` of ``model`` in eval mode (no dropout).

    The loss a data-driven method differentiates with respect to the *base* params (Fisher
    information, gradient-based inits); rows whose ``mask`` is False weigh zero, so a padded
    example contributes no gradient.
    """
    from flax import traverse_util

    loss = loss_for(model.head)

    def fn(flat: dict, batch: dict) -> jax.Array:
        out = model.apply(traverse_util.unflatten_dict(flat, sep="."), batch, train=False)
        return loss(out, batch)

    return fn
