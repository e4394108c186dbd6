"""Runs the cells of a sweep: sequentially or in N worker processes, resumably.

Layout of a sweep's ``workdir``::

    results.jsonl     one line per finished attempt of a cell (ok or failed), kill-safe (ResultsStore)
    cells/<id>/       the cell's training workdir: checkpoints, metrics.jsonl, result.json
    cells/<id>/cell.json   the cell (resolved config, variant, grid values, seed)
    stamps.jsonl      the reproducibility stamp of every invocation (git commit, versions, device)
    sweep.json        the sweep definition as given, and its expanded cell ids

Guarantees:

* **Skip finished.** A cell whose latest line is ``ok`` is never rerun. A cell whose latest line
  is ``failed`` is skipped too unless ``retry_failed`` (then its workdir is cleared and it starts
  over, since the failure may have been caused by code that has changed since).
* **Failure isolation.** A cell that raises records its error and traceback and the grid goes
  on. With workers, a cell whose process dies (segfault, out of memory) is recorded as failed and
  the worker replaced.
* **Kill-safe.** Only this process writes ``results.jsonl``, one complete line per write +
  fsync; a kill at any moment leaves complete lines only (a torn tail is dropped on the next
  append). A cell killed mid-run has no line, so the rerun runs it again, resuming from its own
  checkpoints (``train_and_evaluate`` resumes bit-identically). Worker processes die with the
  runner (``PR_SET_PDEATHSIG``), so a killed runner leaves no orphan training the same cell.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from peftjax.files import write_json_atomic
from peftjax.grid.results import ResultsStore
from peftjax.grid.sweep import Cell, cell_id, recorded_id

CellFn = Callable[[Cell, str], dict]
DEFAULT_CELL_FN = "peftjax.grid.runner:train_cell"


# --------------------------------------------------------------------------------------------
# What one cell does.


def load_cell_fn(spec: str) -> CellFn:
    """``"package.module:function"`` → the function (it must be importable by worker processes)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"cell function {spec!r} must be 'module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"cell function {spec!r}: {module} has no callable {name!r}")
    return fn


def read_curves(workdir: str) -> dict:
    """Learning curves from the loop's ``metrics.jsonl``: per split, the steps and each metric."""
    path = os.path.join(workdir, "metrics.jsonl")
    curves: dict[str, dict[str, list]] = {}
    if not os.path.exists(path):
        return curves
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            split = row.pop("split")
            step = row.pop("step")
            c = curves.setdefault(split, {"step": []})
            c["step"].append(step)
            for k, v in row.items():
                c.setdefault(k, []).append(v)
    return curves


QUIET_CELLS = "PEFTJAX_SWEEP_QUIET"   # set by run(progress=False) for its cells
# Set by run() for its cells: the sweep's <workdir>/cache, where a method's data pass (a Fisher
# estimate) is kept for the cells (other learning rates, a resumed cell) that would repeat it.
CACHE_DIR = "PEFTJAX_SWEEP_CACHE"


def train_cell(cell: Cell, workdir: str) -> dict:
    """The default cell: ``train_and_evaluate`` on the cell's config (resuming in ``workdir``),
    plus the learning curves and, with ``rank_sweep``, the evaluation at those ranks."""
    import ml_collections

    from peftjax.train import train_and_evaluate

    config = ml_collections.ConfigDict(cell.config)
    if os.environ.get(QUIET_CELLS):
        config.train.progress = False
        if "progress" in config.method:   # a method's own data pass (Fisher, gradient init)
            config.method.progress = False
    result = train_and_evaluate(config, workdir, cache_dir=os.environ.get(CACHE_DIR) or None)
    result["curves"] = read_curves(workdir)
    if cell.rank_sweep:
        result["rank_sweep"] = _rank_sweep(workdir, list(cell.rank_sweep))
    return result


def _rank_sweep(workdir: str, ranks: list[int]) -> dict:
    """``scripts/dylora_sweep.py`` on the finished cell (its own process: the script owns
    absl flags); returns its ``rank_sweep.json``."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, os.path.join(root, "scripts", "dylora_sweep.py"), f"--workdir={workdir}",
           f"--ranks={','.join(str(r) for r in ranks)}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"DyLoRA rank sweep failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    with open(os.path.join(workdir, "rank_sweep.json")) as f:
        return json.load(f)


def _task_info(task: str, config: Mapping[str, Any] | None = None) -> dict:
    """The row's ``primary_metric`` (what chose its best step and what the report selects on:
    the config's ``train.select_metric`` or the task's) and ``task_kind``."""
    try:
        from peftjax import data as data_lib

        t = data_lib.get_task(task)
    except (ImportError, ValueError):
        return {}
    chosen = ((config or {}).get("train") or {}).get("select_metric", "")
    primary = "loss" if t.kind == "causal_lm" else (chosen or t.primary_metric)
    return {"primary_metric": primary, "task_kind": t.kind}


def run_cell(cell: Cell, workdir: str, cell_fn: CellFn) -> dict:
    """Runs one cell and returns its results row (``status`` ok or failed; never raises on a
    cell's own error: the error and traceback are in the row). A run that diverged (NaN/inf
    loss, gradient or state) is failed with ``diverged_at_step``: it is not rerun, and the
    selection of its variant treats it as a finished value that lost (``sweep``, ``report``)."""
    celldir = os.path.join(workdir, "cells", cell.id)
    os.makedirs(celldir, exist_ok=True)
    write_json_atomic(os.path.join(celldir, "cell.json"), cell.to_dict(), indent=1, sort_keys=True)
    row = {"cell": cell.id, "label": cell.label, "variant": cell.variant, "method": cell.method,
           "model": cell.model, "task": cell.task, "seed": cell.seed, "hp": cell.hp,
           **_task_info(cell.task, cell.config)}
    t0 = time.time()
    try:
        result = cell_fn(cell, celldir)
    except Exception as e:  # noqa: BLE001 - a failing cell must not stop the grid
        from peftjax.train.loop import NonFiniteLossError

        diverged = {"diverged_at_step": e.step} if isinstance(e, NonFiniteLossError) else {}
        return {**row, "status": "failed", **diverged, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(), "config": cell.config,
                "cell_seconds": time.time() - t0}
    return {**result, **row, "status": "ok", "config": result.get("config", cell.config),
            "cell_seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------
# Status of a sweep folder.


def latest_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """The last row of each cell (a retried cell's new line supersedes its failure), keyed by the
    id its recorded config hashes to now (``recorded_id``): a store not yet re-keyed by ``rekey``
    (a dry run, a committed copy) still counts its finished cells."""
    out: dict[str, dict] = {}
    for r in rows:
        if "cell" in r:
            out[recorded_id(r) or r["cell"]] = dict(r)
    return out


def status(cells: Sequence[Cell], workdir: str) -> dict[str, str]:
    """``{cell id: "ok" | "failed" | "pending"}``."""
    latest = latest_rows(ResultsStore(os.path.join(workdir, "results.jsonl")).read())
    return {c.id: latest.get(c.id, {}).get("status", "pending") for c in cells}


def adopt(cells: Sequence[Cell], workdir: str, other: str) -> list[Cell]:
    """Copies into ``workdir``'s store the finished cells of another sweep folder that are cells
    of this one — the same resolved config, hence the same id (e.g. a convergence check's long
    run at the rate a grid at that budget also runs) — labelled as this sweep labels them, with
    ``adopted_from`` naming the source; returns the cells adopted. Rows whose config differs in
    anything are never adopted (the id is the hash of the config, and the config is compared)."""
    pending = {c.id: c for c in cells if status([c], workdir)[c.id] != "ok"}
    store = ResultsStore(os.path.join(workdir, "results.jsonl"))
    adopted = []
    for cid, row in latest_rows(ResultsStore(os.path.join(other, "results.jsonl")).read()).items():
        cell = pending.get(cid)
        if cell is None or row.get("status") != "ok" or row.get("config") != json.loads(json.dumps(cell.config)):
            continue
        store.append({**row, "cell": cell.id, "label": cell.label, "variant": cell.variant, "hp": cell.hp,
                      "adopted_from": os.path.abspath(other)})
        adopted.append(cell)
    return adopted


def rekey(workdir: str) -> dict[str, str]:
    """Recomputes the id of every cell folder and results row of ``workdir`` from its recorded
    config; returns ``{old id: new id}`` of those that changed (renamed folders, rewritten rows).

    Why: a cell's id hashes its resolved config, leaving out fields at a neutral value
    (``sweep.NEUTRAL_DEFAULTS``). A field added to the configs after a store was written, and
    recorded in its configs before its bundle was declared neutral, changes those cells' ids:
    finished cells would rerun and killed ones restart from step 0. Recorded configs are
    re-hashed here at the start of every run, so a store always uses the current ids. A folder
    whose new id is taken already is left alone and named in the log.
    """
    changed: dict[str, str] = {}
    ranks: dict[str, tuple] = {}
    cells = os.path.join(workdir, "cells")
    for name in sorted(os.listdir(cells)) if os.path.isdir(cells) else []:
        path = os.path.join(cells, name, "cell.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            cell = Cell.from_dict(json.load(f))
        new = cell_id(cell.config, cell.rank_sweep)
        ranks[name] = ranks[new] = cell.rank_sweep
        if new == name:
            continue
        target = os.path.join(cells, new)
        if os.path.exists(target):
            logging.warning("rekey: %s would become %s, which exists; left as it is", name, new)
            continue
        os.rename(os.path.join(cells, name), target)
        write_json_atomic(os.path.join(target, "cell.json"),
                          dataclasses.replace(cell, id=new).to_dict(), indent=1, sort_keys=True)
        changed[name] = new
    store = ResultsStore(os.path.join(workdir, "results.jsonl"))
    rows, dirty = store.read(), False
    for row in rows:
        old = row.get("cell")
        new = recorded_id(row, ranks.get(old))
        if new is not None and new != old:
            row["cell"], dirty = new, True
            changed.setdefault(old, new)
    if dirty:
        store.rewrite(rows)
    return changed


# --------------------------------------------------------------------------------------------
# Workers.


COMPILATION_CACHE = "jax_cache"


def use_compilation_cache(workdir: str) -> str:
    """Turns on JAX's persistent compilation cache in ``<workdir>/jax_cache`` for this process.

    Why: every cell compiles its train and eval steps; cells that differ only in seed, or in
    values passed as arrays, compile the very same programs. With the cache a later cell (or a
    resumed sweep, or another worker) loads the compiled executable instead of spending XLA's
    compile time again. Every program is cached (no minimum compile time): the tiny ones are
    cheap to store and a cell has few of them. One cache per sweep workdir keeps it next to what
    it serves and lets ``rm -r`` clean both.

    JAX opens its cache once, at the first compile that has a folder for it: with
    $JAX_COMPILATION_CACHE_DIR set (the test suite sets it), a compile before this call opened
    that folder and every cell's program went there, none to ``<workdir>/jax_cache``. So the
    cache is reset after the setting, and the next compile opens the workdir's.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.join(os.path.abspath(workdir), COMPILATION_CACHE)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    return path


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (no orphan keeps training)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            return


def _worker(wid: int, parent_pid: int, tasks, results, cell_fn_spec: str, workdir: str,
            compile_cache: bool = True) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    # The running cell's bar sits below the overall bar, one line per worker (tqdm reads
    # TQDM_* environment variables as defaults).
    os.environ["TQDM_POSITION"] = str(wid + 1)
    if compile_cache:
        use_compilation_cache(workdir)
    cell_fn = load_cell_fn(cell_fn_spec)
    while True:
        item = tasks.get()
        if item is None:
            return
        cell = Cell.from_dict(item)
        results.put(("start", wid, cell.id))
        results.put(("done", wid, run_cell(cell, workdir, cell_fn)))


# --------------------------------------------------------------------------------------------
# The runner.


def run(cells: Sequence[Cell], workdir: str, *, workers: int = 1, retry_failed: bool = False,
        cell_fn: str = DEFAULT_CELL_FN, definition: Mapping[str, Any] | None = None,
        progress: bool = True, compile_cache: bool = True,
        more: Callable[[], Sequence[Cell]] | None = None) -> dict[str, int]:
    """Runs every pending cell of ``cells`` in ``workdir``; returns counts by outcome.

    ``workers=1`` runs the cells one after another in this process; ``workers=N`` in N spawned
    processes. ``cell_fn`` (``module:function``, called as ``fn(cell, celldir) -> dict``) is what
    a cell does: by default, training and evaluating its config. ``compile_cache``: JAX's
    persistent compilation cache in ``<workdir>/jax_cache`` (``use_compilation_cache``). The
    default cell keeps a method's data pass (a Fisher estimate) in ``<workdir>/cache``
    (``methods/pass_cache.py``), shared by the cells that would repeat it.

    ``more``, if given, is asked after every finished cell for the cells to run now (the sweep
    re-expanded on the results so far: a variant whose learning-rate selection just finished
    releases its other seeds). Its new pending cells join the queue at their place in its list,
    so a variant's seeds run as soon as its choice is known, ahead of later variants, instead
    of waiting for the end of a round (an interim report then has whole variants, and no
    worker idles while the released cells wait). Cells are handed to workers one at a time as
    they free up, so the queue's order is the order cells start.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    load_cell_fn(cell_fn)  # a bad spec fails here, not in every worker
    os.makedirs(workdir, exist_ok=True)
    if compile_cache and workers == 1:
        use_compilation_cache(workdir)
    from peftjax.grid.stamp import stamp

    moved = rekey(workdir)
    if moved:
        logging.warning("rekey: %d cell id(s) of %s recomputed from their recorded configs "
                        "(sweep.NEUTRAL_DEFAULTS): %s", len(moved), workdir,
                        ", ".join(f"{a} -> {b}" for a, b in list(moved.items())[:10]))
    ResultsStore(os.path.join(workdir, "stamps.jsonl")).append(stamp())
    store = ResultsStore(os.path.join(workdir, "results.jsonl"))
    # No bars at all: the cells' training bars go too (train.progress is display only; the
    # workers inherit the environment, train_cell reads it).
    os.environ[QUIET_CELLS] = "" if progress else "1"
    os.environ[CACHE_DIR] = os.path.join(os.path.abspath(workdir), "cache")
    counts = {"total": 0, "skipped_ok": 0, "skipped_failed": 0, "ok": 0, "failed": 0}
    bar = tqdm(total=0, unit="cell", desc="sweep", position=0, dynamic_ncols=True,
               disable=not progress, smoothing=0.0)
    queue = _Queue(workdir, retry_failed, counts, bar)

    def add(cells: Sequence[Cell]) -> None:
        """Queues the new ones; ``sweep.json`` lists every cell this run has been given."""
        if queue.add(cells) and definition is not None:
            write_json_atomic(os.path.join(workdir, "sweep.json"),
                              {"definition": definition, "cells": list(queue.seen)}, indent=1, sort_keys=True)

    add(cells)

    def record(row: dict) -> None:
        store.append(row)
        counts[row["status"]] += 1
        bar.update(1)
        if row["status"] == "failed":
            bar.write(f"FAILED {row['label']} ({row['cell']}): {row['error']}")
        if more is not None:
            add(more())

    try:
        if workers == 1:
            fn = load_cell_fn(cell_fn)
            while queue:
                cell = queue.pop()
                bar.set_postfix_str(cell.label)
                record(run_cell(cell, workdir, fn))
        else:
            _run_pool(queue, workdir, workers, cell_fn, bar, record, compile_cache)
    finally:
        bar.close()
    return counts


class _Queue:
    """The cells still to start, in the order of the latest cell list given (``add``), each
    cell once: a cell already finished (or failed, unless retried) is counted as skipped, not
    queued; a retried failed cell starts afresh."""

    def __init__(self, workdir: str, retry_failed: bool, counts: dict, bar) -> None:
        self.workdir, self.retry_failed, self.counts, self.bar = workdir, retry_failed, counts, bar
        self.seen: dict[str, Cell] = {}
        self.todo: list[Cell] = []

    def add(self, cells: Sequence[Cell]) -> int:
        """Queues the cells not seen before; returns how many there were."""
        fresh = list({c.id: c for c in cells if c.id not in self.seen}.values())
        if not fresh:
            return 0
        state = status(fresh, self.workdir)
        self.seen.update((c.id, c) for c in fresh)
        retried = {c.id for c in fresh if state[c.id] == "failed" and self.retry_failed}
        starts = [c for c in fresh if state[c.id] == "pending" or c.id in retried]
        self.counts["total"] += len(fresh)
        self.counts["skipped_ok"] += sum(state[c.id] == "ok" for c in fresh)
        self.counts["skipped_failed"] += sum(state[c.id] == "failed" for c in fresh) - len(retried)
        for cid in retried:
            shutil.rmtree(os.path.join(self.workdir, "cells", cid), ignore_errors=True)
        place = {c.id: i for i, c in enumerate(cells)}
        self.todo = sorted(self.todo + starts, key=lambda c: place.get(c.id, len(place)))
        self.bar.total += len(fresh)
        self.bar.update(len(fresh) - len(starts))
        return len(fresh)

    def pop(self) -> Cell:
        return self.todo.pop(0)

    def __len__(self) -> int:
        return len(self.todo)


def _failed_row(cell: Cell, error: str) -> dict:
    return {"cell": cell.id, "label": cell.label, "variant": cell.variant, "method": cell.method,
            "model": cell.model, "task": cell.task, "seed": cell.seed, "hp": cell.hp,
            "status": "failed", "error": error, "traceback": "", "config": cell.config,
            **_task_info(cell.task, cell.config)}


def _run_pool(queue: _Queue, workdir: str, workers: int, cell_fn: str, bar, record,
              compile_cache: bool = True) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    # Results go through a SimpleQueue: a put is written to the pipe before it returns (no
    # feeder thread), so a worker that dies right after announcing a cell has announced it.
    # A cell is put in ``tasks`` only when a worker is free for it (at most ``workers`` in
    # flight), so cells released while others run still start in the queue's order.
    tasks, results = ctx.Queue(), ctx.SimpleQueue()
    by_id: dict[str, Cell] = {}
    procs: dict[int, Any] = {}
    running: dict[int, str] = {}

    def start(wid: int) -> None:
        p = ctx.Process(target=_worker, args=(wid, os.getpid(), tasks, results, cell_fn, workdir,
                                              compile_cache),
                        daemon=True)
        p.start()
        procs[wid] = p

    def dispatch() -> None:
        while queue and len(by_id) - len(finished) < workers:
            cell = queue.pop()
            by_id[cell.id] = cell
            tasks.put(cell.to_dict())
            # A free slot: never started, or its worker ended between cells. A worker that died
            # mid-cell keeps its slot until the loop below has recorded its cell.
            free = [w for w in range(workers)
                    if w not in procs or (not procs[w].is_alive() and w not in running)]
            if workers - len(free) < len(by_id) - len(finished):
                start(free[0])

    restarts = 0
    finished: set[str] = set()

    def finish(row: dict) -> None:
        finished.add(row["cell"])
        record(row)   # may add cells to the queue (``more``)
        dispatch()

    dispatch()
    try:
        while len(by_id) > len(finished):
            if not results.empty():
                kind, wid, payload = results.get()
                if kind == "start":
                    running[wid] = payload
                    bar.set_postfix_str(by_id[payload].label)
                else:
                    running.pop(wid, None)
                    finish(payload)
                continue
            time.sleep(0.2)
            dead = [wid for wid, p in procs.items() if not p.is_alive()]
            if not results.empty():  # read what the dead said before judging them
                continue
            in_flight = len(by_id) > len(finished)
            for wid in dead:
                p = procs[wid]
                if p.is_alive():  # already replaced (``dispatch`` starts workers as needed)
                    continue
                if wid in running:  # died mid-cell (segfault, OOM killer)
                    start(wid)  # its replacement takes the next cell dispatched
                    finish(_failed_row(by_id[running.pop(wid)],
                                       f"worker process died (exit code {p.exitcode})"))
                elif p.exitcode != 0 and in_flight:  # died between cells (e.g. at start-up)
                    restarts += 1
                    if restarts > 3 * workers:
                        raise RuntimeError(f"sweep workers keep dying (last exit code "
                                           f"{p.exitcode}); run with --workers=1 to see why")
                    start(wid)
            if len(by_id) > len(finished) and not any(p.is_alive() for p in procs.values()):
                # Every worker is gone yet cells are unaccounted for (a worker died between
                # taking a cell and announcing it): record them rather than wait forever.
                for cell in [c for cid, c in by_id.items() if cid not in finished]:
                    finish(_failed_row(cell, "lost: its worker process died before reporting it"))
        for _ in procs:   # every cell is done: each worker takes one sentinel and ends
            tasks.put(None)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
