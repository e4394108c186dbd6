"""The composed training config: a model, a method and a task, plus training settings.

    python scripts/train.py \
      --config=configs/train.py:model=all-MiniLM-L6-v2,method=lora,task=tweet_sentiment \
      --config.method.rank=16 --workdir=runs/lora

composes ``configs/models/<model>.py``, ``configs/methods/<method>.py`` and
``configs/tasks/<task>.py``. Each method file also gives its training defaults (learning rate:
PEFT methods train few params and want larger rates than full fine-tuning). Any field can be
overridden on the command line (``--config.train.steps=500``); an unknown field is an error.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:  # so that `configs.models` imports from scripts
    sys.path.insert(0, os.path.dirname(_HERE))

DEFAULTS = dict(model="all-MiniLM-L6-v2", method="lora", task="tweet_sentiment")


def _load(kind: str, name: str):
    module = name.lower().replace("-", "_").replace(".", "_")
    path = os.path.join(_HERE, kind, module + ".py")
    if not os.path.exists(path):
        available = sorted(f[:-3] for f in os.listdir(os.path.join(_HERE, kind))
                           if f.endswith(".py") and not f.startswith("_"))
        raise ValueError(f"unknown {kind[:-1]} {name!r}: no configs/{kind}/{module}.py; "
                         f"available: {', '.join(available)}")
    spec = importlib.util.spec_from_file_location(f"configs.{kind}.{module}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_arg(arg: str | None) -> dict[str, str]:
    values = dict(DEFAULTS)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(f"bad config argument {item!r}; expected comma-separated "
                             f"key=value with keys {', '.join(DEFAULTS)}")
        values[key] = value
    return values


def train_defaults() -> dict:
    return dict(
        steps=1000,              # optimizer updates
        batch_size=32,
        eval_batch_size=128,
        learning_rate=1e-4,
        warmup_steps=0,          # 0: use warmup_ratio
        warmup_ratio=0.06,
        schedule="linear",       # linear | cosine | constant
        weight_decay=0.01,
        clip_norm=1.0,
        grad_accum_steps=1,
        b1=0.9, b2=0.999, eps=1e-8,
        dtype="float32",         # compute dtype: float32 | bfloat16 (params stay fp32)
        remat="none",            # rematerialise each block in the backward pass: none | block | block_dots
        # Run the layer stack as one lax.scan (compiled once per layer; every family but
        # Qwen3-MoE; peftjax/models/layer_scan.py). Off by default: on XLA:CPU every family's
        # step is slower scanned (T5-small LoRA 0.787 vs 0.741 s, though it compiles in 4.6 vs
        # 6.2 s), and the small Llama's compile is slower too (LoRA 3.50 vs 1.80 s).
        scan_layers=False,
        eval_every=200,
        # The validation metric that picks the best step (and a sweep's setting): "" is the
        # task's primary metric; e.g. macro_f1 for an imbalanced task. One of the task's metrics.
        select_metric="",
        log_every=10,
        checkpoint_every=200,
        train_limit=0,           # use only the first N training examples (0: all)
        # Length-grouped batching (transformers' group_by_length): 0 off; G > 0 sorts mega-batches
        # of G x batch_size rows by length, so batches pad little (peftjax.data.epoch_order).
        group_by_length=0,
        # Pad batches to multiples of this many tokens (0: powers of two). Each padded length is
        # its own compiled step, so finer buckets pay on long runs and can cost on short ones
        # (tweet_methods, issue 18: 1600-step cells 1.52x cells/h with multiples of 8; 40-step
        # cells 1.07x with 8, 1.26x with 16).
        bucket_multiple=0,
        eval_limit=0,            # evaluate on the first N validation/test examples (0: all)
        test_limit=-1,           # the test split's own limit (-1: eval_limit's; 0: all)
        progress=True,
        # Per-parameter learning-rate multipliers on the optimizer's updates, "regex=m,regex=m"
        # over trainable keys ("added.<site>.lora_B", "base.<path>", "head.<path>"): LoRA+ is
        # "lora_B$=16". A method may add its own (Method.lr_multipliers).
        lr_mults="",
        # Resuming a workdir whose recorded config (run_config.json) differs is refused; "force"
        # accepts changes to evaluation/logging fields only (compose.RESUME_SAFE_FIELDS).
        resume="auto",
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    names = parse_arg(arg)
    from configs import models

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data_dir = ""
    config.model = models.get(names["model"])
    method_mod = _load("methods", names["method"])
    config.method = method_mod.get_config()
    # task=<file>:<arg> hands <arg> to configs/tasks/<file>.py (task=jsonl:/data/train.jsonl).
    task_file, _, task_arg = names["task"].partition(":")
    task_mod = _load("tasks", task_file)
    task_cfg = task_mod.get_config(task_arg) if task_arg else task_mod.get_config()
    config.task = ml_collections.ConfigDict({
        "name": task_cfg.name,
        "max_length": task_cfg.max_length,
        # auto: an encoder's task head when the family has one, else a decoder's LM format
        # (prompt template + verbaliser, classes scored by log-likelihood).
        "format": "auto",
        "lm_template": task_cfg.get("lm_template", ""),
    })
    # Task-specific settings pass through (instruction tasks: format, source, fields, templates).
    config.task.update({k: v for k, v in task_cfg.items()
                        if k not in ("batch_size", "eval_batch_size")})
    train = train_defaults()
    train["batch_size"] = task_cfg.get("batch_size", train["batch_size"])
    train["eval_batch_size"] = task_cfg.get("eval_batch_size", train["eval_batch_size"])
    train.update(getattr(method_mod, "train_defaults", dict)())
    config.train = ml_collections.ConfigDict(train)
    # Device mesh (peftjax.parallel; docs/distributed.md): sizes of the data / fsdp / tensor
    # axes, -1 = the devices the others leave. All 1: no mesh, the single-device path.
    # e.g. --config.mesh.data=-1 (data parallel on all devices), --config.mesh.fsdp=8.
    # min_shard_elements: arrays smaller than this (or 1-D) that no rule names are replicated.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, min_shard_elements=1024))
    # Multi-host: jax.distributed.initialize (also when PEFTJAX_DISTRIBUTED=1). Empty / -1
    # fields come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID or JAX's
    # cluster auto-detection (SLURM, Open MPI, TPU pod slices).
    config.distributed = ml_collections.ConfigDict(dict(
        initialize=False, coordinator_address="", num_processes=-1, process_id=-1,
        local_device_ids="", initialization_timeout=0))
    config.lock()  # unknown override keys are errors
    return config
