"""Run by tests/parallel/test_sharding.py in a subprocess with 8 forced host CPU devices.

    python tests/parallel/sharded_train.py [MESHES [METHODS]]
    # MESHES: "8,1,1/2,4,1/2,2,2" (default); METHODS: "lora,adapter,prompt_tuning,fishmask,full"

Trains one method of each family (LoRA; adapter and prompt tuning (additional params); FishMask
(selection, sparse deltas); full fine-tuning) on a tiny Llama for a few steps on one device and
on each mesh. The first mesh's final state is checkpointed; it is restored onto the (1,8,1)
mesh's shardings (values and shardings checked), and, given two meshes or more, onto the last
mesh, which takes one more step from it. All methods share one jitted program per mesh (one
compilation per mesh). Prints one JSON object on stdout: losses per mesh and method, the
placements that prove arrays really were sharded, and the checkpoint checks.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from configs import models as model_configs
from configs.train import train_defaults
from peftjax import methods as methods_lib
from peftjax.models import build_model
from peftjax.parallel import make_mesh, plan
from peftjax.train.checkpoint import Checkpointer
from peftjax.train.optim import make_optimizer
from peftjax.train.steps import init_state, make_train_step
from tests.helpers import METHOD_CONFIGS, fisher_context, learnable_batch

METHODS = ("lora", "adapter", "prompt_tuning", "fishmask", "full")
MESHES = "8,1,1/2,4,1/2,2,2"
# Named settings beyond METHOD_CONFIGS: (registered method, config).
CONFIGS = {"lora_experts": ("lora", {"rank": 4, "alpha": 8.0, "targets": (), "target_parameters": (
    "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")})}
STEPS = 3
MIN_ELEMENTS = 64   # small enough that the tiny model's LoRA factors are sharded too


def log(msg: str) -> None:
    print(f"[sharded_train {time.strftime('%X')} cpu {time.process_time():.1f}s] {msg}", file=sys.stderr, flush=True)


def restore(directory: str, like: dict, shardings: dict) -> dict:
    ckpt = Checkpointer(directory)
    restored = ckpt.restore(like, shardings=shardings)
    ckpt.close()
    return {n: type(like[n])(*restored[n]) if not isinstance(restored[n], type(like[n])) else restored[n]
            for n in like}


def same_sharding(tree: dict, shardings: dict) -> bool:
    return all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
        jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def main(meshes: str = MESHES, methods: str = ",".join(METHODS), model_name: str = "tiny-llama") -> None:
    meshes = [tuple(int(x) for x in m.split(",")) for m in meshes.split("/")]
    METHODS = tuple(methods.split(","))
    assert jax.device_count() == 8, f"expected 8 forced host devices, got {jax.device_count()}"
    hf = {**model_configs.get(model_name).hf_config.to_dict(), "vocab_size": 256,
          "initializer_range": 0.2, "num_hidden_layers": 1}
    hf.pop("layer_types", None)   # one layer: the family's default pattern (Gemma 3: local)
    model = build_model(hf, head="causal_lm")
    base = traverse_util.flatten_dict(model.init(jax.random.PRNGKey(0)), sep=".")
    batch = learnable_batch(model, batch=8)
    tc = ml_collections.ConfigDict({**train_defaults(), "learning_rate": 1e-2, "warmup_steps": 0,
                                  "warmup_ratio": 0.0})
    named = {n: CONFIGS.get(n, (n, METHOD_CONFIGS.get(n))) for n in METHODS}
    meths = {n: methods_lib.create(named[n][0], model, named[n][1]) for n in METHODS}
    pefts = {n: meths[n].setup(jax.random.PRNGKey(1), base, fisher_context(model, batch)) for n in METHODS}
    txs = {n: make_optimizer(tc, STEPS + 1, meths[n])[0] for n in METHODS}
    fns = {n: make_train_step(meths[n], txs[n], seed=0) for n in METHODS}

    def multi(states, frozens, b):
        out = {n: fns[n](states[n], frozens[n], b) for n in METHODS}
        return {n: o[0] for n, o in out.items()}, {n: o[1]["loss"] for n, o in out.items()}

    def fresh():
        return ({n: init_state(pefts[n].trainable, pefts[n].state, txs[n]) for n in METHODS},
                {n: pefts[n].frozen for n in METHODS})

    result: dict = {"losses": {}, "placements": {}}
    log("setup done")
    t0 = time.time()
    states, frozens = fresh()
    step = jax.jit(multi, donate_argnums=(0,))
    losses = []
    for _ in range(STEPS + 1):
        states, loss = step(states, frozens, batch)
        losses.append({n: float(v) for n, v in loss.items()})
    result["losses"]["1"] = losses
    log(f"single device: {time.time() - t0:.1f}s")

    # removed when the process ends, whether it succeeds or fails
    saved_tmp = tempfile.TemporaryDirectory(prefix="sharded_ckpt_")
    saved_dir = saved_tmp.name
    for shape in meshes:
        t0 = time.time()
        mesh = make_mesh(shape)
        states, frozens = fresh()
        plans = {n: plan(meths[n], mesh, states[n], frozens[n], min_elements=MIN_ELEMENTS) for n in METHODS}
        for n in METHODS:
            states[n], frozens[n] = plans[n].put(states[n], frozens[n])
        state_sh = {n: plans[n].state for n in METHODS}
        step = jax.jit(multi, in_shardings=(state_sh, {n: plans[n].frozen for n in METHODS},
                                            plans[METHODS[0]].batch),
                       out_shardings=(state_sh, plans[METHODS[0]].replicated), donate_argnums=(0,))
        sharded_batch = plans[METHODS[0]].put_batch(batch)
        losses = []
        for _ in range(STEPS):
            states, loss = step(states, frozens, sharded_batch)
            losses.append({n: float(v) for n, v in loss.items()})
        key = ",".join(map(str, shape))
        result["losses"][key] = losses
        result["placements"][key] = {
            n: {g: {p: str(pl.spec) for p, pl in plans[n].placements[g].items()}
                for g in ("frozen", "base", "added", "head", "method_state")} for n in METHODS}
        # the arrays really live sharded: shard shapes of a frozen kernel and the LoRA A factor
        q = "model.layers.0.self_attn.q_proj"
        result["placements"][key]["_shard_shapes"] = {
            "frozen_q_kernel": list(frozens["lora"][f"{q}.kernel"].addressable_shards[0].data.shape),
            "lora_A": list(states["lora"].trainable["added"][f"{q}.lora_A"].addressable_shards[0].data.shape),
            "lora_A_adam_mu": [list(x.addressable_shards[0].data.shape) for x in jax.tree.leaves(
                states["lora"].opt_state) if x.shape == (32, 4)][:1],
        }
        if shape == meshes[0]:
            ckpt = Checkpointer(saved_dir)
            ckpt.save(STEPS, states)
            ckpt.close()
            saved = jax.device_get(states)
            # onto another mesh's shardings, without a step (no compilation)
            other = make_mesh((1, 8, 1))
            other_sh = {n: plan(meths[n], other, states[n], frozens[n], min_elements=MIN_ELEMENTS).state
                        for n in METHODS}
            restored = restore(saved_dir, states, other_sh)
            result["restore_values"] = {
                "from": key, "onto": "1,8,1",
                "same_sharding": same_sharding(restored, other_sh),
                "equal": all(np.array_equal(np.asarray(a), b) for a, b in zip(
                    jax.tree.leaves(restored), jax.tree.leaves(saved))),
                "sharded_leaves": sum(not s.is_fully_replicated for s in jax.tree.leaves(other_sh))}
        if len(meshes) > 1 and shape == meshes[-1]:  # restore onto this mesh, take one step
            restored = restore(saved_dir, states, state_sh)
            _, loss = step(restored, frozens, sharded_batch)
            result["restore"] = {"from": ",".join(map(str, meshes[0])), "onto": key,
                                 "same_sharding": same_sharding(restored, state_sh),
                                 "next_loss": {n: float(v) for n, v in loss.items()}}
        log(f"mesh {shape}: {time.time() - t0:.1f}s")
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
