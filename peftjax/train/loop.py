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
* **Fails early and loudly.** Bad configs fail before compute; a NaN/inf loss stops the run with
  a message and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from peftjax import data as data_lib
from peftjax import methods as methods_lib
from peftjax.methods import saving
from peftjax.models import hf_io
from peftjax.train import measure
from peftjax.train.checkpoint import Checkpointer
from peftjax.train.optim import make_optimizer
from peftjax.train.steps import TrainState, init_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HEAD_FOR_TASK_KIND = {"classification": "classification", "regression": "regression",
                      "causal_lm": "causal_lm"}


class NonFiniteLossError(FloatingPointError):
    pass


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(rows)
        os.replace(tmp, self.path)

    def close(self) -> None:
        self.tb.close()


def _flat(params: dict) -> dict:
    return traverse_util.flatten_dict(params, sep=".")


FORMATS = ("auto", "head", "lm", "instruction")


def task_format(config, task) -> str:
    """'head' (an encoder's classification/regression head), 'lm' (a decoder, verbalisers) or
    'instruction' (a decoder on instruction records, ``peftjax.data.instructions``; set by the task).

    ``auto`` picks the head when the model family has one for the task, else the LM format.
    """
    fmt = config.task.get("format", "auto")
    if fmt not in FORMATS:
        raise ValueError(f"task.format={fmt!r} is invalid; valid: {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    from peftjax.models.registry import family_for, hf_config_from

    hf = config.model.hf_config
    family = family_for(hf.get("model_type") if hasattr(hf, "get") else hf.model_type)
    return "head" if HEAD_FOR_TASK_KIND[task.kind] in family.heads else "lm"


def get_task(config):
    """The registered task, or for ``task.format='instruction'`` the instruction task it describes."""
    if config.task.get("format", "auto") == "instruction":
        from peftjax.data import instructions

        return instructions.task_from_config(config.task)
    return data_lib.get_task(config.task.name)


def _remat(value) -> bool | str:
    """``train.remat`` as the model families take it: False for none (every family reads a falsy
    value as no rematerialisation), else the policy name (see ``layers.REMAT_POLICIES``)."""
    from peftjax.models.layers import remat_name

    name = remat_name(value)
    return False if name == "none" else name


def lm_head_for(config) -> str:
    """The LM head of the configured model's family: ``seq2seq_lm`` for an encoder-decoder (T5),
    whose encoder reads the prompt and whose decoder targets are the class words; else
    ``causal_lm`` (prompt + verbaliser in one sequence)."""
    from peftjax.models.registry import family_for

    hf = config.model.hf_config
    family = family_for(hf.get("model_type") if hasattr(hf, "get") else hf.model_type)
    return "seq2seq_lm" if "seq2seq_lm" in family.heads else "causal_lm"


def build(config, *, with_weights: bool = True, with_tokenizer: bool = True):
    """Model, tokenizer, method and flat base params from a composed train config."""
    task = get_task(config)
    fmt = task_format(config, task)
    head = "causal_lm" if fmt in ("lm", "instruction") else HEAD_FOR_TASK_KIND[task.kind]
    if fmt == "lm":
        head = lm_head_for(config)  # an encoder-decoder learns the task text-to-text
    dtype = DTYPES[config.train.dtype]
    model, params, tokenizer = hf_io.load_from_config(
        config.model, head=head,
        num_labels=task.num_labels if head == "classification" else None,
        dtype=dtype, rng=jax.random.PRNGKey(config.seed), remat=_remat(config.train.remat),
        with_weights=with_weights, with_tokenizer=with_tokenizer)
    method_cfg = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    if method_cfg.get("total_step", None) == 0:  # schedule-driven methods (AdaLoRA): the run's length
        method_cfg["total_step"] = config.train.steps * config.train.grad_accum_steps
    method = methods_lib.create(config.method.name, model, method_cfg)
    return task, model, tokenizer, method, (_flat(params) if params is not None else None)


def encode_split(config, task, tokenizer, split: str, limit: int | None, *, for_eval: bool) -> dict:
    """Tokenised split; evaluation splits are sorted by length.

    Sorting makes each eval batch pad to the smallest bucket that fits it (about half the
    compute on tweets); metrics do not depend on the order of examples.
    """
    if task_format(config, task) == "instruction":  # response-only labels, no classes
        from peftjax.data import instructions

        encoded = instructions.encode_split(config.task, split, tokenizer, limit=limit,
                                            hf_config=config.model.hf_config.to_dict(),
                                            data_dir=config.data_dir or None)
        if for_eval:
            order = np.argsort(encoded["attention_mask"].sum(axis=1), kind="stable")
            encoded = {k: v[order] for k, v in encoded.items()}
        return encoded
    examples = data_lib.load_examples(task.name, split, data_dir=config.data_dir or None, limit=limit)
    if task_format(config, task) == "lm":
        from peftjax.data.lm import DEFAULT_TEMPLATE, encode_lm, encode_seq2seq

        encode = encode_seq2seq if lm_head_for(config) == "seq2seq_lm" else encode_lm
        encoded = encode(examples, tokenizer, config.task.max_length, task,
                         config.task.get("lm_template", "") or DEFAULT_TEMPLATE, candidates=for_eval)
    else:
        encoded = data_lib.encode(examples, tokenizer, config.task.max_length)
    if for_eval:
        order = np.argsort(encoded["attention_mask"].sum(axis=1), kind="stable")
        encoded = {k: v[order] for k, v in encoded.items()}
    return encoded


def split_limits(tc) -> dict[str, int | None]:
    """Examples used per split (None: all) from ``train_limit``, ``eval_limit``, ``test_limit``.

    ``test_limit`` lets a budget validate often on a small sample and still report test on a
    larger one (model selection only ever sees validation); -1 means "as eval_limit".
    """
    test = tc.get("test_limit", -1)
    test = tc.eval_limit if test is None or test < 0 else test
    return {"train": tc.train_limit or None, "validation": tc.eval_limit or None,
            "test": test or None}


def evaluate(eval_fn, trainable, frozen, method_state, encoded, batch_size: int, task) -> dict[str, float]:
    if task.kind == "causal_lm":
        nll = tokens = 0.0
        for batch in data_lib.eval_batches(encoded, batch_size):
            out = jax.device_get(eval_fn(trainable, frozen, method_state, batch))
            nll += float(out["nll_sum"])
            tokens += float(out["tokens"])
        loss = nll / max(tokens, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
    preds, labels = [], []
    label_key = "class_labels" if "class_labels" in encoded else "labels"
    for batch in data_lib.eval_batches(encoded, batch_size):
        out = jax.device_get(eval_fn(trainable, frozen, method_state, batch))
        keep = np.asarray(batch["mask"], bool)
        preds.append(np.asarray(out["predictions"])[keep])
        labels.append(np.asarray(batch[label_key])[keep])
    return data_lib.compute_metrics(task, np.concatenate(preds), np.concatenate(labels))


def _better(task, new: dict, old: dict | None) -> bool:
    if old is None:
        return True
    if task.kind == "causal_lm":
        return new["loss"] < old["loss"]
    return new[task.primary_metric] > old[task.primary_metric]


def init_context(model, tokenizer, train_encoded: dict, chunk: int = 8) -> "methods_lib.InitContext":
    """What ``Method.setup`` gets: the tokenizer and, for Fisher masks, the training rows in order
    (full length, ``chunk`` at a time, ``mask`` False on padding rows) with a per-example loss."""
    from peftjax.methods.fisher import per_example_loss_fn

    n = data_lib.num_rows(train_encoded)

    def batches():
        for start in range(0, n, chunk):
            rows = np.minimum(np.arange(start, start + chunk), n - 1)
            batch = {k: np.asarray(v)[rows] for k, v in train_encoded.items()}
            batch["mask"] = np.arange(start, start + chunk) < n
            yield batch

    return methods_lib.InitContext(tokenizer=tokenizer, train_batches=batches,
                                   loss_fn=per_example_loss_fn(model), num_train_examples=n)


def train_and_evaluate(config, workdir: str, *, stop_after_step: int | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the result.

    ``stop_after_step`` ends the process' work early after that step's checkpoint, as a kill
    would (used by the resume tests).
    """
    os.makedirs(workdir, exist_ok=True)
    tc = config.train
    from peftjax.parallel import distributed, shard

    distributed.maybe_initialize(config.get("distributed", None))  # before any device is touched
    task, model, tokenizer, method, base = build(config)
    if tokenizer is None:
        raise ValueError(f"model {config.model.name!r} has no tokenizer; set model.tokenizer")

    splits = dict(zip(("train", "validation", "test"), task.splits))
    limits = split_limits(tc)
    encoded = {key: encode_split(config, task, tokenizer, split, limits[key], for_eval=key != "train")
               for key, split in splits.items()}
    lm_classes = task.num_labels if "class_labels" in encoded["test"] else 0

    ctx = init_context(model, tokenizer, encoded["train"])
    peft = method.setup(jax.random.PRNGKey(config.seed + 1), base, ctx)
    total = tc.steps * tc.grad_accum_steps
    tx, schedule = make_optimizer(tc, tc.steps, method.gradient_transform())
    state = init_state(peft.trainable, peft.state, tx)
    frozen = peft.frozen
    best = {"trainable": jax.tree.map(jnp.copy, peft.trainable), "metrics": None, "step": 0}
    # config.mesh: frozen, trainable, optimizer and method state placed by the sharding rules;
    # None (no mesh) keeps the single-device path.
    shardings = shard.from_config(config, method, state, frozen)
    if shardings is not None:
        state, frozen = shardings.put(state, frozen)
        best["trainable"] = shard.put_tree(best["trainable"], shardings.state.trainable)

    names = _metric_names(task)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    # multi-host: plain files come from process 0 (orbax checkpoints from every process)
    metrics_log = MetricsLog(workdir) if distributed.is_writer() else distributed.NullMetricsLog()
    on_mesh = shardings.on_mesh if shardings is not None else (lambda tree: tree)
    start = 0
    if ckpt.latest_step() is not None:
        restored = ckpt.restore({"state": state, "best": on_mesh(_best_tree(best, names))})
        state = TrainState(*restored["state"]) if not isinstance(restored["state"], TrainState) \
            else restored["state"]
        best = _best_from_tree(restored["best"])
        start = int(state.step)
        metrics_log.truncate_after(start)
        log.info("resumed from step %d", start)

    if shardings is None:
        train_step = jax.jit(make_train_step(method, tx, config.seed), donate_argnums=(0,))
        eval_fn = jax.jit(make_eval_step(method, lm_classes))
    else:
        train_step = shardings.jit_train_step(make_train_step(method, tx, config.seed))
        eval_fn = shardings.jit_eval_step(make_eval_step(method, lm_classes))

    times: list[float] = []
    compiled_shapes: set = set()
    memory: dict[str, int] = {}
    batches = data_lib.train_batches(encoded["train"], tc.batch_size, config.seed, start_step=start)
    bar = tqdm(total=total, initial=start, desc=f"{method.name} on {task.name}", unit="step",
               dynamic_ncols=True, disable=not tc.progress)
    try:
        for step in range(start, total):
            batch = next(batches)
            if shardings is not None:  # each process transfers the rows its devices hold
                batch = shardings.put_batch(batch)
            shape = batch["input_ids"].shape
            if shape not in compiled_shapes:
                if not memory:
                    memory = measure.memory_analysis(train_step.lower(state, frozen, batch).compile())
                t0 = time.perf_counter()
                state, m = train_step(state, frozen, batch)
                loss = float(m["loss"])
                compiled_shapes.add(shape)
            else:
                t0 = time.perf_counter()
                state, m = train_step(state, frozen, batch)
                loss = float(m["loss"])  # blocks: the step is done
                times.append(time.perf_counter() - t0)
            if not np.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss} at step {step + 1} ({method.name} on {task.name}, "
                    f"lr={tc.learning_rate}); stopping. The last good checkpoint "
                    f"(step {ckpt.latest_step()}) is kept in {ckpt.directory}. Try a lower "
                    "learning rate, gradient clipping (train.clip_norm) or fp32 (train.dtype).")
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if done % tc.log_every == 0 or done == total:
                opt_step = done // tc.grad_accum_steps
                metrics_log.write(done, "train", {"loss": loss, "grad_norm": float(m["grad_norm"]),
                                                  "learning_rate": float(schedule(opt_step))})
            if done % tc.eval_every == 0 or done == total:
                val = evaluate(eval_fn, state.trainable, frozen, state.method_state,
                               encoded["validation"], tc.eval_batch_size, task)
                metrics_log.write(done, "validation", val)
                if _better(task, val, best["metrics"]):
                    best = {"trainable": jax.tree.map(jnp.copy, state.trainable), "metrics": val,
                            "step": done}
            if done % tc.checkpoint_every == 0 or done == total:
                ckpt.save(done, {"state": state, "best": on_mesh(_best_tree(best, names))})
            if stop_after_step is not None and done >= stop_after_step:
                ckpt.wait()
                return {"stopped_at": done}
        bar.close()
        if not memory:  # resumed after the last step: compile once to measure
            memory = measure.memory_analysis(
                train_step.lower(state, frozen, next(data_lib.train_batches(
                    encoded["train"], tc.batch_size, config.seed))).compile())
        test = evaluate(eval_fn, best["trainable"], frozen, state.method_state, encoded["test"],
                        tc.eval_batch_size, task)
        if task_format(config, task) == "instruction" and config.task.get("eval_generate", 0):
            test.update(_instruction_exact_match(config, tokenizer, method, best["trainable"], frozen,
                                                 state.method_state, encoded["test"]))
        metrics_log.write(total, "test", test)
        # The shareable result: the best trainable tree and the method state, no optimizer state.
        adapter_trees = (best["trainable"], state.method_state)
        if shardings is not None:  # whole arrays on every process (a collective: all take part)
            adapter_trees = shard.host_tree(adapter_trees)
        adapter_bytes = saving.save_adapter(
            os.path.join(workdir, "adapter"), method, *adapter_trees,
            extra={"model": config.model.name, "task": task.name, "step": int(best["step"])}
        ) if distributed.is_writer() else None
    finally:
        bar.close()
        ckpt.close()
        metrics_log.close()
    counts = methods_lib.count_params(method, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                               for k, v in base.items()})
    result = {
        "method": method.name,
        "model": config.model.name,
        "task": task.name,
        **counts,
        "trainable_percent": 100.0 * counts["trainable_params"] / counts["total_params"],
        "metrics": {"validation": best["metrics"], "test": test},
        "best_step": best["step"],
        "adapter_bytes": adapter_bytes,
        "steps": total,
        "step_time_s": measure.median(times),
        "peak_memory_bytes": memory.get("peak_memory_bytes"),
        "memory": memory,
        "format": task_format(config, task),
        "majority_rate": (data_lib.majority_rate(
            encoded["test"]["class_labels" if lm_classes else "labels"])
            if task.kind == "classification" else None),
        "config": config.to_dict(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "mesh": dict(shardings.mesh.shape) if shardings is not None else None,
    }
    result.update(method_report(method, state))
    if distributed.is_writer():
        write_json_atomic(os.path.join(workdir, "result.json"), result)
    return result


def _instruction_exact_match(config, tokenizer, method, trainable, frozen, method_state, encoded) -> dict:
    """Greedy-generation exact match on ``task.eval_generate`` test rows (instruction tasks)."""
    from peftjax.data.instructions import special_tokens
    from peftjax.train.steps import greedy_exact_match

    hf = config.model.hf_config.to_dict()
    return greedy_exact_match(method, trainable, frozen, method_state, encoded,
                              limit=config.task.eval_generate, batch_size=config.train.eval_batch_size,
                              eos_token_id=special_tokens(tokenizer, hf)[1],
                              pad_token_id=hf.get("pad_token_id") or 0)


def method_report(method, state) -> dict:
    """Method-specific results worth saving (e.g. AdaLoRA's final rank allocation)."""
    report = getattr(method, "report", None)
    return report(state.trainable, state.method_state) if report else {}


def _metric_names(task) -> tuple[str, ...]:
    return ("loss", "perplexity") if task.kind == "causal_lm" else tuple(task.metrics)


def _best_tree(best: dict, names: tuple[str, ...]) -> dict:
    """The best-so-far record as a fixed-structure pytree (orbax restores into a template)."""
    metrics = best["metrics"] or {}
    return {"trainable": best["trainable"], "step": jnp.asarray(best["step"], jnp.int32),
            "metrics": {k: jnp.asarray(metrics.get(k, np.nan), jnp.float32) for k in names}}


def _best_from_tree(tree: dict) -> dict:
    step = int(tree["step"])
    metrics = {k: float(v) for k, v in tree["metrics"].items()} if step > 0 else None
    return {"trainable": tree["trainable"], "step": step, "metrics": metrics}
