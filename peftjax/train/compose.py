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
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peftjax import methods as methods_lib
from peftjax.data import formats

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
log = logging.getLogger(__name__)


def _flat(params: dict) -> dict:
    return traverse_util.flatten_dict(params, sep=".")


def model_hf_config(config: Any) -> dict:
    """The architecture the run loads: a checkpoint's own config.json when the model config
    names a checkpoint (it wins over ``model.hf_config``, as the loader does), else
    ``model.hf_config``."""
    from peftjax.models import hf_io

    checkpoint = config.model.get("checkpoint", "")
    if checkpoint:
        return hf_io.read_config(hf_io.resolve_checkpoint(checkpoint))
    hf = config.model.hf_config
    return hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)


def family_heads(config: Any) -> tuple[str, ...]:
    """The heads the configured model's family offers (what ``formats.task_format`` decides on)."""
    from peftjax.models.registry import family_for

    return family_for(model_hf_config(config)["model_type"]).heads


def model_source(config: Any, base: dict | None) -> dict:
    """What a run actually loaded: the checkpoint folder (or random init), its model type, the
    parameter count and a sha256 of the weights files — recorded in result.json so a result
    names its weights, whatever ``model.name`` says."""
    from peftjax.models import hf_io

    checkpoint = config.model.get("checkpoint", "")
    folder = hf_io.resolve_checkpoint(checkpoint) if checkpoint else None
    return {"name": config.model.name, "checkpoint": os.path.abspath(folder) if folder else None,
            "model_type": model_hf_config(config)["model_type"],
            "params": int(sum(np.prod(np.shape(v), dtype=np.int64) for v in base.values())) if base else None,
            "weights_sha256": hf_io.weights_digest(folder) if folder else None}


def remat_setting(value) -> bool | str:
    """``train.remat`` as the model families take it: False for none (every family reads a falsy
    value as no rematerialisation), else the policy name (see ``layers.REMAT_POLICIES``)."""
    from peftjax.models.layers import remat_name

    name = remat_name(value)
    return False if name == "none" else name


def run_format(config: Any, task: Any) -> str:
    """The task's format for the configured model (``peftjax.data.formats``)."""
    return formats.task_format(config.task, task, family_heads(config))


def _mesh_shardings(config: Any):
    """With a mesh configured, a function of the model giving each param's sharding (the frozen
    base's rules), so a checkpoint streams straight onto the mesh and no host holds it whole
    (issue 23); the train step's plan places the params by the same rules, so nothing moves
    again. None on a single device."""
    from peftjax.parallel import mesh as mesh_lib

    mesh_cfg = config.get("mesh", None)
    if mesh_cfg is None or mesh_lib.is_trivial(mesh_cfg):
        return None

    def shardings(model) -> dict:
        from peftjax.parallel import shard
        from peftjax.parallel.rules import DEFAULT_MIN_ELEMENTS

        return shard.param_shardings(model, mesh_lib.make_mesh(mesh_cfg), min_elements=int(
            mesh_cfg.get("min_shard_elements", DEFAULT_MIN_ELEMENTS)))

    return shardings


def model_head(config: Any) -> tuple[str, int | None]:
    """``(head, num_labels)`` of the model a composed train config builds (num_labels only for
    a classification head)."""
    task = formats.get_task(config.task)
    heads = family_heads(config)
    head = formats.model_head(formats.task_format(config.task, task, heads), task, heads)
    return head, (task.num_labels if head == "classification" else None)


def model_key(config: Any) -> str:
    """What the structure of the model ``build`` makes depends on, as one string: the model
    section, head and labels, dtype, remat and scan setting. Configs with equal keys build the
    same (abstract) model, whatever else differs: GLUE's eight tasks build three."""
    return json.dumps([config.model.to_dict(), model_head(config), config.train.dtype,
                       str(config.train.remat), bool(config.train.get("scan_layers", False))],
                      sort_keys=True, default=str)


def build(config: Any, *, with_weights: bool = True, with_tokenizer: bool = True):
    """``(task, model, tokenizer, method, flat base params)`` from a composed train config."""
    from peftjax.models import hf_io

    task = formats.get_task(config.task)
    head, num_labels = model_head(config)
    method_cfg = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    made = {}

    def quantize_on_load(model) -> dict:
        # model.quant: the matrices the method leaves frozen are quantized as each is read, so
        # the float base is never on the host whole (peftjax/train/quantize.py decides which).
        from peftjax.train import quantize

        made["method"] = methods_lib.create(config.method.name, model, method_cfg)
        return quantize.on_load(made["method"], model, quantize.config_of(config))

    model, params, tokenizer = hf_io.load_from_config(
        config.model, head=head,
        num_labels=num_labels,
        dtype=DTYPES[config.train.dtype], rng=jax.random.PRNGKey(config.seed),
        remat=remat_setting(config.train.remat), with_weights=with_weights,
        with_tokenizer=with_tokenizer, transforms=quantize_on_load, shardings=_mesh_shardings(config),
        scan_layers=bool(config.train.get("scan_layers", False)))
    method = made.get("method") or methods_lib.create(config.method.name, model, method_cfg)
    return task, model, tokenizer, method, (_flat(params) if params is not None else None)


def total_steps(config: Any) -> int:
    """Train steps of the run (micro-steps: optimizer updates × accumulation)."""
    return int(config.train.steps) * int(config.train.grad_accum_steps)


def init_context(model, tokenizer, train_encoded: dict, *, total_steps: int | None = None,
                 chunk: int = 8, clip_norm: float | None = None,
                 cache_dir: str | None = None) -> methods_lib.InitContext:
    """What ``Method.setup`` gets: the tokenizer, the training rows in order (full length,
    ``chunk`` at a time, ``mask`` False on padding rows), a loss of the base params, the
    run's length and its gradient clipping, and where a data pass may cache its result
    (``cache_dir``). Batches are produced lazily, only if a method asks for them."""
    from peftjax.data import num_rows
    from peftjax.losses import params_loss_fn
    from peftjax.methods import pass_cache

    n = num_rows(train_encoded)

    def batches():
        for start in range(0, n, chunk):
            rows = np.minimum(np.arange(start, start + chunk), n - 1)
            batch = {k: np.asarray(v)[rows] for k, v in train_encoded.items()}
            batch["mask"] = np.arange(start, start + chunk) < n
            yield batch

    return methods_lib.InitContext(tokenizer=tokenizer, train_batches=batches,
                                   loss_fn=params_loss_fn(model), num_train_examples=n,
                                   total_steps=total_steps, clip_norm=clip_norm,
                                   cache_dir=cache_dir, fingerprint=pass_cache.fingerprint(model))


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
    from peftjax.train import quantize

    qcfg = quantize.config_of(config)
    if qcfg.enabled or quantize.has_quantized(frozen):  # the base the run trained against
        frozen = quantize.quantize_frozen(method, frozen, trainable, qcfg)
    return FinishedRun(config, result, task, model, tokenizer, method, trainable, frozen, state)


# --------------------------------------------------------------------------------------------
# Validation of a composed config, before anything is loaded or computed.

RESUME_MODES = ("auto", "force")


def _check(ok: bool, field: str, value: Any, valid: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid; valid: {valid}")


def _finite_positive(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and np.isfinite(value) and value > 0)


def _int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def validate_config(config: Any) -> None:
    """Checks a composed train config's values (not only its keys) before any work: a bad
    learning rate, step count or schedule fails here with the field and what is valid, instead
    of after the model is loaded, or silently (``steps=0`` used to report an untrained model)."""
    from peftjax.models.layers import remat_name
    from peftjax.train.optim import SCHEDULES, parse_lr_mults

    tc = config.train
    _check(_int_at_least(tc.steps, 1), "train.steps", tc.steps,
           "an integer >= 1 (0 would report the untrained model's scores)")
    _check(_finite_positive(tc.learning_rate), "train.learning_rate", tc.learning_rate,
           "a finite number > 0")
    for name in ("batch_size", "eval_batch_size", "grad_accum_steps", "eval_every", "log_every",
                 "checkpoint_every"):
        _check(_int_at_least(tc[name], 1), f"train.{name}", tc[name], "an integer >= 1")
    for name in ("train_limit", "eval_limit", "group_by_length", "bucket_multiple"):
        _check(_int_at_least(tc[name], 0), f"train.{name}", tc[name], "an integer >= 0 (0: off / all)")
    test_limit = tc.get("test_limit", -1)
    _check(_int_at_least(test_limit, -1), "train.test_limit", test_limit,
           "-1 (as eval_limit), 0 (all) or a positive integer")
    _check(tc.schedule in SCHEDULES, "train.schedule", tc.schedule, " | ".join(SCHEDULES))
    _check(tc.dtype in DTYPES, "train.dtype", tc.dtype, " | ".join(DTYPES))
    _check(0.0 <= float(tc.get("warmup_ratio", 0.0)) <= 1.0, "train.warmup_ratio",
           tc.get("warmup_ratio", 0.0), "0 <= warmup_ratio <= 1")
    _check(_int_at_least(tc.warmup_steps, 0), "train.warmup_steps", tc.warmup_steps, "an integer >= 0")
    for name in ("weight_decay", "clip_norm"):
        value = tc[name]
        _check(isinstance(value, (int, float)) and np.isfinite(value) and value >= 0,
               f"train.{name}", value, "a finite number >= 0")
    _check(0 <= tc.b1 < 1 and 0 <= tc.b2 < 1, "train.b1/b2", (tc.b1, tc.b2), "0 <= beta < 1")
    _check(_finite_positive(tc.eps), "train.eps", tc.eps, "a finite number > 0")
    resume = tc.get("resume", "auto")
    _check(resume in RESUME_MODES, "train.resume", resume, " | ".join(RESUME_MODES))
    remat_name(tc.remat)
    scan = tc.get("scan_layers", False)
    _check(isinstance(scan, bool), "train.scan_layers", scan, "true | false")
    from peftjax.train.quantize import config_of

    config_of(config)  # model.quant / model.double_quant
    parse_lr_mults(tc.get("lr_mults", ""))
    chosen = tc.get("select_metric", "")
    task_metrics = formats.get_task(config.task).metrics
    _check(chosen == "" or chosen in task_metrics, "train.select_metric", chosen,
           '"" (the task\'s primary metric) or one of ' + " | ".join(task_metrics))
    formats.task_format(config.task, formats.get_task(config.task), family_heads(config))


# --------------------------------------------------------------------------------------------
# The config a workdir was started with.

RUN_CONFIG = "run_config.json"
# Fields that change what is reported or how often, never the trajectory of the training: a
# resumed run may take new values for them with train.resume=force.
RESUME_SAFE_FIELDS = ("train.eval_limit", "train.test_limit", "train.eval_batch_size",
                      "train.eval_every", "train.log_every", "train.checkpoint_every",
                      "train.progress", "method.progress", "train.resume", "data_dir",
                      "distributed.*", "model.name")


# Fields that change only what the terminal shows: a resume takes their new value silently (a
# sweep restarted with --noprogress resumes its killed cell, which ran with bars). method.progress
# is the bar of a method's own data pass (FishMask's and Child-tuning_D's Fisher, LoRA-GA's
# gradient).
DISPLAY_ONLY_FIELDS = ("train.progress", "method.progress")


def _flat_config(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = list(node) if isinstance(node, tuple) else node

    walk(config.to_dict() if hasattr(config, "to_dict") else dict(config), "")
    return out


# Where and how the run computes, not what: a checkpoint restores onto any mesh
# (docs/distributed.md), and both quantized-matmul paths form the same weights
# (peftjax/models/quant_matmul.py), so a run killed under one resumes under another with a
# warning (the results equal up to float summation order).
LAYOUT_FIELDS = ("mesh.*", "model.quant_matmul")


def _matches(field: str, patterns: tuple[str, ...]) -> bool:
    return any(field == f or (f.endswith(".*") and field.startswith(f[:-1])) for f in patterns)


def _safe(field: str) -> bool:
    return _matches(field, RESUME_SAFE_FIELDS)


def check_workdir_config(config: Any, workdir: str, *, has_checkpoint: bool) -> None:
    """Records ``config`` in ``workdir/run_config.json`` on a fresh start; on a resume, refuses a
    config that differs from the recorded one, listing the fields, unless every differing
    field is safe to change (evaluation and logging settings) and ``train.resume=force``, or
    only the mesh changed (resumed with a warning: ``LAYOUT_FIELDS``)."""
    from peftjax.files import write_json_atomic

    path = os.path.join(workdir, RUN_CONFIG)
    mine = _flat_config(config)
    if not os.path.exists(path) or not has_checkpoint:
        write_json_atomic(path, config.to_dict(), sort_keys=True)
        return
    try:
        with open(path) as f:
            recorded = _flat_config(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); it records the config this workdir was "
                         "started with: restore it, or start in a new workdir") from None
    # A field added since the workdir started (quantization) at its neutral default is no change.
    from peftjax.grid.sweep import NEUTRAL_DEFAULTS

    for group, defaults in NEUTRAL_DEFAULTS:
        for k, v in defaults.items():
            key = f"{group}.{k}"
            if key not in recorded and mine.get(key) == v:
                recorded[key] = v
    differ = sorted(k for k in set(mine) | set(recorded)
                    if k not in DISPLAY_ONLY_FIELDS and mine.get(k, "<absent>") != recorded.get(k, "<absent>"))
    if not differ:
        return
    rows = "\n  ".join(f"{k}: {recorded.get(k, '<absent>')!r} -> {mine.get(k, '<absent>')!r}" for k in differ)
    if all(_matches(k, LAYOUT_FIELDS) for k in differ):
        log.warning("resuming %s on another mesh or quantized-matmul path (the same computation "
                    "up to float summation order):\n  %s", workdir, rows)
        write_json_atomic(path, config.to_dict(), sort_keys=True)
        return
    unsafe = [k for k in differ if not _safe(k) and not _matches(k, LAYOUT_FIELDS)]
    force = config.train.get("resume", "auto") == "force"
    if force and not unsafe:
        log.warning("resuming %s with changed settings (train.resume=force):\n  %s", workdir, rows)
        write_json_atomic(path, config.to_dict(), sort_keys=True)
        return
    ways = ("start in a new --workdir" + (", or pass --config.train.resume=force (every differing "
            "field is an evaluation/logging setting, safe to change)" if not unsafe else
            "; train.resume=force only allows evaluation/logging settings to change, and "
            f"{', '.join(unsafe)} change the training itself"))
    raise ValueError(f"{workdir} holds a run started with another config ({len(differ)} field(s) "
                     f"differ):\n  {rows}\nResuming would mix two runs: {ways}.")
