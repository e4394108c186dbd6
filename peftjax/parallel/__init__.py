"""Scale-out with JAX's own machinery: a named device mesh (``data``, ``fsdp``, ``tensor``),
regex → ``PartitionSpec`` rules per model family, GSPMD-partitioned train steps via
``jax.jit(in_shardings=..., out_shardings=...)`` and ``jax.distributed`` for multi-host runs.
See docs/distributed.md.
"""

from peftjax.parallel.mesh import AXES, BATCH_AXES, abstract_mesh, is_trivial, make_mesh, resolve_axis_sizes
from peftjax.parallel.rules import Placement, ShardingRules, describe, register_rules, rules_for
from peftjax.parallel.shard import (SingleDevice, TrainShardings, memory_report, per_device_bytes, plan,
                                    total_bytes)

__all__ = ["AXES", "BATCH_AXES", "abstract_mesh", "is_trivial", "make_mesh", "resolve_axis_sizes",
           "Placement", "ShardingRules", "describe", "register_rules", "rules_for", "SingleDevice",
           "TrainShardings", "memory_report", "per_device_bytes", "plan", "total_bytes"]
