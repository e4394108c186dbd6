"""One of two processes of a multi-host run on one machine (4 host CPU devices each, gloo
collectives), launched by tests/parallel/test_sharding.py (slow):

    python tests/parallel/multihost_train.py PROCESS_ID PORT CHECKPOINT_DIR

``jax.distributed`` connects the processes through ``peftjax.parallel.distributed`` (config
fields, as the loop does); LoRA trains on a (2,2,2) mesh spanning both processes (each transfers
only its own rows of every batch), the state is checkpointed by both processes together and
restored onto a (1,8,1) mesh. Each process also trains the same steps on its own first device
alone (the reference) and prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import jax


def main(pid: int, port: int, directory: str) -> None:
    from peftjax.parallel import distributed

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.maybe_initialize({"initialize": True, "coordinator_address": f"localhost:{port}",
                                  "num_processes": 2, "process_id": pid})
    import numpy as np
    import optax
    from jax.experimental import multihost_utils

    from peftjax import methods
    from peftjax.parallel import make_mesh, plan
    from peftjax.train.checkpoint import Checkpointer
    from peftjax.train.steps import init_state, make_train_step
    from tests.helpers import METHOD_CONFIGS, learnable_batch, tiny_model

    model, base = tiny_model("llama")
    method = methods.create("lora", model, METHOD_CONFIGS["lora"])
    peft = method.setup(jax.random.PRNGKey(0), base)
    tx = optax.adam(1e-2)
    batch = learnable_batch(model, batch=8)
    fn = make_train_step(method, tx, seed=0)

    state, frozen = init_state(peft.trainable, peft.state, tx), peft.frozen
    local = jax.jit(fn)   # uncommitted inputs: runs on this process's first device
    reference = []
    for _ in range(3):
        state, m = local(state, frozen, batch)
        reference.append(float(m["loss"]))

    state = init_state(peft.trainable, peft.state, tx)
    sh = plan(method, make_mesh((2, 2, 2)), state, peft.frozen, min_elements=64)
    state, frozen = sh.put(state, peft.frozen)
    step = sh.jit_train_step(fn)
    losses = []
    for _ in range(3):
        state, m = step(state, frozen, sh.put_batch(batch))
        losses.append(float(m["loss"]))

    ckpt = Checkpointer(directory)
    ckpt.save(3, state)
    ckpt.close()
    other = plan(method, make_mesh((1, 8, 1)), state, frozen, min_elements=64).state
    ckpt = Checkpointer(directory)
    restored = ckpt.restore(state, shardings=other)
    ckpt.close()
    ok_sharding = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
        jax.tree.leaves(restored), jax.tree.leaves(other)))
    gather = lambda t: [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(t)]
    equal = all(np.array_equal(a, b) for a, b in zip(gather(restored), gather(state)))
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "reference": reference, "losses": losses,
                      "restore_sharding": ok_sharding, "restore_equal": bool(equal)}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
