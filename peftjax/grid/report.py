"""Reports of sweeps: honest hyperparameter selection on validation, tables as Markdown and
LaTeX (booktabs) with the best value per column in bold, plots, and a reproducibility stamp.

    python scripts/report.py runs/tweet_methods   # → report.md, report.tex, plots/, resolved_configs.json
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from peftjax import host
from peftjax.files import write_text_atomic

log = logging.getLogger(__name__)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n}"


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Any]]) -> str:
    """``columns``: (header, key path like ``metrics.test.accuracy``, formatter)."""

    def get(row, path):
        for part in path.split("."):
            row = row.get(part) if isinstance(row, dict) else None
        return row

    header = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for _, path, fmt in columns:
            value = get(row, path)
            cells.append("n/a" if value is None else fmt(value))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *body])


# ------------------------------------------------------------------------------------------------
# Sweep reports: honest selection, tables (Markdown + LaTeX booktabs), plots, stamp.

LOWER_IS_BETTER_METRICS = frozenset({"loss", "perplexity"})


def _get(row: Any, path: str) -> Any:
    for part in path.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def _hp_key(hp: dict) -> str:
    return json.dumps(hp or {}, sort_keys=True)


def _hp_order(hk: str) -> tuple:
    """Sort key of an hp key: by value, numbers numerically (1e-05 before 3e-05 before 0.0001,
    which a string sort puts last)."""
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool)
                  else (1, 0, json.dumps(v))) for k, v in sorted(json.loads(hk).items()))


def _hp_text(hp: dict) -> str:
    if not hp:
        return "-"
    return ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in sorted(hp.items()))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single seed)."""
    arr = np.asarray([v for v in values if v is not None], float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def primary_of(row: dict) -> tuple[str, bool]:
    """(primary metric, higher is better) of a results row."""
    metric = row.get("primary_metric")
    if metric is None:
        from peftjax import data as data_lib

        task = data_lib.get_task(row["task"])
        metric = "loss" if task.kind == "causal_lm" else task.primary_metric
    return metric, metric not in LOWER_IS_BETTER_METRICS


def _divergence_text(hk: str, by_seed: Mapping[int, int], named: bool = True) -> str:
    """``learning_rate=0.3 diverged (NaN/inf) at step 57 (seed 0)``; without the value when
    ``named`` is False (a table row that already names it)."""
    where = ", ".join(f"step {step} (seed {seed})" for seed, step in sorted(by_seed.items()))
    return (f"{_hp_text(json.loads(hk))} " if named else "") + f"diverged (NaN/inf) at {where}"


def _divergence_notes(by_hk: Mapping[str, Mapping[int, int]]) -> list[str]:
    """``_divergence_text`` of each diverged grid value, in the grid's numeric order."""
    return [_divergence_text(hk, by_hk[hk]) for hk in sorted(by_hk, key=_hp_order)]


@dataclasses.dataclass
class Selection:
    """The hyperparameters chosen on validation for one (model, task, variant), and their seeds.

    ``candidates``: hp key → (mean validation score over seeds, seeds); ``rows``: the chosen hp's
    finished seeds, whose test scores are the only ones reported.
    """

    model: str
    task: str
    variant: str
    method: str
    metric: str
    higher_is_better: bool
    hp: dict
    rows: list
    candidates: dict
    grid_size: int = 0   # grid values the definition gives this variant (0: not known)
    seeds_expected: int = 0   # seeds the definition runs at the chosen value (0: not known)
    tier: int | None = None   # 0 = first; set by uncertainty_section where intervals exist
    diverged: dict = dataclasses.field(default_factory=dict)   # hp key -> {seed: step it diverged at}

    @property
    def incomplete(self) -> str:
        """A note when the row is interim, else ``""``: the choice was made before every grid
        value finished (a pending value may still win), or fewer of its seeds than the
        definition runs have finished (its mean and interval will move)."""
        notes = []
        done = len(set(self.candidates) | set(self.diverged))
        if self.grid_size > done:
            notes.append(f"selection incomplete: {done} of {self.grid_size} grid values finished")
        lost = self.diverged.get(_hp_key(self.hp), {})
        if self.seeds_expected > len(self.rows) + len(lost):
            notes.append(f"{len(self.rows)} of {self.seeds_expected} seeds finished")
        return "; ".join(notes + self.divergence_notes())

    def divergence_notes(self) -> list[str]:
        """One note per grid value whose run diverged, with the seeds and the step."""
        return _divergence_notes(self.diverged)

    def stat(self, path: str) -> tuple[float, float]:
        return _mean_std([_get(r, path) for r in self.rows])

    def first(self, path: str) -> Any:
        for r in self.rows:
            v = _get(r, path)
            if v is not None:
                return v
        return None


def latest_by_cell(rows: Sequence[dict]) -> dict[str, dict]:
    """The last line of each cell (a retried cell's new line supersedes its failure)."""
    return {r["cell"]: r for r in rows if "cell" in r}


def finished_rows(rows: Sequence[dict]) -> list[dict]:
    """The latest line of each cell, keeping those that finished (status ok)."""
    return [r for r in latest_by_cell(rows).values() if r.get("status", "ok") == "ok"]


def diverged_rows(rows: Sequence[dict]) -> list[dict]:
    """The latest line of each cell, keeping those whose run diverged (NaN/inf; the runner's
    ``diverged_at_step``): a value of a grid that lost, not a cell to rerun."""
    return [r for r in latest_by_cell(rows).values()
            if r.get("status") == "failed" and "diverged_at_step" in r]


def read_definition(workdir: str) -> dict:
    """The sweep definition a folder last ran (its ``sweep.json``); ``{}`` when it has none."""
    path = os.path.join(workdir, "sweep.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("definition", {})


def current_rows(rows: Sequence[dict], definition: Mapping[str, Any] | None) -> tuple[list[dict], int]:
    """``(rows of the definition's cells and baselines, how many others were dropped)``.

    Why: a results store keeps every cell that ever finished; after a definition changes (a
    setting, a task's selection metric) its old cells no longer belong to the comparison, and
    mixing them into a selection would average two protocols. A kept row carries the variant
    name the definition gives its cell now: a cell's id is its resolved config, not its name, so
    a variant renamed in the definition (tweet_methods' lora → lora_qv) keeps its finished cells
    and the report files them under the new name. Without a definition, all rows as they are."""
    if not definition or not definition.get("variants"):
        return list(rows), 0
    from peftjax.grid import sweep

    names = {c.id: c.variant for c in sweep.expand(definition)}
    kept = []
    for r in rows:
        if str(r["cell"]).startswith("baseline:"):
            kept.append(r)
            continue
        # Matched by its recorded id or by the id its recorded config hashes to now (a store
        # written before a neutral field existed; runner.rekey re-keys a live workdir).
        cid = r["cell"] if r["cell"] in names else sweep.recorded_id(r)
        if cid in names:
            kept.append(r if r.get("variant") == names[cid] else {**r, "variant": names[cid]})
    return kept, len(rows) - len(kept)


def select(rows: Sequence[dict], fixed: dict | None = None,
           selection_seeds: Sequence[int] | None = None) -> list[Selection]:
    """Honest model selection: per (model, task, variant), the hp setting with the best mean
    validation score over its seeds; test is then read for that setting only.

    (The best *step* within a run was already chosen on validation by the training loop, which
    evaluated test once, at that step.) ``fixed`` restricts to rows whose hp has these values
    (used by ablations: the best of the other hps at each value of one). ``selection_seeds``:
    the choice uses these seeds' validation scores only (two-stage tuning: the other seeds ran
    the chosen value alone, and counting them would favour it after the fact).
    """
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if fixed and any((r.get("hp") or {}).get(k) != v for k, v in fixed.items()):
            continue
        key = (r["model"], r["task"], r["variant"])
        groups.setdefault(key, {}).setdefault(_hp_key(r.get("hp")), []).append(r)
    out = []
    for (model, task, variant), by_hp in groups.items():
        metric, higher = primary_of(next(iter(by_hp.values()))[0])
        cands = {}
        for hk, rs in by_hp.items():
            picked = [r for r in rs if selection_seeds is None or r["seed"] in selection_seeds]
            val, _ = _mean_std([_get(r, f"metrics.validation.{metric}") for r in picked])
            cands[hk] = (val, sorted(r["seed"] for r in picked))
        valid = [hk for hk in cands if not math.isnan(cands[hk][0])]
        if not valid:
            continue
        best = (max if higher else min)(sorted(valid), key=lambda hk: cands[hk][0])
        chosen = sorted(by_hp[best], key=lambda r: r["seed"])
        out.append(Selection(model, task, variant, chosen[0].get("method", variant), metric, higher,
                             json.loads(best), chosen, cands))
    return out


def _definition_groups(definition: Mapping[str, Any]) -> dict[tuple, tuple[set, set]]:
    """(model, task, variant) → (its grid values as hp keys, its seeds) under the definition;
    ``{}`` without one."""
    if not definition or not definition.get("variants"):
        return {}
    from peftjax.grid import sweep

    groups: dict[tuple, tuple[set, set]] = {}
    for c in sweep.expand(definition):
        hps, seeds = groups.setdefault((c.model, c.task, c.variant), (set(), set()))
        hps.add(_hp_key(c.hp))
        seeds.add(c.seed)
    return groups


def attach_divergences(sels: Sequence[Selection], diverged: Sequence[dict]) -> dict[tuple, dict]:
    """Files each diverged run under its selection (``Selection.diverged``); returns the
    (model, task, variant) groups that have no selection because every run diverged, with their
    divergences, so the report can name them rather than drop them."""
    by_key = {(s.model, s.task, s.variant): s for s in sels}
    orphans: dict[tuple, dict] = {}
    for r in diverged:
        key = (r["model"], r["task"], r["variant"])
        target = by_key[key].diverged if key in by_key else orphans.setdefault(key, {})
        target.setdefault(_hp_key(r.get("hp")), {})[r["seed"]] = r["diverged_at_step"]
    return orphans


def set_expectations(definition: Mapping[str, Any], sels: Sequence[Selection]) -> None:
    """Gives each selection the grid size and seed count its definition asks for, so an
    interim row (a sweep still running) says what it is still missing."""
    groups = _definition_groups(definition)
    for s in sels:
        hps, seeds = groups.get((s.model, s.task, s.variant), ((), ()))
        s.grid_size, s.seeds_expected = len(hps), len(seeds)


@dataclasses.dataclass
class Progress:
    """How much of a sweep definition has finished: ``total`` counts the cells it will run —
    those runnable now plus, under two-stage tuning, one cell per (variant, other seed) still
    waiting for its selection — and ``pending`` names what is left per (model, task)."""

    finished: int
    total: int
    pending: dict   # (model, task) -> {variant: cells left}

    def summary(self) -> list[str]:
        """Markdown lines for an interim report; none once every cell has finished."""
        if self.finished >= self.total:
            return []
        lines = [f"**Interim report: {self.finished} of the definition's {self.total} cells have "
                 "finished.** A row may still change (its notes say how: a grid value or a seed "
                 "not finished yet), and variants with no finished selection are not in the "
                 "tables. Cells left:"]
        for (model, task), left in sorted(self.pending.items()):
            lines.append(f"- {model} × {task}: " + ", ".join(f"{v} ({n})" for v, n in left.items()))
        return lines + [""]


def progress(definition: Mapping[str, Any], rows: Sequence[dict]) -> Progress | None:
    """The definition's :class:`Progress` given a store's rows; None without a definition."""
    if not definition or not definition.get("variants"):
        return None
    from peftjax.grid import sweep

    run, deferred = sweep.expand_with_selection(definition, rows)
    ok = finished_rows(rows) + diverged_rows(rows)   # a diverged run is settled, not left
    # A row counts under its recorded id and under the id its config hashes to now.
    done = {r["cell"] for r in ok} | ({sweep.recorded_id(r) for r in ok} - {None})
    pending: dict[tuple, dict[str, int]] = {}
    for c in run:
        if c.id not in done:
            left = pending.setdefault((c.model, c.task), {})
            left[c.variant] = left.get(c.variant, 0) + 1
    later = sorted({(c.model, c.task, c.variant, c.seed) for c in deferred})
    for model, task, variant, _ in later:
        left = pending.setdefault((model, task), {})
        left[variant] = left.get(variant, 0) + 1
    finished = sum(c.id in done for c in run)
    return Progress(finished, len(run) + len(later), pending)


def _scale(metric: str) -> float:
    return 1.0 if metric in LOWER_IS_BETTER_METRICS else 100.0


def _latex_escape(s: str) -> str:
    s = s.replace("\\", "\x00")
    for a, b in (("{", r"\{"), ("}", r"\}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"),
                 ("#", r"\#"), ("$", r"\$")):
        s = s.replace(a, b)
    return s.replace("\x00", r"\textbackslash{}")


def task_table(sels: Sequence[Selection], metrics: Sequence[str]) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cells (text) and best-in-column flags for one task's selections.

    Columns: variant, method, chosen hps, seeds, test metrics (mean ± std over seeds, ×100 for
    rates), validation primary metric, trainable params, % of total, peak memory, step time.
    Best: the fewest params, least memory and fastest step; for scores, where the selections
    have tiers (:func:`uncertainty_section`, run first), every variant of the first tier in the
    main metric's test column and no other score — a single bold best would rank variants whose
    intervals overlap — else the highest (for losses, lowest) mean score.
    """
    header = ["variant", "method", "chosen hp", "seeds"] + [f"test {m}" for m in metrics] + [
        f"val {sels[0].metric}" if sels else "val", "trainable", "% of total", "peak memory",
        "step time (s)"]
    cols_value: list[list[float]] = []
    text: list[list[str]] = []
    for s in sels:
        row_text = [s.variant, s.method, _hp_text(s.hp), str(len(s.rows))]
        values: list[float] = []
        for split, m in [("test", m) for m in metrics] + [("validation", s.metric)]:
            mean, std = s.stat(f"metrics.{split}.{m}")
            k = _scale(m)
            row_text.append("n/a" if math.isnan(mean) else f"{k * mean:.1f} ± {k * std:.1f}"
                            if k != 1 else f"{mean:.3f} ± {std:.3f}")
            values.append(mean if m not in LOWER_IS_BETTER_METRICS else -mean)
        params = s.first("trainable_params")
        pct = s.first("trainable_percent")
        mem, _ = s.stat("peak_memory_bytes")
        step, _ = s.stat("step_time_s")
        row_text += [human_count(params) if params is not None else "n/a",
                     f"{pct:.3f}%" if pct is not None else "n/a",
                     human_bytes(None if math.isnan(mem) else mem),
                     "n/a" if math.isnan(step) else f"{step:.3f}"]
        values += [-(params if params is not None else math.nan), -(pct if pct is not None else math.nan),
                   -mem, -step]
        text.append(row_text)
        cols_value.append(values)
    best = [[False] * len(header) for _ in sels]
    first_value_col = 4
    n_scores = len(metrics) + 1   # test metrics, then validation
    tiered = any(s.tier is not None for s in sels)
    for j in range(len(cols_value[0]) if cols_value else 0):
        if tiered and j < n_scores:
            if j == 0:   # the main metric's test column
                for i, s in enumerate(sels):
                    best[i][first_value_col] = s.tier == 0
            continue
        col = np.asarray([v[j] for v in cols_value], float)
        if np.all(np.isnan(col)):
            continue
        top = np.nanmax(col)
        for i in range(len(sels)):
            best[i][first_value_col + j] = bool(col[i] == top)
    return header, text, best


def render_markdown(header, text, best) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row, flags in zip(text, best):
        lines.append("| " + " | ".join(f"**{c}**" if b else c for c, b in zip(row, flags)) + " |")
    return "\n".join(lines)


def render_latex(header, text, best, caption: str, label: str) -> str:
    def cell(c: str, b: bool) -> str:
        c = _latex_escape(c).replace("±", r"$\pm$")
        return rf"\textbf{{{c}}}" if b else c

    spec = "lll r" + "r" * (len(header) - 4)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{_latex_escape(caption)}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{spec.replace(' ', '')}}}", r"\toprule",
             " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for row, flags in zip(text, best):
        lines.append(" & ".join(cell(c, b) for c, b in zip(row, flags)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def _order(sels: Sequence[Selection], variant_order: Sequence[str]) -> list[Selection]:
    rank = {v: i for i, v in enumerate(variant_order)}
    return sorted(sels, key=lambda s: (rank.get(s.variant, len(rank)), s.variant))


def _curve_stats(sel: Selection, split: str, metric: str):
    """Mean ± std over seeds of a learning curve, on the steps every seed logged."""
    per_seed = []
    for r in sel.rows:
        c = _get(r, f"curves.{split}")
        if c and metric in c:
            per_seed.append(dict(zip(c["step"], c[metric])))
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    vals = np.asarray([[p[s] for s in steps] for p in per_seed], float)
    std = vals.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(steps))
    return steps, vals.mean(axis=0), std


def write_report(workdir: str, out: str | None = None, *, title: str | None = None,
                 command: str | None = None, convergence: str | None = None,
                 convergence_command: str | None = None) -> dict[str, Any]:
    """Writes ``report.md``, ``report.tex``, ``plots/*.{png,pdf}`` and ``resolved_configs.json``
    to ``out`` (default: ``workdir``) from ``workdir/results.jsonl``; returns what was written.
    ``convergence``: the folder of a longer rerun of some variants (peftjax/grid/convergence.py),
    checked against this grid's choices in its own section."""
    from peftjax.grid import plots
    from peftjax.grid.results import ResultsStore
    from peftjax.grid.stamp import stamp

    out = out or workdir
    all_rows = ResultsStore(os.path.join(workdir, "results.jsonl")).read()
    if not all_rows:
        raise ValueError(f"{workdir}/results.jsonl has no results; run scripts/sweep.py first")
    latest = latest_by_cell(all_rows)
    rows = finished_rows(all_rows)
    failed = [r for r in latest.values() if r.get("status") == "failed"]
    definition = read_definition(workdir)
    variant_order = ((definition.get("report") or {}).get("order")
                     or list((definition.get("variants") or {}).keys()))
    rows, stale = current_rows(rows, definition)
    name = title or definition.get("name") or os.path.basename(os.path.abspath(workdir))
    stamps = ResultsStore(os.path.join(workdir, "stamps.jsonl")).read()
    now = stamp()
    plot_dir = os.path.join(out, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    written: dict[str, Any] = {"plots": []}

    sels = select(rows, selection_seeds=definition.get("selection_seeds"))
    set_expectations(definition, sels)
    lost = attach_divergences(sels, current_rows(diverged_rows(all_rows), definition)[0])
    done = progress(definition, all_rows)
    tasks = _order_names(sorted({s.task for s in sels} | {t for _, t, _ in lost}),
                         definition.get("tasks") or [])
    md = [f"# {name}", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    if done is not None:
        md += done.summary()
        written["progress"] = done
    if stale:
        md += [f"({stale} finished cells in results.jsonl are not cells of the current definition "
               "(a setting changed since they ran) and are left out.)", ""]
    md += ["Model selection: per (model, task, variant) the hyperparameters with the best mean "
           "validation score over seeds are chosen; within each run the training loop keeps the "
           "step with the best validation score and evaluates test there once. Test is reported "
           "for the chosen setting only, as mean ± std (sample std) over its seeds. Best value per "
           "column in bold (fewest params, least memory, fastest step; for scores, the first "
           "tier of the interval table under each table, in the main metric's test column — "
           "variants not ranked apart — or, without intervals, the highest score). Step time "
           "is each cell's steady step as it ran — beside another cell when the sweep ran several "
           "workers, on whichever host ran it (the stamp lists them) — so it compares variants "
           "only roughly; scripts/bench.py times methods side by side on quiet cores.", ""]
    tex = [r"% Generated by scripts/report.py; needs \usepackage{booktabs}.", ""]
    for model in _order_names(sorted({s.model for s in sels} | {m for m, _, _ in lost}),
                              definition.get("models") or []):
        for task in tasks:
            ts = _order([s for s in sels if s.task == task and s.model == model], variant_order)
            all_lost = [f"**{variant}** has no row: every run of its grid diverged (NaN/inf): "
                        + "; ".join(_divergence_notes(by_hk)) + "."
                        for (m, t, variant), by_hk in lost.items() if (m, t) == (model, task)]
            if not ts:
                if all_lost:
                    md += [f"## {model} × {task}", ""] + [line for x in all_lost for line in (x, "")]
                continue
            metrics_names = list(_get(ts[0].rows[0], "metrics.test") or {}) or [ts[0].metric]
            metrics_names = [ts[0].metric] + [m for m in metrics_names if m != ts[0].metric]
            margin = ((definition.get("report") or {}).get("min_over_majority") or {}).get(task)
            intervals = uncertainty_section(ts, min_over_majority=margin)   # sets the tiers
            header, text, best = task_table(ts, metrics_names)
            md += [f"## {model} × {task}", "", render_markdown(header, text, best), ""]
            heads = {s.first("head_params") for s in ts} - {None, 0}   # baselines have no head
            if len(heads) == 1:
                md += [f"Trainable: the method's own parameters; every fine-tuned variant also "
                       f"trains the task head ({heads.pop():,} parameters), which no count includes.", ""]
            diverged_notes = [f"{s.variant}: " + "; ".join(s.divergence_notes()) for s in ts if s.diverged]
            if diverged_notes:
                md += ["Diverged runs (each a grid value that lost; nothing of them was saved): "
                       + " — ".join(diverged_notes) + ".", ""]
            md += intervals
            md += [line for x in all_lost for line in (x, "")]
            tiered = any(s.tier is not None for s in ts)
            tex += [render_latex(header, text, best, f"{model} on {task}: test "
                                 f"{ts[0].metric} at the hyperparameters chosen on validation "
                                 "(mean ± std over seeds)."
                                 + (" Bold scores: the first tier of 95% paired-bootstrap "
                                    "intervals, not ranked apart." if tiered else ""),
                                 f"tab:{model}-{task}".replace("_", "-")), ""]
            # Plots for this (model, task).
            tag = f"{model}_{task}".replace("/", "_")
            k = _scale(ts[0].metric)
            pts = []
            for s in ts:
                p = s.first("trainable_params")
                mean, std = s.stat(f"metrics.test.{s.metric}")
                if p is not None and not math.isnan(mean):
                    pts.append({"label": s.variant, "params": p, "mean": k * mean, "std": k * std})
            if pts:
                written["plots"] += plots.score_vs_params(
                    pts, os.path.join(plot_dir, f"pareto_{tag}"), ylabel=f"test {ts[0].metric}",
                    title=f"{model} × {task}: score vs trainable parameters",
                    higher_is_better=ts[0].higher_is_better)
            lc = {}
            for s in ts:
                st = _curve_stats(s, "validation", s.metric)
                if st:
                    lc[s.variant] = (st[0], k * st[1], k * st[2])
            if lc:
                written["plots"] += plots.curves(
                    lc, os.path.join(plot_dir, f"curves_{tag}"), xlabel="step",
                    ylabel=f"validation {ts[0].metric}", title=f"{model} × {task}: learning curves "
                    "(chosen hps, mean ± std over seeds)")
            written["plots"] += _sensitivity_plot(ts, plot_dir, tag, model, task)
            written["plots"] += _rank_plots(rows, ts, plot_dir, tag, model, task)
    # Memory and step time per variant (one bar per task).
    labels = _order_names(sorted({s.variant for s in sels}), variant_order)
    if labels:
        for key, fname, ylabel, scale in (("peak_memory_bytes", "memory", "peak memory (MB)", 1e-6),
                                          ("step_time_s", "step_time", "train step time (s)", 1.0)):
            series = {}
            for task in tasks:
                vals = []
                for v in labels:
                    match = [s for s in sels if s.task == task and s.variant == v]
                    m = match[0].stat(key)[0] if match else math.nan
                    vals.append(None if math.isnan(m) else scale * m)
                series[task] = vals
            written["plots"] += plots.grouped_bars(labels, series, os.path.join(plot_dir, fname),
                                                   ylabel=ylabel, title=f"{ylabel} per method")
    if convergence:
        from peftjax.grid import convergence as convergence_lib

        found = convergence_lib.checks(rows, convergence_lib.read(convergence),
                                       definition.get("selection_seeds"))
        lines, paths = convergence_lib.section(found, plot_dir, command=convergence_command)
        md += lines or [f"(No variant of {convergence} matches a selection of this grid.)", ""]
        written["plots"] += paths
    md += ["## Plots", ""]
    for p in written["plots"]:
        if p.endswith(".png"):
            rel = os.path.relpath(p, out)
            md += [f"![{os.path.basename(p)[:-4]}]({rel})", ""]
    md += ["## Validation scores across each hyperparameter grid", "",
           "| model | task | variant | hp | val (mean over seeds) | seeds | chosen |", "|---|---|---|---|---|---|---|"]
    grids = [(s.model, s.task, s.variant, s.candidates, s.diverged, _hp_key(s.hp), _scale(s.metric))
             for s in sels] + [(m, t, v, {}, by_hk, None, 1.0) for (m, t, v), by_hk in lost.items()]
    for model, task, variant, cands, div, chosen_hk, k in sorted(grids, key=lambda g: g[:3]):
        for hk in sorted(set(cands) | set(div), key=_hp_order):
            text = _hp_text(json.loads(hk))
            if hk in cands:
                val, seeds = cands[hk]
                score = f"{k * val:.2f}" + (f" ({_divergence_text(hk, div[hk], named=False)})"
                                            if hk in div else "")
            else:
                score, seeds = _divergence_text(hk, div[hk], named=False), sorted(div[hk])
            md.append(f"| {model} | {task} | {variant} | {text} | {score} | {','.join(map(str, seeds))} | "
                      f"{'yes' if hk == chosen_hk else ''} |")
    md.append("")
    if failed:
        md += ["## Failed cells", "", "| cell | label | error |", "|---|---|---|"]
        for r in failed:
            error = (str(r.get("error", "")).splitlines() or [""])[0][:200].replace("|", "\\|")
            md.append(f"| {r['cell']} | {r.get('label', '')} | {error} |")
        md += ["", f"Tracebacks: {os.path.join(workdir, 'results.jsonl')}.", ""]
    configs = {r["cell"]: r.get("config") for r in rows}
    configs_path = os.path.join(out, "resolved_configs.json")
    _write_text(configs_path, json.dumps(configs, indent=1, sort_keys=True) + "\n")
    md += _stamp_md(now, stamps, len(rows), len(latest), os.path.relpath(configs_path, out))
    if done is not None and done.finished < done.total:
        tex += [f"% INTERIM: {done.finished} of the definition's {done.total} cells had finished."]
    tex += ["% Reproducibility stamp:", *[f"% {line}" for line in _stamp_lines(now, stamps)]]
    written["md"] = os.path.join(out, "report.md")
    written["tex"] = os.path.join(out, "report.tex")
    written["configs"] = configs_path
    _write_text(written["md"], "\n".join(md) + "\n")
    _write_text(written["tex"], "\n".join(tex) + "\n")
    written["selections"] = sels
    return written


REFERENCES = ("full", "lora")   # the differences every row is reported against
MAJORITY = "majority"           # the class-prior baseline's variant (peftjax/grid/baselines.py)


def _predictions(s: Selection) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """(predictions (seeds, n), labels (n,), seeds) of a selection's test split, or None."""
    rows = [r for r in s.rows if (r.get("test_predictions") or {}).get("predictions")]
    if not rows:
        return None
    labels = np.frombuffer(rows[0]["test_predictions"]["labels"].encode(), np.uint8) - ord("0")
    preds = np.stack([np.frombuffer(r["test_predictions"]["predictions"].encode(), np.uint8) - ord("0")
                      for r in rows])
    return preds.astype(np.int64), labels.astype(np.int64), [r["seed"] for r in rows]


def _edge_choices(s: Selection) -> list[str]:
    """The chosen values that lie at an end of their grid (the grid should be extended)."""
    notes = []
    keys = sorted({k for hk in s.candidates for k in json.loads(hk)})
    for key in keys:
        values = sorted({json.loads(hk).get(key) for hk in s.candidates} - {None})
        if len(values) >= 2 and key in s.hp and s.hp[key] in (values[0], values[-1]):
            end = "lowest" if s.hp[key] == values[0] else "highest"
            notes.append(f"{key.split('.')[-1]}={s.hp[key]:g} is the grid's {end}"
                         if isinstance(s.hp[key], float) else f"{key}={s.hp[key]} at the grid's {end}")
    return notes


def uncertainty_section(ts: Sequence[Selection], level: float = 0.95, draws: int = 2000,
                        min_over_majority: float | None = None) -> list[str]:
    """95% paired-bootstrap intervals (test examples × seeds; ``peftjax.grid.stats``) of each
    variant's test accuracy and macro-F1, its difference to full fine-tuning and to LoRA (marked
    * when the interval excludes 0), and tiers: variants are ranked only where intervals do not
    overlap. Rows that predict one class, and grid choices at a grid's end, are flagged.

    With a ``majority`` row, each variant's accuracy margin over it (points, with its interval)
    is a column; ``min_over_majority`` (points; the sweep definition's
    ``report.min_over_majority``) flags the rows below it and sums the check up under the table."""
    from peftjax.grid import stats

    data = {s.variant: _predictions(s) for s in ts}
    data = {v: d for v, d in data.items() if d is not None}
    if not data:
        return []
    labels = next(iter(data.values()))[1]
    if any(len(d[1]) != len(labels) or not np.array_equal(d[1], labels) for d in data.values()):
        return ["(Intervals omitted: the variants' test predictions are not over the same examples.)", ""]
    k = max(len(d[2]) for d in data.values())
    classes = int(max(labels.max(), max(d[0].max() for d in data.values()))) + 1
    draw = stats.Resamples.draw(len(labels), k, b=draws)

    def seeds_k(preds: np.ndarray) -> np.ndarray:   # a deterministic baseline repeats its one run
        return np.concatenate([preds] * (-(-k // len(preds))))[:k]

    refs = {r: seeds_k(data[r][0]) for r in REFERENCES if r in data}
    majority = seeds_k(data[MAJORITY][0]) if MAJORITY in data else None
    # The metric the variants were selected on (macro-F1 for an imbalanced task) is the one
    # differences and tiers are stated in.
    main = ts[0].metric if ts[0].metric in stats.METRICS else "accuracy"
    ivs: dict[str, dict] = {}
    for v, (preds, _, _) in data.items():
        p = seeds_k(preds)
        ivs[v] = {m: stats.interval(p, labels, m, draw, classes, level) for m in stats.METRICS}
        ivs[v]["diff"] = {r: stats.difference(p, rp, labels, main, draw, classes, level)
                          for r, rp in refs.items() if r != v}
        if majority is not None and v != MAJORITY:
            ivs[v]["over_majority"] = stats.difference(p, majority, labels, "accuracy", draw,
                                                       classes, level)
    order = list(data)
    tiers = stats.unranked_groups([ivs[v][main] for v in order])
    for s in ts:
        s.tier = tiers[order.index(s.variant)] if s.variant in order else None
    fmt = lambda iv: f"{100 * iv.estimate:.1f} [{100 * iv.low:.1f}, {100 * iv.high:.1f}]"  # noqa: E731
    dfmt = lambda iv: (f"{100 * iv.estimate:+.1f} [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}]"  # noqa: E731
                       + ("*" if iv.excludes_zero else ""))
    md = [f"Test scores with {100 * level:.0f}% paired-bootstrap intervals ({draws} resamples of the "
          f"{len(labels)} test examples × the {k} seeds). Δ: difference in {main} (points) to "
          "the reference, * where its interval excludes 0. Tier: 1 is best; variants whose "
          f"{main} intervals overlap share a tier, and so does any chain of overlapping intervals, "
          "so a variant is in a lower tier only when its interval lies entirely below every "
          "interval of each tier above — within a tier they are not ranked."
          + (" Over majority: accuracy points above the majority class (the class prior)."
             if majority is not None else ""), "",
          "| variant | tier | test accuracy | test macro-F1 | "
          + " | ".join(f"Δ vs {r}" for r in refs) + (" | over majority" if majority is not None else "")
          + " | notes |",
          "|---|---|---|---|" + "---|" * len(refs) + ("---|" if majority is not None else "") + "---|"]
    short: list[str] = []
    by_variant = {s.variant: s for s in ts}
    for v, tier in zip(order, tiers):
        preds = data[v][0]
        top = np.bincount(preds.ravel(), minlength=classes).max() / preds.size
        notes = _edge_choices(by_variant[v]) + [n for n in [by_variant[v].incomplete] if n]
        if top > 0.99:
            notes.append(f"predicts one class for {100 * top:.1f}% of examples")
        diffs = [dfmt(ivs[v]["diff"][r]) if r in ivs[v]["diff"] else "—" for r in refs]
        if majority is not None:
            over = ivs[v].get("over_majority")
            diffs.append(dfmt(over) if over is not None else "—")
            if over is not None and min_over_majority is not None and \
                    100 * over.estimate < min_over_majority:
                notes.append(f"{100 * over.estimate:.1f} points above the majority class, "
                             f"below the {min_over_majority:g} asked")
                short.append(f"{v} ({100 * over.estimate:+.1f})")
        md.append(f"| {v} | {tier + 1} | {fmt(ivs[v]['accuracy'])} | {fmt(ivs[v]['macro_f1'])} | "
                  + " | ".join(diffs) + f" | {'; '.join(notes)} |")
    md.append("")
    if majority is not None and min_over_majority is not None:
        n = sum(1 for v in order if v != MAJORITY)
        md += [f"Margin over the majority class (≥ {min_over_majority:g} accuracy points asked): "
               + (f"all {n} variants reach it." if not short else
                  f"{n - len(short)} of {n} variants reach it; below it: {', '.join(short)}."), ""]
    return md


def _order_names(names: list[str], order: Sequence[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(order)}
    return sorted(names, key=lambda v: (rank.get(v, len(rank)), v))


def _rank_plots(rows, ts: Sequence[Selection], plot_dir: str, tag: str, model: str, task: str) -> list[str]:
    """Rank ablations: each variant whose grid varies a ``*.rank`` key (best other hps on
    validation at each rank, test mean ± std); DyLoRA's rank sweep; AdaLoRA's rank allocation."""
    from peftjax.grid import plots

    paths: list[str] = []
    series = {}
    for s in ts:
        rank_keys = sorted({k for hk in s.candidates for k in json.loads(hk) if k.endswith(".rank")})
        for key in rank_keys:
            values = sorted({json.loads(hk)[key] for hk in s.candidates})
            if len(values) < 2:
                continue
            xs, ms, ss = [], [], []
            for v in values:
                sub = [x for x in select([r for r in rows if r["variant"] == s.variant
                                          and r["task"] == task and r["model"] == model], {key: v})]
                if sub:
                    mean, std = sub[0].stat(f"metrics.test.{s.metric}")
                    xs.append(v), ms.append(_scale(s.metric) * mean), ss.append(_scale(s.metric) * std)
            series[f"{s.variant} ({key.split('.')[-1]})"] = (xs, ms, ss)
    for s in ts:
        sweeps = [r.get("rank_sweep") for r in s.rows if r.get("rank_sweep")]
        if sweeps:
            ranks = sorted(set.intersection(*(set(sw["ranks"]) for sw in sweeps)), key=int)
            for split in ("test", "validation"):
                vals = np.asarray([[sw["ranks"][r][split][s.metric] for r in ranks] for sw in sweeps])
                std = vals.std(axis=0, ddof=1) if len(sweeps) > 1 else np.zeros(len(ranks))
                series[f"{s.variant} eval rank sweep ({split})"] = (
                    [int(r) for r in ranks], _scale(s.metric) * vals.mean(axis=0), _scale(s.metric) * std)
    if series:
        paths += plots.curves(series, os.path.join(plot_dir, f"rank_ablation_{tag}"), xlabel="rank",
                              ylabel=f"{ts[0].metric}", logx=True,
                              title=f"{model} × {task}: rank ablations (test unless marked)")
    for s in ts:
        ranks = s.first("rank_allocation")
        budget = s.first("rank_budget") or {}
        if ranks and budget.get("final") != budget.get("target", budget.get("final")):
            # The schedule had not reached its target budget: the pattern is a mid-pruning
            # snapshot, not the allocation AdaLoRA arrives at, so it is not plotted.
            log.warning("%s on %s: rank budget %s of target %s at the end; allocation not plotted",
                        s.variant, task, budget.get("final"), budget.get("target"))
            continue
        if ranks:
            paths += plots.rank_allocation_heatmap(
                ranks, os.path.join(plot_dir, f"rank_allocation_{tag}_{s.variant}"),
                title=f"{s.variant} on {task}: final rank allocation (seed {s.rows[0]['seed']})")
    return paths


def _sensitivity_plot(ts: Sequence[Selection], plot_dir: str, tag: str, model: str,
                      task: str) -> list[str]:
    """Validation score against the one numeric hyperparameter the variants' grids vary (the
    learning rate of a per-method tuning grid), one panel per variant with its choice ringed:
    where the choice sits on its curve, and how flat the curve is around it, says whether the
    grid was wide enough and how much the rate matters. Variants whose grid varies something
    else (a baseline's smoothing) are left out."""
    from peftjax.grid import plots

    grids = {}
    for s in ts:
        hps = {hk: json.loads(hk) for hk in set(s.candidates) | set(s.diverged)}
        keys = {k for hp in hps.values() for k in hp}
        if len(keys) != 1 or len(hps) < 2:
            continue
        (key,) = keys
        xs = {hk: hp[key] for hk, hp in hps.items()}
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in xs.values()):
            continue
        points = [(xs[hk], _scale(s.metric) * val) for hk, (val, _) in s.candidates.items()
                  if not math.isnan(val)]
        if points:
            grids[s.variant] = (key, points, s, xs)
    counts: dict[str, int] = {}
    for key, *_ in grids.values():
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return []
    key = max(counts, key=counts.get)   # the key most variants tune
    panels = {}
    for variant, (k, points, s, xs) in grids.items():
        if k == key:
            done = len(xs)
            lost = [xs[hk] for hk in s.diverged if hk not in s.candidates]
            panels[variant] = {"x": [x for x, _ in points], "y": [v for _, v in points],
                               "chosen": s.hp.get(key), "diverged": lost,
                               "note": f"{done} of {s.grid_size} values run" if s.grid_size > done else ""}
    ys = [y for p in panels.values() for y in p["y"]]
    # A collapse would flatten the rest; a divergence needs a floor to be drawn on.
    spread = min(ys) < max(ys) - 15 or any(p["diverged"] for p in panels.values())
    floor = max(ys) - 15 if spread else None
    return plots.small_multiples(panels, os.path.join(plot_dir, f"sensitivity_{tag}"),
                                 xlabel=key.split(".")[-1].replace("_", " "), floor=floor,
                                 ylabel=f"validation {ts[0].metric} (selection seeds)",
                                 title=f"{model} × {task}: each variant's tuning grid (choice ringed)")


def _stamp_lines(now: dict, stamps: Sequence[dict]) -> list[str]:
    commits = sorted({(s.get("commit"), s.get("dirty")) for s in stamps}, key=str)
    lines = [f"report generated {now['date']} at commit {now.get('commit')} "
             f"(dirty: {now.get('dirty')})"]
    for c, d in commits:
        files = sorted({f for st in stamps if (st.get("commit"), st.get("dirty")) == (c, d)
                        for f in st.get("dirty_files", [])})
        lines.append(f"sweep run at commit {c} (dirty: {d}" + (
            f"; {len(files)} modified code files, listed in stamps.jsonl)" if files else ")"))
    if stamps:
        lines.append(f"sweep invocations: {len(stamps)}, first {stamps[0]['date']}, last {stamps[-1]['date']}")
        dev = stamps[-1].get("device", {})
        lines.append("device: " + ", ".join(f"{k}={v}" for k, v in dev.items() if k not in ("host", "cpu")))
        # Cells' timings compare only within one kind of machine: name every kind that ran some.
        kinds = collections.Counter(host.label(st["device"]["cpu"]) if st.get("device", {}).get("cpu")
                                    else "unrecorded" for st in stamps)
        lines.append("CPUs of the sweep's invocations: " + ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items())))
        lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in stamps[-1].get("packages", {}).items()))
    return lines


def _stamp_md(now: dict, stamps: Sequence[dict], n_ok: int, n_cells: int, configs_rel: str) -> list[str]:
    md = ["## Reproducibility", "", f"- {n_ok} finished cells of {n_cells} recorded; resolved "
          f"configs of every reported cell: `{configs_rel}` (cell id = sha256 of the resolved config)."]
    md += [f"- {line}" for line in _stamp_lines(now, stamps)]
    return md + [""]


def _write_text(path: str, text: str) -> None:
    write_text_atomic(path, text)
