"""Device meshes with the named axes every sharding rule refers to: ``data``, ``fsdp``, ``tensor``.

* ``data``: pure data parallelism — each group of devices along it holds a full replica of
  whatever the other axes do not shard, and a slice of the batch.
* ``fsdp``: fully-sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020): the batch is split
  over it like ``data``, and parameters are split over it too; XLA's SPMD partitioner (GSPMD,
  Xu et al. 2021) inserts the all-gathers before use and the reduce-scatters of gradients.
* ``tensor``: Megatron-style tensor parallelism (Shoeybi et al. 2019): column-parallel input
  projections, row-parallel output projections.

A train config says ``config.mesh = ConfigDict(data=-1, fsdp=1, tensor=1)``; ``-1`` (at most one
axis) takes the devices the others leave. All sizes 1 means "no mesh": the training loop then
runs exactly the single-device code path it always ran.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")   # the batch dimension is split over both


def axis_sizes_from(spec: Any) -> dict[str, int]:
    """``{"data": d, "fsdp": f, "tensor": t}`` from a mapping/ConfigDict, a sequence of three
    ints, or a ``"d,f,t"`` string (the command-line form). Sizes are unresolved (may be -1)."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            spec = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"mesh {spec!r} is invalid; expected three comma-separated ints "
                             f"data,fsdp,tensor such as '1,8,1' (-1: the rest)") from None
    if isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
        values = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        sizes = {a: values.get(a, 1) for a in AXES}
    else:
        spec = list(spec)
        if len(spec) != len(AXES):
            raise ValueError(f"mesh {spec!r} has {len(spec)} sizes; expected 3 ({', '.join(AXES)})")
        sizes = dict(zip(AXES, spec))
    for axis, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis}={size!r} is invalid; valid: a positive int or -1 (the rest)")
    return {a: int(s) for a, s in sizes.items()}


def is_trivial(spec: Any) -> bool:
    """True when every axis size is 1: no mesh, the plain single-device path."""
    return all(s == 1 for s in axis_sizes_from(spec).values())


def resolve_axis_sizes(spec: Any, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes with ``-1`` resolved so that their product is ``num_devices`` (checked)."""
    sizes = axis_sizes_from(spec)
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh {sizes} has -1 on {', '.join(rest)}; at most one axis may be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed "
                             f"axes' product {fixed}")
        sizes[rest[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but "
                         f"{num_devices} are available; sizes must multiply to the device count")
    return tuple(sizes[a] for a in AXES)


def make_mesh(spec: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all devices of all processes) with axes
    ``("data", "fsdp", "tensor")``.

    ``jax.make_mesh`` orders devices so that the innermost axis (``tensor``, the most
    communication-heavy) lies on the fastest interconnect (within a host / ICI ring). Axes are
    ``AxisType.Auto``: shardings are hints to GSPMD, which propagates them through the program.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_axis_sizes(spec, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def abstract_mesh(spec: Any, num_devices: int | None = None) -> AbstractMesh:
    """A device-less mesh of the given shape, for per-device memory figures on abstract shapes
    (no devices needed: ``NamedSharding(abstract_mesh, spec).shard_shape`` works on it).

    ``num_devices`` resolves a ``-1``; without it every size must be given.
    """
    sizes = axis_sizes_from(spec)
    if num_devices is None:
        if -1 in sizes.values():
            raise ValueError(f"mesh {sizes} has a -1 axis; give num_devices to resolve it")
        num_devices = math.prod(sizes.values())
    shape = resolve_axis_sizes(sizes, num_devices)
    return AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_divisor(mesh: Mesh | AbstractMesh) -> int:
    """How many ways the batch dimension is split (data × fsdp); batch sizes must divide by it."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
