"""peftjax's train step against transformers + peft on PyTorch (CPU): same model, method, batch, machine.

    python scripts/bench_vs_peft.py --model=all-MiniLM-L6-v2 --methods=lora,dora,full --batch=32 --seq=64
    python scripts/bench_vs_peft.py --model=bench-llama-small --head=causal_lm --methods=lora,dora,full --batch=8 --seq=128
    python scripts/bench_vs_peft.py --model=bench-t5-small --head=seq2seq_lm --methods=lora,full --batch=8 --seq=128

For each method, in one process, it times ``--steps`` train steps after compilation and
``--warmup`` untimed steps on both sides and prints JSON with both medians and the ratio
``peftjax / peft`` (below 1: peftjax is faster), plus the threads each side used.

Both sides run the same step: the model (random classifier head, ``--num_labels`` classes; or,
``--head=causal_lm`` / ``seq2seq_lm``, its LM head on the batch's own tokens) on the
same random ``(batch, seq)`` token batch in training mode (dropout on), cross-entropy, backward,
and one AdamW update (lr 1e-4, weight decay 1e-4 on every param: optax.adamw's defaults, set on
torch's AdamW too; no clipping). peftjax's side is scripts/bench.py's step (jitted, state
donated). The PyTorch side loads the same checkpoint with transformers' auto class for the head
(or builds the same config with random weights when the model ships none, e.g. tiny-bert) and
adapts it as the training-parity runs do (``peftjax.interop.train_parity.peft_side``): our
method's initial tensors exported as a PEFT adapter and loaded trainable, or copied by name into
PEFT's own model (prompt and prefix tuning, PiSSA/OLoRA/LoRA-GA, LN tuning), with the task head
as ``modules_to_save``; ``bitfit`` and ``full`` are plain transformers with only the trained
tensors requiring grad. ``--methods`` takes the parity names (``SUPPORTED``: every method PEFT
also has, LoRA+ and LoRA-FA aside, which are PEFT optimizers over the LoRA step). AdaLoRA's
PyTorch step includes ``update_and_allocate``, as ours includes its ``update_state``. The
trainable counts of both sides are reported and must agree.

Attention: transformers' default for BERT on CPU is "sdpa", PyTorch's fused
scaled_dot_product_attention kernel (scores, softmax, dropout and the value product in one
kernel, heads read in place); peftjax's attention is XLA's composition of those ops.
``--peft_attention=eager`` times the PyTorch side with the same unfused composition, to
separate the fused kernel's share of the difference from everything else.

Threads: ``torch.set_num_threads(--threads)`` (default: the CPUs this process may use); XLA:CPU
runs its intra-op pool over the same CPUs. ``--profile`` also times each side's forward pass and
forward + backward (no update), to show where a step's time goes.
"""

import json
import os
import platform
import statistics
import time

import _bootstrap
import bench  # its flags: --model --methods --head --batch --seq --steps --warmup --num_labels ...
from absl import app, flags, logging

flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: the CPUs this process may use)")
flags.DEFINE_bool("profile", False, "also time forward and forward+backward on both sides")
# --head is bench.py's flag: here the task both sides train, sequence classification (the default;
# transformers' ForSequenceClassification), a causal LM over the whole batch (ForCausalLM,
# decoders) or text-to-text (ForSeq2SeqLM, T5: the batch is also the target).
HEADS = ("classification", "causal_lm", "seq2seq_lm")
flags.DEFINE_string("peft_attention", "", "transformers' attn_implementation on the PyTorch side "
                    "('' = its default, sdpa on CPU; 'eager' = the unfused composition peftjax "
                    "compiles, as a diagnostic)")
FLAGS = flags.FLAGS

# Every method PEFT also has, by its parity name (peftjax/interop/train_parity.py builds the
# PEFT side from our method's tensors, as the training-parity runs do), except the two that are
# PEFT optimizers rather than models (LoRA+, LoRA-FA: the same LoRA step with other rates).
SUPPORTED = ("lora", "rslora", "dora", "pissa", "olora", "lora_ga", "adalora", "vera", "hira", "ia3",
             "prompt_tuning", "prefix_tuning", "ln_tuning", "bitfit", "full")
WEIGHT_DECAY = 1e-4   # optax.adamw's default; torch's AdamW default (1e-2) is overridden to match
LEARNING_RATE = 1e-4


def _torch_matmul_gflops(torch, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of PyTorch's n × n matmul: the counterpart of ``peftjax.host.matmul_gflops``."""
    from peftjax import host

    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    return host.gflops_rate(lambda: a @ a, 2 * n ** 3, repeats)


def _median(times: list[float]) -> float:
    return float(statistics.median(times))


def _timed(fn, steps: int, warmup: int) -> list[float]:
    from peftjax.train import measure

    return measure.time_calls(fn, steps, warmup)


AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification",
                "causal_lm": "AutoModelForCausalLM", "seq2seq_lm": "AutoModelForSeq2SeqLM"}


def torch_model(model_cfg, num_labels: int, attention: str = "", head: str = "classification"):
    """The PyTorch model of a named model config: its checkpoint, or random weights of its config,
    with the ``head``'s transformers class.

    ``attention`` picks transformers' attention implementation ("" = its default, which for
    BERT on CPU is "sdpa": PyTorch's fused scaled_dot_product_attention kernel)."""
    import torch
    import transformers

    from peftjax.models import hf_io

    torch.manual_seed(0)
    auto = getattr(transformers, AUTO_CLASSES[head])
    labels = {"num_labels": num_labels} if head == "classification" else {}
    checkpoint = model_cfg.get("checkpoint") or ""
    if checkpoint:
        folder = hf_io.resolve_checkpoint(checkpoint)
        kwargs = {"attn_implementation": attention} if attention else {}
        return auto.from_pretrained(folder, **labels, **kwargs)
    hf = dict(model_cfg.hf_config.to_dict())
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **labels, **hf)
    if attention:
        config._attn_implementation = attention
    return auto.from_config(config)


def peft_side(s, method, peft, torch_net):
    """``torch_net`` adapted by peft as parity spec ``s`` says, starting from our ``peft``
    tensors (``train_parity.peft_side``: an exported adapter folder loaded trainable, or the
    tensors copied by name); plain transformers for BitFit and full fine-tuning."""
    import tempfile

    from peftjax.interop import train_parity

    with tempfile.TemporaryDirectory() as workdir:
        net, _ = train_parity.peft_side(s, method, method.model, peft, torch_net, workdir,
                                        check_init=False)
    return net


def torch_side(net, batch, steps: int, warmup: int, profile: bool, after_step=None,
               forward=None) -> dict:
    """Median seconds of ``net``'s train step (and optionally forward / forward+backward).

    ``after_step(i)``: what the method does after each optimizer step (AdaLoRA's
    ``update_and_allocate``), part of the step's time as ``update_state`` is on our side.
    ``forward(net, inputs, labels)``: the model call when not ``net(**inputs, labels=labels)``."""
    import torch

    inputs = {k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")
              if k in batch}
    labels = torch.from_numpy(batch["labels"]).long()
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    count = [0]
    call = forward or (lambda n, i, l: n(**i, labels=l))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = call(net, inputs, labels).loss
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(count[0])
        count[0] += 1

    times = _timed(step, steps, warmup)
    out = {"step_s": _median(times), "step_s_all": [round(t, 4) for t in times],
           "trainable_values": int(sum(p.numel() for p in params))}
    if profile:
        def forward():
            with torch.no_grad():
                call(net, inputs, labels)

        def forward_backward():
            net.zero_grad(set_to_none=True)
            call(net, inputs, labels).loss.backward()

        out["forward_s"] = _median(_timed(forward, steps, warmup))
        out["forward_backward_s"] = _median(_timed(forward_backward, steps, warmup))
    return out


def jax_profile(method, base, batch, steps: int, warmup: int) -> dict:
    """peftjax's forward (train mode, no grad) and forward + backward, jitted, for ``--profile``."""
    import jax

    from peftjax.losses import loss_for
    from peftjax.train.compose import init_context

    peft = method.setup(jax.random.PRNGKey(1), base, init_context(method.model, None, batch))
    loss_fn = loss_for(method.model.head)
    rng = jax.random.PRNGKey(0)

    def loss(trainable, frozen, state, b):
        return loss_fn(method.apply(trainable, frozen, state, b, train=True, rng=rng), b)

    fwd = jax.jit(loss).lower(peft.trainable, peft.frozen, peft.state, batch).compile()
    grad = jax.jit(jax.value_and_grad(loss)).lower(peft.trainable, peft.frozen, peft.state, batch).compile()
    args = (peft.trainable, peft.frozen, peft.state, batch)
    return {"forward_s": _median(_timed(lambda: jax.block_until_ready(fwd(*args)), steps, warmup)),
            "forward_backward_s": _median(_timed(lambda: jax.block_until_ready(grad(*args)), steps, warmup))}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    bad = [m for m in FLAGS.methods if m not in SUPPORTED]
    if bad:
        raise app.UsageError(f"--methods {bad} have no peft counterpart here; valid: {', '.join(SUPPORTED)}")
    head = FLAGS.head or "classification"
    if head not in HEADS:
        raise app.UsageError(f"--head={head}: compared heads are {', '.join(HEADS)}")
    if FLAGS.dtype != "float32":
        raise app.UsageError("--dtype: the comparison is fp32 only (PyTorch CPU trains in fp32 here)")
    if FLAGS.remat:
        raise app.UsageError("--remat: not compared (peft's side would need gradient checkpointing)")
    from peftjax import host

    threads = FLAGS.threads or host.cpus()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import peft as peft_lib
    import torch
    import transformers
    from flax import traverse_util

    from configs import models
    from peftjax import methods, runtime
    from peftjax.interop import train_parity
    from peftjax.train.compose import init_context
    from peftjax.models import hf_io

    torch.set_num_threads(threads)
    # The machine first, while nothing else of this run is in memory: the CPU and what its
    # cores give each side's dense matmul (the bound the step's GFLOP/s are read against).
    machine = {**host.describe(), "torch_matmul_gflops": _torch_matmul_gflops(torch)}
    model_cfg = models.get(FLAGS.model).copy_and_resolve_references()
    with model_cfg.unlocked():
        # The PyTorch side is transformers' ForSequenceClassification, which always classifies
        # through the pooler on [CLS]: time the same head here (a model config may default to
        # sentence-transformers' mean pooling).
        if "pooling" in model_cfg:
            model_cfg.pooling = "cls"
        if FLAGS.random_weights and model_cfg.get("checkpoint"):
            # Same shapes, random weights on both sides (speed does not depend on the values):
            # for machines that lack the checkpoint's package.
            model_cfg.checkpoint = None
    model, params, _ = hf_io.load_from_config(model_cfg, head=head,
                                              num_labels=FLAGS.num_labels, dtype=jnp.float32,
                                              with_tokenizer=False, scan_layers=FLAGS.scan_layers)
    base = traverse_util.flatten_dict(params, sep=".")
    rng = np.random.default_rng(0)
    vocab = model_cfg.hf_config.vocab_size
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(FLAGS.batch, FLAGS.seq)).astype(np.int32)
    # An LM learns the batch itself: every token (causal: shifted inside both losses), or the
    # input as its own target (text-to-text: the decoder reads it shifted right, as transformers).
    labels = ids if head != "classification" else rng.integers(0, FLAGS.num_labels, FLAGS.batch)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "mask": np.ones(FLAGS.batch, bool),
             "labels": labels.astype(np.int32)}
    if "token_type_ids" in model.input_names:
        batch["token_type_ids"] = np.zeros_like(ids)
    overrides = json.loads(FLAGS.method_overrides) if FLAGS.method_overrides else {}

    # Every method is built before any is timed: a refusal (BitFit on a model without biases)
    # fails in seconds, not after the methods before it have run. The parity spec's settings
    # (rsLoRA, PiSSA's init, ...) are a named variant ("lora@rslora") of the method.
    built = {}
    for name in FLAGS.methods:
        s = train_parity.spec(name, 100)
        label = s.method if name == s.method else f"{s.method}@{name}"
        variant = {label: {**s.config, **overrides.get(name, {})}}
        built[name] = (s, label, variant, methods.create(
            s.method, model, bench.method_config(label, variant, FLAGS.batch)))
    rows = []
    for name in FLAGS.methods:
        t0 = time.perf_counter()
        s, label, variant, method = built[name]
        ours = bench.bench_method(label, model, base, batch, variant, FLAGS.steps, FLAGS.warmup)
        ours["method"] = name
        peft = method.setup(jax.random.PRNGKey(1), base, init_context(model, None, {
            k: v for k, v in batch.items() if k != "mask"}))
        net = peft_side(s, method, peft, torch_model(model_cfg, FLAGS.num_labels,
                                                     FLAGS.peft_attention, head))
        after = None
        if s.method == "adalora":   # PEFT's rank allocation after each step (ours: update_state)
            after = net.base_model.update_and_allocate
        forward = None
        if name == "prefix_tuning" and head == "classification":
            # PEFT 0.21's classification prefix forward fails its signature check on
            # transformers 5 (BERT's forward renamed past_key_values); its steps written out,
            # with PEFT's own position numbering (train_parity.peft_prefix_forward).
            forward = lambda n, i, l: train_parity.peft_prefix_forward(n, i, l, shift_positions=True)
        theirs = torch_side(net, batch, FLAGS.steps, FLAGS.warmup, FLAGS.profile, after, forward)
        ours_values = ours["updated_values"]
        if ours_values != theirs["trainable_values"]:
            raise RuntimeError(f"{name}: peftjax trains {ours_values} values, peft "
                               f"{theirs['trainable_values']}: the two sides are not the same method")
        row = {"method": name, "peftjax_step_s": ours["train_step_s"], "peft_step_s": theirs["step_s"],
               "ratio": ours["train_step_s"] / theirs["step_s"],
               "trainable_values": ours_values, "trainable_params": ours["trainable_params"],
               "peftjax_step_s_all": ours["train_step_s_all"], "peft_step_s_all": theirs["step_s_all"],
               "flops": ours.get("flops"), "peftjax_compile_s": ours["compile_s"],
               "peak_memory_bytes": ours.get("peak_memory_bytes")}
        if FLAGS.profile:
            prof = jax_profile(method, base, batch, FLAGS.steps, FLAGS.warmup)
            row["peftjax_profile"] = {**prof, "step_s": ours["train_step_s"]}
            row["peft_profile"] = {k: theirs[k] for k in ("forward_s", "forward_backward_s")}
            row["peft_profile"]["step_s"] = theirs["step_s"]
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    out = {
        "model": FLAGS.model, "head": head, "random_weights": bool(FLAGS.random_weights), "batch": FLAGS.batch, "seq": FLAGS.seq, "dtype": FLAGS.dtype,
        "steps": FLAGS.steps, "warmup": FLAGS.warmup, "scan_layers": FLAGS.scan_layers,
        "torch_threads": torch.get_num_threads(), "jax_threads": host.cpus(),
        "jax_threads_note": "XLA:CPU's intra-op pool spans the CPUs this process may use",
        "cpus": host.cpus(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "host": machine,   # the CPU, and its matmul GFLOP/s measured before the methods
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft_lib.__version__},
        "backend": jax.default_backend(),
        "peft_attention": net.config._attn_implementation,
        # Both sides run in this process, so both get the same allocator setting.
        "host_malloc": runtime.state,
        "methods": rows,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)
