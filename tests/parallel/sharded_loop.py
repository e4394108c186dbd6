"""Run by tests/parallel/test_sharding.py (slow) with 8 forced host CPU devices: the training loop
(``train_and_evaluate``) on a (2,2,2) mesh matches the single-device run (train losses, metrics),
and a run killed on the (2,4,1) mesh resumes on the (2,2,2) mesh to the same result. Prints one
JSON object on stdout."""

from __future__ import annotations

import json
import sys
import tempfile

from configs.train import get_config
from peftjax.train import train_and_evaluate


def config(data_dir: str, mesh: tuple[int, int, int]):
    cfg = get_config("model=tiny-bert,method=lora,task=tweet_sentiment")
    cfg.data_dir = data_dir
    for k, v in dict(steps=6, batch_size=8, eval_batch_size=16, train_limit=64, eval_limit=32,
                     eval_every=3, checkpoint_every=2, log_every=1, progress=False).items():
        cfg.train[k] = v
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    cfg.mesh.min_shard_elements = 64
    return cfg


def losses(workdir: str) -> list[float]:
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    return [r["loss"] for r in rows if r["split"] == "train"]


def main() -> None:
    data_dir = sys.argv[1]
    tmp = tempfile.TemporaryDirectory(prefix="sharded_loop_")  # removed when the process ends
    root = tmp.name
    out = {}
    for name, mesh in (("single", (1, 1, 1)), ("mesh", (2, 2, 2))):
        res = train_and_evaluate(config(data_dir, mesh), f"{root}/{name}")
        out[name] = {"losses": losses(f"{root}/{name}"), "metrics": res["metrics"], "mesh": res["mesh"]}
    train_and_evaluate(config(data_dir, (2, 4, 1)), f"{root}/resumed", stop_after_step=4)
    res = train_and_evaluate(config(data_dir, (2, 2, 2)), f"{root}/resumed")
    out["resumed"] = {"losses": losses(f"{root}/resumed"), "metrics": res["metrics"], "mesh": res["mesh"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
