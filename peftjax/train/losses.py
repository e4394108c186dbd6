"""Task losses. Every batch carries ``mask`` (bool, per row): padded rows count for nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE = -100  # label id excluded from the causal-LM loss (prompt and padding tokens)


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


def causal_lm_loss(logits, batch) -> jax.Array:
    """Next-token cross-entropy on tokens whose label is not ``IGNORE`` (prompt tokens masked).

    ``labels`` aligns with ``input_ids``; position t predicts token t+1, as transformers shifts.
    """
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].astype(jnp.float32)
    valid = (labels != IGNORE) & batch["mask"][:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def seq2seq_lm_loss(logits, batch) -> jax.Array:
    """Encoder-decoder (teacher forcing) cross-entropy on decoder ``labels`` that are not ``IGNORE``.

    The logits already align with ``labels`` (the decoder read them shifted right, with the
    decoder start token first), so unlike ``causal_lm_loss`` there is no shift here; the mean
    over the batch's real target tokens, as transformers' T5 loss.
    """
    labels = batch["labels"]
    valid = (labels != IGNORE) & batch["mask"][:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         jnp.where(valid, labels, 0))
    return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


LOSSES = {"classification": classification_loss, "regression": regression_loss,
          "causal_lm": causal_lm_loss, "seq2seq_lm": seq2seq_lm_loss}


def loss_for(head: str):
    try:
        return LOSSES[head]
    except KeyError:
        raise ValueError(f"no loss for head {head!r}; heads with a loss: {', '.join(LOSSES)}") from None
