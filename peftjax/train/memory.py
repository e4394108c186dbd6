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
        return make_optimizer(train_cfg, max(int(train_cfg.steps), 1), method.gradient_transform())[0]
    parts = [method.gradient_transform()] if method.gradient_transform() is not None else []
    lr = float(train_cfg.learning_rate)
    parts.append(optax.sgd(lr) if name == "sgd" else optax.adafactor(lr))
    return optax.chain(*parts)


def build_abstract(config: Any, head: str | None = None):
    """(model, method) of ``config`` without weights: the trainer's choice of head for the task
    (``loop.build``), or ``head`` when given (``causal_lm`` / ``seq2seq_lm`` for LM-style
    fine-tuning of a decoder / encoder-decoder, as the seed's memory table trains them)."""
    from peftjax import methods as methods_lib
    from peftjax.models import hf_io
    from peftjax.train.loop import DTYPES as COMPUTE_DTYPES, _remat, build

    if head is None:
        _, model, _, method, _ = build(config, with_weights=False, with_tokenizer=False)
        return model, method
    model, _, _ = hf_io.load_from_config(config.model, head=head, dtype=COMPUTE_DTYPES[config.train.dtype],
                                         remat=_remat(config.train.remat), with_weights=False,
                                         with_tokenizer=False)
    method_cfg = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    if method_cfg.get("total_step", None) == 0:  # schedule-driven methods (AdaLoRA): the run's length
        method_cfg["total_step"] = config.train.steps * config.train.grad_accum_steps
    return model, methods_lib.create(config.method.name, model, method_cfg)


def analyze_train_step(config: Any, *, batch: int = 8, seq: int = 64, target_seq: int | None = None,
                       optimizer: str = "adamw", frozen_dtype: str = "float32",
                       head: str | None = None, mesh: Any = None) -> dict:
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
    """
    if mesh is not None:
        raise NotImplementedError("analyze_train_step(mesh=...) is not supported yet: sharded "
                                  "memory accounting comes with the sharding work (issue 9); "
                                  "call it without a mesh for single-device figures")
    if frozen_dtype not in DTYPES:
        raise ValueError(f"frozen_dtype={frozen_dtype!r} is invalid; valid: {', '.join(DTYPES)}")
    from peftjax import methods as methods_lib
    from peftjax.train.loop import init_context
    from peftjax.train.steps import TrainState, make_train_step

    t0 = time.perf_counter()
    model, method = build_abstract(config, head)
    abstract_base = traverse_util.flatten_dict(model.abstract_params(), sep=".")
    batch_spec = abstract_batch(model, batch, seq, target_seq)
    ctx = init_context(model, None, _concrete_rows(batch_spec))
    try:
        peft = jax.eval_shape(lambda b: method.setup(jax.random.PRNGKey(config.seed + 1), b, ctx),
                              abstract_base)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError) as e:
        raise NotImplementedError(
            f"method {method.name!r} chooses its trainable set from concrete values (data-driven "
            "initialisation, e.g. a Fisher mask), which abstract shapes cannot give: its memory "
            f"is not accounted here ({type(e).__name__})") from e
    frozen = peft.frozen
    if frozen_dtype != "float32":
        cast = DTYPES[frozen_dtype]
        frozen = {k: (jax.ShapeDtypeStruct(v.shape, cast) if jnp.issubdtype(v.dtype, jnp.floating)
                      else v) for k, v in frozen.items()}
    tx = make_tx(optimizer, config.train, method)
    opt_state = jax.eval_shape(tx.init, peft.trainable)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), peft.trainable, opt_state, peft.state)
    step = jax.jit(make_train_step(method, tx, config.seed), donate_argnums=(0,))
    t1 = time.perf_counter()
    lowered = step.lower(state, frozen, batch_spec)
    compiled = lowered.compile()
    t2 = time.perf_counter()

    from peftjax.train import measure

    xla = measure.memory_analysis(compiled)
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
        "clip_norm": float(config.train.clip_norm), "remat": str(config.train.remat),
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        **counts,
        "trainable_percent": round(100.0 * counts["trainable_params"] / counts["total_params"], 4),
        "bytes": sizes,
        "xla": xla,
        "peak_bytes": xla.get("peak_memory_bytes"),
        "peak_gib": round(xla["peak_memory_bytes"] / GIB, 3) if "peak_memory_bytes" in xla else None,
        **measure.cost_analysis(compiled),
        "trace_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
    }
    return out
