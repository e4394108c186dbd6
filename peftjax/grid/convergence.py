"""Has the comparison's budget converged? The strongest methods rerun at a multiple of it.

A comparison at a fixed budget ranks methods by how fast they learn as much as by how well; it
is a comparison of *methods* only if the strongest baselines have stopped improving by the end
of the budget. The check (issue 18's protocol): rerun full fine-tuning and LoRA, at the learning
rate each chose on validation in the main grid and its selection seed, for ``k``× the steps (the
same schedule shape: warm-up ratio, linear decay to 0 over the longer run), and compare the best
validation score of each run:

    gain = best_val(k × budget) − best_val(budget)      (points of the primary metric)

The budget has converged for a method when ``gain < tolerance`` (1 point). Only validation is
used: test stays evaluated once, in the main grid.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

from peftjax.grid.report import _get, _hp_key, _hp_text, _scale, select


@dataclasses.dataclass(frozen=True)
class Check:
    """One (model, task, variant): the main grid's chosen run against its long rerun."""

    model: str
    task: str
    variant: str
    metric: str
    chosen_hp: dict
    long_hp: dict
    steps: int
    long_steps: int
    val: float            # best validation score of the chosen setting, selection seed(s)
    long_val: float       # best validation score of the long run
    curves: tuple         # ((steps, values) of the budget run, (steps, values) of the long run)

    @property
    def gain(self) -> float:
        """Points gained by the longer run (positive: the budget left score on the table)."""
        return _scale(self.metric) * (self.long_val - self.val)

    @property
    def same_setting(self) -> bool:
        """The long run used the chosen hyperparameters (anything else checks the wrong run)."""
        return self.chosen_hp == self.long_hp


def _curve(rows: Sequence[dict], metric: str) -> tuple[list, list]:
    c = _get(rows[0], "curves.validation") or {}
    return list(c.get("step", [])), list(c.get(metric, []))


def checks(main_rows: Sequence[dict], long_rows: Sequence[dict],
           selection_seeds: Sequence[int] | None = None) -> list[Check]:
    """Pairs every (model, task, variant) of the long runs with the main grid's choice for it.

    ``main_rows``/``long_rows``: finished results rows (``report.finished_rows``). The main
    side's score is the chosen setting's mean validation over ``selection_seeds`` (the score
    the choice was made on); the long side's over the seeds it ran.
    """
    chosen = {(s.model, s.task, s.variant): s for s in select(main_rows, selection_seeds=selection_seeds)}
    out = []
    for long in select(long_rows):
        key = (long.model, long.task, long.variant)
        if key not in chosen:
            continue
        main = chosen[key]
        main_val = main.candidates[_hp_key(main.hp)][0]
        picked = [r for r in main.rows if selection_seeds is None or r["seed"] in selection_seeds]
        # The long run's values of the chosen keys, wherever its definition set them (a grid,
        # or a per-task override, which records no hp).
        long_hp = {k: _get(long.rows[0], f"config.{k}") for k in main.hp}
        out.append(Check(long.model, long.task, long.variant, main.metric, main.hp, long_hp,
                         int(_get(main.rows[0], "steps") or 0), int(_get(long.rows[0], "steps") or 0),
                         main_val, long.stat(f"metrics.validation.{long.metric}")[0],
                         (_curve(picked or main.rows, main.metric), _curve(long.rows, long.metric))))
    return out


def section(found: Sequence[Check], plot_dir: str | None = None, tolerance: float = 1.0,
            command: str | None = None) -> tuple[list[str], list[str]]:
    """Markdown lines of the convergence table (and plots of each pair of curves, when
    ``plot_dir`` is given); returns ``(lines, plot paths)``."""
    from peftjax.grid import plots

    if not found:
        return [], []
    md = ["## Convergence of the budget", "",
          "Full fine-tuning and LoRA rerun at the learning rate each chose on validation, for "
          "a multiple of the budget (same warm-up ratio, linear decay over the longer run). The "
          f"budget has converged for a method when the longer run gains < {tolerance:g} point of "
          "best validation score (peftjax/grid/convergence.py)." + (f" Command: `{command}`." if command else ""),
          "", "| model | task | variant | setting | steps | best val | steps (long) | best val (long) | gain | converged |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    paths: list[str] = []
    for c in found:
        k = _scale(c.metric)
        ok = c.same_setting and c.gain < tolerance
        verdict = "yes" if ok else ("**no**" if c.same_setting else
                                    f"**not comparable**: the long run used {_hp_text(c.long_hp)}")
        md.append(f"| {c.model} | {c.task} | {c.variant} | {_hp_text(c.chosen_hp)} | {c.steps} | "
                  f"{k * c.val:.2f} | {c.long_steps} | {k * c.long_val:.2f} | {c.gain:+.2f} | {verdict} |")
    md.append("")
    if plot_dir:
        for task in sorted({c.task for c in found}):
            series, styles = {}, {}
            for j, c in enumerate(c for c in found if c.task == task):
                # One colour per variant: its budget run solid with markers, its long run dashed.
                colour = plots.line_style(j)["color"]
                for tag, (xs, ys), look in zip(
                        (f"{c.steps} steps", f"{c.long_steps} steps"), c.curves,
                        ({"linestyle": "-", "marker": "o"}, {"linestyle": "--", "marker": None})):
                    if xs and ys and not any(math.isnan(y) for y in ys):
                        label = f"{c.variant}, {tag}"
                        series[label] = (xs, [k * y for y in ys], [0.0] * len(ys))
                        styles[label] = {"color": colour, **look}
            if series:
                paths += plots.curves(series, os.path.join(plot_dir, f"convergence_{task}"),
                                      xlabel="step", ylabel=f"validation {found[0].metric}",
                                      title=f"{task}: the budget vs a longer run (chosen rates)",
                                      styles=styles)
    return md, paths


def read(workdir: str) -> list[dict]:
    """Finished rows of a sweep folder's results store that belong to its current definition
    (``sweep.json``): an earlier check at another budget left rows in the same store, and
    mixing them in would compare the wrong long run."""
    from peftjax.grid.report import current_rows, finished_rows, read_definition
    from peftjax.grid.results import ResultsStore

    path = os.path.join(workdir, "results.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the convergence sweep first "
                                "(experiments/<name>/convergence.py's docstring has the command)")
    return current_rows(finished_rows(ResultsStore(path).read()), read_definition(workdir))[0]
