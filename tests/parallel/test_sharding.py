"""Sharded training on 8 forced host CPU devices equals one device (loss curves ≤ 1e-5
relative, fp32), and checkpoints saved on one mesh restore onto another.

Each check runs in a subprocess (``sharded_train.py``, ``sharded_loop.py``): XLA's device count
is fixed when the backend starts, and the rest of the suite must keep its single device.
``make test`` runs the whole matrix in one subprocess (one compilation per mesh, ~70 s on 2
cores): LoRA, adapters, prompt tuning, FishMask and full fine-tuning on the (2,2,2) mesh (every
axis used), then (8,1,1) and (2,4,1); the (2,2,2) state is checkpointed, restored onto (1,8,1)
and onto (2,4,1), which takes one more step from it. The training loop on a mesh, another family
on a mesh and the two-process runs are ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers import ROOT, xla_flags

METHODS = ("lora", "adapter", "prompt_tuning", "fishmask", "full")
# One method of each family (low-rank, additional, selection, baseline): the other model
# families' runs (slow).
FAST_METHODS = ("lora", "prompt_tuning", "fishmask", "full")
# (2,2,2) first: the checkpoint restored onto other meshes is then the one sharded on every axis.
MATRIX_MESHES = ("2,2,2", "8,1,1", "2,4,1")
RTOL = 1e-5


def run_script(name: str, *args: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(8)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PEFTJAX_DISTRIBUTED", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel", name), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def matrix() -> dict:
    return run_script("sharded_train.py", "/".join(MATRIX_MESHES), ",".join(METHODS))


def check_curves(run: dict, mesh: str) -> None:
    single, sharded = run["losses"]["1"], run["losses"][mesh]
    assert set(single[0]) == set(sharded[0]) and len(single[0]) >= 4
    for method in single[0]:
        want = np.array([row[method] for row in single[:len(sharded)]])
        got = np.array([row[method] for row in sharded])
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=f"{method} on mesh {mesh}")
        assert want[-1] < want[0], f"{method} did not train (curve {want}); the comparison would be vacuous"


def test_sharded_loss_curves_match_one_device(matrix):
    check_curves(matrix, "2,2,2")


@pytest.mark.slow
def test_a_llama_derived_family_trains_sharded_as_on_one_device():
    """Gemma 3 (a local layer with its own RoPE base, q/k norms, sandwich norms) under the fast
    methods on the (2,2,2) mesh: its sharding rules give one device's loss curves."""
    run = run_script("sharded_train.py", "2,2,2", ",".join(FAST_METHODS), "tiny-gemma3")
    check_curves(run, "2,2,2")
    specs = run["placements"]["2,2,2"]["full"]["base"]
    assert specs["model.layers.0.self_attn.q_proj.kernel"] == str(P("fsdp", "tensor"))
    assert specs["model.layers.0.self_attn.q_norm.scale"] == str(P())


def test_moe_family_trains_sharded_as_on_one_device():
    """Qwen3-MoE on the (2,2,2) mesh: experts split over fsdp (expert parallelism) and their
    matrices over tensor, the router replicated; full fine-tuning, LoRA on q/v and LoRA on the
    stacked experts and the router (target_parameters), prompt tuning give one device's loss curves."""
    run = run_script("sharded_train.py", "2,2,2", "lora,lora_experts,full,prompt_tuning", "tiny-qwen3-moe")
    check_curves(run, "2,2,2")
    pl = run["placements"]["2,2,2"]
    assert pl["full"]["base"]["model.layers.0.mlp.experts.gate_up_proj"] == str(P("fsdp", None, "tensor"))
    assert pl["full"]["base"]["model.layers.0.mlp.experts.down_proj"] == str(P("fsdp", "tensor"))
    assert pl["full"]["base"]["model.layers.0.mlp.gate.kernel"] == str(P())
    assert pl["lora_experts"]["added"]["model.layers.0.mlp.experts.gate_up_proj.lora_A"] == str(P("fsdp"))
    assert pl["lora_experts"]["frozen"]["model.layers.0.mlp.experts.down_proj"] == str(P("fsdp", "tensor"))


def test_arrays_really_are_sharded(matrix):
    pl = matrix["placements"]["2,2,2"]
    # Q is column-parallel (in over fsdp, out over tensor); LoRA A and its Adam moments over fsdp.
    assert pl["lora"]["frozen"]["model.layers.0.self_attn.q_proj.kernel"] == str(P("fsdp", "tensor"))
    assert pl["_shard_shapes"] == {"frozen_q_kernel": [16, 16], "lora_A": [16, 4], "lora_A_adam_mu": [[16, 4]]}
    # sparse deltas (values under the weight's path) and their indices are replicated
    fm = pl["fishmask"]
    sparse = [k[: -len(".indices")] for k in fm["method_state"] if k.endswith(".indices")]
    assert sparse and {fm["base"][k] for k in sparse} == {str(P())}
    assert {fm["method_state"][k + ".indices"] for k in sparse} == {str(P())}


def test_checkpoint_saved_on_one_mesh_restores_onto_another(matrix):
    r = matrix["restore_values"]
    assert r["from"] == "2,2,2" and r["onto"] == "1,8,1"
    assert r["equal"] and r["same_sharding"] and r["sharded_leaves"] > 0


def test_full_mesh_matrix_and_resume_across_meshes(matrix):
    """The issue's matrix: every mesh, one method per family (two of additional parameters)."""
    for mesh in MATRIX_MESHES:
        check_curves(matrix, mesh)
    assert matrix["placements"]["8,1,1"]["_shard_shapes"]["frozen_q_kernel"] == [32, 32]  # pure data parallel
    assert matrix["placements"]["2,4,1"]["_shard_shapes"]["lora_A"] == [8, 4]
    restore = matrix["restore"]
    assert restore["from"] == "2,2,2" and restore["onto"] == "2,4,1" and restore["same_sharding"]
    single_next = matrix["losses"]["1"][len(matrix["losses"]["2,4,1"])]
    for method in METHODS:
        np.testing.assert_allclose(restore["next_loss"][method], single_next[method], rtol=RTOL,
                                   err_msg=f"{method}: step after restoring (2,2,2) onto (2,4,1)")


@pytest.mark.slow
def test_training_loop_on_a_mesh_and_resumed_on_another(tmp_path):
    run = run_script("sharded_loop.py", str(tmp_path / "tfds"))
    assert run["single"]["mesh"] is None and run["mesh"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    for name in ("mesh", "resumed"):
        np.testing.assert_allclose(run[name]["losses"], run["single"]["losses"], rtol=RTOL, err_msg=name)
        for split in ("validation", "test"):
            for k, v in run["single"]["metrics"][split].items():
                assert run[name]["metrics"][split][k] == pytest.approx(v, rel=1e-6), (name, split, k)


@pytest.mark.slow
def test_two_processes_train_one_mesh_and_share_a_checkpoint(tmp_path):
    """A real multi-host run on one machine: 2 processes × 4 host CPU devices (gloo collectives)
    joined by jax.distributed train LoRA on a (2,2,2) mesh that spans both, each feeding only
    its own rows; the losses equal a one-device run and the checkpoint both write restores onto
    a (1,8,1) mesh."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(4)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(ROOT, "tests", "parallel", "multihost_train.py")
    procs = [subprocess.Popen([sys.executable, script, str(i), str(port), str(tmp_path / "ckpt")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"multihost_train.py failed:\n{err[-4000:]}"
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["process"] for r in rows) == [0, 1]
    for r in rows:
        assert r["processes"] == 2 and r["devices"] == 8
        np.testing.assert_allclose(r["losses"], r["reference"], rtol=RTOL)
        assert r["losses"][-1] < r["losses"][0]
        assert r["restore_sharding"] and r["restore_equal"]


@pytest.mark.slow
def test_two_processes_run_the_training_loop_like_one_device(tmp_path):
    """The loop itself across 2 processes × 4 devices ((2,2,2) mesh, config.distributed): train
    losses and metrics equal a one-device run; only process 0 writes metrics and result.json."""
    import socket

    data_dir = str(tmp_path / "tfds")
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    reference = (
        "import sys\nfrom tests.parallel.sharded_loop import config\n"
        "from peftjax.train import train_and_evaluate\n"
        f"train_and_evaluate(config({data_dir!r}, (1, 1, 1)), {str(tmp_path / 'single')!r})\n")
    proc = subprocess.run([sys.executable, "-c", reference], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)   # also prepares the data both processes read
    assert proc.returncode == 0, proc.stderr[-4000:]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env["XLA_FLAGS"] = xla_flags(4)
    script = os.path.join(ROOT, "tests", "parallel", "multihost_loop.py")
    procs = [subprocess.Popen([sys.executable, script, str(i), str(port), data_dir, str(tmp_path / "multi")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, f"multihost_loop.py failed:\n{err[-4000:]}"
    from tests.parallel.sharded_loop import losses

    single = json.load(open(tmp_path / "single" / "result.json"))
    multi = json.load(open(tmp_path / "multi" / "result.json"))
    assert multi["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(losses(str(tmp_path / "multi")), losses(str(tmp_path / "single")), rtol=RTOL)
    for split in ("validation", "test"):
        for k, v in single["metrics"][split].items():
            assert multi["metrics"][split][k] == pytest.approx(v, rel=1e-6), (split, k)


def test_steps_on_a_mesh_of_several_devices_trace_the_quantized_matmul_as_partitioned():
    """A Pallas call has no sharding rule: TrainShardings' jitted steps trace with
    quant_matmul.partitioned() on a mesh of several devices (auto then takes XLA's path), and
    without it on one device."""
    import types

    from peftjax.models import quant_matmul
    from peftjax.parallel.shard import TrainShardings

    seen = []
    record = lambda *args: seen.append(quant_matmul._PARTITIONED.get())
    for size in (8, 1):
        sh = TrainShardings(types.SimpleNamespace(size=size), None, None, None, None, {})
        sh._traced_partitioned(record)()
    assert seen == [True, False]
