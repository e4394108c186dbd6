"""Fault injection (slow; ``make test-all``): kill -9 a training run or a sweep at seeded random
moments, rerun it, and require the same results as an uninterrupted run; a corrupted latest
checkpoint is recovered from the previous one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

STEPS = 12
TIMING = {"step_time_s", "memory", "peak_memory_bytes", "cell_seconds", "resumed_from", "stamp",
          "seconds", "started", "finished"}
METHOD_FLAGS = {"lora": [], "prompt_tuning": ["--config.method.num_virtual_tokens=4"],
                "fishmask": ["--config.method.num_examples=32", "--config.method.keep_ratio=0.02",
                             "--config.method.progress=false"],
                "adalora": ["--config.method.tinit=2", "--config.method.tfinal=3",
                            "--config.method.deltaT=2"]}


def _train_cmd(method: str, workdir, data_dir) -> list[str]:
    return [sys.executable, "scripts/train.py",
            f"--config=configs/train.py:model=tiny-bert,method={method},task=tweet_sentiment",
            f"--workdir={workdir}", f"--config.data_dir={data_dir}", f"--config.train.steps={STEPS}",
            "--config.train.batch_size=8", "--config.train.train_limit=96", "--config.train.eval_limit=32",
            "--config.train.eval_batch_size=16", "--config.train.eval_every=3",
            "--config.train.checkpoint_every=3", "--config.train.log_every=1",
            "--config.train.progress=false", *METHOD_FLAGS[method]]


def _comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING}


def _rows(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def _wait_until(predicate, proc, timeout: float = 300.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_kill_9_at_random_steps_then_rerun_equals_uninterrupted(method, data_dir, tmp_path):
    rng = np.random.default_rng(sum(map(ord, method)))
    ref = subprocess.run(_train_cmd(method, tmp_path / "ref", data_dir), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _comparable(json.load(open(tmp_path / "ref" / "result.json")))
    work = tmp_path / "killed"
    # two kills at seeded random train steps (the second after a resume), then a clean finish
    for kill_step in sorted(rng.choice(np.arange(1, STEPS), size=2, replace=False)):
        proc = subprocess.Popen(_train_cmd(method, work, data_dir), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        reached = _wait_until(lambda: any(r["split"] == "train" and r["step"] >= kill_step
                                          for r in _rows(work / "metrics.jsonl")), proc)
        assert reached, proc.stderr.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (work / "result.json").exists()   # killed mid-run, not finished
    done = subprocess.run(_train_cmd(method, work, data_dir), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _comparable(json.load(open(work / "result.json"))) == reference
    rows = _rows(work / "metrics.jsonl")
    assert len({(r["step"], r["split"]) for r in rows}) == len(rows)  # no duplicated rows
    assert rows == _rows(tmp_path / "ref" / "metrics.jsonl")


def test_kill_9_then_corrupt_latest_checkpoint_recovers(data_dir, tmp_path):
    ref = subprocess.run(_train_cmd("lora", tmp_path / "ref", data_dir), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    work = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd("lora", work, data_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    finished = lambda: sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit()) \
        if (work / "checkpoints").exists() else []
    assert _wait_until(lambda: len(finished()) >= 2, proc)   # two complete steps on disk
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = finished()
    assert len(steps) >= 2 and not (work / "result.json").exists()
    with open(work / "checkpoints" / str(steps[-1]) / "default" / "_METADATA", "w") as f:
        f.write("garbage{")
    done = subprocess.run(_train_cmd("lora", work, data_dir), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checkpoint step {steps[-1]}" in done.stderr and "unusable" in done.stderr
    assert (_comparable(json.load(open(work / "result.json")))
            == _comparable(json.load(open(tmp_path / "ref" / "result.json"))))


SWEEP = """def get_config():
    import ml_collections
    return ml_collections.ConfigDict(dict(
        name="kill", models=["tiny-bert"], tasks=["tweet_sentiment"], seeds=[0, 1],
        base={"train": dict(steps=6, batch_size=8, train_limit=48, eval_limit=16,
                            eval_batch_size=16, eval_every=3, checkpoint_every=2, log_every=1,
                            progress=False), "data_dir": %r},
        variants={"lora": {"method": "lora"}, "bitfit": {"method": "bitfit"}}))
"""


def test_kill_9_sweep_at_random_moments_then_rerun_equals_uninterrupted(data_dir, tmp_path):
    grid = tmp_path / "grid.py"
    grid.write_text(SWEEP % data_dir)

    def cmd(workdir):
        return [sys.executable, "scripts/sweep.py", f"--config={grid}", f"--workdir={workdir}",
                "--progress=false"]

    ref = subprocess.run(cmd(tmp_path / "ref"), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = {r["cell"]: _comparable(r) for r in _rows(tmp_path / "ref" / "results.jsonl")}
    assert len(reference) == 4
    work = tmp_path / "killed"
    rng = np.random.default_rng(7)
    for delay in sorted(rng.uniform(5.0, 40.0, size=3)):
        proc = subprocess.Popen(cmd(work), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd(work), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(work / "results.jsonl")
    assert sorted(r["cell"] for r in rows) == sorted(reference)   # one row per cell
    for r in rows:
        assert _comparable(r) == reference[r["cell"]], r["cell"]
