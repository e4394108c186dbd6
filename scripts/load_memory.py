"""Host memory of loading a checkpoint: the peak RSS rise over the load, against the bound.

    python scripts/load_memory.py --model=all-MiniLM-L6-v2
    python scripts/load_memory.py --model=Gemma-3-1B --random --checkpoint_dtype=bfloat16 \\
        --dtype=bfloat16 --workdir=/tmp/gemma3_1b_random
    python scripts/load_memory.py --model=all-MiniLM-L6-v2 --eager     # the loader before issue 23
    python scripts/load_memory.py --model=T0_3B --head=seq2seq_lm --checkpoint_dtype=float32 --accelerator_bound

Loads the model's weights (a named model's checkpoint, a folder, or with ``--random`` a
checkpoint of the named model's shapes with random weights, written a tensor at a time into
``--workdir`` first) and prints JSON: the loaded parameter bytes ``P``, the largest tensor ``T``
(as loaded), the peak RSS rise over the load (``peftjax.host_memory``: VmHWM reset before it),
its ratio to ``P`` and the bound ``1.10 P + T`` (issue 23). The model is built (abstract shapes,
nothing allocated) and JAX initialised before the measured block, so the rise is the loader's
alone. ``--eager`` reads every tensor into a dict first (``hf_io.read_safetensors``), as loading
did before the streaming loader: the figure to compare with.

``--train_method=lora`` (with a head that has a loss: ``--head=classification`` or
``causal_lm``) then sets the method up on the loaded params and measures the first train step
(``--batch`` × ``--seq`` random tokens, AdamW, the state donated): the peak RSS rise over the
step against what XLA's memory analysis of the compiled step says it allocates anew (outputs +
temporaries − donated buffers; the arguments are resident before it). On the CPU backend the
device is host memory, so this is the host memory of a training step and a check of the memory
table's XLA figures; compilation happens before the measured block.

``--accelerator_bound`` computes, from abstract shapes alone, what the loader holds on the host
when the device is an accelerator (``hf_io.accelerator_host_bytes``: one chunk of rows and its
converted copy at a time), and this process's RSS after building the model (Python + JAX on the
CPU; an accelerator runtime adds its own), for the memory table's host column.
"""

import json
import os
import subprocess
import sys

import _bootstrap  # noqa: F401
from absl import app, flags, logging

flags.DEFINE_string("model", "all-MiniLM-L6-v2", "a named model (configs/models) or a checkpoint folder")
flags.DEFINE_string("head", "none", "the model's head (none, classification, causal_lm, ...)")
flags.DEFINE_integer("num_labels", 3, "labels of a classification head")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the loaded params")
flags.DEFINE_bool("random", False, "write a random checkpoint of the model's shapes to --workdir and load it")
flags.DEFINE_enum("checkpoint_dtype", "bfloat16", ["float32", "bfloat16"], "dtype of the --random checkpoint "
                  "(and of the stored tensors for --accelerator_bound)")
flags.DEFINE_string("workdir", None, "where --random writes its checkpoint (reused if it is there)")
flags.DEFINE_bool("write_only", False, "with --random: write the checkpoint and exit (run by the script itself)")
flags.DEFINE_bool("accelerator_bound", False, "print the loader's host bytes when the device is an "
                  "accelerator, computed from abstract shapes (no weights needed), and exit")
flags.DEFINE_bool("eager", False, "read the whole checkpoint into host arrays first (the old loader)")
flags.DEFINE_string("train_method", "", "also measure one train step of this method (configs/methods "
                    "defaults, AdamW) on the loaded model: its peak RSS rise against XLA's plan")
flags.DEFINE_integer("batch", 8, "--train_method: batch size")
flags.DEFINE_integer("seq", 128, "--train_method: sequence length")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import jax.numpy as jnp

    from configs import models
    from peftjax import host_memory
    from peftjax.models import build_model, hf_io

    jnp.ones(1).block_until_ready()      # the runtime's own allocations happen before
    if FLAGS.accelerator_bound:
        model = build_model(models.get(FLAGS.model).hf_config.to_dict(), head=FLAGS.head,
                            num_labels=FLAGS.num_labels)
        bound = hf_io.accelerator_host_bytes(model, getattr(jnp, FLAGS.checkpoint_dtype), getattr(jnp, FLAGS.dtype))
        print(json.dumps({"model": FLAGS.model, "checkpoint_dtype": FLAGS.checkpoint_dtype,
                          "dtype": FLAGS.dtype, **bound, "process_rss_here": host_memory.rss()}, indent=1))
        return 0
    if FLAGS.random:
        if not FLAGS.workdir:
            print("error: --random needs --workdir (where the random checkpoint is written)", file=sys.stderr)
            return 2
        hf = models.get(FLAGS.model).hf_config.to_dict()
        model = build_model(hf, head=FLAGS.head, num_labels=FLAGS.num_labels)
        folder = FLAGS.workdir
        if FLAGS.write_only:
            written = hf_io.save_random_pretrained(model, folder, dtype=getattr(jnp, FLAGS.checkpoint_dtype),
                                                   max_shard_bytes=2 << 30)
            print(f"wrote a random {FLAGS.checkpoint_dtype} checkpoint of {FLAGS.model}: "
                  f"{written / 2**30:.2f} GiB in {folder}", file=sys.stderr)
            return 0
        if not os.path.exists(os.path.join(folder, "config.json")):
            # Written by a child process: pages this process freed after writing would stay
            # resident and absorb the load, hiding its rise.
            subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--write_only"], check=True)
    else:
        folder = (FLAGS.model if os.path.isdir(FLAGS.model)
                  else hf_io.resolve_checkpoint(models.get(FLAGS.model).checkpoint))
        model = build_model(hf_io.read_config(folder), head=FLAGS.head, num_labels=FLAGS.num_labels)
    dtype = getattr(jnp, FLAGS.dtype)
    with host_memory.measure() as rise:
        tensors = hf_io.read_safetensors(folder) if FLAGS.eager else hf_io.tensor_index(folder)
        params, fresh = hf_io.params_from_tensors(model, tensors, dtype=dtype, source=folder)
        jax.block_until_ready(params)
        del tensors
    leaves = jax.tree.leaves(params)
    p = sum(x.nbytes for x in leaves)
    t = max(x.nbytes for x in leaves)
    bound = 1.10 * p + t
    out = {"model": FLAGS.model, "folder": folder, "loader": "eager" if FLAGS.eager else "streaming",
           "dtype": FLAGS.dtype, "params": sum(x.size for x in leaves), "param_bytes": p,
           "largest_tensor_bytes": t, "rss_before": rise.start, "rss_peak_rise": rise.bytes,
           "rise_over_params": rise.bytes / p, "bound_bytes": bound, "within_bound": rise.bytes <= bound,
           "newly_initialised": fresh}
    if FLAGS.train_method:
        out["train_step"] = train_step_memory(model, params, FLAGS.train_method, FLAGS.batch, FLAGS.seq)
    print(json.dumps(out, indent=1))
    return 0


def train_step_memory(model, params, method_name: str, batch_size: int, seq: int) -> dict:
    """The first train step's peak RSS rise against XLA's plan of the compiled step."""
    import jax
    import numpy as np
    import optax

    from peftjax import host_memory, methods
    from peftjax.models import hf_io
    from peftjax.train import init_state, make_train_step, measure

    if model.head not in ("classification", "causal_lm", "seq2seq_lm"):
        raise app.UsageError(f"--train_method needs a head with a loss (--head=classification, causal_lm "
                             f"or seq2seq_lm), not {model.head!r}")
    method = methods.create(method_name, model, {})
    peft = method.setup(jax.random.PRNGKey(1), hf_io.flatten(params))
    del params
    tx = optax.adamw(1e-4)
    state = init_state(peft.trainable, peft.state, tx)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, min(20000, model.hf_config.vocab_size), size=(batch_size, seq)).astype(np.int32)
    batch = {**model.dummy_batch(batch_size, seq), "input_ids": ids, "mask": np.ones(batch_size, bool)}
    batch["labels"] = (ids if model.head != "classification"
                       else rng.integers(0, model.num_labels, batch_size)).astype(np.int32)
    if "decoder_input_ids" in batch:
        batch["decoder_input_ids"] = ids
    compiled = jax.jit(make_train_step(method, tx, seed=0), donate_argnums=(0,)).lower(
        state, peft.frozen, batch).compile()
    xla = measure.memory_analysis(compiled)
    new = xla["output_bytes"] + xla["temp_bytes"] - xla["alias_bytes"]
    with host_memory.measure() as rise:
        state, metrics = compiled(state, peft.frozen, batch)
        jax.block_until_ready(metrics["loss"])
    return {"method": method_name, "batch": batch_size, "seq": seq, "xla": xla,
            "xla_new_bytes": new, "rss_before": rise.start, "rss_peak_rise": rise.bytes,
            "rise_over_xla_new": rise.bytes / new if new else None,
            "note": "first step after compilation; the arguments (params, optimizer state, batch) "
                    "were resident before it"}


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
