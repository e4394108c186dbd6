"""The convergence check: a longer rerun of the chosen settings against the grid's choice."""

import json

from peftjax.grid import ResultsStore, convergence
from peftjax.grid.report import write_report


def run_row(variant, lr, seed, val, steps, curve, **extra):
    hp = extra.pop("hp", {"train.learning_rate": lr})
    return {"cell": f"{variant}-{lr}-{seed}-{steps}", "status": "ok", "model": "m",
            "task": "tweet_sentiment", "variant": variant, "method": variant, "seed": seed, "hp": hp,
            "primary_metric": "accuracy", "steps": steps,
            "metrics": {"validation": {"accuracy": val}, "test": {"accuracy": val}},
            "config": {"train": {"learning_rate": lr, "steps": steps}},
            "curves": {"validation": {"step": [steps // 2, steps], "accuracy": curve}}, **extra}


def grid_rows():
    """full: 1e-4 wins on seed 0 (0.80); lora: 1e-3 wins (0.75); seeds 1-2 at the choice only."""
    rows = [run_row("full", 1e-5, 0, 0.70, 400, [0.6, 0.7]), run_row("full", 1e-4, 0, 0.80, 400, [0.7, 0.8]),
            run_row("lora", 1e-4, 0, 0.70, 400, [0.6, 0.7]), run_row("lora", 1e-3, 0, 0.75, 400, [0.7, 0.75])]
    # Seeds 1-2 score higher; the check compares with the score the choice was made on (seed 0).
    rows += [run_row("full", 1e-4, s, 0.90, 400, [0.8, 0.9]) for s in (1, 2)]
    return rows


def test_gain_is_points_over_the_chosen_setting_and_flags_an_unconverged_or_wrong_rerun():
    long = [run_row("full", 1e-4, 0, 0.805, 1600, [0.79, 0.805], hp={}),   # +0.5: converged
            run_row("lora", 1e-3, 0, 0.78, 1600, [0.76, 0.78], hp={})]      # +3.0: not converged
    found = {c.variant: c for c in convergence.checks(grid_rows(), long, selection_seeds=[0])}
    assert abs(found["full"].gain - 0.5) < 1e-9 and found["full"].same_setting
    assert abs(found["lora"].gain - 3.0) < 1e-9
    lines, _ = convergence.section(list(found.values()))
    table = {line.split("|")[3].strip(): line for line in lines if line.startswith("| m |")}
    assert table["full"].rstrip().endswith("| yes |") and "**no**" in table["lora"]
    # A rerun at another rate checks nothing: said so, never "yes".
    wrong = convergence.checks(grid_rows(), [run_row("full", 3e-4, 0, 0.80, 1600, [0.7, 0.8], hp={})], [0])
    (line,) = [x for x in convergence.section(wrong)[0] if x.startswith("| m |")]
    assert "not comparable" in line and "learning_rate=0.0003" in line


def test_report_gains_a_convergence_section_and_plot(tmp_path):
    main, long = tmp_path / "grid", tmp_path / "long"
    for folder, rows in ((main, grid_rows()),
                         (long, [run_row("full", 1e-4, 0, 0.801, 1600, [0.79, 0.801], hp={})])):
        folder.mkdir()
        store = ResultsStore(str(folder / "results.jsonl"))
        for r in rows:
            store.append(r)
    (main / "sweep.json").write_text(json.dumps({"definition": {"selection_seeds": [0]}}))
    written = write_report(str(main), str(tmp_path / "out"), convergence=str(long),
                           convergence_command="python scripts/sweep.py --config=c.py")
    md = open(written["md"]).read()
    assert "## Convergence of the budget" in md and "`python scripts/sweep.py --config=c.py`" in md
    assert "| m | tweet_sentiment | full | learning_rate=0.0001 | 400 | 80.00 | 1600 | 80.10 | +0.10 | yes |" in md
    assert any(p.endswith("convergence_tweet_sentiment.png") for p in written["plots"])


def test_rows_of_an_earlier_check_in_the_same_folder_are_not_read(tmp_path):
    """A check rerun at a new budget in the same folder keeps the old long runs in its store;
    only the cells of its current definition (sweep.json) are compared."""
    from peftjax.grid import sweep

    d = {"name": "long", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0],
         "base": {"train": {"steps": 1600}}, "variants": {"full": {"method": "full"}}}
    (cell,) = sweep.expand(d)
    store = ResultsStore(str(tmp_path / "results.jsonl"))
    store.append({**run_row("full", 1e-4, 0, 0.80, 400, [0.7, 0.8], hp={}), "config": {"train": {"steps": 400}}})
    store.append({**run_row("full", 1e-4, 0, 0.81, 1600, [0.8, 0.81], hp={}), "cell": cell.id,
                  "config": cell.config})
    (tmp_path / "sweep.json").write_text(json.dumps({"definition": d}))
    assert [r["steps"] for r in convergence.read(str(tmp_path))] == [1600]
