"""Train-step speed and memory of methods on one model, measured on this machine.

    python scripts/bench.py --model=all-MiniLM-L6-v2 --methods=full,lora --batch=32 --seq=64

prints a JSON list, one object per method: ``method``, ``train_step_s`` (median of ``--steps``
timed steps after compilation and warm-up), ``train_step_s_all`` (every timed step),
``compile_s`` (tracing + XLA compilation of the step; ``--scan_layers`` compiles one layer body),
``peak_memory_bytes`` (XLA memory analysis of the compiled step: arguments + outputs +
temporaries − donated), the exact byte sizes of the optimizer state, trainable tree, method state
and frozen params, ``trainable_params``, ``flops`` (XLA cost analysis) and the backend. With
``full`` among the methods each row also gets ``optimizer_state_vs_full`` and
``peak_memory_vs_full`` (ratios to full fine-tuning's figures in the same run). ``--profile_dir``
adds ``op_profile`` (where the step's time goes, per XLA op: ``peftjax.train.op_profile``).
Each method uses its configs/methods/<name>.py defaults (override with --method_overrides; a
``name@variant`` entry is the method with the overrides given under that label) and
the same random batch, AdamW, fp32 unless --dtype=bfloat16.
"""

import json
import os
import time

import _bootstrap
from absl import app, flags, logging

flags.DEFINE_string("model", "all-MiniLM-L6-v2", "named model (configs/models) ")
flags.DEFINE_list("methods", ["full", "lora"], "methods to time")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_integer("seq", 64, "sequence length")
flags.DEFINE_integer("steps", 10, "timed steps per method (after compilation and warm-up)")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
flags.DEFINE_string("head", "", "task head (classification, causal_lm, seq2seq_lm; default: classification "
                    "where the family has it, else its LM head)")
flags.DEFINE_integer("num_labels", 3, "classification labels (encoders)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_bool("remat", False, "rematerialise layers in the backward pass")
flags.DEFINE_integer("num_layers", 0, "build the model with this many layers (random weights; 0: "
                     "the model's own), e.g. to see how compile time grows with depth")
flags.DEFINE_bool("scan_layers", False, "run the layer stack as one lax.scan (compiled once per "
                  "layer; the families offering it: peftjax/models/layer_scan.py)")
flags.DEFINE_string("method_overrides", "", "JSON {method: {key: value}} over config defaults")
flags.DEFINE_bool("random_weights", False, "random init instead of the model's checkpoint (same "
                  "shapes and speed; for machines without the offline weights)")
flags.DEFINE_string("profile_dir", "", "also trace 3 steps of each method with jax.profiler into "
                    "<dir>/<method>/ and add ``op_profile``: op time per step by kind and the top "
                    "ops with their HLO shape and source (peftjax.train.op_profile)")
flags.DEFINE_bool("inference", False, "also time inference: the adapted model, its merged form "
                  "(mergeable methods) and the base model, each a jitted forward pass")
FLAGS = flags.FLAGS


def method_config(label: str, overrides: dict, rows: int) -> dict:
    """The config of method ``label`` (``name`` or ``name@variant``): its configs/methods defaults
    and the label's overrides; a data-driven init's example count capped at the bench batch."""
    from configs.train import _load

    cfg = {k: v for k, v in _load("methods", label.split("@")[0]).get_config().to_dict().items()
           if k != "name"}
    cfg.update(overrides.get(label, {}))
    if "num_examples" in cfg:  # Fisher masks, LoRA-GA (timing only): the bench batch is the training set
        cfg["num_examples"] = min(cfg["num_examples"], rows)
    return cfg


def bench_method(label, model, base, batch, overrides, steps, warmup):
    import jax
    import optax

    from peftjax import methods
    from peftjax.train import init_state, make_train_step
    from peftjax.train import measure

    name = label.split("@")[0]   # "fishmask@dense": a named variant of a method
    method = methods.create(name, model, method_config(label, overrides, len(batch["input_ids"])))
    from peftjax.train.compose import init_context

    ctx = init_context(model, None, {k: v for k, v in batch.items() if k != "mask"})
    peft = method.setup(jax.random.PRNGKey(1), base, ctx)
    tx = optax.adamw(1e-4)
    transform = method.gradient_transform(jax.random.PRNGKey(0))
    if transform is not None:  # Child-tuning_F's mask is part of its step cost
        tx = optax.chain(transform, tx)
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(method, tx, seed=0), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, peft.frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = measure.memory_analysis(compiled)
    holder = {"state": state}

    def one():
        holder["state"], m = compiled(holder["state"], peft.frozen, batch)
        jax.block_until_ready(m["loss"])

    times = measure.time_calls(one, steps, warmup)
    counts = methods.count_params(method)
    extra = {}
    if FLAGS.profile_dir:
        from peftjax.train import op_profile

        prof = op_profile.profile(one, compiled, 3, os.path.join(FLAGS.profile_dir, label))
        # Summed op time over the untraced median step: how much the executor overlapped ops.
        prof["overlap"] = round(prof["op_ms_per_step"] / 1e3 / measure.median(times), 2)
        extra["op_profile"] = prof
    if FLAGS.inference:
        extra = bench_inference(method, model, base, peft, holder["state"], batch, steps, warmup)
    nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
    return {**extra, "method": label, "train_step_s": measure.median(times),
            # Tracing, lowering and XLA compilation of the train step (no persistent cache).
            "compile_s": round(compile_s, 3),
            # Exact sizes of what the step carries between calls: the optimizer state (Adam's
            # two moments + a count) and gradients exist only for the trainable tree.
            "optimizer_state_bytes": nbytes(holder["state"].opt_state),
            "trainable_bytes": nbytes(holder["state"].trainable),
            # Every value the step updates (method, base selection and head): prefix tuning's
            # reparameterisation MLP included, which trainable_params (the folded count) is not.
            "updated_values": int(sum(x.size for x in jax.tree.leaves(holder["state"].trainable))),
            "method_state_bytes": nbytes(holder["state"].method_state),
            "frozen_bytes": nbytes(peft.frozen),
            "train_step_s_all": [round(t, 4) for t in times],
            "peak_memory_bytes": memory.get("peak_memory_bytes"),
            "trainable_params": counts["trainable_params"], "head_params": counts["head_params"],
            "total_params": counts["total_params"], **measure.cost_analysis(compiled)}


def bench_inference(method, model, base, peft, state, batch, steps, warmup) -> dict:
    """Median forward time of the adapted model, its merged form and the plain base model."""
    import jax
    from flax import traverse_util

    from peftjax.train import measure

    def timed(fn, *args):
        compiled = jax.jit(fn).lower(*args).compile()
        return measure.median(measure.time_calls(
            lambda: jax.block_until_ready(compiled(*args)), steps, warmup))

    inputs = {k: v for k, v in batch.items() if k in model.input_names}
    out = {"infer_adapted_s": timed(
        lambda t, f, s, b: method.apply(t, f, s, b), state.trainable, peft.frozen,
        state.method_state, inputs)}
    plain = lambda p, b: model.apply(p, b)
    out["infer_base_s"] = timed(plain, traverse_util.unflatten_dict(base, sep="."), inputs)
    if method.mergeable:
        merged = method.merged_params(state.trainable, peft.frozen, state.method_state)
        out["infer_merged_s"] = timed(plain, traverse_util.unflatten_dict(merged, sep="."), inputs)
        out["merged_over_base"] = out["infer_merged_s"] / out["infer_base_s"]
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from configs import models
    from peftjax import host
    from peftjax.models import hf_io

    machine = host.describe()   # the CPU and its matmul rate, measured before the model loads
    model_cfg = models.get(FLAGS.model)
    if (FLAGS.random_weights or FLAGS.num_layers) and model_cfg.get("checkpoint"):
        model_cfg = model_cfg.copy_and_resolve_references()
        with model_cfg.unlocked():
            model_cfg.checkpoint = None
    if FLAGS.num_layers:
        model_cfg = model_cfg.copy_and_resolve_references()
        with model_cfg.unlocked():
            model_cfg.hf_config.num_hidden_layers = FLAGS.num_layers  # GPT-2/BLOOM: n_layer, T5: num_layers
            if "num_decoder_layers" in model_cfg.hf_config:  # T5's decoder stack, as deep
                model_cfg.hf_config.num_decoder_layers = FLAGS.num_layers
    head = FLAGS.head or "classification"
    from peftjax.models.registry import family_for

    heads = family_for(model_cfg.hf_config.model_type).heads
    if FLAGS.head and FLAGS.head not in heads:
        raise app.UsageError(f"--head={FLAGS.head}: {FLAGS.model} has {', '.join(heads)}")
    if head not in heads:  # an LM: encoder-decoders (T5) train text-to-text
        head = "seq2seq_lm" if "seq2seq_lm" in heads else "causal_lm"
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    model, params, _ = hf_io.load_from_config(model_cfg, head=head, num_labels=FLAGS.num_labels,
                                              dtype=dtype, remat=FLAGS.remat, with_tokenizer=False,
                                              scan_layers=FLAGS.scan_layers)
    base = traverse_util.flatten_dict(params, sep=".")
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(FLAGS.batch, FLAGS.seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "mask": np.ones(FLAGS.batch, bool)}
    if "token_type_ids" in model.input_names:
        batch["token_type_ids"] = np.zeros_like(ids)
    batch["labels"] = (ids if head in ("causal_lm", "seq2seq_lm") else rng.integers(0, FLAGS.num_labels, FLAGS.batch)
                       ).astype(np.int32)
    overrides = json.loads(FLAGS.method_overrides) if FLAGS.method_overrides else {}
    results = []
    for name in FLAGS.methods:
        r = bench_method(name, model, base, batch, overrides, FLAGS.steps, FLAGS.warmup)
        r.update(model=FLAGS.model, head=head, batch=FLAGS.batch, seq=FLAGS.seq, dtype=FLAGS.dtype,
                 remat=FLAGS.remat, scan_layers=FLAGS.scan_layers,
                 num_layers=next((getattr(model.config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                                  if hasattr(model.config, k)), None), backend=jax.default_backend(),
                 device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(), host=machine)
        results.append(r)
    full = next((r for r in results if r["method"] == "full"), None)
    if full is not None:
        for r in results:
            r["optimizer_state_vs_full"] = r["optimizer_state_bytes"] / full["optimizer_state_bytes"]
            if r.get("peak_memory_bytes") and full.get("peak_memory_bytes"):
                r["peak_memory_vs_full"] = r["peak_memory_bytes"] / full["peak_memory_bytes"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)
