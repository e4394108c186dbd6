"""Encoder family: BERT, RoBERTa and MiniLM (BERT architecture) in Flax linen.

Module names are Hugging Face's (``bert.encoder.layer.0.attention.self.query``), so checkpoints
load by name and PEFT target patterns (``query|value``) carry over. The forward pass follows
transformers' ``modeling_bert`` / ``modeling_roberta`` exactly (post-LayerNorm residual blocks,
exact-erf GELU, additive padding mask), which the parity test checks to 1e-4 against PyTorch.

Heads (HF layouts, so checkpoints with heads load), by the model config's ``pooling``:

* ``cls`` (transformers' heads, unchanged):
  BERT sequence classification/regression: ``pooler.dense`` + tanh on [CLS], dropout,
  ``classifier`` (BertForSequenceClassification); RoBERTa: no pooler; ``classifier.dense`` +
  tanh, ``classifier.out_proj`` on <s> (RobertaClassificationHead).
* ``mean`` (sentence-transformers' pooling, which all-MiniLM-L6-v2 and the other sentence
  embedding checkpoints were trained with; their BERT pooler is untrained, e.g. MiniLM's
  ``pooler.dense.bias`` is exactly 0): the masked mean of the last hidden states over real
  tokens (``masked_mean``) replaces the pooler's output (BERT: dropout, ``classifier``) or the
  <s> state (RoBERTa: the head's own dropout, ``dense`` + tanh, dropout, ``out_proj`` are kept,
  they are trained with the head). The model then has no ``pooler`` params at all (a checkpoint's
  pooler is not loaded). The mean uses the *effective* mask that ``BertModel`` returns, so with
  prompt tuning the virtual tokens are averaged too (they are part of the sequence the encoder
  reads, as the [CLS] pooler reads the first virtual token under ``cls``). The bare encoder
  (head ``"none"``) is the same under both poolings.

The task head is ``classifier`` for both poolings and both model types (``_head_prefixes``): the
BERT pooler is backbone under ``cls``, as in HF PEFT (``modules_to_save=["classifier"]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models import hooks, layer_scan, registry
from peftjax.models.layers import (Dense, Dropout, Embed, LayerNorm, activation,
                                   attention_weights_and_output, normal_init, remat_block)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture facts of a BERT-family model (from a transformers config)."""

    model_type: str = "bert"  # "bert" or "roberta"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # Not a transformers field: what the classification head reads ("cls" | "mean", see the
    # module docstring); registry.build_model sets it from the model config.
    pooling: str = "cls"

    @classmethod
    def from_hf(cls, hf: Any) -> "BertConfig":
        fields = {f.name for f in dataclasses.fields(cls)} - {"pooling"}
        values = {k: getattr(hf, k) for k in fields if hasattr(hf, k) and getattr(hf, k) is not None
                  or k == "classifier_dropout" and hasattr(hf, k)}
        if values.get("pad_token_id") is None:
            values["pad_token_id"] = 1 if values.get("model_type") == "roberta" else 0
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, train: bool):
        c = self.config
        init = normal_init(c.initializer_range)
        embeds = Embed(c.vocab_size, c.hidden_size, self.dtype, embedding_init=init,
                       name="word_embeddings")(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        seq_before = embeds.shape[1]
        embeds, attention_mask, token_type_ids = hooks.active().embeddings(
            self, embeds, attention_mask, token_type_ids)
        batch, seq = embeds.shape[:2]
        if c.model_type == "roberta":
            pad = c.pad_token_id
            if seq == seq_before:
                # RoBERTa numbers positions from padding_idx + 1, skipping pad tokens.
                not_pad = (input_ids != pad).astype(jnp.int32)
                positions = jnp.cumsum(not_pad, axis=1) * not_pad + pad
            else:
                # Embeddings were prepended (prompt tuning): transformers then numbers the
                # inputs_embeds sequentially, as HF PEFT does; we follow it for interop.
                positions = jnp.broadcast_to(jnp.arange(seq) + pad + 1, (batch, seq))
        else:
            positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        embeds = embeds + Embed(c.max_position_embeddings, c.hidden_size, self.dtype,
                                embedding_init=init, name="position_embeddings")(positions)
        embeds = embeds + Embed(c.type_vocab_size, c.hidden_size, self.dtype,
                                embedding_init=init, name="token_type_embeddings")(token_type_ids)
        embeds = LayerNorm(c.layer_norm_eps, self.dtype, name="LayerNorm")(embeds)
        embeds = Dropout(c.hidden_dropout_prob)(embeds, deterministic=not train)
        return embeds, attention_mask


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, train: bool):
        c = self.config
        init = normal_init(c.initializer_range)
        b, l, _ = h.shape
        heads = lambda x: x.reshape(b, x.shape[1], c.num_attention_heads, c.head_dim)
        q = heads(Dense(c.hidden_size, dtype=self.dtype, kernel_init=init, name="query")(h))
        k = heads(Dense(c.hidden_size, dtype=self.dtype, kernel_init=init, name="key")(h))
        v = heads(Dense(c.hidden_size, dtype=self.dtype, kernel_init=init, name="value")(h))
        k, v, mask = hooks.active().attention_kv(self, k, v, mask)
        drop = Dropout(c.attention_probs_dropout_prob)
        out = attention_weights_and_output(q, k, v, mask, lambda p: drop(p, deterministic=not train))
        return out.reshape(b, l, c.hidden_size)


class BertOutput(nn.Module):
    """Projection, dropout, then the post-LayerNorm residual ``LayerNorm(h + residual)``, which
    the ``block_output`` hook computes (adapters change it; the LayerNorm is handed over as
    ``norm`` so a Pfeiffer adapter can apply it before and after itself)."""

    config: BertConfig
    kind: str  # "attention" (BertSelfOutput) or "ffn" (BertOutput)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, residual, train: bool):
        c = self.config
        h = Dense(c.hidden_size, dtype=self.dtype, kernel_init=normal_init(c.initializer_range),
                  name="dense")(h)
        h = Dropout(c.hidden_dropout_prob)(h, deterministic=not train)
        norm = LayerNorm(c.layer_norm_eps, self.dtype, name="LayerNorm")
        return hooks.active().block_output(self, self.kind, h, residual, norm)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, train: bool):
        ctx = BertSelfAttention(self.config, self.dtype, name="self")(h, mask, train)
        return BertOutput(self.config, "attention", self.dtype, name="output")(ctx, h, train)


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        c = self.config
        h = Dense(c.intermediate_size, dtype=self.dtype, kernel_init=normal_init(c.initializer_range),
                  name="dense")(h)
        return activation(c.hidden_act)(h)


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, train: bool):
        h = BertAttention(self.config, self.dtype, name="attention")(h, mask, train)
        ffn = BertIntermediate(self.config, self.dtype, name="intermediate")(h)
        return BertOutput(self.config, "ffn", self.dtype, name="output")(ffn, h, train)


class BertLayerStack(nn.Module):
    """Holds layers named "0", "1", ... so paths read ``encoder.layer.3``."""

    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool | str = False  # a layers.REMAT_POLICIES name, or True/False
    scan: bool = False  # one lax.scan over the layers (layer_scan.py)

    @nn.compact
    def __call__(self, h, mask, train: bool):
        if layer_scan.scanning(self):
            # Every BERT layer reads the same padding mask: nothing is picked per layer.
            return layer_scan.scan_stack(
                self, lambda: BertLayer(self.config, self.dtype, parent=None), h,
                lambda i: (mask, train), self.config.num_hidden_layers, self.remat, train,
                returns_state=False)
        layer_cls = remat_block(BertLayer, self.remat, static_argnums=(3,))
        for i in range(self.config.num_hidden_layers):
            h = layer_cls(self.config, self.dtype, name=str(i))(h, mask, train)
        return h


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, h, mask, train: bool):
        return BertLayerStack(self.config, self.dtype, self.remat, self.scan, name="layer")(h, mask, train)


class BertModel(nn.Module):
    """The bare encoder: returns (last hidden states, effective attention mask).

    The mask is returned because a prompt method may have extended the sequence.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    add_pooling_layer: bool = True
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False):
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        h, attention_mask = BertEmbeddings(c, self.dtype, name="embeddings")(
            input_ids, attention_mask, token_type_ids, train)
        mask = attention_mask.astype(bool)[:, None, None, :]
        mask = jnp.broadcast_to(mask, (h.shape[0], 1, h.shape[1], h.shape[1]))
        h = BertEncoder(c, self.dtype, self.remat, self.scan, name="encoder")(h, mask, train)
        pooled = None
        if self.add_pooling_layer:
            pooled = BertPooler(c, self.dtype, name="pooler")(h)
        return h, pooled, attention_mask


class BertPooler(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        c = self.config
        return jnp.tanh(Dense(c.hidden_size, dtype=self.dtype,
                              kernel_init=normal_init(c.initializer_range), name="dense")(h[:, 0]))


def masked_mean(h: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``h`` (batch, seq, d) over the positions where ``mask`` (batch, seq) is nonzero.

    sentence-transformers' ``Pooling`` with ``pooling_mode_mean_tokens``
    (sentence_transformers/models/Pooling.py): ``sum_t h_t m_t / max(sum_t m_t, 1e-9)``, so an
    all-padding row gives zeros, not NaN. Summed in float32 (a bf16 sum over 64+ tokens loses
    digits), returned in ``h``'s dtype.
    """
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(h.astype(jnp.float32) * m, axis=1)
    return (total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)).astype(h.dtype)


class RobertaClassificationHead(nn.Module):
    config: BertConfig
    num_labels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool, features: jax.Array | None = None):
        """``features``: the pooled vector to classify (``mean``); None reads <s> (``cls``)."""
        c = self.config
        rate = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        init = normal_init(c.initializer_range)
        x = Dropout(rate)(h[:, 0] if features is None else features, deterministic=not train)
        x = jnp.tanh(Dense(c.hidden_size, dtype=self.dtype, kernel_init=init, name="dense")(x))
        x = Dropout(rate)(x, deterministic=not train)
        return Dense(self.num_labels, dtype=self.dtype, kernel_init=init, name="out_proj")(x)


class BertForSequenceClassification(nn.Module):
    """Sequence classification (num_labels > 1) or regression (num_labels == 1) head."""

    config: BertConfig
    num_labels: int
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train: bool = False):
        c = self.config
        if c.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {c.pooling!r}; valid poolings: cls, mean")
        roberta = c.model_type == "roberta"
        mean = c.pooling == "mean"
        h, pooled, mask = BertModel(c, self.dtype, add_pooling_layer=not (roberta or mean),
                                    remat=self.remat, scan=self.scan, name=c.model_type)(
            input_ids, attention_mask, token_type_ids, train)
        if mean:  # the effective mask: prompt tuning's virtual tokens count as real tokens
            pooled = masked_mean(h, mask)
        if roberta:
            return RobertaClassificationHead(c, self.num_labels, self.dtype, name="classifier")(
                h, train, pooled if mean else None)
        rate = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        pooled = Dropout(rate)(pooled, deterministic=not train)
        return Dense(self.num_labels, dtype=self.dtype, kernel_init=normal_init(c.initializer_range),
                     name="classifier")(pooled)


def _build(config: BertConfig, head: str, num_labels: int, dtype, remat: bool,
           scan_layers: bool = False) -> nn.Module:
    if head == "none":
        return BertModel(config, dtype, add_pooling_layer=True, remat=remat, scan=scan_layers)
    return BertForSequenceClassification(config, num_labels, dtype, remat, scan_layers)


def _head_prefixes(config: BertConfig, head: str) -> tuple[str, ...]:
    """The task head, trained by every method: ``classifier`` under both poolings (BERT's
    ``classifier`` Dense; RoBERTa's ``classifier.dense`` + ``out_proj``). Under ``cls`` the BERT
    pooler is backbone, as in HF PEFT's ``modules_to_save=["classifier"]``; under ``mean`` the
    model has no pooler."""
    return () if head == "none" else ("classifier",)


def _backbone_prefix(config: BertConfig, head: str) -> str:
    return "" if head == "none" else config.model_type


FAMILY = registry.register_family(registry.Family(
    name="bert",
    options=("scan_layers",),
    model_types=("bert", "roberta"),
    config_from_hf=BertConfig.from_hf,
    build=_build,
    heads=("none", "classification", "regression"),
    head_prefixes=_head_prefixes,
    backbone_prefix=_backbone_prefix,
    input_names=("input_ids", "attention_mask", "token_type_ids"),
    optional_params=r"(^|\.)pooler\.",
    poolings=("cls", "mean"),
))
