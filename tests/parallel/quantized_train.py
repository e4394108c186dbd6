"""Run by tests/train/test_quantize.py in a subprocess with 8 forced host CPU devices.

LoRA on a tiny Llama whose frozen matrices are NF4 (double quant) and int8 trains for a few
steps on one device and on the (2,2,2) mesh, the quantized arrays placed by
``peftjax.parallel.plan``. Prints one JSON object: both loss curves per kind and the shard
shapes of one quantized kernel's arrays (proof they really are sharded).
"""

from __future__ import annotations

import json

import jax
import optax
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods as methods_lib
from peftjax.models import build_model
from peftjax.parallel import make_mesh, plan
from peftjax.train import quantize
from peftjax.train.steps import init_state, make_train_step
from tests.helpers import METHOD_CONFIGS, learnable_batch

STEPS = 4


def main() -> None:
    assert jax.device_count() == 8, f"expected 8 forced host devices, got {jax.device_count()}"
    hf = {**model_configs.get("tiny-llama").hf_config.to_dict(), "vocab_size": 256,
          "initializer_range": 0.2, "num_hidden_layers": 1}
    model = build_model(hf, head="causal_lm")
    base = traverse_util.flatten_dict(model.init(jax.random.PRNGKey(0)), sep=".")
    batch = learnable_batch(model, batch=8)
    method = methods_lib.create("lora", model, METHOD_CONFIGS["lora"])
    tx = optax.adam(1e-2)
    fn = make_train_step(method, tx, seed=0)
    out: dict = {}
    for kind in ("nf4", "int8"):
        peft = quantize.setup(method, jax.random.PRNGKey(1), base, None, quantize.QuantConfig(kind))
        curves = {}
        state = init_state(peft.trainable, peft.state, tx)
        step = jax.jit(fn)
        curves["1"] = []
        for _ in range(STEPS):
            state, m = step(state, peft.frozen, batch)
            curves["1"].append(float(m["loss"]))
        mesh = make_mesh((2, 2, 2))
        state = init_state(peft.trainable, peft.state, tx)
        sh = plan(method, mesh, state, peft.frozen, min_elements=64)
        state, frozen = sh.put(state, peft.frozen)
        step = sh.jit_train_step(fn, donate=False)
        sbatch = sh.put_batch(batch)
        curves["2,2,2"] = []
        for _ in range(STEPS):
            state, m = step(state, frozen, sbatch)
            curves["2,2,2"].append(float(m["loss"]))
        q = frozen["model.layers.0.self_attn.q_proj.kernel"]
        out[kind] = {"losses": curves, "shard_shapes": {
            name: [list(s.data.shape) for s in x.addressable_shards[:1]]
            for name, x in (("data", q.data), ("scale", q.scale)) }}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
