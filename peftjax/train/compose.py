"""From a composed train config to the objects of a run, and back from a finished run's workdir.

* ``build(config)``: the task, model (with the head the task's format needs), tokenizer, method
  and flat pretrained params — what ``train_and_evaluate``, ``scripts/count_params.py`` and the
  memory accounting start from.
* ``init_context(...)``: what every method's ``prepare``/``init`` may read (the training rows,
  a loss of the base params, the run's length), built the same way for every method.
* ``load_run(workdir)``: a finished run's method with its best trainable tree, the frozen params
  it trained against and its state — the one public way to use a run's result (proxy-tuning an
  expert, a DyLoRA rank sweep, an experiment's evaluation).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peftjax import methods as methods_lib
from peftjax.data import formats

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _flat(params: dict) -> dict:
    return traverse_util.flatten_dict(params, sep=".")


def family_heads(config: Any) -> tuple[str, ...]:
    """The heads the configured model's family offers (what ``formats.task_format`` decides on)."""
    from peftjax.models.registry import family_for

    hf = config.model.hf_config
    return family_for(hf.get("model_type") if hasattr(hf, "get") else hf.model_type).heads


def remat_setting(value) -> bool | str:
    """``train.remat`` as the model families take it: False for none (every family reads a falsy
    value as no rematerialisation), else the policy name (see ``layers.REMAT_POLICIES``)."""
    from peftjax.models.layers import remat_name

    name = remat_name(value)
    return False if name == "none" else name


def run_format(config: Any, task: Any) -> str:
    """The task's format for the configured model (``peftjax.data.formats``)."""
    return formats.task_format(config.task, task, family_heads(config))


def build(config: Any, *, with_weights: bool = True, with_tokenizer: bool = True):
    """``(task, model, tokenizer, method, flat base params)`` from a composed train config."""
    from peftjax.models import hf_io

    task = formats.get_task(config.task)
    heads = family_heads(config)
    head = formats.model_head(formats.task_format(config.task, task, heads), task, heads)
    model, params, tokenizer = hf_io.load_from_config(
        config.model, head=head,
        num_labels=task.num_labels if head == "classification" else None,
        dtype=DTYPES[config.train.dtype], rng=jax.random.PRNGKey(config.seed),
        remat=remat_setting(config.train.remat), with_weights=with_weights,
        with_tokenizer=with_tokenizer)
    method_cfg = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    method = methods_lib.create(config.method.name, model, method_cfg)
    return task, model, tokenizer, method, (_flat(params) if params is not None else None)


def total_steps(config: Any) -> int:
    """Train steps of the run (micro-steps: optimizer updates × accumulation)."""
    return int(config.train.steps) * int(config.train.grad_accum_steps)


def init_context(model, tokenizer, train_encoded: dict, *, total_steps: int | None = None,
                 chunk: int = 8) -> methods_lib.InitContext:
    """What ``Method.setup`` gets: the tokenizer, the training rows in order (full length,
    ``chunk`` at a time, ``mask`` False on padding rows), a loss of the base params and the
    run's length. Batches are produced lazily, only if a method asks for them."""
    from peftjax.data import num_rows
    from peftjax.losses import params_loss_fn

    n = num_rows(train_encoded)

    def batches():
        for start in range(0, n, chunk):
            rows = np.minimum(np.arange(start, start + chunk), n - 1)
            batch = {k: np.asarray(v)[rows] for k, v in train_encoded.items()}
            batch["mask"] = np.arange(start, start + chunk) < n
            yield batch

    return methods_lib.InitContext(tokenizer=tokenizer, train_batches=batches,
                                   loss_fn=params_loss_fn(model), num_train_examples=n,
                                   total_steps=total_steps)


class FinishedRun(NamedTuple):
    """A finished run, ready to evaluate or deploy: ``method.apply(trainable, frozen, state, batch)``."""

    config: Any            # the run's resolved config (an ml_collections ConfigDict)
    result: dict           # its result.json
    task: Any
    model: Any
    tokenizer: Any
    method: methods_lib.Method   # as saved (prefix tuning: folded)
    trainable: dict              # the best trainable tree (the one the run tested)
    frozen: dict
    state: dict


def load_run(workdir: str) -> FinishedRun:
    """The result of ``train_and_evaluate`` in ``workdir``: its best trainable tree and method
    state from ``workdir/adapter`` (``peftjax.methods.saving``), on the base the config names.

    Raises a ``ValueError`` naming what is missing when the run did not finish.
    """
    import ml_collections

    from peftjax.methods import saving

    path = os.path.join(workdir, "result.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir} holds no finished run (no result.json): run "
                         "scripts/train.py there to the end first")
    with open(path) as f:
        result = json.load(f)
    config = ml_collections.ConfigDict(result["config"])
    task, model, tokenizer, _, base = build(config)
    method, trainable, state, frozen = saving.load_adapter(os.path.join(workdir, "adapter"), model, base)
    return FinishedRun(config, result, task, model, tokenizer, method, trainable, frozen, state)
