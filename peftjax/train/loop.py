"""``train_and_evaluate(config, workdir)``: the one training loop every method and task uses.

What it guarantees:

* **Resumable, deterministic.** The data order is a function of (seed, step) and each step's
  dropout rng is fold_in(seed, step); checkpoints hold step, trainable tree, optimizer and method
  state (and the best-so-far trainable tree), so a run killed at any point and restarted in
  the same workdir ends bit-identical to an uninterrupted run.
* **Honest model selection.** Validation is evaluated every ``eval_every`` steps; the trainable
  tree with the best validation score is kept and the test split is evaluated for it alone.
* **Measured, not guessed.** ``step_time_s`` is the median wall time of training steps after
  compilation; ``peak_memory_bytes`` is XLA's memory analysis of the compiled step.
* **Ends with a shareable adapter.** ``workdir/adapter/`` holds the best trainable tree and the
  method state (no optimizer state, no frozen base) as safetensors + JSON
  (``peftjax.methods.saving``); ``result.json`` gives its size in ``adapter_bytes``.
* **Fails early and loudly, and never poisons a workdir.** Bad config values fail before
  anything is loaded (``compose.validate_config``). A non-finite loss or gradient norm stops the
  run at that step, and a state is checked finite before it is checkpointed, so the kept
  checkpoint is always a good one (the message names it). A workdir records the config it was
  started with (``run_config.json``); resuming it under another config is refused with the
  differing fields. An unreadable or non-finite latest checkpoint is moved aside and the
  previous one used (``Checkpointer.restore_latest``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from peftjax import data as data_lib
from peftjax.data import formats
from peftjax.files import write_json_atomic
from peftjax.methods import saving
from peftjax.models.registry import head_description
from peftjax.train import measure, quantize
from peftjax.train.checkpoint import Checkpointer, all_finite, exact_scalar, from_exact_scalar
from peftjax.train.compose import (build, check_workdir_config, family_heads, init_context,
                                   model_hf_config, model_source, run_format, total_steps,
                                   validate_config)
from peftjax.train.optim import make_optimizer
from peftjax.train.steps import TrainState, init_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient norm or the state became NaN/inf; nothing of it was saved.
    ``step``: the update at which it happened (a sweep records it: a learning rate that
    diverges is a result of its grid, not a failure to retry)."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class MetricsLog:
    """Metrics to ``metrics.jsonl`` (one JSON object a line) and TensorBoard event files."""

    def __init__(self, workdir: str) -> None:
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        row = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the restored checkpoint (they will be redone)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        from peftjax.files import write_text_atomic

        write_text_atomic(self.path, "".join(rows))

    def close(self) -> None:
        self.tb.close()


def encode_splits(config, task, tokenizer) -> dict[str, dict]:
    """The run's train / validation / test splits, tokenised in the task's format."""
    limits = formats.split_limits(config.train)
    heads = family_heads(config)
    return {key: formats.encode_split(config.task, task, tokenizer, split, limits[key],
                                      family_heads=heads, hf_config=model_hf_config(config),
                                      data_dir=config.data_dir or None, for_eval=key != "train")
            for key, split in zip(("train", "validation", "test"), task.splits)}


def evaluate(eval_fn, trainable, frozen, method_state, encoded, batch_size: int, task,
             bucket_multiple: int = 0) -> dict[str, float]:
    """The task's metrics on a whole (length-sorted) split, ``batch_size`` rows at a time."""
    if task.kind == "causal_lm":
        nll = tokens = 0.0
        for batch in data_lib.eval_batches(encoded, batch_size, bucket_multiple):
            out = jax.device_get(eval_fn(trainable, frozen, method_state, batch))
            nll += float(out["nll_sum"])
            tokens += float(out["tokens"])
        loss = nll / max(tokens, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
    preds, labels = predict(eval_fn, trainable, frozen, method_state, encoded, batch_size,
                            bucket_multiple)
    return data_lib.compute_metrics(task, preds, labels)


def predict(eval_fn, trainable, frozen, method_state, encoded, batch_size: int,
            bucket_multiple: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(predictions, labels)`` of a classification/regression split, in the split's order."""
    preds, labels = [], []
    label_key = "class_labels" if "class_labels" in encoded else "labels"
    for batch in data_lib.eval_batches(encoded, batch_size, bucket_multiple):
        out = jax.device_get(eval_fn(trainable, frozen, method_state, batch))
        keep = np.asarray(batch["mask"], bool)
        preds.append(np.asarray(out["predictions"])[keep])
        labels.append(np.asarray(batch[label_key])[keep])
    return np.concatenate(preds), np.concatenate(labels)


def class_string(values: np.ndarray) -> str | None:
    """Class ids as one digit each ("0210…"), the compact form result.json keeps test
    predictions in (for paired bootstrap intervals over examples); None beyond 10 classes."""
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() > 9):
        return None
    return "".join(map(str, values.astype(int).tolist()))


def select_metric(config, task) -> str:
    """The validation metric that chooses the best step: ``train.select_metric`` or the task's
    primary metric (``loss`` for a language model)."""
    if task.kind == "causal_lm":
        return "loss"
    return config.train.get("select_metric", "") or task.primary_metric


def _better(metric: str, new: dict, old: dict | None) -> bool:
    if old is None:
        return True
    return new[metric] < old[metric] if metric == "loss" else new[metric] > old[metric]


class Prepared(NamedTuple):
    """Everything a run builds before its first step, placed where the step runs."""

    task: Any
    model: Any
    tokenizer: Any
    fmt: str              # the task's format for this model (``run_format``)
    method: Any
    base: dict            # the pretrained (or random) params, flat
    encoded: dict         # split -> encoded columns
    lm_classes: int       # > 0: a decoder classifies by scoring each class's verbaliser
    peft: Any             # the method's PeftParams (frozen / trainable / state), before placement
    tx: Any               # the optax optimizer
    schedule: Any         # step -> learning rate
    state: TrainState     # on the placement's devices
    frozen: dict          # on the placement's devices
    placement: Any        # ``shard.from_config``: a mesh and its rules, or one device


def prepare(config, cache_dir: str | None = None) -> Prepared:
    """Builds a run's model, method, data, optimizer and initial state, in the order a run
    needs them (the training loop and ``scripts/bench_cell.py``, which times a sweep cell's
    step, both start here, so a benchmark times what a run runs).

    ``cache_dir``: where a method's data pass (a Fisher estimate) keeps its result for runs that
    would compute the same one (``pass_cache``); None: computed every time.
    """
    validate_config(config)
    tc = config.train
    from peftjax.parallel import distributed, shard

    distributed.maybe_initialize(config.get("distributed", None))  # before any device is touched
    task, model, tokenizer, method, base = build(config)
    if tokenizer is None:
        raise ValueError(f"model {config.model.name!r} has no tokenizer; set model.tokenizer")
    fmt = run_format(config, task)
    encoded = encode_splits(config, task, tokenizer)
    lm_classes = task.num_labels if "class_labels" in encoded["test"] else 0
    ctx = init_context(model, tokenizer, encoded["train"], total_steps=total_steps(config),
                       clip_norm=tc.clip_norm, cache_dir=cache_dir)
    # model.quant: the frozen base's weight matrices stored quantized (peftjax/train/quantize.py)
    peft = quantize.setup(method, jax.random.PRNGKey(config.seed + 1), base, ctx,
                          quantize.config_of(config))
    tx, schedule = make_optimizer(tc, tc.steps, method, config.seed)
    state = init_state(peft.trainable, peft.state, tx, seed=config.seed)
    # Where the step runs: config.mesh's devices with the sharding rules, or a single device.
    placement = shard.from_config(config, method, state, frozen=peft.frozen)
    state, frozen = placement.put(state, peft.frozen)
    return Prepared(task, model, tokenizer, fmt, method, base, encoded, lm_classes, peft, tx, schedule,
                    state, frozen, placement)


def train_and_evaluate(config, workdir: str, *, stop_after_step: int | None = None,
                       cache_dir: str | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the result.

    ``stop_after_step`` ends the process' work early after that step's checkpoint, as a kill
    would (used by the resume tests). ``cache_dir``: where a method's data pass (a Fisher
    estimate) keeps its result for runs that would compute the same one (``pass_cache``; a
    sweep shares ``<workdir>/cache`` among its cells); None: computed every time.
    """
    from peftjax.parallel import distributed

    run = prepare(config, cache_dir)   # checks the config first: a bad value creates no workdir
    os.makedirs(workdir, exist_ok=True)
    tc = config.train
    task, model, tokenizer, method, base = run.task, run.model, run.tokenizer, run.method, run.base
    encoded, lm_classes, tx, schedule = run.encoded, run.lm_classes, run.tx, run.schedule
    state, frozen, placement = run.state, run.frozen, run.placement
    fmt = run.fmt
    total = total_steps(config)
    initial_added = run.peft.trainable["added"] if method.rewrites_base else None
    best = {"trainable": jax.tree.map(jnp.copy, state.trainable), "metrics": None, "step": 0}

    names = _metric_names(task)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    # multi-host: plain files come from process 0 (orbax checkpoints from every process)
    metrics_log = MetricsLog(workdir) if distributed.is_writer() else distributed.NullMetricsLog()
    start = 0
    if distributed.is_writer():
        check_workdir_config(config, workdir, has_checkpoint=ckpt.latest_step() is not None)
    found = ckpt.restore_latest({"state": state, "best": placement.on_mesh(_best_tree(best, names))},
                                finite=lambda t: (t["state"], t["best"]["trainable"]))
    if found is not None:
        _, restored = found
        state = TrainState(*restored["state"]) if not isinstance(restored["state"], TrainState) \
            else restored["state"]
        best = _best_from_tree(restored["best"])
        start = int(state.step)
        log.info("resumed from step %d", start)
    metrics_log.truncate_after(start)  # rows of steps that will be redone (all on a fresh start)

    qcfg = quantize.config_of(config)   # model.quant_matmul: the path its quantized matmuls take
    train_step = placement.jit_train_step(  # the seed is in the state
        quantize.traced(make_train_step(method, tx), qcfg))
    eval_fn = placement.jit_eval_step(quantize.traced(make_eval_step(method, lm_classes), qcfg))

    times: list[float] = []
    # One executable per batch shape, compiled ahead of time: the first one also gives XLA's
    # memory analysis, and calling the compiled object avoids jit compiling it a second time.
    executables: dict[tuple, Any] = {}
    memory: dict[str, int] = {}
    batching = dict(group_by_length=tc.group_by_length, bucket_multiple=tc.bucket_multiple)
    batches = data_lib.train_batches(encoded["train"], tc.batch_size, config.seed, start_step=start,
                                     **batching)
    bar = tqdm(total=total, initial=start, desc=f"{method.name} on {task.name}", unit="step",
               dynamic_ncols=True, disable=not tc.progress)
    try:
        for step in range(start, total):
            batch = placement.put_batch(next(batches))  # each process moves its devices' rows
            shape = batch["input_ids"].shape
            first = shape not in executables
            if first:
                executables[shape] = train_step.lower(state, frozen, batch).compile()
                memory = memory or measure.memory_analysis(executables[shape])
            t0 = time.perf_counter()
            state, m = executables[shape](state, frozen, batch)
            loss = float(m["loss"])  # blocks: the step is done
            if not first:  # a shape's first call pays one-off costs (allocations)
                times.append(time.perf_counter() - t0)
            grad_norm = float(m["grad_norm"])
            if not (np.isfinite(loss) and np.isfinite(grad_norm)):
                what = (f"the loss became {loss}" if not np.isfinite(loss) else
                        f"the gradient norm became {grad_norm} (loss {loss:.4g})")
                raise _non_finite(what, step + 1, method, task, tc, ckpt)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if done % tc.log_every == 0 or done == total:
                opt_step = done // tc.grad_accum_steps
                metrics_log.write(done, "train", {"loss": loss, "grad_norm": grad_norm,
                                                  "learning_rate": float(schedule(opt_step))})
            if done % tc.eval_every == 0 or done == total:
                val = evaluate(eval_fn, state.trainable, frozen, state.method_state,
                               encoded["validation"], tc.eval_batch_size, task, tc.bucket_multiple)
                metrics_log.write(done, "validation", val)
                if _better(select_metric(config, task), val, best["metrics"]):
                    best = {"trainable": jax.tree.map(jnp.copy, state.trainable), "metrics": val,
                            "step": done}
            if done % tc.checkpoint_every == 0 or done == total:
                if not bool(all_finite(state)):  # never write a state that holds NaN/inf
                    raise _non_finite("the updated state holds NaN/inf", done, method, task, tc, ckpt)
                ckpt.save(done, {"state": state, "best": placement.on_mesh(_best_tree(best, names))})
            if stop_after_step is not None and done >= stop_after_step:
                ckpt.wait()
                return {"stopped_at": done}
        bar.close()
        if not memory:  # resumed after the last step: compile once to measure
            memory = measure.memory_analysis(
                train_step.lower(state, frozen, placement.put_batch(next(data_lib.train_batches(
                    encoded["train"], tc.batch_size, config.seed, **batching)))).compile())
        test_predictions = None
        if task.kind == "classification":
            preds, labels = predict(eval_fn, best["trainable"], frozen, state.method_state,
                                    encoded["test"], tc.eval_batch_size, tc.bucket_multiple)
            test = data_lib.compute_metrics(task, preds, labels)
            test_predictions = {"predictions": class_string(preds), "labels": class_string(labels)}
        else:
            test = evaluate(eval_fn, best["trainable"], frozen, state.method_state, encoded["test"],
                            tc.eval_batch_size, task, tc.bucket_multiple)
        if fmt == "instruction" and config.task.get("eval_generate", 0):
            test.update(_instruction_exact_match(config, tokenizer, method, best["trainable"], frozen,
                                                 state.method_state, encoded["test"]))
        metrics_log.write(total, "test", test)
        # The shareable result: the best trainable tree and the method state, no optimizer state
        # (whole arrays on every process: a collective, all processes take part).
        adapter_trees = placement.host_tree((best["trainable"], state.method_state))
        adapter_bytes = saving.save_adapter(
            os.path.join(workdir, "adapter"), method, *adapter_trees, initial_added=initial_added,
            extra={"model": config.model.name, "task": task.name, "step": int(best["step"])}
        ) if distributed.is_writer() else None
    finally:
        bar.close()
        ckpt.close()
        metrics_log.close()
    from peftjax import methods as methods_lib

    counts = methods_lib.count_params(method, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                               for k, v in base.items()})
    result = {
        "method": method.name,
        "model": config.model.name,
        "model_source": model_source(config, base),
        "task": task.name,
        **head_description(model),  # "pooling" and "head": {"params", "count"}
        **counts,
        "trainable_percent": 100.0 * counts["trainable_params"] / counts["total_params"],
        "metrics": {"validation": best["metrics"], "test": test},
        # the test split's predictions and labels in its (length-sorted) order, one digit per
        # example: the same order in every run of a task, so runs pair up example by example
        "test_predictions": test_predictions,
        "best_step": best["step"],
        "adapter_bytes": adapter_bytes,
        "steps": total,
        # share of the token positions computed that were padding (train: the run's batches)
        "padding_fraction": {
            "train": data_lib.padding_fraction(itertools.islice(data_lib.train_batches(
                encoded["train"], tc.batch_size, config.seed, **batching), total)),
            "validation": data_lib.padding_fraction(data_lib.eval_batches(
                encoded["validation"], tc.eval_batch_size, tc.bucket_multiple))},
        "step_time_s": measure.median(times),
        "peak_memory_bytes": memory.get("peak_memory_bytes"),
        "memory": memory,
        "format": fmt,
        "quantization": {"setting": quantize.config_of(config).describe(),
                         **quantize.summary(run.peft.frozen)},
        "majority_rate": (data_lib.majority_rate(
            encoded["test"]["class_labels" if lm_classes else "labels"])
            if task.kind == "classification" else None),
        "config": config.to_dict(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "mesh": placement.mesh_shape,
        **method.report(state.trainable, state.method_state),
    }
    if distributed.is_writer():
        write_json_atomic(os.path.join(workdir, "result.json"), result)
    return result


def _instruction_exact_match(config, tokenizer, method, trainable, frozen, method_state, encoded) -> dict:
    """Greedy-generation exact match on ``task.eval_generate`` test rows (instruction tasks)."""
    from peftjax.data.instructions import special_tokens
    from peftjax.train.steps import greedy_exact_match

    hf = model_hf_config(config)
    return greedy_exact_match(method, trainable, frozen, method_state, encoded,
                              limit=config.task.eval_generate, batch_size=config.train.eval_batch_size,
                              eos_token_id=special_tokens(tokenizer, hf)[1],
                              pad_token_id=hf.get("pad_token_id") or 0)


def _metric_names(task) -> tuple[str, ...]:
    return ("loss", "perplexity") if task.kind == "causal_lm" else tuple(task.metrics)


def _non_finite(what: str, step: int, method, task, tc, ckpt) -> NonFiniteLossError:
    """The stop message: what went non-finite, where, and the checkpoint actually kept."""
    ckpt.wait()
    kept = ckpt.latest_step()
    where = (f"The last good checkpoint (step {kept}) is kept in {ckpt.directory}."
             if kept is not None else "No checkpoint was written before it.")
    return NonFiniteLossError(
        f"{what} at step {step} ({method.name} on {task.name}, lr={tc.learning_rate}); stopping "
        f"without saving that state. {where} Start a new --workdir with a lower learning rate, "
        "gradient clipping (train.clip_norm) or fp32 (train.dtype): this config would diverge "
        "again, and another config does not resume this workdir.", step=step)


def _best_tree(best: dict, names: tuple[str, ...]) -> dict:
    """The best-so-far record as a fixed-structure pytree (orbax restores into a template).

    Metrics are stored as the two 32-bit words of their float64 value (``exact_scalar``), so a
    resumed run reports exactly the validation scores an uninterrupted one does."""
    metrics = best["metrics"] or {}
    return {"trainable": best["trainable"], "step": jnp.asarray(best["step"], jnp.int32),
            "metrics": {k: exact_scalar(metrics.get(k, np.nan)) for k in names}}


def _best_from_tree(tree: dict) -> dict:
    step = int(tree["step"])
    metrics = {k: from_exact_scalar(v) for k, v in tree["metrics"].items()} if step > 0 else None
    return {"trainable": tree["trainable"], "step": step, "metrics": metrics}
