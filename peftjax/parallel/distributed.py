"""Multi-host runs: ``jax.distributed.initialize`` from the config or the environment, and the
rows of each global batch that one process feeds.

JAX is multi-controller: every host runs the same program on its local devices, and
``jax.devices()`` lists all devices of all hosts once ``jax.distributed.initialize`` has
connected the processes (it must run before anything touches a device). Where JAX can detect the
cluster — SLURM, Open MPI, Cloud TPU pod slices, GKE — no argument is needed; else the coordinator
address, process count and id come from ``config.distributed`` or the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_LOCAL_DEVICE_IDS``).
The launch recipes are in docs/distributed.md.

Data: every process builds the same deterministic global batch (a function of seed and step,
``peftjax.data.train_batches``) and transfers only the rows its own devices hold
(``jax.make_array_from_process_local_data``), so a run on N hosts sees exactly the examples of a
one-host run, in the same order.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax.sharding import NamedSharding

log = logging.getLogger(__name__)

ENV_ENABLE = "PEFTJAX_DISTRIBUTED"   # "1": initialise even if the config does not say so


def _get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def wants_initialize(cfg: Any = None) -> bool:
    env = os.environ.get(ENV_ENABLE, "")
    if env not in ("", "0", "1"):
        raise ValueError(f"{ENV_ENABLE}={env!r} is invalid; valid: 0 or 1")
    return bool(_get(cfg, "initialize", False)) or env == "1"


def initialize_args(cfg: Any = None) -> dict:
    """Keyword arguments for ``jax.distributed.initialize``: config fields first, then the
    environment; absent ones are left to JAX's cluster auto-detection."""
    args: dict[str, Any] = {}
    address = _get(cfg, "coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        args["coordinator_address"] = address
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = _get(cfg, key, -1)
        if value is None or value < 0:
            raw = os.environ.get(env, "")
            try:
                value = int(raw) if raw else -1
            except ValueError:
                raise ValueError(f"{env}={raw!r} is not an integer") from None
        if value >= 0:
            args[key] = value
    ids = _get(cfg, "local_device_ids", "") or ""
    if ids:
        try:
            args["local_device_ids"] = [int(i) for i in str(ids).split(",")]
        except ValueError:
            raise ValueError(f"distributed.local_device_ids={ids!r} is invalid; valid: "
                             "comma-separated ints such as '0,1,2,3'") from None
    if "num_processes" in args and "process_id" in args and not 0 <= args["process_id"] < args["num_processes"]:
        raise ValueError(f"distributed.process_id={args['process_id']} is invalid; valid: "
                         f"0..{args['num_processes'] - 1} (num_processes={args['num_processes']})")
    timeout = _get(cfg, "initialization_timeout", 0)
    if timeout:
        args["initialization_timeout"] = int(timeout)
    return args


def maybe_initialize(cfg: Any = None) -> bool:
    """Connects this process to the others when the config (``distributed.initialize``) or
    ``PEFTJAX_DISTRIBUTED=1`` asks for it; idempotent. Returns whether JAX is distributed."""
    if jax.distributed.is_initialized():
        return True
    if not wants_initialize(cfg):
        return False
    args = initialize_args(cfg)
    log.info("jax.distributed.initialize(%s)", args)
    jax.distributed.initialize(**args)
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def process_rows(num_rows: int, sharding: NamedSharding) -> tuple[int, int]:
    """``[lo, hi)``: the rows of a ``num_rows`` global batch that this process's devices hold
    under ``sharding`` (leading dim split over the batch axes).

    ``jax.make_mesh`` keeps each process's devices together along the mesh's leading axes, so
    the rows are one contiguous block; any other layout is refused with the offending ranges.
    """
    idx = sharding.addressable_devices_indices_map((num_rows,))
    ranges = sorted({(s[0].start or 0, num_rows if s[0].stop is None else s[0].stop) for s in idx.values()})
    lo, hi = ranges[0][0], ranges[-1][1]
    covered = sum(b - a for a, b in ranges)
    if covered != hi - lo:
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {ranges}; "
                         "build the mesh with peftjax.parallel.make_mesh (process-major device order)")
    return lo, hi


def is_writer() -> bool:
    """Whether this process writes the run's plain files (metrics, result.json, adapter):
    process 0 only, so N processes do not append the same rows N times. Orbax checkpoints are
    written by every process (each its own shards)."""
    return jax.process_index() == 0


class NullMetricsLog:
    """Stands in for the loop's ``MetricsLog`` on processes other than 0."""

    def write(self, step: int, split: str, values: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
