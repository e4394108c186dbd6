"""Run by tests/parallel/test_streaming_load.py with 8 forced host CPU devices: the training
loop with a checkpoint (tiny-bert's shapes, random weights saved as safetensors) on the
(2,2,2) mesh, its base streamed straight into its shardings, matches the single-device run
(train losses, metrics); the mesh run's frozen kernels were placed by the loader (sharded
before the plan). Prints one JSON object."""

from __future__ import annotations

import json
import sys
import tempfile

import jax


def main(data_dir: str) -> None:
    from configs.train import get_config
    from peftjax.models import build_model, hf_io
    from peftjax.train import compose, train_and_evaluate
    from tests.parallel.sharded_loop import config, losses

    tmp = tempfile.TemporaryDirectory(prefix="streaming_loop_")  # removed when the process ends
    root = tmp.name
    model_cfg = get_config("model=tiny-bert,method=lora,task=tweet_sentiment").model
    model = build_model(model_cfg.hf_config.to_dict(), head="none")
    hf_io.save_pretrained(model, model.init(jax.random.PRNGKey(7)), f"{root}/ckpt")
    out = {}
    for name, mesh in (("single", (1, 1, 1)), ("mesh", (2, 2, 2))):
        cfg = config(data_dir, mesh)
        cfg.model.checkpoint = f"{root}/ckpt"
        if name == "mesh":   # what the loader hands the loop: params already on the mesh
            _, _, _, _, base = compose.build(cfg, with_tokenizer=False)
            out["loaded_sharded"] = sum(not v.sharding.is_fully_replicated for v in base.values())
        res = train_and_evaluate(cfg, f"{root}/{name}")
        out[name] = {"losses": losses(f"{root}/{name}"), "metrics": res["metrics"], "mesh": res["mesh"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
