"""Model families registered by Hugging Face ``model_type``, and the ``Model`` handle.

A ``Model`` bundles a flax module with what the rest of peftjax needs to know about it without
knowing the architecture: which inputs it takes, which params form the task head (trained by
every method and reported separately), and the prefix under which the bare backbone's weights
live in a checkpoint (``bert.`` / ``roberta.`` / ``model.``). A new family is one module that
calls ``register_family``; nothing else changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HEADS = ("none", "classification", "regression", "causal_lm", "seq2seq_lm")
# What a classification/regression head reads (``pooling`` of a model config):
#   cls   the head transformers builds for the family (BERT: tanh(pooler.dense) of [CLS];
#         RoBERTa: <s>; decoders: the last real token);
#   mean  the masked mean of the last hidden states over real tokens, as sentence-transformers'
#         Pooling(pooling_mode_mean_tokens) computes sum_t(h_t m_t) / max(sum_t m_t, 1e-9)
#         (sentence_transformers/models/Pooling.py); offered by families listing it in
#         ``Family.poolings`` (the encoders).
POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build and drive one architecture family.

    Attributes:
      name: family name (``"bert"``, ``"llama"``).
      model_types: the transformers ``model_type`` values it serves.
      config_from_hf: transformers config → frozen family config dataclass.
      build: ``(config, head, num_labels, dtype, remat) -> nn.Module``; a family that offers
        ``scan_layers`` (the Llama-architecture ones, ``layer_scan.py``) takes
        ``scan_layers=True`` too, and lists it in ``options``.
      heads: heads this family supports (subset of ``HEADS``).
      head_prefixes: ``(config, head) -> tuple`` of dotted param prefixes forming the task head.
      backbone_prefix: ``(config, head) -> str``: prefix of the backbone params in the flax tree
        (``""`` when the module is the bare backbone); checkpoints of the bare backbone load into
        a model with a head by adding it.
      input_names: batch keys the module's ``__call__`` takes, in order.
      optional_params: regex over param paths that a checkpoint may lack and that are then
        initialised fresh, as transformers does (BERT's pooler: MLM checkpoints ship none).
      untransposed_kernels: regex over param paths of kernels that the checkpoint already stores
        as (in, out), so ``hf_io`` must not transpose them (GPT-2's ``Conv1D`` layers); every
        other kernel is an ``nn.Linear`` weight, stored (out, in).
      tied_fallbacks: ``(tensor, source)`` pairs: a checkpoint without ``tensor`` loads it from
        ``source``, as transformers ties it (a T5 ``lm_head.weight`` absent: ``shared.weight``).
      poolings: the ``POOLINGS`` its classification/regression heads offer. Non-empty: the
        family config has a ``pooling`` field, which ``build_model`` sets, so ``build`` and
        ``head_prefixes`` see it. Empty (decoders, T5): the head is transformers' alone and only
        ``"cls"`` (meaning that head) is accepted; ``"mean"`` is refused rather than ignored, so
        a run never reports a pooling that did not happen.
      stacked_params: ``(path, shape) -> per-expert HF tensor names | None``: params stacked over
        a leading experts axis that checkpoints keep as one tensor per expert (``hf_io`` stacks
        them on load, concatenating each expert's parts along the output axis, and splits them
        on save); ``None`` for every ordinary param. Mixture-of-experts families.
      options: optional build switches ``build`` takes as keywords (``"scan_layers"``).
      aux_loss: ``(config, router_logits, attention_mask) -> loss | None``: an auxiliary training
        loss computed from what the model sowed (``moe.ROUTER_LOGITS``); ``Model.apply`` adds it
        to the losses being collected (``collect_aux_losses``) in training. MoE families.
    """

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[Any], Any]
    build: Callable[..., nn.Module]
    heads: tuple[str, ...]
    head_prefixes: Callable[[Any, str], tuple[str, ...]]
    backbone_prefix: Callable[[Any, str], str]
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    optional_params: str = ""
    untransposed_kernels: str = ""
    tied_fallbacks: tuple[tuple[str, str], ...] = ()
    poolings: tuple[str, ...] = ()
    stacked_params: Callable[[str, tuple[int, ...]], tuple[tuple[str, ...], ...] | None] | None = None
    aux_loss: Callable[[Any, list, Any], Any] | None = None
    options: tuple[str, ...] = ()


_AUX = threading.local()


@contextlib.contextmanager
def collect_aux_losses() -> Iterator[list]:
    """Collects the auxiliary losses (``Family.aux_loss``) of every training-mode model call
    traced inside the block, e.g. a MoE router's load-balancing loss, into the yielded list; the
    train step adds their sum to its objective. Calls outside any such block add nothing."""
    stack = getattr(_AUX, "stack", None)
    if stack is None:
        stack = _AUX.stack = []
    stack.append([])
    try:
        yield stack[-1]
    finally:
        stack.pop()


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def family_for(model_type: str) -> Family:
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; supported model types: "
                         f"{', '.join(supported_model_types())}") from None


def hf_config_from(spec: Any):
    """A transformers config from a dict (``config.json`` contents) or a config object.

    transformers' config classes fill in the defaults a ``config.json`` omits, so they are
    the single source of truth for architecture facts.
    """
    import transformers

    if isinstance(spec, transformers.PretrainedConfig):
        return spec
    if hasattr(spec, "to_dict") and not isinstance(spec, Mapping):  # ml_collections.ConfigDict
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise TypeError(f"expected a config dict or transformers.PretrainedConfig, got {type(spec).__name__}")
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ValueError("the model config has no 'model_type'; supported model types: "
                         f"{', '.join(supported_model_types())}")
    family_for(model_type)  # fail with the supported list before transformers' own error
    return transformers.AutoConfig.for_model(model_type, **spec)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model of a registered family with a chosen head.

    ``apply(params, batch, train=..., rng=...)`` returns the head's output: logits for
    classification / causal LM, a score for regression, hidden states for ``head="none"``.
    """

    family: Family
    config: Any
    head: str
    num_labels: int
    module: nn.Module
    hf_config: Any
    dtype: Any = jnp.float32

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        return self.family.head_prefixes(self.config, self.head)

    @property
    def pooling(self) -> str | None:
        """What the classification/regression head reads (``POOLINGS``); None for a family whose
        head is fixed (decoders read the last token, T5 has none)."""
        return getattr(self.config, "pooling", None) if self.family.poolings else None

    @property
    def backbone_prefix(self) -> str:
        return self.family.backbone_prefix(self.config, self.head)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.family.input_names

    def dummy_batch(self, batch: int = 1, seq: int = 8) -> dict[str, np.ndarray]:
        out = {"input_ids": np.ones((batch, seq), np.int32),
               "attention_mask": np.ones((batch, seq), np.int32)}
        if "token_type_ids" in self.input_names:
            out["token_type_ids"] = np.zeros((batch, seq), np.int32)
        if "decoder_input_ids" in self.input_names:  # encoder-decoder: a decoder sequence too
            out["decoder_input_ids"] = np.zeros((batch, seq), np.int32)
            out["decoder_attention_mask"] = np.ones((batch, seq), np.int32)
        return out

    def init(self, rng: jax.Array, batch: Mapping[str, Any] | None = None) -> dict:
        """Randomly initialised params (a nested dict, flax layout)."""
        batch = self.dummy_batch() if batch is None else batch
        return _init_params(self.module, rng, self._inputs(batch))

    def abstract_params(self) -> dict:
        """The param tree as ``jax.ShapeDtypeStruct`` leaves: nothing is allocated (7B in seconds).

        Cached on the model: methods, counting and discovery all ask for it.
        """
        cached = self.__dict__.get("_abstract_params")
        if cached is None:
            cached = jax.eval_shape(lambda r: self.init(r), jax.random.PRNGKey(0))
            object.__setattr__(self, "_abstract_params", cached)
        return cached

    def _inputs(self, batch: Mapping[str, Any]) -> list:
        return [batch.get(name) for name in self.input_names]

    def apply(self, params: dict, batch: Mapping[str, Any], *, train: bool = False,
              rng: jax.Array | None = None, **kwargs) -> Any:
        rngs = {"dropout": rng} if (train and rng is not None) else None
        collector = (getattr(_AUX, "stack", None) or [None])[-1]
        if train and collector is not None and self.family.aux_loss is not None \
                and getattr(self.config, "output_router_logits", False):
            from peftjax.models import moe

            out, variables = self.module.apply({"params": params}, *self._inputs(batch), train=train,
                                               rngs=rngs, mutable=[moe.ROUTER_LOGITS], **kwargs)
            logits = moe.collected_router_logits(variables)
            loss = self.family.aux_loss(self.config, logits, _rows_mask(batch.get("attention_mask"), logits))
            if loss is not None:
                collector.append(loss)
        else:
            out = self.module.apply({"params": params}, *self._inputs(batch), train=train, rngs=rngs,
                                    **kwargs)
        if self.head == "none" and isinstance(out, tuple):
            return out[0]
        return out


@functools.partial(jax.jit, static_argnums=0)
def _init_params(module: nn.Module, rng: jax.Array, inputs: list) -> dict:
    """``module.init``'s params, jitted (op by op, initialisation dispatches hundreds of tiny
    computations) with the module static: flax modules hash and compare by their fields, so
    every ``Model`` of one architecture reuses one trace (a tiny model's init traces its whole
    forward pass: ~0.5 s that each run, sweep cell and test building it again paid)."""
    return module.init({"params": rng}, *inputs, train=False)["params"]


def _rows_mask(mask: Any, router_logits: list) -> Any:
    """The attention mask as the router saw the rows: a prompt method's ``n`` virtual tokens
    come first in each row (always attended), so a ``(B, L)`` mask becomes ``(B, n + L)``."""
    if mask is None or not router_logits:
        return mask
    mask = jnp.asarray(mask)
    b, l = mask.shape
    rows = router_logits[0].shape[0]
    if rows == b * l:
        return mask
    if rows % b or rows // b < l:
        raise ValueError(f"router logits have {rows} rows for a ({b}, {l}) batch")
    return jnp.concatenate([jnp.ones((b, rows // b - l), mask.dtype), mask], axis=1)


def build_model(hf_config: Any, head: str = "none", num_labels: int | None = None,
                dtype: Any = jnp.float32, remat: bool = False, pooling: str = "cls",
                scan_layers: bool = False) -> Model:
    """Builds a ``Model`` from a transformers config (object or ``config.json`` dict).

    ``pooling`` (``POOLINGS``) is what a classification/regression head reads; see
    ``Family.poolings`` for the families that offer ``"mean"``. ``scan_layers``: run the layer
    stack as one ``lax.scan`` (compiled once per layer; ``layer_scan.py``), for the families
    that offer it.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
    hf = hf_config_from(hf_config)
    family = family_for(hf.model_type)
    if head not in family.heads:
        raise ValueError(f"the {family.name} family has no {head!r} head (task/model mismatch); "
                         f"its heads: {', '.join(family.heads)}")
    if pooling not in (family.poolings or ("cls",)):
        raise ValueError(f"the {family.name} family has no pooling={pooling!r}; its classification "
                         "head is transformers' own (pooling='cls'); 'mean' is offered by: "
                         + ", ".join(sorted({f.name for f in _FAMILIES.values() if "mean" in f.poolings})))
    if head == "classification":
        num_labels = num_labels or getattr(hf, "num_labels", 2)
        if num_labels < 2:
            raise ValueError(f"a classification head needs num_labels >= 2, got {num_labels}")
    elif head == "regression":
        num_labels = 1
    else:
        num_labels = 0
    config = family.config_from_hf(hf)
    if family.poolings:
        config = dataclasses.replace(config, pooling=pooling)
    if scan_layers:
        if "scan_layers" not in family.options:
            raise ValueError(f"the {family.name} family has no scan_layers option; families with "
                             "it: " + ", ".join(sorted({f.name for f in _FAMILIES.values()
                                                         if "scan_layers" in f.options})))
        module = family.build(config, head, num_labels, dtype, remat, scan_layers=True)
    else:
        module = family.build(config, head, num_labels, dtype, remat)
    return Model(family=family, config=config, head=head, num_labels=num_labels, module=module,
                 hf_config=hf, dtype=dtype)


def head_description(model: Model) -> dict:
    """What a result states about the task head: the pooling and the params the head holds.

    ``{"pooling": "cls" | "mean" | None, "head": {"params": [paths], "count": n}}``. The params
    are those under ``model.head_prefixes`` (trained by every method, reported apart from the
    method's own): with ``cls`` on BERT the ``classifier`` only, the pooler being backbone (as
    HF PEFT's ``modules_to_save=["classifier"]``); with ``mean`` the pooler does not exist.
    """
    from flax import traverse_util

    flat = traverse_util.flatten_dict(model.abstract_params(), sep=".")
    paths = sorted(p for p in flat
                   if any(p == h or p.startswith(h + ".") for h in model.head_prefixes))
    count = sum(int(np.prod(flat[p].shape)) for p in paths)
    return {"pooling": model.pooling, "head": {"params": paths, "count": count}}
