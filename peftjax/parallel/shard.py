"""Shardings of everything a train step touches, from the rules and abstract shapes alone.

The train state is ``TrainState(step, trainable, opt_state, method_state)`` plus the frozen tree
and the batch (``peftjax.train.steps``). Their placement on a mesh:

* **frozen base**: the family's rules (FSDP and/or tensor parallel), the generic fallback else;
* **trainable** (``{"base", "added", "head"}``): the same rules by path — LoRA factors, adapter
  kernels and prompt embeddings are sharded over ``fsdp`` when big enough, replicated when small;
  **sparse deltas** (FishMask / Child-tuning_D keep a vector of selected values per weight, under
  the weight's own path, and their int32 ``.indices`` in the method state) are replicated: a
  scatter of a sharded index list would need a gather of the whole weight anyway, and they are
  tiny (≤ 0.5 % of the weights);
* **optimizer state**: each moment (Adam's mu/nu, ...) takes the sharding of the parameter it
  mirrors (found by its key path and shape), scalars (counts, rng seeds) are replicated — the
  ZeRO partition of optimizer state follows the parameter's;
* **method state** (AdaLoRA importance EMAs, VeRA's shared A/B): the rules by name;
* **batch**: the leading (example) dim over ``("data", "fsdp")``.

``jax.jit(step, in_shardings=..., out_shardings=...)`` then lets GSPMD partition the step: it
all-gathers FSDP-sharded weights before use, reduce-scatters their gradients and all-reduces over
``data``. The computation is the same as on one device (up to float summation order), which the
tests check on 8 host devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from peftjax.models import quant, quant_matmul
from peftjax.parallel import mesh as mesh_lib
from peftjax.parallel.rules import DEFAULT_MIN_ELEMENTS, Placement, ShardingRules, describe, fit_spec

log = logging.getLogger(__name__)

SPARSE_DELTA = "sparse delta (replicated)"
SPARSE_INDICES = "sparse indices (replicated)"


def _shape(x) -> tuple[int, ...]:
    return tuple(int(s) for s in np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _flat_placements(flat: Mapping[str, Any], rules: ShardingRules, mesh_shape: Mapping[str, int],
                     special: Callable[[str, tuple], str | None] = lambda p, s: None) -> dict[str, Placement]:
    out = {}
    for path, value in flat.items():
        shape = _shape(value)
        reason = special(path, shape)
        out[path] = Placement(path, shape, P(), reason) if reason else rules.place(path, shape, mesh_shape)
    return out


@dataclasses.dataclass
class TrainShardings:
    """``NamedSharding`` trees matching ``(state, frozen, batch)`` of a train step, and the
    ``Placement`` of every param (``placements[group][path]``; groups: frozen, base, added,
    head, method_state) for reports."""

    mesh: Mesh
    state: Any                  # a TrainState of shardings
    frozen: dict
    batch: NamedSharding
    replicated: NamedSharding
    placements: dict[str, dict[str, Placement]]

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    def put(self, state, frozen):
        """``state`` and ``frozen`` placed on the mesh (single- or multi-process)."""
        return put_tree(state, self.state), put_tree(frozen, self.frozen)

    def host_tree(self, tree):
        """Whole host arrays on every process (a collective: all processes take part)."""
        return host_tree(tree)

    def on_mesh(self, tree):
        """``tree`` with every leaf not yet on this mesh (host-local scalars such as the loop's
        best-so-far step and metrics) replicated on it: multi-process orbax saves only global
        arrays. Leaves already on the mesh are returned as they are."""
        def one(x):
            if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh:
                return x
            return put_tree(np.asarray(jax.device_get(x)), self.replicated)

        return jax.tree.map(one, tree)

    def put_batch(self, batch: Mapping[str, Any]) -> dict:
        """A global batch (every process holds the same rows) as a sharded array dict; each
        process transfers only the rows its own devices hold."""
        return {k: global_batch_array(np.asarray(v), self.batch) for k, v in batch.items()}

    def _traced_partitioned(self, fn: Callable) -> Callable:
        """``fn`` traced with ``quant_matmul.partitioned()`` on a mesh of several devices: the
        fused quantized matmul (a Pallas call, no sharding rule) would gather sharded codes."""
        if self.mesh.size == 1:
            return fn

        @functools.wraps(fn)
        def traced(*args):
            with quant_matmul.partitioned():
                return fn(*args)

        return traced

    def jit_train_step(self, step_fn: Callable, donate: bool = True) -> Callable:
        """``step_fn`` (``steps.make_train_step``) jitted with these shardings; metrics come out
        replicated so every process can read them."""
        return jax.jit(self._traced_partitioned(step_fn),
                       in_shardings=(self.state, self.frozen, self.batch),
                       out_shardings=(self.state, self.replicated),
                       donate_argnums=(0,) if donate else ())

    def jit_eval_step(self, eval_fn: Callable) -> Callable:
        """``eval_fn(trainable, frozen, method_state, batch)`` with inputs as placed, the (host)
        eval batch replicated — eval batches need not divide over the mesh — and replicated
        outputs, readable on every process."""
        jitted = jax.jit(self._traced_partitioned(eval_fn), in_shardings=(self.state.trainable, self.frozen,
                                                self.state.method_state, self.replicated),
                         out_shardings=self.replicated)

        def run(trainable, frozen, method_state, batch):
            batch = put_tree(dict(batch), jax.tree.map(lambda _: self.replicated, dict(batch)))
            return jitted(trainable, frozen, method_state, batch)

        return run


def put_tree(tree, shardings):
    """``jax.device_put`` onto a sharding tree; in a multi-process run every process passes the
    same (host) values and keeps the shards of its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            # already global (streamed onto the mesh by the loader): kept, or resharded on the
            # devices, never gathered to a host
            return x if x.sharding == s else jax.device_put(x, s)
        x = np.asarray(jax.device_get(x)) if not isinstance(x, np.ndarray) else x
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def global_batch_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One batch field as a global array sharded by ``sharding`` over its leading dim."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    from peftjax.parallel.distributed import process_rows

    lo, hi = process_rows(x.shape[0], sharding)
    return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    ways = mesh_lib.batch_divisor(mesh)
    if batch_size % ways:
        raise ValueError(f"{what}={batch_size} is not divisible by the mesh's batch split "
                         f"data x fsdp = {ways} ({dict(mesh.shape)}); use a multiple of {ways}")


def _opt_state_shardings(opt_state, trainable_shardings: dict, trainable_shapes: dict,
                         replicated: NamedSharding):
    """A param-shaped optimizer leaf whose key path ends with a trainable param's key path (and
    has its shape) gets that param's sharding; any other leaf is replicated."""
    by_path = {}
    for kp, s in jax.tree_util.tree_flatten_with_path(trainable_shardings)[0]:
        by_path[tuple(kp)] = s
    depth = {len(k) for k in by_path}

    def pick(kp, leaf):
        kp = tuple(kp)
        for d in depth:
            key = kp[-d:]
            if len(kp) >= d and key in by_path and tuple(leaf.shape) == trainable_shapes[key]:
                return by_path[key]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def plan(method, mesh: Mesh, state, frozen: Mapping[str, Any], *, rules: ShardingRules | None = None,
         min_elements: int = DEFAULT_MIN_ELEMENTS) -> TrainShardings:
    """Shardings for ``(state, frozen, batch)`` of ``method``'s train step on ``mesh``.

    ``state`` is a ``TrainState`` (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
    ``jax.eval_shape``); nothing is allocated. The shardings come back as the same NamedTuple
    type (``state._replace``), so this module needs nothing from ``peftjax.train``.
    """
    rules = rules or ShardingRules.for_family(method.model.family.name, min_elements)
    shape = dict(mesh.shape)
    named = lambda pl: {k: NamedSharding(mesh, p.spec) for k, p in pl.items()}
    replicated = NamedSharding(mesh, P())
    frozen_shapes = {k: _shape(v) for k, v in frozen.items()}

    def sparse_delta(path, shp):
        # selection methods' values, stored under the weight's own path with ``.indices`` in the
        # method state (FishMask, Child-tuning_D), or any vector that replaces a frozen weight
        sparse = path + ".indices" in state.method_state or (
            path in frozen_shapes and frozen_shapes[path] != shp)
        return SPARSE_DELTA if sparse else None

    placements = {"frozen": _flat_placements(frozen, rules, shape)}
    trainable_sh = {}
    for group, tree in state.trainable.items():
        pl = _flat_placements(tree, rules, shape, sparse_delta if group == "base" else lambda p, s: None)
        placements[group] = pl
        trainable_sh[group] = named(pl)
    placements["method_state"] = _flat_placements(
        state.method_state, rules, shape,
        lambda p, s: SPARSE_INDICES if p.endswith(".indices") else None)
    shapes = {tuple(kp): tuple(v.shape) for kp, v in
              jax.tree_util.tree_flatten_with_path(state.trainable)[0]}
    opt_sh = _opt_state_shardings(state.opt_state, trainable_sh, shapes, replicated)
    state_sh = state._replace(step=replicated, trainable=trainable_sh, opt_state=opt_sh,
                              method_state=named(placements["method_state"]),
                              **({"rng": replicated} if getattr(state, "rng", None) is not None else {}))
    frozen_sh = {k: (_quantized_shardings(frozen[k], pl.spec, mesh) if quant.is_quantized(frozen[k])
                     else NamedSharding(mesh, pl.spec)) for k, pl in placements["frozen"].items()}
    return TrainShardings(mesh, state_sh, frozen_sh,
                          NamedSharding(mesh, P(mesh_lib.BATCH_AXES)), replicated, placements)


def _quantized_shardings(q: "quant.QuantizedTensor", kernel_spec: P, mesh) -> "quant.QuantizedTensor":
    """A quantized frozen kernel's shardings: its arrays placed by the rule of the kernel it
    stores (``quant.component_specs``: packed codes and per-block scales along the kernel's own
    axes, int8's per-output scales along ``out``, double quantization's few-KiB second level
    replicated), each dim that does not divide replicated (``fit_spec``)."""
    specs = quant.component_specs(q, kernel_spec)
    shape = dict(mesh.shape)

    def one(spec, x):
        if x is None:
            return None
        return NamedSharding(mesh, fit_spec(spec, _shape(x), shape, where=f"quantized {q.kind}")[0])

    return quant.QuantizedTensor(one(specs.data, q.data), one(specs.scale, q.scale),
                                 one(specs.scale2, q.scale2), one(specs.offset, q.offset),
                                 kind=q.kind, shape=q.shape, dtype=q.dtype, block_size=q.block_size)


# --------------------------------------------------------------------------------------------
# Per-device bytes from abstract shapes.


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (arrays or ``ShapeDtypeStruct``s) laid out by
    ``shardings`` (a matching tree of ``NamedSharding``s, on a real or ``AbstractMesh``).

    Σ_leaves prod(shard_shape) × itemsize: exact for the even splits the rules produce (a dim is
    sharded only when it divides). A replicated leaf counts whole on every device.
    """
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
            shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
        shp = _shape(x)
        total += math.prod(s.shard_shape(shp)) * np.dtype(x.dtype).itemsize
    return int(total)


def total_bytes(tree) -> int:
    """Bytes of ``tree`` unsharded (the single-device figure)."""
    return int(sum(math.prod(_shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def memory_report(state, frozen, shardings: TrainShardings) -> dict[str, int]:
    """Per-device and single-device bytes of params (frozen + trainable), gradients (one per
    trainable param, sharded like it), optimizer state and method state."""
    st = shardings.state
    return {
        "frozen_bytes": total_bytes(frozen),
        "frozen_bytes_per_device": per_device_bytes(frozen, shardings.frozen),
        "trainable_bytes": total_bytes(state.trainable),
        "trainable_bytes_per_device": per_device_bytes(state.trainable, st.trainable),
        "gradient_bytes": total_bytes(state.trainable),
        "gradient_bytes_per_device": per_device_bytes(state.trainable, st.trainable),
        "optimizer_bytes": total_bytes(state.opt_state),
        "optimizer_bytes_per_device": per_device_bytes(state.opt_state, st.opt_state),
        "method_state_bytes": total_bytes(state.method_state),
        "method_state_bytes_per_device": per_device_bytes(state.method_state, st.method_state),
    }


class SingleDevice:
    """The trivial placement: one device, nothing to shard (a mesh whose sizes are all 1).

    It has ``TrainShardings``' interface, so the training loop places, jits and gathers the same
    way on one device as on a mesh, with no branch on which it is.
    """

    mesh = None
    mesh_shape = None

    def put(self, state, frozen):
        return state, frozen

    def on_mesh(self, tree):
        return tree

    def put_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        return batch

    def jit_train_step(self, step_fn: Callable, donate: bool = True) -> Callable:
        return jax.jit(step_fn, donate_argnums=(0,) if donate else ())

    def jit_eval_step(self, eval_fn: Callable) -> Callable:
        return jax.jit(eval_fn)

    def host_tree(self, tree):
        return jax.device_get(tree)


def from_config(config, method, state, frozen: Mapping[str, Any]) -> "TrainShardings | SingleDevice":
    """Where the train step runs: ``config.mesh`` on all devices (``TrainShardings``), or
    ``SingleDevice`` when the mesh is trivial (every size 1). Checks that the train batch
    divides over the batch axes before any compute."""
    mesh_cfg = config.get("mesh", None)
    if mesh_cfg is None or mesh_lib.is_trivial(mesh_cfg):
        return SingleDevice()
    mesh = mesh_lib.make_mesh(mesh_cfg)
    check_batch_size(config.train.batch_size, mesh)
    sh = plan(method, mesh, state, frozen,
              min_elements=int(mesh_cfg.get("min_shard_elements", DEFAULT_MIN_ELEMENTS)))
    placements = [p for group in sh.placements.values() for p in group.values()]
    fallbacks = [p for p in placements if p.replicated_dims]
    log.info("mesh %s; %d arrays sharded, %d replicated", dict(mesh.shape),
             sum(p.spec != P() for p in placements), sum(p.spec == P() for p in placements))
    if fallbacks:  # a rule asked for a split that does not divide: that dim is replicated
        log.warning("%d arrays keep a dim replicated because it does not divide by its mesh axes:\n%s",
                    len(fallbacks), describe(fallbacks))
    log.debug("placements:\n%s", describe(placements))
    return sh


def host_tree(tree):
    """``tree`` as host numpy arrays, whole on every process (sharded arrays spanning several
    processes are all-gathered: ``multihost_utils.process_allgather``); for files such as the
    adapter that need whole arrays."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from peftjax.models.hf_io import host_array

    return jax.tree.map(host_array, tree)


def param_shardings(model, mesh: Mesh, *, rules: ShardingRules | None = None,
                    min_elements: int = DEFAULT_MIN_ELEMENTS) -> dict[str, NamedSharding]:
    """Where each of ``model``'s params lives on ``mesh`` under its family's rules (the frozen
    base's placement in ``plan``), by dotted path, from abstract shapes: a loader places every
    tensor there directly (``hf_io.params_from_tensors(..., shardings=...)``), so no host or
    device ever holds the whole model."""
    from flax import traverse_util

    rules = rules or ShardingRules.for_family(model.family.name, min_elements)
    flat = traverse_util.flatten_dict(model.abstract_params(), sep=".")
    return {k: NamedSharding(mesh, p.spec) for k, p in _flat_placements(flat, rules, dict(mesh.shape)).items()}
