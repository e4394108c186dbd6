"""Reports from a synthetic results file: honest selection, tables (md + booktabs), plots, stamp."""

import json
import os

import numpy as np

from peftjax.grid import ResultsStore
from peftjax.grid.plots import pareto_front
from peftjax.grid.report import select, uncertainty_section, write_report

TASKS = ("tweet_sentiment",)  # one task keeps the test fast; tables and plots are per task


def row(task, variant, method, seed, hp, val, test, params, **extra):
    steps = [10, 20, 30]
    return {"cell": f"{task}-{variant}-{json.dumps(hp, sort_keys=True)}-{seed}", "status": "ok",
            "model": "m", "task": task, "variant": variant, "method": method, "seed": seed, "hp": hp,
            "primary_metric": "accuracy", "task_kind": "classification",
            "metrics": {"validation": {"accuracy": val, "macro_f1": val - 0.1},
                        "test": {"accuracy": test, "macro_f1": test - 0.1}},
            "trainable_params": params, "trainable_percent": params / 1e5, "peak_memory_bytes": 5e8 + params,
            "step_time_s": 0.1 + params / 1e7, "config": {"seed": seed, "variant": variant},
            "curves": {"validation": {"step": steps, "accuracy": [val - 0.2, val - 0.1, val]}}, **extra}


def synthetic_rows():
    rows = []
    for task in TASKS:
        for seed in (0, 1, 2):
            e = 0.01 * seed
            rows.append(row(task, "full", "full", seed, {}, 0.80 + e, 0.79 + e, 1_000_000))
            # The rank 16 setting has the best *test* score but not the best validation score:
            # honest selection must pick rank 4 (best validation) and report its test score.
            for rank, val, test in ((1, 0.60, 0.60), (4, 0.75, 0.70), (16, 0.74, 0.90)):
                rows.append(row(task, "lora", "lora", seed, {"method.rank": rank},
                                val + e, test + e, 100 * rank))
            rows.append(row(task, "bitfit", "bitfit", seed, {}, 0.70 + e, 0.69 + e, 50))
            sweep = {"ranks": {str(r): {"validation": {"accuracy": 0.5 + r / 20},
                                        "test": {"accuracy": 0.5 + r / 20 + e}} for r in (1, 2, 4, 8)}}
            rows.append(row(task, "dylora", "dylora", seed, {}, 0.72 + e, 0.71 + e, 800, rank_sweep=sweep))
            ranks = {f"bert.encoder.layer.{i}.attention.self.{m}": (i + seed) % 4
                     for i in range(2) for m in ("query", "value")}
            rows.append(row(task, "adalora", "adalora", seed, {}, 0.71 + e, 0.70 + e, 900,
                            rank_allocation=ranks))
    return rows


def test_selection_uses_validation_and_reports_test_of_the_choice_only():
    sels = {(s.task, s.variant): s for s in select(synthetic_rows())}
    lora = sels[("tweet_sentiment", "lora")]
    assert lora.hp == {"method.rank": 4} and len(lora.rows) == 3
    mean, std = lora.stat("metrics.test.accuracy")
    assert np.isclose(mean, 0.71) and np.isclose(std, 0.01)  # seeds 0.70, 0.71, 0.72; ddof 1
    assert set(lora.candidates) == {'{"method.rank": 1}', '{"method.rank": 4}', '{"method.rank": 16}'}
    assert pareto_front([(1, 0.5), (10, 0.4), (10, 0.7), (100, 0.6), (1000, 0.9)]) == [0, 2, 4]


def test_report_from_synthetic_results_writes_tables_plots_and_stamp(tmp_path):
    store = ResultsStore(str(tmp_path / "results.jsonl"))
    for r in synthetic_rows():
        store.append(r)
    store.append({"cell": "x", "status": "failed", "label": "m/tweet_sentiment/vera/seed=0",
                  "variant": "vera", "task": "tweet_sentiment", "model": "m", "seed": 0, "hp": {},
                  "error": "RuntimeError: boom | bad", "traceback": "Traceback ..."})
    ResultsStore(str(tmp_path / "stamps.jsonl")).append(
        {"date": "2026-01-01T00:00:00+00:00", "commit": "abc123", "dirty": False,
         "packages": {"jax": "0.0"}, "device": {"backend": "cpu", "cpu_count": 2}})
    # A later invocation on another kind of machine (stamps record its CPU since 2026-12-06).
    zen3 = {"model_name": "AMD EPYC", "family": 25, "model": 1, "isa": ["avx2", "fma"], "cpus": 2}
    ResultsStore(str(tmp_path / "stamps.jsonl")).append(
        {"date": "2026-01-02T00:00:00+00:00", "commit": "abc123", "dirty": False,
         "packages": {"jax": "0.0"}, "device": {"backend": "cpu", "cpu_count": 2, "cpu": zen3}})
    with open(tmp_path / "sweep.json", "w") as f:
        json.dump({"definition": {"name": "synthetic", "report": {"order": ["full", "lora", "dylora",
                                                                            "adalora", "bitfit"]}}}, f)
    out = write_report(str(tmp_path), str(tmp_path / "report"), command="python scripts/sweep.py ...")
    md = open(out["md"]).read()
    tex = open(out["tex"]).read()
    assert md.startswith("# synthetic") and "Command: `python scripts/sweep.py ...`" in md
    table = md.split("## m × tweet_sentiment")[1].split("##")[0].strip().splitlines()
    assert [line.split(" | ")[0].strip("| ") for line in table[2:]] == [
        "full", "lora", "dylora", "adalora", "bitfit"]  # the definition's order
    lora = next(line for line in table if line.startswith("| lora"))
    assert "rank=4" in lora and "71.0 ± 1.0" in lora and "91" not in lora
    full = next(line for line in table if line.startswith("| full"))
    assert "**80.0 ± 1.0**" in full  # best test accuracy in bold
    bitfit = next(line for line in table if line.startswith("| bitfit"))
    assert "**50**" in bitfit  # fewest trainable params in bold
    assert "| m | tweet_sentiment | lora | rank=16 | 75.00 | 0,1,2 |  |" in md  # candidates listed
    assert "| m | tweet_sentiment | lora | rank=4 | 76.00 | 0,1,2 | yes |" in md
    assert "RuntimeError: boom \\| bad" in md
    for needle in ("commit abc123", "packages: jax 0.0", "device: backend=cpu", "report generated",
                   "resolved_configs.json",
                   "CPUs of the sweep's invocations: amd-epyc-f25m1-avx2-2cpu (1), unrecorded (1)"):
        assert needle in md, needle
    assert all(k in tex for k in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{80.0 $\pm$ 1.0}",
                                  r"tweet\_sentiment", "% sweep run at commit abc123"))
    assert tex.count(r"\begin{tabular}") == len(TASKS)
    plots = {os.path.basename(p) for p in out["plots"]}
    for task in TASKS:
        for stem in (f"pareto_m_{task}", f"curves_m_{task}", f"rank_ablation_m_{task}",
                     f"rank_allocation_m_{task}_adalora", f"sensitivity_m_{task}"):
            assert {f"{stem}.png", f"{stem}.pdf"} <= plots, stem
    assert {"memory.png", "memory.pdf", "step_time.png", "step_time.pdf"} <= plots
    assert all(os.path.getsize(p) > 1000 for p in out["plots"])
    assert "![pareto_m_tweet_sentiment](plots/pareto_m_tweet_sentiment.png)" in md
    configs = json.load(open(out["configs"]))
    assert len(configs) == len(synthetic_rows())


def test_selection_seeds_choose_on_the_selection_seed_only():
    """Two-stage tuning: rank 16 ran only on seed 0 (worse), rank 4 on seeds 0-2; the choice
    must compare them on seed 0 alone, whatever seeds 1-2 of rank 4 scored."""
    rows = [row("tweet_sentiment", "lora", "lora", 0, {"method.rank": 4}, 0.70, 0.70, 400),
            row("tweet_sentiment", "lora", "lora", 0, {"method.rank": 16}, 0.75, 0.72, 1600),
            row("tweet_sentiment", "lora", "lora", 1, {"method.rank": 4}, 0.95, 0.70, 400),
            row("tweet_sentiment", "lora", "lora", 2, {"method.rank": 4}, 0.95, 0.70, 400)]
    (all_seeds,) = select(rows)
    assert all_seeds.hp == {"method.rank": 4}        # biased: counts seeds only rank 4 ran
    (honest,) = select(rows, selection_seeds=[0])
    assert honest.hp == {"method.rank": 16}


def _preds_row(variant, seed, accuracy, labels, rng, **kw):
    p = labels.copy()
    flip = rng.random(len(labels)) > accuracy
    p[flip] = (p[flip] + 1) % 3
    r = row("tweet_sentiment", variant, variant, seed, kw.pop("hp", {}), accuracy, accuracy, 10,
            head_params=1155, **kw)
    r["test_predictions"] = {"predictions": "".join(map(str, p)), "labels": "".join(map(str, labels))}
    return r


def test_report_gives_paired_intervals_differences_tiers_and_flags(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1500)
    rows = []
    for seed in (0, 1, 2):
        rows += [_preds_row("full", seed, 0.85, labels, rng), _preds_row("lora", seed, 0.84, labels, rng),
                 _preds_row("bitfit", seed, 0.70, labels, rng)]
        for lr in (1e-3, 1e-2):   # the chosen rate is the grid's highest: flagged
            rows.append(_preds_row("vera", seed, 0.6 if lr == 1e-3 else 0.8, labels, rng,
                                   hp={"train.learning_rate": lr}))
    stuck = row("tweet_sentiment", "prefix", "prefix", 0, {}, 0.4, 0.4, 10)
    stuck["test_predictions"] = {"predictions": "0" * len(labels), "labels": "".join(map(str, labels))}
    store = ResultsStore(str(tmp_path / "results.jsonl"))
    for r in rows + [stuck]:
        store.append(r)
    md = open(write_report(str(tmp_path))["md"]).read()
    assert "paired-bootstrap intervals" in md
    lines = {line.split("|")[1].strip(): line for line in md.splitlines()
             if line.startswith("| ") and "[" in line and "]" in line and "Δ" not in line}
    assert "*" in lines["bitfit"].split("|")[5]           # clearly below full: significant
    assert lines["full"].split("|")[2].strip() == lines["lora"].split("|")[2].strip() == "1"  # same tier
    assert "learning_rate=0.01 is the grid's highest" in lines["vera"]
    assert "predicts one class for 100.0% of examples" in lines["prefix"]
    assert "also trains the task head (1,155 parameters)" in md   # the counts exclude it
    tex = open(tmp_path / "report.tex").read()
    assert r"Bold scores: the first tier of 95\% paired-bootstrap intervals" in tex
    # The score table bolds the whole first tier (full and lora overlap), not one best.
    table = {line.split("|")[1].strip(): line.split("|") for line in md.splitlines()
             if line.startswith("| ") and "±" in line}
    test_col = 5   # | variant | method | chosen hp | seeds | test accuracy | ...
    assert table["full"][test_col].strip().startswith("**") and table["lora"][test_col].strip().startswith("**")
    assert "**" not in table["bitfit"][test_col] and "**" not in table["full"][test_col + 2]


def test_intervals_state_differences_and_tiers_in_the_selection_metric(tmp_path):
    """An imbalanced task selected on macro-F1 (train.select_metric) gets its Δ and tiers in
    macro-F1, not accuracy."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 800)
    store = ResultsStore(str(tmp_path / "results.jsonl"))
    for seed in (0, 1):
        for variant, acc in (("full", 0.9), ("lora", 0.85)):
            r = _preds_row(variant, seed, acc, labels, rng)
            r["primary_metric"] = "macro_f1"
            store.append(r)
    md = open(write_report(str(tmp_path))["md"]).read()
    assert "Δ: difference in macro_f1" in md and "variants whose macro_f1 intervals overlap share a tier" in md


def test_rows_of_cells_outside_the_current_definition_are_left_out():
    """A store keeps every cell that ever finished; after a setting changes, the old cells are
    not part of the comparison (their selection would average two protocols)."""
    from peftjax.grid import sweep
    from peftjax.grid.report import current_rows

    d = {"name": "t", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0],
         "base": {"train": {"steps": 4}}, "variants": {"full": {"method": "full"}}}
    (cell,) = sweep.expand(d)
    rows = [{"cell": cell.id}, {"cell": "0123456789ab"}, {"cell": "baseline:m/t/majority"}]
    kept, dropped = current_rows(rows, d)
    assert [r["cell"] for r in kept] == [cell.id, "baseline:m/t/majority"] and dropped == 1
    assert current_rows(rows, None) == (rows, 0)
    # A row recorded under an older id whose config hashes to a current cell (a store written
    # before a neutral field existed, e.g. a committed copy) is the same cell.
    stale = {"cell": "fedcba987654", "config": cell.config, "method": "full", "variant": "full"}
    assert current_rows([stale], d) == ([stale], 0)
    # A variant renamed in the definition keeps its cells (the id is the config, not the name);
    # its rows are reported under the new name.
    renamed = {**d, "variants": {"full_ft": {"method": "full"}}}
    (kept,), _ = current_rows([{**stale, "cell": cell.id}], renamed)
    assert kept["variant"] == "full_ft" and kept["cell"] == cell.id


def test_adalora_allocation_is_plotted_only_once_its_budget_reached_the_target(tmp_path):
    ranks = {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.attention.self.value": 1}
    for final, plotted in ((3, True), (6, False)):
        out = tmp_path / str(final)
        store = ResultsStore(str(out / "results.jsonl"))
        store.append(row("tweet_sentiment", "adalora", "adalora", 0, {}, 0.7, 0.7, 900, rank_allocation=ranks,
                         rank_budget={"init": 8, "target": 3, "final": final}))
        written = write_report(str(out))
        assert any("rank_allocation" in p for p in written["plots"]) is plotted


def test_a_choice_made_before_its_grid_finished_is_flagged():
    """An interim report (a sweep still running) chooses among the grid values finished so far;
    a pending value may still win, so the row says so."""
    from peftjax.grid.report import Selection, _hp_key, set_expectations

    d = {"name": "t", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0],
         "base": {"train": {"steps": 4}},
         "variants": {"a": {"method": "lora", "grid": {"train": {"learning_rate": [1e-3, 2e-3, 3e-3]}}}}}
    keys = [_hp_key({"train.learning_rate": lr}) for lr in (1e-3, 2e-3, 3e-3)]
    sel = Selection("tiny-bert", "tweet_sentiment", "a", "lora", "accuracy", True,
                    {"train.learning_rate": 1e-3}, [{"seed": 0}], {keys[0]: (0.7, [0])})
    set_expectations(d, [sel])
    assert sel.incomplete == "selection incomplete: 1 of 3 grid values finished"
    sel.candidates = {k: (0.7, [0]) for k in keys}
    assert sel.incomplete == ""
    set_expectations({}, [sel])
    assert (sel.grid_size, sel.seeds_expected, sel.incomplete) == (0, 0, "")


def test_an_interim_report_says_how_much_of_its_definition_is_left():
    """A report written while the sweep runs counts the definition's cells (two-stage tuning's
    later seeds included), names what is left per variant, and marks rows missing seeds."""
    from peftjax.grid import sweep
    from peftjax.grid.report import progress, set_expectations

    d = {"name": "t", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"], "seeds": [0, 1],
         "selection_seeds": [0], "base": {"train": {"steps": 4}},
         "variants": {"tuned": {"method": "lora", "grid": {"train": {"learning_rate": [1e-3, 3e-3]}}},
                      "plain": {"method": "full"}}}
    cells = {(c.variant, c.hp.get("train.learning_rate"), c.seed): c for c in sweep.expand(d)}

    def done(variant, lr, seed, val):
        c = cells[(variant, lr, seed)]
        return {**row("tweet_sentiment", variant, c.method, seed, c.hp, val, val, 10),
                "cell": c.id, "model": "tiny-bert", "config": c.config}

    rows = [done("tuned", 1e-3, 0, 0.7), done("plain", None, 0, 0.8)]
    p = progress(d, rows)
    # tuned: 2 values on seed 0, then seed 1 at the chosen one; plain: seeds 0 and 1.
    assert (p.finished, p.total) == (2, 5)
    assert p.pending == {("tiny-bert", "tweet_sentiment"): {"tuned": 2, "plain": 1}}
    text = "\n".join(p.summary())
    assert "2 of the definition's 5 cells" in text and "tuned (2), plain (1)" in text
    sels = {s.variant: s for s in select(rows, selection_seeds=[0])}
    set_expectations(d, list(sels.values()))
    assert sels["tuned"].incomplete == ("selection incomplete: 1 of 2 grid values finished; "
                                        "1 of 2 seeds finished")
    assert sels["plain"].incomplete == "1 of 2 seeds finished"
    # 3e-3 wins on validation; its seed 1 is then the only later cell, and once every cell has
    # finished the report is no longer interim.
    rows += [done("tuned", 3e-3, 0, 0.75), done("plain", None, 1, 0.8), done("tuned", 3e-3, 1, 0.75)]
    p = progress(d, rows)
    assert (p.finished, p.total, p.summary()) == (5, 5, [])
    assert progress({}, rows) is None


def test_margin_over_the_majority_class_is_a_column_and_a_checked_floor(tmp_path):
    """Issue 18's floor: every chosen row ≥ 15 accuracy points above the majority class on
    tweet_sentiment (the definition's report.min_over_majority); rows below are named."""
    rng = np.random.default_rng(2)
    labels = rng.choice(3, 1200, p=[0.45, 0.3, 0.25])
    store = ResultsStore(str(tmp_path / "results.jsonl"))
    for seed in (0, 1):
        for variant, acc in (("full", 0.85), ("lora", 0.84), ("weak", 0.5)):
            store.append(_preds_row(variant, seed, acc, labels, rng))
    prior = row("tweet_sentiment", "majority", "majority", 0, {}, 0.45, 0.45, 0)
    prior["cell"] = "baseline:majority"
    prior["test_predictions"] = {"predictions": "0" * len(labels), "labels": "".join(map(str, labels))}
    store.append(prior)
    with open(tmp_path / "sweep.json", "w") as f:
        json.dump({"definition": {"report": {"min_over_majority": {"tweet_sentiment": 15}}}}, f)
    md = open(write_report(str(tmp_path))["md"]).read()
    header = next(line for line in md.splitlines() if line.startswith("| variant | tier"))
    assert "over majority" in header
    lines = {line.split("|")[1].strip(): line for line in md.splitlines()
             if line.startswith("| ") and "[" in line and "]" in line}
    col = [c.strip() for c in header.split("|")].index("over majority")
    majority_acc = np.mean(labels == 0)
    full_over = float(lines["full"].split("|")[col].split()[0])
    assert abs(full_over - 100 * (0.85 - majority_acc)) < 3 and "*" in lines["full"].split("|")[col]
    assert "below the 15 asked" in lines["weak"] and "below the 15" not in lines["full"]
    assert "2 of 3 variants reach it; below it: weak (+" in md
    # Without the floor: the column, no verdict.
    md = "\n".join(uncertainty_section(select(store.read()), draws=200))
    assert "over majority" in md and "Margin over the majority class" not in md


def test_the_grid_table_lists_values_in_numeric_order():
    from peftjax.grid.report import _hp_key, _hp_order

    keys = [_hp_key({"train.learning_rate": lr}) for lr in (3e-4, 1e-5, 0.1, 3e-5, 1e-4)]
    ordered = [json.loads(k)["train.learning_rate"] for k in sorted(keys, key=_hp_order)]
    assert ordered == [1e-5, 3e-5, 1e-4, 3e-4, 0.1]
    mixed = [_hp_key({"method.init": "pissa"}), _hp_key({"method.init": "default"})]
    assert [json.loads(k)["method.init"] for k in sorted(mixed, key=_hp_order)] == ["default", "pissa"]
