"""Proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy"): decoding-time tuning.

A large base LM ``B`` is steered, without touching its weights, by the difference a tuning made
to a small LM: ``M+`` (the small model after tuning, the *expert*) and ``M-`` (the same small
model before tuning, the *anti-expert*). At every step ``t`` the next-token logits are combined

    s̃_t = s_B(x_<t) + α · (s_M+(x_<t)[:V] − s_M-(x_<t)[:V]),     p̃(x_t | x_<t) = softmax(s̃_t)

(paper §2, eq. 1, with α = 1; α scales the steering, §6.2). Details follow the reference code
(alisawuffles/proxy-tuning ``modeling/dexperts.py``, ``DExpertsLlama.generate``):

* the small models' logits are truncated to the base vocabulary ``V`` (experts may carry extra
  tokens at the end of the shared vocabulary); a small model with *fewer* tokens than the base
  cannot score every base token and is refused, as is a model that is not a causal LM;
* temperature and top-p are applied to the *combined* logits, then softmax; greedy decoding is
  the argmax of the combined logits (``temperature = 0`` here, as in
  ``peftjax.models.generation``);
* rows stop at EOS and are padded afterwards.

Classification (``proxy_class_scores``) scores each class's verbaliser under the proxy
distribution: ``Σ_t log softmax(s̃_t)[y_t]`` over the verbaliser tokens, the rule decoder
fine-tuning uses (``peftjax.data.lm``), so a proxy-tuned large model is evaluated exactly like
the small tuned model it borrows from.

Design. Each of the three models is a ``CausalLM``: a model plus either plain params or a PEFT
method with its partitioned params (an unmerged LoRA, prompt-tuning, ... expert); the method's
hooks are active only inside that model's own forward, every other model runs under no-op hooks.
Each model keeps its own KV cache (``generation.KVCache``): all three are prefilled with the
prompt, then every step feeds the chosen token to all three. Generation is one jitted
``while_loop``; α and all weights are traced arguments, so sweeping α never recompiles. Step
``t`` samples with ``fold_in(rng, t)`` exactly as ``generation.generate``, so with α = 0 (or
identical expert and anti-expert) proxy generation *is* base generation, token for token.

    base = CausalLM.plain(large_model, large_params)
    expert = CausalLM.adapted(lora, peft.trainable, peft.frozen, peft.state)
    anti = CausalLM.plain(small_model, small_params)
    out = proxy_generate(base, expert, anti, ids, mask, max_new_tokens=32, alpha=1.0)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peftjax.losses import sequence_log_likelihood
from peftjax.models import generation
from peftjax.models import hooks as hooks_lib
from peftjax.models.registry import Model



# --------------------------------------------------------------------------------------------
# The models taking part.


@dataclasses.dataclass(frozen=True, eq=False)
class CausalLM:
    """One causal LM: a ``Model`` run either with plain params or through a PEFT method.

    ``weights`` is the traced part: nested flax params (plain) or ``(trainable, frozen, state)``
    of ``method`` (as ``Method.setup`` returns them). ``spec`` (model, method) is the static part
    a compiled function is keyed by.
    """

    model: Model
    weights: Any
    method: Any = None

    @classmethod
    def plain(cls, model: Model, params: Mapping[str, Any]) -> "CausalLM":
        """A model with its own params (nested flax layout, or flat dotted paths)."""
        params = dict(params)
        if params and all(not isinstance(v, Mapping) for v in params.values()) and any("." in k for k in params):
            params = traverse_util.unflatten_dict(params, sep=".")
        return cls(_check_causal(model, "model"), params, None)

    @classmethod
    def adapted(cls, method: Any, trainable: dict, frozen: dict, state: dict) -> "CausalLM":
        """``method``'s model with its PEFT params (hooks active for this model's calls only)."""
        return cls(_check_causal(method.model, f"{method.name} model"), (trainable, frozen, state), method)

    @property
    def spec(self) -> tuple:
        return (self.model, self.method)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def _check_causal(model: Model, what: str) -> Model:
    if not isinstance(model, Model):
        raise TypeError(f"{what} must be a peftjax.models.Model, got {type(model).__name__}")
    if model.head != "causal_lm":
        raise ValueError(f"proxy-tuning needs causal LMs; the {what} has head {model.head!r} "
                         f"({model.family.name} family). Build it with head='causal_lm'"
                         + ("" if "causal_lm" in model.family.heads else
                            f" (the {model.family.name} family has none: its heads are "
                            f"{', '.join(model.family.heads)})"))
    return model


def as_causal_lm(lm: CausalLM | tuple, what: str = "model") -> CausalLM:
    """A ``CausalLM`` from itself or a ``(model, params)`` pair."""
    if isinstance(lm, CausalLM):
        return lm
    if isinstance(lm, tuple) and len(lm) == 2:
        return CausalLM.plain(*lm)
    raise TypeError(f"the {what} must be a CausalLM or a (model, params) pair, got {type(lm).__name__}")


def _forward(spec: tuple, weights: Any, input_ids: jax.Array, attention_mask: jax.Array,
             cache: generation.KVCache | None = None):
    """Logits ``(B, L, V)`` (and the new cache when given one) of one model, inside a trace."""
    model, method = spec
    if method is None:
        with hooks_lib.use(None):  # no hooks from an enclosing context leak into a plain model
            return model.module.apply({"params": weights}, input_ids, attention_mask, train=False,
                                      cache=cache)
    trainable, frozen, state = weights
    return method.apply(trainable, frozen, state,
                        {"input_ids": input_ids, "attention_mask": attention_mask},
                        train=False, cache=cache)


def check_compatible(base: CausalLM, tuned: CausalLM, untuned: CausalLM,
                     tokenizers: Sequence[Any] | None = None) -> int:
    """The shared vocabulary size ``V`` (the base's); raises when the models cannot be combined.

    Every model must be a causal LM; the small models need at least ``V`` tokens (their logits
    are truncated to the base vocabulary, as the reference does). With ``tokenizers`` (base,
    tuned, untuned) the ids below ``V`` must name the same tokens in all three.
    """
    base, tuned, untuned = (as_causal_lm(m, w) for m, w in
                            ((base, "base model"), (tuned, "tuned model"), (untuned, "untuned model")))
    v = base.vocab_size
    for lm, name in ((tuned, "tuned"), (untuned, "untuned")):
        if lm.vocab_size < v:
            raise ValueError(
                f"incompatible vocabularies: the {name} small model has {lm.vocab_size} tokens, the "
                f"base model {v}; proxy-tuning truncates the small models' logits to the base "
                "vocabulary, so each small model needs at least as many tokens (a shared tokenizer)")
    if tokenizers is not None:
        if len(tokenizers) != 3:
            raise ValueError(f"tokenizers must be (base, tuned, untuned), got {len(tokenizers)}")
        ref = tokenizers[0].convert_ids_to_tokens(list(range(min(v, len(tokenizers[0])))))
        for tok, name in zip(tokenizers[1:], ("tuned", "untuned")):
            if tok is tokenizers[0]:
                continue
            other = tok.convert_ids_to_tokens(list(range(min(v, len(tok)))))
            diff = [i for i, (a, b) in enumerate(zip(ref, other)) if a != b]
            if len(other) != len(ref) or diff:
                first = diff[0] if diff else min(len(ref), len(other))
                raise ValueError(
                    f"incompatible vocabularies: the {name} model's tokenizer differs from the base "
                    f"tokenizer below id {v} (first difference at id {first}: "
                    f"{ref[first] if first < len(ref) else None!r} vs "
                    f"{other[first] if first < len(other) else None!r}); proxy-tuning adds logits "
                    "token by token, so all three models must share one vocabulary")
    return v


def combine_logits(base: jax.Array, tuned: jax.Array, untuned: jax.Array, alpha: float | jax.Array = 1.0
                   ) -> jax.Array:
    """``base + α (tuned[..., :V] − untuned[..., :V])`` in fp32, ``V`` the base vocabulary (eq. 1)."""
    v = base.shape[-1]
    if tuned.shape[-1] < v or untuned.shape[-1] < v:
        raise ValueError(f"small-model logits have {tuned.shape[-1]} / {untuned.shape[-1]} tokens, "
                         f"fewer than the base vocabulary {v}")
    f32 = lambda x: x.astype(jnp.float32)
    return f32(base) + jnp.asarray(alpha, jnp.float32) * (f32(tuned[..., :v]) - f32(untuned[..., :v]))


# --------------------------------------------------------------------------------------------
# Full-sequence logits and class scores.


@functools.partial(jax.jit, static_argnums=(0,))
def _proxy_logits(specs, weights, input_ids, attention_mask, alpha):
    outs = [_forward(s, w, input_ids, attention_mask) for s, w in zip(specs, weights)]
    return combine_logits(*outs, alpha)


def _prepare(base, tuned, untuned) -> tuple[tuple, tuple]:
    lms = (as_causal_lm(base, "base model"), as_causal_lm(tuned, "tuned model"),
           as_causal_lm(untuned, "untuned model"))
    check_compatible(*lms)
    return tuple(m.spec for m in lms), tuple(m.weights for m in lms)


def proxy_logits(base: CausalLM, tuned: CausalLM, untuned: CausalLM, input_ids: Any,
                 attention_mask: Any = None, alpha: float = 1.0) -> jax.Array:
    """Combined logits ``(B, L, V)`` at every position (full forward passes, no cache)."""
    specs, weights = _prepare(base, tuned, untuned)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return _proxy_logits(specs, weights, input_ids, mask, jnp.float32(alpha))


def candidate_scores(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], batch: Mapping[str, Any],
                     num_classes: int) -> jax.Array:
    """``(B, K)`` log-likelihood of each class's verbaliser: ``batch`` holds ``cand{k}_input_ids``,
    ``cand{k}_attention_mask`` and ``cand{k}_labels`` (``peftjax.data.lm.encode_lm(...,
    candidates=True)``); ``logits_fn(ids, mask)`` gives ``(B, L, V)`` logits."""
    missing = [f"cand{k}_{f}" for k in range(num_classes) for f in ("input_ids", "attention_mask", "labels")
               if f"cand{k}_{f}" not in batch]
    if missing:
        raise KeyError(f"the batch lacks {missing[:3]}...; encode it with "
                       "peftjax.data.lm.encode_lm(..., candidates=True)")
    scores = [sequence_log_likelihood(logits_fn(batch[f"cand{k}_input_ids"], batch[f"cand{k}_attention_mask"]),
                                      batch[f"cand{k}_labels"]) for k in range(num_classes)]
    return jnp.stack(scores, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _proxy_scores(specs, num_classes, weights, batch, alpha):
    def logits_fn(ids, mask):
        outs = [_forward(s, w, ids, mask) for s, w in zip(specs, weights)]
        return combine_logits(*outs, alpha)

    return candidate_scores(logits_fn, batch, num_classes)


def proxy_class_scores(base: CausalLM, tuned: CausalLM, untuned: CausalLM, batch: Mapping[str, Any],
                       num_classes: int, alpha: float = 1.0) -> jax.Array:
    """``(B, K)``: each class verbaliser's log-likelihood under the proxy distribution
    ``softmax(s_B + α (s_M+ − s_M-))``; the argmax is the predicted class."""
    specs, weights = _prepare(base, tuned, untuned)
    cand = {k: jnp.asarray(v) for k, v in batch.items() if k.startswith("cand")}
    return _proxy_scores(specs, int(num_classes), weights, cand, jnp.float32(alpha))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _lm_scores(spec, num_classes, weights, batch):
    return candidate_scores(lambda ids, mask: _forward(spec, weights, ids, mask), batch, num_classes)


def lm_class_scores(lm: CausalLM, batch: Mapping[str, Any], num_classes: int) -> jax.Array:
    """``(B, K)`` verbaliser log-likelihoods under one causal LM (zero-shot, ICL, a tuned model)."""
    lm = as_causal_lm(lm)
    cand = {k: jnp.asarray(v) for k, v in batch.items() if k.startswith("cand")}
    return _lm_scores(lm.spec, int(num_classes), lm.weights, cand)


def classify(score_fn: Callable[[dict], jax.Array], encoded: Mapping[str, np.ndarray], batch_size: int,
             *, progress: bool = False, desc: str = "scoring") -> np.ndarray:
    """Predicted class per row of an ``encode_lm(..., candidates=True)`` set, in row order.

    Batches are fixed-size (``peftjax.data.eval_batches``: padding rows dropped by ``mask``) and
    cut to length buckets, so ``score_fn`` compiles once per bucket.
    """
    from tqdm.auto import tqdm

    from peftjax import data as data_lib

    preds = []
    for batch in tqdm(data_lib.eval_batches(dict(encoded), batch_size), desc=desc, unit="batch",
                      total=data_lib.num_eval_batches(dict(encoded), batch_size), disable=not progress):
        scores = np.asarray(jax.device_get(score_fn(batch)))
        preds.append(np.argmax(scores, axis=-1)[np.asarray(batch["mask"], bool)])
    return np.concatenate(preds) if preds else np.zeros((0,), np.int64)


# --------------------------------------------------------------------------------------------
# Generation.


def _eos_ids(eos_token_id: int | Iterable[int] | None, config: Any) -> tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", ()) or ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _generate(specs, max_new_tokens, temperature, top_p, eos, pad, weights, input_ids, attention_mask,
              alpha, rng):
    b, l = input_ids.shape
    total = l + max_new_tokens
    caches, logits = [], []
    for spec, w in zip(specs, weights):
        cache = generation.init_cache(spec[0], b, total)
        out, cache = _forward(spec, w, input_ids, attention_mask, cache)
        logits.append(generation.last_token_logits(out, attention_mask))
        caches.append(cache)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def forward(token, t, caches):
        # One cached step of each model on the chosen token; the loop samples the combination.
        step_logits, new_caches = [], []
        for spec, w, cache in zip(specs, weights, caches):
            lg, cache = _forward(spec, w, token[:, None], jnp.ones((b, 1), jnp.int32), cache)
            step_logits.append(lg[:, 0])
            new_caches.append(cache)
        return combine_logits(*step_logits, alpha), tuple(new_caches)

    out = generation.decode_loop(combine_logits(*logits, alpha), forward, tuple(caches),
                                 max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
                                 top_p=top_p, pad=pad, eos_arr=eos_arr)
    return jnp.concatenate([input_ids, out], axis=1)


def proxy_generate(base: CausalLM, tuned: CausalLM, untuned: CausalLM, input_ids: Any,
                   attention_mask: Any = None, max_new_tokens: int = 32, *, alpha: float = 1.0,
                   temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None,
                   eos_token_id: int | Sequence[int] | None = None,
                   pad_token_id: int | None = None) -> jax.Array:
    """Proxy-tuned generation; returns ``(B, L + max_new_tokens)`` int32, prompt then new tokens.

    Args:
      base, tuned, untuned: the large base model, the small tuned expert and the small untuned
        anti-expert (``CausalLM`` or ``(model, params)``), sharing the base vocabulary.
      input_ids, attention_mask: ``(B, L)`` prompt, left or right padded (each row continues after
        its last real token); the same prompt goes to all three models.
      alpha: steering strength α (1 = the paper's default; 0 = the base model alone).
      temperature: 0 = greedy argmax of the combined logits; otherwise sample from
        ``softmax(top_p_filter(s̃ / T))`` (temperature and top-p applied after combining).
      rng: PRNG key, required when sampling; step ``t`` uses ``fold_in(rng, t)`` (deterministic).
      eos_token_id, pad_token_id: as ``generation.generate`` (defaults from the base config).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng for determinism")
    specs, weights = _prepare(base, tuned, untuned)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise ValueError(f"input_ids must be (B, L) with a mask of the same shape, got "
                         f"{input_ids.shape} and {mask.shape}")
    if max_new_tokens < 1:
        return input_ids
    config = specs[0][0].hf_config
    eos = _eos_ids(eos_token_id, config)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    return _generate(specs, int(max_new_tokens), float(temperature), float(top_p), eos, int(pad_token_id),
                     weights, input_ids, mask, jnp.float32(alpha), rng)
