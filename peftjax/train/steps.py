"""Jitted train and eval steps, pure functions of the partitioned trees.

``jax.value_and_grad`` differentiates ``trainable`` only: frozen params are a non-differentiated
argument, so XLA computes no weight gradient for them and optax keeps no state for them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.methods.core import Method
from peftjax.models import registry
from peftjax.losses import IGNORE, lm_nll, loss_for, sequence_log_likelihood


class TrainState(NamedTuple):
    step: jax.Array          # micro-steps taken (optimizer updates × accumulation)
    trainable: dict
    opt_state: Any
    method_state: dict
    rng: jax.Array | None = None   # the run's base key (uint32 key data): dropout, DyLoRA's ranks


def init_state(trainable: dict, method_state: dict, tx: optax.GradientTransformation,
               seed: int = 0) -> TrainState:
    """A fresh train state that owns its buffers.

    The trees are copied: the train step donates its state, and donating arrays shared with the
    caller's base params (full fine-tuning's trainable tree *is* the base) would delete them.
    The run's ``seed`` becomes the state's base key — an input of the compiled step, not a
    constant in it, so runs that differ only in seed share one compiled program (and the
    persistent compilation cache serves every seed of a sweep from one compile).
    """
    trainable = jax.tree.map(jnp.copy, trainable)
    method_state = jax.tree.map(jnp.copy, method_state)
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), method_state,
                      jax.random.PRNGKey(seed))


def make_train_step(method: Method, tx: optax.GradientTransformation, seed: int | None = None,
                    loss_fn: Callable | None = None) -> Callable:
    """``(state, frozen, batch) -> (state, metrics)``; the step's rng is fold_in(key, step) so a
    resumed run draws exactly the dropout masks of an uninterrupted one. The key is the state's
    (``init_state(..., seed)``); ``seed`` given here overrides it with a constant."""
    loss_fn = loss_fn or loss_for(method.model.head)
    fixed_rng = None if seed is None else jax.random.PRNGKey(seed)

    def step_fn(state: TrainState, frozen: dict, batch: dict):
        base_rng = fixed_rng if fixed_rng is not None else state.rng
        rng = jax.random.fold_in(base_rng, state.step)

        def objective(trainable):
            # Auxiliary losses the model adds in training (a MoE router's load balancing, when
            # its config enables it) join the objective; the reported loss stays the task's.
            with registry.collect_aux_losses() as aux:
                out = method.apply(trainable, frozen, state.method_state, batch, train=True, rng=rng)
            task = loss_fn(out, batch)
            aux_total = sum(aux) if aux else jnp.zeros((), jnp.float32)
            return task + method.regularizer(trainable, state.method_state) + aux_total, (task, aux_total)

        (_, (task_loss, aux_loss)), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        # The method state travels to the optimizer as an extra argument: a method's gradient
        # transform may read it (LoRA-FA's projection of B's gradient by its frozen A).
        updates, opt_state = optax.with_extra_args_support(tx).update(
            grads, state.opt_state, state.trainable, method_state=state.method_state)
        trainable = optax.apply_updates(state.trainable, updates)
        method_state, trainable = method.update_state(state.method_state, trainable, grads, state.step)
        metrics = {"loss": task_loss, "grad_norm": optax.global_norm(grads)}
        if getattr(method.model.config, "output_router_logits", False):
            metrics["aux_loss"] = aux_loss
        return TrainState(state.step + 1, trainable, opt_state, method_state, state.rng), metrics

    return step_fn


def make_eval_step(method: Method, lm_classes: int = 0) -> Callable:
    """``(trainable, frozen, method_state, batch) -> outputs`` for the metrics.

    Classification heads give class ids, regression heads scores, causal and seq2seq LMs the
    summed NLL.
    With ``lm_classes = K`` a decoder classifies: each class's verbaliser sequence
    (``cand{k}_*`` in the batch) is scored by its log-likelihood and the best class wins; an
    encoder-decoder reads ``input_ids`` once per class and scores ``cand{k}_labels`` as targets.
    """
    head = method.model.head

    def eval_fn(trainable, frozen, method_state, batch):
        run = lambda b: method.apply(trainable, frozen, method_state, b, train=False)
        if lm_classes:
            scores = []
            for k in range(lm_classes):
                if head == "seq2seq_lm":  # encoder reads the prompt, decoder scores the class words
                    sub = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                           "labels": batch[f"cand{k}_labels"]}
                    scores.append(sequence_log_likelihood(run(sub), sub["labels"], shift=False))
                    continue
                sub = {"input_ids": batch[f"cand{k}_input_ids"],
                       "attention_mask": batch[f"cand{k}_attention_mask"]}
                scores.append(sequence_log_likelihood(run(sub), batch[f"cand{k}_labels"]))
            return {"predictions": jnp.argmax(jnp.stack(scores, axis=-1), axis=-1)}
        out = run(batch)
        if head == "classification":
            return {"predictions": jnp.argmax(out, axis=-1)}
        if head == "regression":
            return {"predictions": out[..., 0].astype(jnp.float32)}
        # decoder-only: position t predicts token t+1; seq2seq logits align with their labels
        nll, tokens = lm_nll(out, batch, shift=head != "seq2seq_lm")
        return {"nll_sum": nll, "tokens": tokens}

    return eval_fn


def greedy_exact_match(method: Method, trainable: dict, frozen: dict, method_state: dict,
                       encoded: dict, *, limit: int, batch_size: int, eos_token_id: int,
                       pad_token_id: int = 0) -> dict[str, float]:
    """Exact match of greedy generation on ``limit`` rows (evenly spread) of a response-labelled split.

    A row's prompt is its tokens before the first labelled position and its reference the
    labelled tokens (the response and its EOS, as ``peftjax.data.instructions`` encodes them).
    The adapted model continues each prompt greedily (``models.generation.generate``, KV cache,
    the method's hooks active) for as many tokens as the longest reference; a row matches when its
    tokens up to and including the first EOS equal the reference exactly. Prompts are
    left-padded and batches hold ``batch_size`` rows (the last filled with copies), so one
    program serves every batch. Returns ``exact_match`` and ``exact_match_n`` (rows scored).
    """
    from flax import traverse_util

    from peftjax.models import generation, hooks

    total = len(encoded["labels"])
    if total == 0 or limit < 1:
        raise ValueError(f"no rows to generate for (split of {total} rows, limit={limit})")
    # Evenly spread rows: evaluation splits are sorted by length, so a prefix would be the shortest.
    pick = np.unique(np.linspace(0, total - 1, min(limit, total)).round().astype(np.int64))
    labels = np.asarray(encoded["labels"])[pick]
    ids = np.asarray(encoded["input_ids"])[pick]
    lengths = np.asarray(encoded["attention_mask"]).sum(axis=1)[pick]
    n = len(labels)
    labelled = labels != IGNORE
    if not labelled.any(axis=1).all():
        raise ValueError("every row needs a labelled response to score generation against")
    starts = labelled.argmax(axis=1)
    refs = [ids[i, starts[i]:lengths[i]].tolist() for i in range(n)]
    width, new = int(starts.max()), max(len(r) for r in refs)
    prompts = np.full((n, width), pad_token_id, np.int32)
    masks = np.zeros((n, width), np.int32)
    for i in range(n):  # left padding: every row continues at the same slot
        prompts[i, width - starts[i]:] = ids[i, :starts[i]]
        masks[i, width - starts[i]:] = 1

    @jax.jit
    def run(trainable, prompt, mask):
        params = traverse_util.unflatten_dict(method.effective_base(trainable, frozen, method_state), sep=".")
        with hooks.use(method.hooks(trainable["added"], method_state, train=False, rng=None)):
            return generation.generate(method.model, params, prompt, mask, new,
                                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    hits = 0
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        out = np.asarray(run(trainable, prompts[rows], masks[rows]))[:, width:]
        for j, i in enumerate(range(start, min(start + batch_size, n))):
            gen = out[j].tolist()
            gen = gen[:gen.index(eos_token_id) + 1] if eos_token_id in gen else gen
            hits += gen == refs[i]
    return {"exact_match": hits / n, "exact_match_n": float(n)}
