"""The sweep runner: skip finished, failure isolation, retry, worker processes, SIGKILL + resume.

Cells run tests/grid/fake_cell.py (a few sleeps that checkpoint and resume like the training
loop), so each test takes seconds; the real cell (train_and_evaluate) is exercised by
tests/train and by the smoke run documented in experiments/tweet_methods/README.md.
"""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from peftjax.grid import ResultsStore, runner, sweep
from tests.helpers import ROOT

FAKE = "tests.grid.fake_cell:cell"
STEPS = 6


def definition(steps=3, seeds=(0, 1)):
    return {"name": "fake", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": list(seeds),
            "base": {"train": {"steps": steps}},
            "variants": {"a": {"method": "full", "grid": {"train": {"learning_rate": [1e-3, 2e-3]}}},
                         "broken": {"method": "bitfit"}}}


def rows_by_cell(workdir):
    rows = ResultsStore(os.path.join(workdir, "results.jsonl")).read()
    out = collections.defaultdict(list)
    for r in rows:
        out[r["cell"]].append(r)
    return out


def test_failures_are_recorded_and_isolated_finished_cells_skipped_and_retry(tmp_path, monkeypatch):
    cells = sweep.expand(definition())
    assert len(cells) == 6
    monkeypatch.setenv("FAKE_FAIL_VARIANTS", "broken")
    counts = runner.run(cells, str(tmp_path), cell_fn=FAKE, progress=False)
    assert counts["ok"] == 4 and counts["failed"] == 2
    rows = rows_by_cell(tmp_path)
    failed = [r[0] for r in rows.values() if r[0]["status"] == "failed"]
    assert {r["variant"] for r in failed} == {"broken"}
    assert all("RuntimeError: fake failure of broken" == r["error"] for r in failed)
    assert all("Traceback" in r["traceback"] and "fake_cell.py" in r["traceback"] for r in failed)
    ok = [r[0] for r in rows.values() if r[0]["status"] == "ok"]
    assert all(r["metrics"]["test"]["accuracy"] > 0 and r["cell_seconds"] >= 0 for r in ok)
    assert runner.status(cells, str(tmp_path)) == {
        c.id: "failed" if c.variant == "broken" else "ok" for c in cells}
    # A rerun runs nothing: finished cells are skipped, failures too unless asked.
    counts = runner.run(cells, str(tmp_path), cell_fn=FAKE, progress=False)
    assert (counts["ok"], counts["failed"], counts["skipped_ok"], counts["skipped_failed"]) == (0, 0, 4, 2)
    monkeypatch.setenv("FAKE_FAIL_VARIANTS", "")
    counts = runner.run(cells, str(tmp_path), cell_fn=FAKE, retry_failed=True, progress=False)
    assert (counts["ok"], counts["failed"]) == (2, 0)
    assert set(runner.status(cells, str(tmp_path)).values()) == {"ok"}
    rows = rows_by_cell(tmp_path)
    assert sum(len(r) for r in rows.values()) == 8  # 6 first attempts + 2 retries
    stamps = ResultsStore(os.path.join(tmp_path, "stamps.jsonl")).read()
    assert len(stamps) == 3 and all(s["commit"] and s["packages"]["jax"] for s in stamps)
    with open(os.path.join(tmp_path, "cells", cells[0].id, "cell.json")) as f:
        assert sweep.Cell.from_dict(json.load(f)) == cells[0]


def test_a_diverged_run_is_a_lost_grid_value_not_a_cell_to_rerun(tmp_path, monkeypatch):
    """A learning rate that diverges (NaN/inf) is a result of the grid: the row records the step,
    the cell is not rerun, its variant's selection goes on among the other values (two-stage
    tuning schedules the later seeds), and the report names it where the value would be."""
    from peftjax.grid import report

    d = {**definition(), "seeds": [0, 1], "selection_seeds": [0]}
    monkeypatch.setenv("FAKE_DIVERGE_FROM_LR", "2e-3")
    cells, deferred = sweep.expand_with_selection(d)
    counts = runner.run(cells, str(tmp_path), cell_fn=FAKE, progress=False)
    assert (counts["ok"], counts["failed"]) == (3, 1)   # a: 1e-3 ok, 2e-3 diverged; broken: 2 seeds
    rows = ResultsStore(os.path.join(tmp_path, "results.jsonl")).read()
    (lost,) = report.diverged_rows(rows)
    assert lost["diverged_at_step"] == 2 and lost["hp"] == {"train.learning_rate": 2e-3}
    assert lost["error"].startswith("NonFiniteLossError: loss is NaN at step 2")
    # The selection is settled: 1e-3 wins, and its seed 1 is now runnable.
    more, deferred = sweep.expand_with_selection(d, rows)
    later = [c for c in more if c.variant == "a" and c.seed == 1]
    assert not deferred and [c.hp for c in later] == [{"train.learning_rate": 1e-3}]
    counts = runner.run(more, str(tmp_path), cell_fn=FAKE, progress=False)
    assert (counts["ok"], counts["skipped_failed"]) == (1, 1)   # the diverged cell is not rerun
    with open(os.path.join(tmp_path, "sweep.json"), "w") as f:
        json.dump({"definition": d}, f)
    written = report.write_report(str(tmp_path))
    md = open(written["md"]).read()
    assert any("sensitivity_" in p for p in written["plots"])   # the lost value marked ✕ there
    assert "Diverged runs (each a grid value that lost" in md
    assert "a: learning_rate=0.002 diverged (NaN/inf) at step 2 (seed 0)" in md
    assert "| a | learning_rate=0.002 | diverged (NaN/inf) at step 2 (seed 0) | 0 |" in md   # the grid
    assert "Interim report" not in md   # settled: nothing is left of the definition
    # Every value diverged: no choice, no later seeds, and the report says so instead of a row.
    monkeypatch.setenv("FAKE_DIVERGE_FROM_LR", "0")
    other = tmp_path / "all"
    cells, _ = sweep.expand_with_selection(d)
    runner.run(cells, str(other), cell_fn=FAKE, progress=False)
    more, deferred = sweep.expand_with_selection(d, ResultsStore(str(other / "results.jsonl")).read())
    assert not deferred and not [c for c in more if c.variant == "a" and c.seed == 1]
    with open(other / "sweep.json", "w") as f:
        json.dump({"definition": d}, f)
    md = open(report.write_report(str(other))["md"]).read()
    assert ("**a** has no row: every run of its grid diverged (NaN/inf): learning_rate=0.001 diverged "
            "(NaN/inf) at step 2 (seed 0); learning_rate=0.002 diverged") in md


def test_worker_processes_run_every_cell_once_and_survive_a_crashing_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH_VARIANTS", "broken")  # the worker process dies (exit code 3)
    cells = sweep.expand(definition())
    counts = runner.run(cells, str(tmp_path), workers=2, cell_fn=FAKE, progress=False)
    assert (counts["ok"], counts["failed"]) == (4, 2)
    rows = rows_by_cell(tmp_path)
    assert sorted(rows) == sorted(c.id for c in cells) and all(len(r) == 1 for r in rows.values())
    assert {r[0]["error"] for r in rows.values() if r[0]["status"] == "failed"} == {
        "worker process died (exit code 3)"}
    assert len({r[0]["pid"] for r in rows.values() if r[0]["status"] == "ok"} - {os.getpid()}) >= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_seeds_a_selection_releases_start_before_later_variants_in_the_same_run(tmp_path, monkeypatch,
                                                                             workers):
    """With ``more`` (the sweep re-expanded after every cell), a variant's other seeds join the
    queue as soon as its selection finishes, ahead of later variants: one run, no idle rounds."""
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    d = {**definition(seeds=(0, 1, 2)), "selection_seeds": [0]}
    d["variants"] = {"a": d["variants"]["a"], "b": {**d["variants"]["a"], "method": "bitfit"}}
    store = ResultsStore(os.path.join(tmp_path, "results.jsonl"))
    cells, deferred = sweep.expand_with_selection(d)
    assert len(cells) == 4 and len(deferred) == 8
    counts = runner.run(cells, str(tmp_path), workers=workers, cell_fn=FAKE, progress=False,
                        definition=d, more=lambda: sweep.expand_with_selection(d, store.read())[0])
    rows = sorted(store.read(), key=lambda r: r["started"])
    assert (counts["total"], counts["ok"], counts["failed"]) == (8, 8, 0)
    with open(os.path.join(tmp_path, "sweep.json")) as f:   # lists the released cells too
        assert sorted(json.load(f)["cells"]) == sorted(r["cell"] for r in rows)
    chosen = {"train.learning_rate": 2e-3}   # the fake cell scores the larger rate higher
    assert sorted((r["variant"], r["seed"]) for r in rows if r["seed"]) == [
        ("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert all(r["hp"] == chosen for r in rows if r["seed"])
    order = [(r["variant"], r["seed"], r["hp"]["train.learning_rate"]) for r in rows]
    if workers == 1:
        assert order == [("a", 0, 1e-3), ("a", 0, 2e-3), ("a", 1, 2e-3), ("a", 2, 2e-3),
                         ("b", 0, 1e-3), ("b", 0, 2e-3), ("b", 1, 2e-3), ("b", 2, 2e-3)]
    else:   # b's first rate fills the worker a's selection leaves; a's seeds come next
        assert order.index(("a", 1, 2e-3)) < order.index(("b", 0, 2e-3))


def test_bad_cell_function_fails_before_running(tmp_path):
    with pytest.raises(ValueError, match="module:function"):
        runner.run(sweep.expand(definition())[:1], str(tmp_path), cell_fn="nocolon", progress=False)


@pytest.mark.slow   # kill -9 of a sweep is also in the fault-injection matrix (make test-all)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_cell_then_rerun_gives_one_result_per_cell(tmp_path, workers):
    grid = tmp_path / "grid.py"
    grid.write_text("def get_config():\n    import ml_collections\n"
                    f"    return ml_collections.ConfigDict({definition(steps=STEPS, seeds=(0,))!r})\n")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "scripts/sweep.py", f"--config={grid}", f"--workdir={workdir}",
           f"--cell_fn={FAKE}", f"--workers={workers}", "--progress=false"]
    env = {**os.environ, "FAKE_STEP_SECONDS": "0.1", "FAKE_FAIL_VARIANTS": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cells = sweep.expand(definition(steps=STEPS, seeds=(0,)))

    def mid_cell():  # a cell with some progress, no result line, and at least one result written
        done = rows_by_cell(workdir)
        for c in cells:
            p = workdir / "cells" / c.id / "progress"
            if done and c.id not in done and p.exists() and 0 < int(p.read_text() or 0) < STEPS:
                return c
        return None

    deadline = time.time() + 180  # generous: a starved machine may take a minute to import jax
    killed_cell = None
    while time.time() < deadline and proc.poll() is None and killed_cell is None:
        killed_cell = mid_cell()
        time.sleep(0.05)
    assert killed_cell is not None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows_by_cell(workdir)
    assert killed_cell.id not in before and len(before) < len(cells)
    progress = workdir / "cells" / killed_cell.id / "progress"
    stopped_at = int(progress.read_text())
    time.sleep(0.5)  # no orphaned worker keeps training the killed cell
    assert int(progress.read_text()) == stopped_at
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    after = rows_by_cell(workdir)
    assert sorted(after) == sorted(c.id for c in cells)
    assert all(len(r) == 1 and r[0]["status"] == "ok" for r in after.values())
    # The killed cell resumed from its checkpoint instead of starting over.
    assert after[killed_cell.id][0]["resumed_from"] == stopped_at > 0
    with open(workdir / "results.jsonl", "rb") as f:
        assert f.read().endswith(b"\n")


@pytest.mark.slow
def test_real_cells_train_record_curves_and_the_dylora_rank_sweep(tmp_path):
    """The default cell (train_and_evaluate) on a tiny random BERT, then the report."""
    from peftjax.grid.report import write_report

    d = {"name": "tiny", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0],
         "base": {"train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "eval_limit": 64,
                            "train_limit": 128, "batch_size": 8, "log_every": 1, "progress": False}},
         "variants": {"lora": {"method": "lora", "grid": {"method": {"rank": [1, 2]}}},
                      "dylora": {"method": "dylora", "rank_sweep": [1, 4]}}}
    cells = sweep.expand(d)
    counts = runner.run(cells, str(tmp_path), definition=d, progress=False)
    assert (counts["ok"], counts["failed"]) == (3, 0)
    rows = {r[0]["variant"] + str(r[0]["hp"]): r[0] for r in rows_by_cell(tmp_path).values()}
    lora = rows["lora{'method.rank': 1}"]
    assert lora["curves"]["validation"]["step"] == [2, 4] and lora["primary_metric"] == "accuracy"
    assert lora["trainable_params"] > 0 and lora["step_time_s"] > 0 and lora["peak_memory_bytes"] > 0
    assert set(rows["dylora{}"]["rank_sweep"]["ranks"]) == {"1", "4"}
    out = write_report(str(tmp_path))
    assert "| lora | lora | rank=" in open(out["md"]).read()
    assert any("rank_ablation" in p for p in out["plots"])


@pytest.mark.slow   # ~28 s on 2 cores: make test-all (make test keeps under its CI budget)
def test_compilation_cache_serves_every_seed_from_one_compile(tmp_path):
    """A sweep's cells share JAX's persistent compilation cache (WORKDIR/jax_cache); cells that
    differ only in seed or learning rate compile nothing new, because the seed's key and the
    peak learning rate are inputs of the compiled step, not constants in it."""
    grid = tmp_path / "grid.py"
    d = {"name": "cache", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0],
         "base": {"train": {"steps": 2, "batch_size": 8, "train_limit": 16, "eval_limit": 16,
                            "eval_batch_size": 16, "eval_every": 2, "checkpoint_every": 2,
                            "progress": False}, "data_dir": str(tmp_path / "tfds")},
         "variants": {"lora": {"method": "lora", "overrides": {"train": {"learning_rate": 1e-3}}}}}
    workdir = tmp_path / "run"
    cache = workdir / runner.COMPILATION_CACHE

    def sweep_once(definition):
        grid.write_text(f"def get_config():\n    import ml_collections\n"
                        f"    return ml_collections.ConfigDict({definition!r})\n")
        out = subprocess.run([sys.executable, "scripts/sweep.py", f"--config={grid}",
                              f"--workdir={workdir}", "--progress=false"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return set(os.listdir(cache))

    first = sweep_once(d)
    assert first, "nothing was cached"
    d["seeds"] = [0, 1]
    d["variants"]["lora"]["overrides"]["train"]["learning_rate"] = 3e-3
    d["variants"]["lora2"] = {"method": "lora", "overrides": {"train": {"learning_rate": 1e-3}}}
    again = sweep_once(d)   # 3 new cells: other seed, other learning rate, both
    assert again == first, sorted(again - first)
    rows = [json.loads(line) for line in open(workdir / "results.jsonl")]
    assert sum(r["status"] == "ok" for r in rows) == 4


def test_adopt_copies_the_same_cells_of_another_sweep_under_this_sweeps_labels(tmp_path):
    """A convergence run given its rate by a per-task override is the grid's cell at that rate:
    adopted with the grid's label and hp; a cell whose config differs is not."""
    long = {"name": "long", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0],
            "base": {"train": {"steps": 3}},
            "variants": {"full": {"method": "full", "task_overrides": {
                "tweet_sentiment": {"train": {"learning_rate": 2e-3}}}}}}
    other = {**long, "base": {"train": {"steps": 4}}}
    runner.run(sweep.expand(long), str(tmp_path / "long"), cell_fn=FAKE, progress=False)
    runner.run(sweep.expand(other), str(tmp_path / "other"), cell_fn=FAKE, progress=False)
    grid = {**definition(), "seeds": [0]}
    grid["variants"] = {"full": grid["variants"]["a"]}
    cells = sweep.expand(grid)
    for source in ("other", "long"):
        adopted = runner.adopt(cells, str(tmp_path / "grid"), str(tmp_path / source))
        assert [c.label for c in adopted] == ([] if source == "other" else
                                              ["tiny-bert/tweet_sentiment/full[learning_rate=0.002]/seed=0"])
    (row,) = ResultsStore(str(tmp_path / "grid" / "results.jsonl")).read()
    assert row["hp"] == {"train.learning_rate": 2e-3} and row["variant"] == "full"
    assert row["adopted_from"] == str(tmp_path / "long")
    assert runner.status(cells, str(tmp_path / "grid")) == {c.id: "ok" if c.hp["train.learning_rate"] == 2e-3
                                                            else "pending" for c in cells}
    assert runner.adopt(cells, str(tmp_path / "grid"), str(tmp_path / "long")) == []   # once


def test_a_store_written_before_a_neutral_field_is_rekeyed_and_resumes(tmp_path, monkeypatch):
    """A field added to the configs later (LoRA's target_parameters, train.scan_layers) and
    recorded before its bundle was declared neutral hashed into the ids of the cells that ran:
    the next run re-keys their folders and rows from the recorded configs, so finished cells
    stay finished and a killed one resumes in its own folder."""
    definition_ = {"name": "fake", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0],
                   "base": {"train": {"steps": 3}},
                   "variants": {"a": {"method": "lora", "grid": {"train": {"learning_rate": [1e-3, 2e-3]}}}}}
    current = sweep.expand(definition_)
    # The ids the older code gave them: no bundle for target_parameters.
    monkeypatch.setattr(sweep, "NEUTRAL_DEFAULTS",
                        tuple(b for b in sweep.NEUTRAL_DEFAULTS if "target_parameters" not in b[1]))
    old = sweep.expand(definition_)
    assert {c.id for c in old}.isdisjoint({c.id for c in current})
    runner.run(old[:1], str(tmp_path), cell_fn=FAKE, progress=False)          # finished
    os.makedirs(tmp_path / "cells" / old[1].id)                              # started, killed
    with open(tmp_path / "cells" / old[1].id / "cell.json", "w") as f:
        json.dump(old[1].to_dict(), f)
    (tmp_path / "cells" / old[1].id / "marker").write_text("checkpoint")
    monkeypatch.undo()
    # Before the re-keying, status (a dry run) already counts the finished cell by the id its
    # recorded config hashes to now.
    assert runner.status(current, str(tmp_path)) == {current[0].id: "ok", current[1].id: "pending"}
    moved = runner.rekey(str(tmp_path))
    assert moved == {o.id: c.id for o, c in zip(old, current)}
    assert runner.status(current, str(tmp_path)) == {current[0].id: "ok", current[1].id: "pending"}
    assert (tmp_path / "cells" / current[1].id / "marker").read_text() == "checkpoint"
    with open(tmp_path / "cells" / current[0].id / "cell.json") as f:
        assert sweep.Cell.from_dict(json.load(f)) == current[0]
    counts = runner.run(current, str(tmp_path), cell_fn=FAKE, progress=False)   # rekeys nothing more
    assert (counts["skipped_ok"], counts["ok"]) == (1, 1) and runner.rekey(str(tmp_path)) == {}


def test_neutral_bundles_are_stripped_one_by_one():
    # train.select_metric is set (not neutral) on an imbalanced task: the later scan_layers field,
    # at its neutral False, must still leave the id as it was before the field existed.
    base = {"model": {"name": "m"}, "method": {"name": "lora", "rank": 8},
            "train": {"select_metric": "macro_f1", "steps": 3}}
    with_fields = {**base, "method": {**base["method"], "target_parameters": ""},
                   "train": {**base["train"], "scan_layers": False}}
    assert sweep.cell_id(with_fields) == sweep.cell_id(base)
    assert sweep.cell_id({**with_fields, "train": {**with_fields["train"], "scan_layers": True}}) != sweep.cell_id(base)


def test_quiet_sweep_silences_the_methods_own_bars_and_they_never_block_a_resume(tmp_path, monkeypatch):
    """--noprogress: a cell runs with train.progress and the method's own data-pass bar off
    (Child-tuning_D's Fisher bar filled the sweep's log), and a cell started with bars resumes
    under it without a config complaint (both fields are display only)."""
    import ml_collections

    import peftjax.train
    from peftjax.train import compose

    seen = []
    monkeypatch.setattr(peftjax.train, "train_and_evaluate",
                        lambda config, workdir, **kw: seen.append(config) or {})
    monkeypatch.setenv(runner.QUIET_CELLS, "1")
    cells = sweep.expand({**definition(), "variants": {"d": {"method": "child_tuning_d"},
                                                       "lora": {"method": "lora"}}})
    fisher_cell = next(c for c in cells if c.variant == "d")
    lora_cell = next(c for c in cells if c.variant == "lora")
    for cell in (fisher_cell, lora_cell):
        runner.train_cell(cell, str(tmp_path / cell.id))
    assert seen[0].train.progress is False and seen[0].method.progress is False
    assert seen[1].train.progress is False and "progress" not in seen[1].method

    loud = ml_collections.ConfigDict(fisher_cell.config)
    loud.method.progress = loud.train.progress = True
    compose.check_workdir_config(loud, str(tmp_path), has_checkpoint=False)   # records it
    compose.check_workdir_config(seen[0], str(tmp_path), has_checkpoint=True)  # resumes silently


def test_cells_share_one_fisher_pass_through_the_sweeps_cache(tmp_path, monkeypatch):
    """Child-tuning_D's Fisher pass depends on the model, the head's init (the seed) and the
    training rows, not on the learning rate: the sweep's cells share WORKDIR/cache, so a grid
    over learning rates makes the pass once (it was over an hour of each MiniLM cell)."""
    from peftjax.methods import fisher

    real, calls = fisher.clipped_batch_fisher, []
    monkeypatch.setattr(fisher, "clipped_batch_fisher", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = {"name": "fisher", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0],
         "base": {"train": {"steps": 1, "eval_every": 1, "checkpoint_every": 1, "eval_limit": 16,
                            "train_limit": 16, "batch_size": 8, "progress": False}},
         "variants": {"d": {"method": "child_tuning_d",
                            "grid": {"train": {"learning_rate": [1e-4, 3e-4]}}}}}
    counts = runner.run(sweep.expand(d), str(tmp_path), definition=d, progress=False)
    assert (counts["ok"], counts["failed"]) == (2, 0)
    assert calls == [1]
    files = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".safetensors")]
    assert len(files) == 1 and files[0].startswith("child_tuning_d_fisher-")
