"""Memory and compute of one train step, from abstract shapes: no weights, nothing allocated.

    python scripts/memory.py --config=configs/train.py:model=T0_3B,method=lora --batch=8 --seq=64
    python scripts/memory.py --config=configs/train.py:model=llama2-7b,method=lora \
        --head=causal_lm --methods=all --out=table.json

compiles the jitted train step (state donated, as the trainer runs it) on ``ShapeDtypeStruct``
inputs and prints JSON: bytes of parameters (frozen + trainable), gradients, optimizer state,
XLA's argument / output / temporary / aliased bytes and the peak (arguments + outputs +
temporaries − aliased), trainable and total params, FLOPs per step (XLA cost analysis), the
backend that compiled it and how long tracing and compilation took.

``--methods=all`` (or a comma list) runs each registered method with its configs/methods
defaults (``--config.method.*`` overrides apply to the method named in ``--config`` only) and
prints a list. Compute dtype: ``--config.train.dtype=bfloat16``; frozen params in bf16:
``--frozen_dtype=bfloat16``; rematerialisation: ``--config.train.remat=block`` (see
peftjax/models/layers.py ``REMAT_POLICIES``); optimizer: ``--optimizer=adamw|sgd|adafactor``.
``--mesh=1,8,1`` (data,fsdp,tensor) adds ``sharded``: per-device bytes of each part of the train
state under that mesh's sharding rules (``peftjax.train.memory.sharded_memory``; docs/distributed.md).

``--compile_for=h100`` compiles with XLA's GPU compiler for that GPU without one attached (a
compile-only device of jax's CUDA plugin: ``make gpu-aot`` installs it; peftjax/gpu_target.py
says what the figures are): the GPU's buffer plan on a machine without a GPU. Set
``XLA_FLAGS=--xla_gpu_autotune_level=0`` (no device to autotune on), as
experiments/memory_table/run_gpu_aot.sh does. On a quantized base (``--config.model.quant=nf4``)
a GPU program's matmuls read the packed codes in a fused Pallas kernel;
``--config.model.quant_matmul=xla`` plans XLA's dequantize-then-dot instead (the row's ``quant_matmul`` and ``fused_quant_kernels``).
"""

import json
import os
import sys

import _bootstrap
from absl import flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/train.py:model=...,method=...",
                                lock_config=True)
flags.mark_flags_as_required(["config"])
flags.DEFINE_integer("batch", 8, "batch size")
flags.DEFINE_integer("seq", 64, "(input) sequence length")
flags.DEFINE_integer("target_seq", 0, "encoder-decoder target length (0: --seq)")
flags.DEFINE_string("methods", "", "'all' or a comma list of methods (default: the config's)")
flags.DEFINE_string("optimizer", "adamw", "adamw | sgd | adafactor")
flags.DEFINE_enum("frozen_dtype", "float32", ["float32", "bfloat16"], "dtype of frozen base params")
flags.DEFINE_string("head", "", "model head (default: the trainer's for the task); causal_lm / "
                    "seq2seq_lm train a decoder / encoder-decoder as a language model")
flags.DEFINE_string("method_overrides", "", "JSON {method: {key: value}} over configs/methods defaults "
                    "(for the methods of --methods other than the --config one)")
flags.DEFINE_string("mesh", "", "data,fsdp,tensor (e.g. 1,8,1): add per-device bytes of params, "
                    "gradients, optimizer and method state under that mesh (sharding rules of "
                    "peftjax.parallel, on abstract shapes: no devices needed)")
flags.DEFINE_string("compile_for", "", "compile for this GPU without one attached (h100; needs "
                    "`make gpu-aot`): XLA:GPU's plan instead of the default backend's")
flags.DEFINE_string("out", "", "also write the JSON here (atomically)")
FLAGS = flags.FLAGS


def method_configs(config, names: str, overrides: dict) -> list:
    """One config per requested method: the given config for its own method, its
    configs/methods defaults (+ ``overrides[name]``) otherwise."""
    import copy

    from configs.train import _load
    from peftjax import methods

    if not names:
        return [config]
    wanted = methods.registered() if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for name in wanted:
        methods.method_class(name)  # unknown names fail with the registered list
        if name == config.method.name:
            out.append(config)
            continue
        cfg = copy.deepcopy(config)
        cfg.unlock()
        cfg.method = _load("methods", name).get_config()
        for key, value in overrides.get(name, {}).items():
            if key not in cfg.method:
                raise ValueError(f"--method_overrides: {name} has no field {key!r}; fields: "
                                 f"{', '.join(sorted(cfg.method))}")
            cfg.method[key] = value
        cfg.lock()
        out.append(cfg)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    from tqdm.auto import tqdm

    from peftjax.files import write_json_atomic
    from peftjax.train.memory import analyze_train_step

    if FLAGS.compile_for:  # before any JAX computation: the CUDA plugin is discovered then
        import functools

        from peftjax.gpu_target import target_device

        analyze_train_step = functools.partial(analyze_train_step,
                                               device=target_device(FLAGS.compile_for))

    if FLAGS.mesh:  # per-device figures under a mesh, next to the single-device compiled ones
        from peftjax.train.memory import sharded_memory

        single = analyze_train_step

        def analyze_train_step(cfg, **kwargs):
            row = single(cfg, **kwargs)
            row["sharded"] = sharded_memory(cfg, FLAGS.mesh, **kwargs)
            return row

    overrides = json.loads(FLAGS.method_overrides) if FLAGS.method_overrides else {}
    configs = method_configs(FLAGS.config, FLAGS.methods, overrides)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    rows = []
    for cfg in tqdm(configs, desc="compiling train steps", disable=len(configs) == 1, file=sys.stderr):
        kwargs = dict(batch=FLAGS.batch, seq=FLAGS.seq, target_seq=FLAGS.target_seq or None,
                      optimizer=FLAGS.optimizer, frozen_dtype=FLAGS.frozen_dtype, head=FLAGS.head or None)
        if not FLAGS.methods:
            rows.append(analyze_train_step(cfg, **kwargs))
        else:
            # A table row per method: one that does not apply to this model (no bias to tune, no
            # target it can match), or whose compile XLA fails, is recorded with its error
            # instead of ending the table.
            try:
                rows.append(analyze_train_step(cfg, **kwargs))
            except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError) as e:
                print(f"{cfg.method.name}: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"model": cfg.model.name, "method": cfg.method.name,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            if FLAGS.out:  # after every row: a long table killed midway keeps what it measured
                write_json_atomic(FLAGS.out, rows)
    result = rows[0] if not FLAGS.methods else rows
    if FLAGS.out:
        write_json_atomic(FLAGS.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)
