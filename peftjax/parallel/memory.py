"""Per-device memory of a train step under a mesh, from abstract shapes (nothing allocated).

For each tree of the train state — frozen params, trainable params, their gradients (one per
trainable param, laid out like it), optimizer state, method state — and the batch:

    bytes per device = Σ_arrays prod(shard_shape(array)) × itemsize

with the shardings the trainer would use (``peftjax.parallel.shard.plan``) on a device-less
``jax.sharding.AbstractMesh``, so a 7B model's 8-way FSDP figures come out on a laptop. These
are the resident state only: activations and XLA temporaries of a partitioned step need a
compile on real devices (``scripts/memory.py`` without ``--mesh`` gives the single-device XLA
figures).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from peftjax.parallel import mesh as mesh_lib
from peftjax.parallel.rules import DEFAULT_MIN_ELEMENTS
from peftjax.parallel.shard import check_batch_size, per_device_bytes, plan, total_bytes


def sharded_memory(config: Any, mesh_spec: Any, *, batch: int = 8, seq: int = 64,
                   target_seq: int | None = None, optimizer: str = "adamw",
                   frozen_dtype: str = "float32", num_devices: int | None = None,
                   head: str | None = None) -> dict:
    """Per-device and whole bytes of ``config``'s train state on a mesh of shape ``mesh_spec``
    (``"data,fsdp,tensor"``, a mapping or 3 ints; a ``-1`` needs ``num_devices``). ``head``,
    ``optimizer``, ``frozen_dtype``, ``batch``/``seq`` as in ``peftjax.train.memory``."""
    from peftjax.train.loop import init_context
    from peftjax.train.memory import DTYPES, _concrete_rows, abstract_batch, build_abstract, make_tx
    from peftjax.train.steps import TrainState

    if frozen_dtype not in DTYPES:
        raise ValueError(f"frozen_dtype={frozen_dtype!r} is invalid; valid: {', '.join(DTYPES)}")
    amesh = mesh_lib.abstract_mesh(mesh_spec, num_devices)
    check_batch_size(batch, amesh, what="batch")
    model, method = build_abstract(config, head)
    abstract_base = traverse_util.flatten_dict(model.abstract_params(), sep=".")
    batch_spec = abstract_batch(model, batch, seq, target_seq)
    ctx = init_context(model, None, _concrete_rows(batch_spec))
    peft = jax.eval_shape(lambda b: method.setup(jax.random.PRNGKey(config.seed + 1), b, ctx),
                          abstract_base)
    frozen = peft.frozen
    if frozen_dtype != "float32":
        cast = DTYPES[frozen_dtype]
        frozen = {k: (jax.ShapeDtypeStruct(v.shape, cast) if jnp.issubdtype(v.dtype, jnp.floating)
                      else v) for k, v in frozen.items()}
    tx = make_tx(optimizer, config.train, method)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), peft.trainable,
                       jax.eval_shape(tx.init, peft.trainable), peft.state)
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
