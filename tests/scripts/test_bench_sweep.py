"""scripts/bench_sweep.py: both sides run the same cells, the 'before' side with its overrides
and without the compilation cache, each in a fresh folder; a non-empty folder is refused.

The two-sided run is ``slow`` (a benchmark's smoke run: 18 s on 2 cores, four interpreters);
``make test`` checks that the script starts and refuses an override the config does not have.
"""

import json
import os

import pytest

from tests.helpers import ROOT, run_script


def bench(*args):
    # PYTHONPATH: the workers import the fake cell from tests/
    return run_script("bench_sweep.py", "--config=experiments/tweet_methods/grid.py",
                      "--cell_fn=tests.grid.fake_cell:cell", "--workers=1", *args, env={"PYTHONPATH": ROOT})


def test_an_unknown_before_override_is_refused(tmp_path):
    wrong = bench(f"--workdir={tmp_path / 'new'}", "--only=bitfit", '--before={"train": {"nope": 1}}')
    assert wrong.returncode == 2 and "train.nope" in wrong.stderr
    assert "valid: " in wrong.stderr and "bucket_multiple" in wrong.stderr   # what is valid
    shape = bench(f"--workdir={tmp_path / 'new'}", "--before=[1]")
    assert shape.returncode == 2 and "JSON object of sections" in shape.stderr
    after = bench(f"--workdir={tmp_path / 'new'}", '--after={"train": {"group_by_lenght": 50}}')
    assert after.returncode == 2 and "--after: train.group_by_lenght" in after.stderr
    assert not os.path.exists(tmp_path / "new")   # refused before anything ran


@pytest.mark.slow
def test_both_sides_run_the_selected_cells_with_the_before_overrides(tmp_path):
    out = bench(f"--workdir={tmp_path}", "--only=tweet_sentiment/bitfit\\[", "--limit=2")
    assert out.returncode == 0, out.stderr
    assert "after/before:" in out.stdout
    report = json.load(open(tmp_path / "bench_sweep.json"))
    assert [s["cells"] for s in report["sides"]] == [2, 2]
    assert report["cells"] == ["all-MiniLM-L6-v2/tweet_sentiment/bitfit[learning_rate=0.0003]/seed=0",
                               "all-MiniLM-L6-v2/tweet_sentiment/bitfit[learning_rate=0.0003]/seed=1"]
    configs = {side: [json.loads(line)["config"]["train"] for line in open(tmp_path / side / "results.jsonl")]
               for side in ("before", "after")}
    assert all(c["group_by_length"] == 0 and c["bucket_multiple"] == 0 for c in configs["before"])
    assert all(c["group_by_length"] == 50 and c["bucket_multiple"] == 8 for c in configs["after"])
    assert os.path.isdir(tmp_path / "after" / "jax_cache") and not os.path.exists(tmp_path / "before" / "jax_cache")
    assert json.load(open(tmp_path / "bench_sweep.json"))["after_overrides"] == {}
    again = bench(f"--workdir={tmp_path}", "--only=bitfit")
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.slow
def test_the_after_overrides_apply_to_the_after_side_only(tmp_path):
    # An old definition measured with the throughput settings on: here the current one with a
    # different mega-batch on the 'after' side, so both sides differ from the definition.
    out = bench(f"--workdir={tmp_path}", "--only=tweet_sentiment/bitfit\\[", "--limit=1",
                '--after={"train": {"group_by_length": 20, "bucket_multiple": 16}}')
    assert out.returncode == 0, out.stderr
    configs = {side: [json.loads(line)["config"]["train"] for line in open(tmp_path / side / "results.jsonl")]
               for side in ("before", "after")}
    assert [(c["group_by_length"], c["bucket_multiple"]) for c in configs["before"]] == [(0, 0)]
    assert [(c["group_by_length"], c["bucket_multiple"]) for c in configs["after"]] == [(20, 16)]
    assert json.load(open(tmp_path / "bench_sweep.json"))["after_overrides"] == {
        "train": {"group_by_length": 20, "bucket_multiple": 16}}
