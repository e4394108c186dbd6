"""One of two processes running the training loop together (4 host CPU devices each, gloo):

    python tests/parallel/multihost_loop.py PROCESS_ID PORT DATA_DIR WORKDIR [STOP_AFTER]

LoRA on tiny-bert / tweet_sentiment on a (2,2,2) mesh spanning both processes, connected by
``config.distributed`` (as a cluster launch would). Prints the result's metrics as JSON.
"""

from __future__ import annotations

import json
import sys

import jax


def main(pid: int, port: int, data_dir: str, workdir: str, stop_after: int | None = None) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from tests.parallel.sharded_loop import config
    from peftjax.train import train_and_evaluate

    cfg = config(data_dir, (2, 2, 2))
    cfg.distributed.initialize = True
    cfg.distributed.coordinator_address = f"localhost:{port}"
    cfg.distributed.num_processes = 2
    cfg.distributed.process_id = pid
    res = train_and_evaluate(cfg, workdir, stop_after_step=stop_after)
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                      "metrics": res.get("metrics"), "mesh": res.get("mesh"), "stopped_at": res.get("stopped_at")}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
         int(sys.argv[5]) if len(sys.argv) > 5 else None)
