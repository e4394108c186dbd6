"""Memory and compute accounting of one train step, on abstract shapes (nothing is allocated).

``analyze_train_step(config, batch=8, seq=64)`` builds everything a train step touches as
``jax.ShapeDtypeStruct`` trees — the base params (``Model.abstract_params``), the method's
trainable / frozen / state partition (``jax.eval_shape`` of ``Method.setup``), the optimizer
state (``jax.eval_shape(tx.init)``) and a batch — then lowers and compiles the jitted step
(state donated, as the trainer does) and reads two XLA analyses of the compiled program:

* ``memory_analysis()``: bytes of the arguments, outputs, temporaries and aliased (donated)
  buffers. The peak is ``arguments + outputs + temporaries - aliased``: the state that goes in is
  donated and reused for the state that comes out, so it counts once.
* ``cost_analysis()``: FLOPs of one step (forward, backward and optimizer update).

Beside XLA's figures the tree sizes are reported by role, so a table can say where the memory
goes: parameters (frozen + trainable), gradients (the gradient tree: one value per trainable
value, since ``jax.value_and_grad`` differentiates the trainable tree only), optimizer state
(AdamW: two moments per trainable value, plus a step counter), the method's own state, and the
batch. XLA's temporaries hold the activations and whatever part of the gradient tree is live at
once: PyTorch keeps every ``.grad`` until ``optimizer.step()``, while XLA may fuse each gradient
into its parameter's update and never hold the whole tree — unless something needs all of them
first, as global-norm clipping does (``train.clip_norm > 0`` adds about two gradient trees).

Why figures differ from PyTorch's ``torch.cuda.max_memory_allocated`` (the HF PEFT README's
table): XLA plans buffers for the whole step at compile time and may reuse, fuse or rematerialise
intermediates; PyTorch's caching allocator measures what eager execution held at its worst
moment, including allocator rounding and the CUDA context's workspace. The CPU backend keeps
dtype up-casts (bf16 → f32) that a GPU compile fuses, so figures are backend-specific and every
report names its backend.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

OPTIMIZERS = ("adamw", "sgd", "adafactor")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GIB = 2 ** 30


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) leaf of ``tree``."""
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def abstract_batch(model, batch: int, seq: int, target_seq: int | None = None) -> dict:
    """A batch of ``ShapeDtypeStruct`` for the model's inputs and its head's labels.

    Encoders and decoders take ``(batch, seq)`` token inputs; inputs named ``decoder_*`` (an
    encoder-decoder's target side) take ``(batch, target_seq)``. Labels follow the head:
    classification ids / regression scores per row, token ids per position for LM heads.
    """
    if batch < 1 or seq < 2:
        raise ValueError(f"batch={batch}, seq={seq} are invalid; valid: batch >= 1, seq >= 2")
    target_seq = target_seq or seq
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    out = {}
    for name in model.input_names:
        out[name] = i32(batch, target_seq if name.startswith("decoder_") else seq)
    out["mask"] = jax.ShapeDtypeStruct((batch,), jnp.bool_)
    head = model.head
    if head == "classification":
        out["labels"] = i32(batch)
    elif head == "regression":
        out["labels"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
    elif head == "causal_lm":
        out["labels"] = i32(batch, seq)
    elif head in ("seq2seq_lm", "seq2seq"):
        out["labels"] = i32(batch, target_seq)
    else:
        raise ValueError(f"no train-step batch for head {head!r}; heads with a loss: classification, "
                         "regression, causal_lm, seq2seq_lm")
    return out


def _concrete_rows(batch_spec: dict) -> dict:
    """Zero-filled host arrays shaped like ``batch_spec`` (a data-driven method's 'training set')."""
    out = {k: np.zeros(v.shape, v.dtype) for k, v in batch_spec.items() if k != "mask"}
    if "attention_mask" in out:
        out["attention_mask"] = np.ones_like(out["attention_mask"])
    return out


def make_tx(name: str, train_cfg: Any, method) -> optax.GradientTransformation:
    """The optimizer whose state is accounted: the trainer's AdamW (``optim.make_optimizer``:
    clipping, decay mask, schedule, accumulation), plain SGD (no state) or Adafactor
    (factored second moments, Shazeer & Stern 2018)."""
    from peftjax.train.optim import make_optimizer

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is invalid; valid: {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return make_optimizer(train_cfg, max(int(train_cfg.steps), 1), method)[0]
    transform = method.gradient_transform(jax.random.PRNGKey(0))
    parts = [transform] if transform is not None else []
    lr = float(train_cfg.learning_rate)
    parts.append(optax.sgd(lr) if name == "sgd" else optax.adafactor(lr))
    return optax.chain(*parts)


def build_abstract(config: Any, head: str | None = None):
    """(model, method) of ``config`` without weights: the trainer's choice of head for the task
    (``compose.build``), or ``head`` when given (``causal_lm`` / ``seq2seq_lm`` for LM-style
    fine-tuning of a decoder / encoder-decoder, as the seed's memory table trains them)."""
    from peftjax import methods as methods_lib
    from peftjax.models import hf_io
    from peftjax.train.compose import DTYPES as COMPUTE_DTYPES, build, remat_setting

    if head is None:
        _, model, _, method, _ = build(config, with_weights=False, with_tokenizer=False)
        return model, method
    model, _, _ = hf_io.load_from_config(config.model, head=head, dtype=COMPUTE_DTYPES[config.train.dtype],
                                         remat=remat_setting(config.train.remat), with_weights=False,
                                         with_tokenizer=False,
                                         scan_layers=bool(config.train.get("scan_layers", False)))
    method_cfg = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    return model, methods_lib.create(config.method.name, model, method_cfg)


def abstract_state(config: Any, model, method, batch_spec: dict, *, optimizer: str = "adamw",
                   frozen_dtype: str = "float32"):
    """``(peft, frozen, tx, TrainState)`` of ``method`` on abstract shapes: the method set up
    under ``jax.eval_shape`` (data-driven methods see ``batch_spec``'s rows as their training
    set), the frozen tree held in ``frozen_dtype``, the optimizer and its state."""
    from peftjax.models import quant
    from peftjax.train.compose import init_context, total_steps
    from peftjax.train.steps import TrainState

    if frozen_dtype not in DTYPES:
        raise ValueError(f"frozen_dtype={frozen_dtype!r} is invalid; valid: {', '.join(DTYPES)}")
    abstract_base = traverse_util.flatten_dict(model.abstract_params(), sep=".")
    ctx = init_context(model, None, _concrete_rows(batch_spec), total_steps=total_steps(config),
                       clip_norm=config.train.clip_norm)
    from peftjax.train import quantize

    qcfg = quantize.config_of(config)  # model.quant: the frozen matrices packed (NF4 / int8)
    try:
        peft = jax.eval_shape(lambda b: quantize.setup(method, jax.random.PRNGKey(config.seed + 1),
                                                       b, ctx, qcfg), abstract_base)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError) as e:
        raise NotImplementedError(
            f"method {method.name!r} chooses its trainable set from concrete values (data-driven "
            "initialisation, e.g. a Fisher mask), which abstract shapes cannot give: its memory "
            f"is not accounted here ({type(e).__name__})") from e
    frozen = peft.frozen
    if frozen_dtype != "float32":
        cast = DTYPES[frozen_dtype]
        frozen = {k: (jax.ShapeDtypeStruct(v.shape, cast) if not quant.is_quantized(v)
                      and jnp.issubdtype(v.dtype, jnp.floating) else v) for k, v in frozen.items()}
    tx = make_tx(optimizer, config.train, method)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), peft.trainable,
                       jax.eval_shape(tx.init, peft.trainable), peft.state,
                       jax.ShapeDtypeStruct((2,), jnp.uint32))
    return peft, frozen, tx, state


def analyze_train_step(config: Any, *, batch: int = 8, seq: int = 64, target_seq: int | None = None,
                       optimizer: str = "adamw", frozen_dtype: str = "float32",
                       head: str | None = None, mesh: Any = None, device: Any = None) -> dict:
    """Compiles one train step of ``config`` (a ``configs/train.py`` config) on abstract shapes
    and returns its memory and compute accounting (see the module docstring).

    Args:
      config: the composed train config; its ``train.dtype`` (compute dtype) and ``train.remat``
        (rematerialisation policy) apply, as in training.
      batch, seq: rows and (input) sequence length of the step's batch.
      target_seq: target length of an encoder-decoder's ``decoder_*`` inputs (default ``seq``).
      optimizer: ``adamw`` (the trainer's), ``sgd`` or ``adafactor``.
      frozen_dtype: dtype the frozen base params are held in (``bfloat16`` halves a PEFT
        method's dominant term; trainable params stay fp32 master weights).
      head: the model's head (default: the trainer's choice for ``config.task``).
      mesh: not supported yet (sharded accounting comes with issue 9); passing one is an error.
      device: compile for this device instead of JAX's default one — e.g. a compile-only GPU
        from ``peftjax.gpu_target.target_device("h100")``, so a machine without a GPU gets
        XLA:GPU's plan (the row's ``deviceless`` says so).
    """
    if mesh is not None:
        raise NotImplementedError("analyze_train_step(mesh=...) is not supported yet: sharded "
                                  "memory accounting comes with the sharding work (issue 9); "
                                  "call it without a mesh for single-device figures")
    from peftjax import gpu_target, methods as methods_lib
    from peftjax.train import quantize
    from peftjax.train.steps import make_train_step

    t0 = time.perf_counter()
    model, method = build_abstract(config, head)
    abstract_base = traverse_util.flatten_dict(model.abstract_params(), sep=".")
    batch_spec = abstract_batch(model, batch, seq, target_seq)
    peft, frozen, tx, state = abstract_state(config, model, method, batch_spec, optimizer=optimizer,
                                             frozen_dtype=frozen_dtype)
    opt_state = state.opt_state
    qcfg = quantize.config_of(config)
    step = jax.jit(quantize.traced(make_train_step(method, tx, config.seed), qcfg), donate_argnums=(0,))
    args = (state, frozen, batch_spec)
    if device is not None:  # the inputs' sharding names the device, hence the compiler
        args = gpu_target.placed(args, device)
    else:
        device = jax.devices()[0]
    deviceless = device not in jax.devices()
    t1 = time.perf_counter()
    with gpu_target.compiling_for(device):  # trace-time backend choices follow the target
        lowered = step.lower(*args)
    compiled = lowered.compile()
    t2 = time.perf_counter()
    # Fused quantized matmuls (Pallas GPU kernels) in the program: read once from its text.
    fused_kernels = lowered.as_text().count("xla.gpu.triton") if qcfg.enabled else 0

    from peftjax.train import measure

    xla = measure.memory_analysis(compiled)
    cost = measure.cost_analysis(compiled)
    if not cost and deviceless:
        # A compile-only device's executable has no cost analysis: count the same program's FLOPs
        # before optimisation on the default backend (XLA's HLO cost analysis, no compile).
        # A fused quantized matmul (a Pallas GPU kernel) does not lower for the host: counted as
        # XLA's dequantize-then-dot (the same products), traced afresh (jit caches traces).
        fused = fused_kernels > 0
        if fused:
            step = jax.jit(quantize.traced(make_train_step(method, tx, config.seed),
                                           dataclasses.replace(qcfg, matmul="xla")),
                           donate_argnums=(0,))
        with gpu_target.compiling_for(device):
            unoptimized = step.lower(state, frozen, batch_spec)
        cost = {**measure.cost_analysis(unoptimized), "flops_of": "unoptimized HLO" + (
            ", quantized matmuls as XLA's dequantize-then-dot" if fused else "")}
    counts = methods_lib.count_params(method, abstract_base)
    trainable_b = tree_bytes(peft.trainable)
    sizes = {
        "frozen_params": tree_bytes(frozen),
        "trainable_params": trainable_b,
        "params": tree_bytes(frozen) + trainable_b,
        "gradients": trainable_b,
        "optimizer_state": tree_bytes(opt_state),
        "method_state": tree_bytes(peft.state),
        "batch": tree_bytes(batch_spec),
    }
    out = {
        "model": config.model.name, "method": method.name, "family": model.family.name,
        "head": model.head, "batch": batch, "seq": seq,
        **({"target_seq": target_seq or seq} if any(n.startswith("decoder_") for n in model.input_names)
           else {}),
        "dtype": config.train.dtype, "frozen_dtype": frozen_dtype, "optimizer": optimizer,
        "quant": qcfg.describe(),
        # which matmul read the quantized matrices: the setting, and how many fused (Pallas)
        # kernels the program calls (quant_matmul: fused on a GPU, XLA's dequantize-then-dot else)
        **({"quant_matmul": qcfg.matmul,
            "fused_quant_kernels": fused_kernels}
           if qcfg.enabled else {}),
        "clip_norm": float(config.train.clip_norm), "remat": str(config.train.remat),
        **({"scan_layers": True} if config.train.get("scan_layers", False) else {}),
        "backend": device.platform, "device_kind": device.device_kind,
        **({"deviceless": True} if deviceless else {}),
        "jax_version": jax.__version__,
        # compiler options change the plan (autotuning, which GEMM emitter): the row keeps them
        **({"xla_flags": os.environ["XLA_FLAGS"]} if os.environ.get("XLA_FLAGS") else {}),
        **counts,
        "trainable_percent": round(100.0 * counts["trainable_params"] / counts["total_params"], 4),
        "bytes": sizes,
        "xla": xla,
        "peak_bytes": xla.get("peak_memory_bytes"),
        "peak_gib": round(xla["peak_memory_bytes"] / GIB, 3) if "peak_memory_bytes" in xla else None,
        **cost,
        "trace_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
    }
    return out


# --------------------------------------------------------------------------------------------
# Per-device memory under a mesh (resident state only), from abstract shapes.


def abstract_plan(method, mesh_spec: Any, abstract_base: dict, tx, *, num_devices: int | None = None,
                  min_elements: int | None = None, ctx: Any = None):
    """``(abstract state, abstract frozen, TrainShardings)`` of ``method`` on a device-less mesh
    of shape ``mesh_spec``: abstract shapes only, for memory figures of models that do not fit.

    The method is set up under ``jax.eval_shape``; data-driven selections (FishMask,
    Child-tuning_D) need ``ctx`` (an ``InitContext`` with training rows) for their sizes.
    """
    from peftjax.parallel import mesh as mesh_lib
    from peftjax.parallel.rules import DEFAULT_MIN_ELEMENTS
    from peftjax.parallel.shard import plan
    from peftjax.train.steps import init_state

    amesh = mesh_lib.abstract_mesh(mesh_spec, num_devices)

    def build(base):
        peft = method.setup(jax.random.PRNGKey(0), base, ctx)
        return init_state(peft.trainable, peft.state, tx), peft.frozen

    state, frozen = jax.eval_shape(build, dict(abstract_base))
    return state, frozen, plan(method, amesh, state, frozen,
                               min_elements=DEFAULT_MIN_ELEMENTS if min_elements is None else min_elements)


def sharded_memory(config: Any, mesh_spec: Any, *, batch: int = 8, seq: int = 64,
                   target_seq: int | None = None, optimizer: str = "adamw",
                   frozen_dtype: str = "float32", num_devices: int | None = None,
                   head: str | None = None) -> dict:
    """Per-device and whole bytes of ``config``'s train state on a mesh of shape ``mesh_spec``
    (``"data,fsdp,tensor"``, a mapping or 3 ints; a ``-1`` needs ``num_devices``).

    For each tree of the train state (frozen params, trainable params, their gradients — one
    per trainable param, laid out like it —, optimizer state, method state) and the batch::

        bytes per device = Σ_arrays prod(shard_shape(array)) × itemsize

    with the shardings the trainer would use (``peftjax.parallel.shard.plan``) on a device-less
    ``jax.sharding.AbstractMesh``, so a 7B model's 8-way FSDP figures come out on a laptop. These
    are the resident state only: activations and XLA temporaries of a partitioned step need a
    compile on real devices (``analyze_train_step`` gives the single-device XLA figures).
    ``head``, ``optimizer``, ``frozen_dtype``, ``batch``/``seq`` as in ``analyze_train_step``.
    """
    from peftjax.parallel import mesh as mesh_lib
    from peftjax.parallel.rules import DEFAULT_MIN_ELEMENTS
    from peftjax.parallel.shard import check_batch_size, per_device_bytes, plan, total_bytes

    amesh = mesh_lib.abstract_mesh(mesh_spec, num_devices)
    check_batch_size(batch, amesh, what="batch")
    model, method = build_abstract(config, head)
    batch_spec = abstract_batch(model, batch, seq, target_seq)
    _, frozen, _, state = abstract_state(config, model, method, batch_spec, optimizer=optimizer,
                                         frozen_dtype=frozen_dtype)
    mesh_cfg = config.get("mesh", None)
    min_elements = int(mesh_cfg.get("min_shard_elements", DEFAULT_MIN_ELEMENTS)) if mesh_cfg else DEFAULT_MIN_ELEMENTS
    sh = plan(method, amesh, state, frozen, min_elements=min_elements)
    st = sh.state
    whole = {
        "frozen_params": total_bytes(frozen),
        "trainable_params": total_bytes(state.trainable),
        "gradients": total_bytes(state.trainable),
        "optimizer_state": total_bytes(state.opt_state),
        "method_state": total_bytes(state.method_state),
        "batch": total_bytes(batch_spec),
    }
    per_device = {
        "frozen_params": per_device_bytes(frozen, sh.frozen),
        "trainable_params": per_device_bytes(state.trainable, st.trainable),
        "gradients": per_device_bytes(state.trainable, st.trainable),
        "optimizer_state": per_device_bytes(state.opt_state, st.opt_state),
        "method_state": per_device_bytes(state.method_state, st.method_state),
        "batch": per_device_bytes(batch_spec, jax.tree.map(lambda _: sh.batch, batch_spec)),
    }
    for d in (whole, per_device):
        d["params"] = d["frozen_params"] + d["trainable_params"]
        d["total"] = sum(v for k, v in d.items() if k not in ("params", "total"))
    fallbacks = sorted({p.path for group in sh.placements.values() for p in group.values()
                        if p.replicated_dims})
    return {
        "model": config.model.name, "method": method.name, "mesh": dict(amesh.shape),
        "devices": int(amesh.size), "batch": batch, "seq": seq, "frozen_dtype": frozen_dtype,
        "optimizer": optimizer, "bytes_per_device": per_device, "bytes_single_device": whole,
        "params_fraction_per_device": round(per_device["params"] / whole["params"], 6),
        "divisibility_fallbacks": len(fallbacks),
    }
