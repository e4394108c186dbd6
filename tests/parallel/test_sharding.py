"""Sharded training on 8 forced host CPU devices equals one device (loss curves ≤ 1e-5
relative, fp32), and a checkpoint saved on one mesh restores onto another.

One subprocess (``sharded_train.py``) does all the work: XLA's device count is fixed when the
backend starts, and the rest of the suite must keep its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESHES = ("8,1,1", "2,4,1", "2,2,2")
METHODS = ("lora", "adapter", "prompt_tuning", "fishmask", "full")
RTOL = 1e-5


@pytest.fixture(scope="module")
def run() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PEFTJAX_DISTRIBUTED", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel", "sharded_train.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sharded_train.py failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _curve(losses: list[dict], method: str, n: int) -> np.ndarray:
    return np.array([row[method] for row in losses[:n]])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_loss_curves_match_one_device(run, mesh):
    single = run["losses"]["1"]
    sharded = run["losses"][mesh]
    for method in METHODS:
        want, got = _curve(single, method, len(sharded)), _curve(sharded, method, len(sharded))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=f"{method} on mesh {mesh}")
        assert want[-1] < want[0], f"{method} did not train (curve {want}); the comparison would be vacuous"


def test_arrays_really_are_sharded(run):
    pl = run["placements"]
    # (2,2,2): Q is column-parallel (in over fsdp, out over tensor); LoRA A over fsdp.
    assert pl["2,2,2"]["lora"]["frozen"]["model.layers.0.self_attn.q_proj.kernel"] == str(P("fsdp", "tensor"))
    assert pl["2,2,2"]["_shard_shapes"]["frozen_q_kernel"] == [16, 16]
    assert pl["2,4,1"]["_shard_shapes"]["lora_A"] == [8, 4]
    assert pl["2,4,1"]["_shard_shapes"]["lora_A_adam_mu"] == [[8, 4]]   # optimizer state follows
    assert pl["8,1,1"]["_shard_shapes"]["frozen_q_kernel"] == [32, 32]  # pure data parallel
    # sparse deltas and their indices are replicated
    fm = pl["2,4,1"]["fishmask"]
    assert fm["base"] and set(fm["base"].values()) == {str(P())}
    assert {v for k, v in fm["method_state"].items() if k.endswith(".indices")} == {str(P())}


def test_checkpoint_saved_on_one_mesh_restores_on_another(run):
    restore = run["restore"]
    assert restore["same_sharding"], "restored arrays are not on the target mesh's shardings"
    single_next = run["losses"]["1"][len(run["losses"]["2,4,1"])]
    for method in METHODS:
        np.testing.assert_allclose(restore["next_loss"][method], single_next[method], rtol=RTOL,
                                   err_msg=f"{method}: step after restoring (2,4,1) onto (2,2,2)")
