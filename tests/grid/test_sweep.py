"""Sweep expansion: counts, stable ids, validation before anything runs, committed definitions."""

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest

from peftjax.grid import sweep
from tests.helpers import ROOT


def definition(**changes):
    d = {
        "name": "t", "models": ["tiny-bert"], "tasks": ["tweet_sentiment", "tweet_polarity"],
        "seeds": [0, 1], "base": {"train": {"steps": 4}},
        "variants": {
            "lora": {"method": "lora", "overrides": {"method": {"alpha": 16.0}},
                     "grid": {"method": {"rank": [1, 2, 4]}, "train": {"learning_rate": [1e-3, 2e-3]}}},
            "full": {"method": "full", "task_overrides": {"tweet_polarity": {"train": {"steps": 6}}}},
            "dylora": {"method": "dylora", "rank_sweep": [1, 8]},
        },
    }
    d.update(changes)
    return d


def test_expansion_counts_order_and_resolved_values():
    cells = sweep.expand(definition())
    # 2 tasks × (3·2 lora + 1 full + 1 dylora) × 2 seeds
    assert len(cells) == 2 * (6 + 1 + 1) * 2
    assert len({c.id for c in cells}) == len(cells)
    lora = [c for c in cells if c.variant == "lora" and c.task == "tweet_sentiment"]
    assert {(c.hp["method.rank"], c.hp["train.learning_rate"], c.seed) for c in lora} == {
        (r, lr, s) for r in (1, 2, 4) for lr in (1e-3, 2e-3) for s in (0, 1)}
    c = lora[0]
    assert c.config["method"]["alpha"] == 16.0 and c.config["train"]["steps"] == 4
    assert c.config["method"]["rank"] == c.hp["method.rank"] and c.config["seed"] == c.seed
    full = {c.task: c.config["train"]["steps"] for c in cells if c.variant == "full"}
    assert full == {"tweet_sentiment": 4, "tweet_polarity": 6}  # per-task override, this variant only
    assert all(c.config["train"]["steps"] == 4 for c in cells
               if c.variant == "lora" and c.task == "tweet_polarity")
    assert [c.rank_sweep for c in cells if c.variant == "dylora"][0] == (1, 8)
    assert "lora" in c.label and "rank=" in c.label and "seed=" in c.label


def test_cell_ids_are_stable_and_follow_the_config(monkeypatch):
    from peftjax.train import compose

    built = []
    real_build = compose.build
    monkeypatch.setattr(compose, "build", lambda config, **kw: built.append(compose.model_key(config))
                        or real_build(config, **kw))
    monkeypatch.setattr(sweep, "_ABSTRACT_MODELS", {})
    a, b = sweep.expand(definition()), sweep.expand(definition())
    assert [c.id for c in a] == [c.id for c in b]
    # The value checks' abstract models are built once per distinct model in the process (tiny-bert
    # with tweet_sentiment's 3 labels and tweet_polarity's 2), not once per expansion.
    assert len(built) == len(set(built)) == 2
    # sha256 of the sorted compact JSON: the same on every machine and Python run.
    assert sweep.cell_id({"b": {"y": [1, 2]}, "a": 1.5}) == sweep.cell_id({"a": 1.5, "b": {"y": [1, 2]}})
    expected = hashlib.sha256(b'{"config":{"a":1.5,"b":{"y":[1,2]}}}').hexdigest()[:12]
    assert sweep.cell_id({"a": 1.5, "b": {"y": [1, 2]}}) == expected == "9a9fc7d71fc7"
    # Display-only keys do not change a cell; any real setting does.
    config = a[0].config
    quiet = copy.deepcopy(config)
    quiet["train"]["progress"] = not config["train"]["progress"]
    assert sweep.cell_id(quiet) == a[0].id
    other = copy.deepcopy(config)
    other["train"]["learning_rate"] *= 2
    assert sweep.cell_id(other) != a[0].id
    roundtrip = sweep.Cell.from_dict(a[0].to_dict())
    assert roundtrip == a[0]


@pytest.mark.parametrize("change, expect", [
    (lambda d: d["variants"]["full"].update(method="fulll"),
     ["cell tiny-bert/tweet_sentiment/full", "unknown method 'fulll'", "variants.full.method"]),
    (lambda d: d.update(models=["tiny-bertt"]), ["unknown model 'tiny-bertt'", "'models'"]),
    (lambda d: d.update(tasks=["tweet_sentimentt"]), ["unknown task 'tweet_sentimentt'", "'tasks'"]),
    (lambda d: d["variants"]["lora"]["grid"]["method"].update(rnk=[1]),
     ["tiny-bert/tweet_sentiment/lora[", "seed=0", "variants.lora.grid", "unknown config key 'method.rnk'"]),
    (lambda d: d["base"]["train"].update(stepz=3), ["tiny-bert/tweet_sentiment/", "'base'", "'train.stepz'"]),
    (lambda d: d["variants"]["lora"]["grid"]["method"].update(rank=["a"]),
     ["lora[", "'method.rank' cannot take 'a'"]),
    (lambda d: d["variants"]["full"].update(overrides={"method": {"rank": 2}}),
     ["full/seed=0", "variants.full.overrides", "'method.rank'"]),
    (lambda d: d["variants"]["full"].update(rank_sweep=[1]), ["'variants.full.rank_sweep' needs a method that can be evaluated at other ranks (dylora), not 'full'"]),
    (lambda d: d["variants"]["dylora"].update(rank_sweep=[16]), ["dylora/seed=0", "1..method.rank=8"]),
    (lambda d: d["variants"]["lora"]["grid"]["method"].update(alpha=[16.0, 16]),
     ["resolves to the same config"]),
    (lambda d: d["variants"]["lora"].update(grd={}), ["variants.lora.grd"]),
    # values, not only keys, are checked at expansion (--dry_run), as the run would check them
    (lambda d: d["variants"]["lora"]["grid"]["method"].update(rank=[0]),
     ["lora[", "lora.rank=0 is invalid"]),
    (lambda d: d["base"]["train"].update(learning_rate=float("nan")), ["train.learning_rate=nan is invalid"]),
    (lambda d: d["base"]["train"].update(steps=0), ["train.steps=0 is invalid"]),
    (lambda d: d["variants"]["full"].update(method="lora", overrides={"method": {"targets": "nosuch"}}),
     ["full/seed=0", "matches no module", "available module paths"]),
])
def test_bad_definitions_fail_at_expansion_naming_cell_and_field(change, expect):
    d = definition()
    change(d)
    with pytest.raises(sweep.GridError) as e:
        sweep.expand(d)
    for text in expect:
        assert text in str(e.value), (text, str(e.value))


def prefix_tuning_available() -> bool:
    from peftjax import methods

    return ("prefix_tuning" in methods.registered()
            and os.path.exists(os.path.join(ROOT, "configs/methods/prefix_tuning.py")))


def test_committed_definitions_expand():
    """tweet_methods (every method tuned on sentiment, a subset on polarity; two-stage tuning)
    and glue_roberta_base (LoRA Table 9)."""
    tweets = sweep.load_definition(os.path.join(ROOT, "experiments/tweet_methods/grid.py"))
    cells = sweep.expand(tweets)
    expected = {"full", "linear_probe", "lora", "dora", "adalora", "dylora", "vera", "adapter",
                "prompt_tuning", "prefix_tuning", "bitfit", "child_tuning_f", "child_tuning_d",
                "fishmask", "lora_plus", "lora_fa", "olora", "lora_ga", "hira", "ia3", "ln_tuning"}
    assert {c.method for c in cells} == expected
    by_task = {t: {c.variant for c in cells if c.task == t} for t in ("tweet_sentiment", "tweet_polarity")}
    assert len(by_task["tweet_sentiment"]) == 27 and by_task["tweet_polarity"] == {
        "full", "linear_probe", "lora", "lora_qv", "adapter_houlsby", "bitfit", "prompt_tuning"}
    # 3 learning rates x 3 seeds before selection; AdaLoRA's, Pfeiffer adapters',
    # Child-tuning_D's, _F's, HiRA's, (IA)3's, LN tuning's, LoRA-FA's, LoRA-GA's, prefix
    # tuning's and VeRA's grids (sentiment), query/value LoRA's, full fine-tuning's, BitFit's
    # and prompt tuning's (both tasks) were extended by one value each; LoRA on NF4 and int8
    # bases (issue 20) at LoRA's chosen rate run their 3 seeds directly
    assert len(cells) == ((25 + 7) * 3 + 19) * 3 + 2 * 3
    run, deferred = sweep.expand_with_selection(tweets)
    assert len(run) == (25 + 7) * 3 + 19 + 2 * 3 and {c.seed for c in run} == {0, 1, 2}
    assert len({(c.variant, c.task, c.seed) for c in deferred}) == (25 + 7) * 2
    by = {c.variant: c.config for c in cells}
    assert by["rslora"]["method"]["use_rslora"] and by["pissa"]["method"]["init"] == "pissa"
    # The low-rank family adapts every linear layer; lora_qv keeps the paper's query/value.
    all_linear = {v for v, c in by.items() if c["method"].get("targets") == by["lora"]["method"]["targets"]}
    assert {"rslora", "dora", "pissa", "adalora", "dylora", "vera", "lora_plus", "lora_fa", "olora",
            "lora_ga", "hira", "lora_nf4", "lora_int8"} <= all_linear and "lora_qv" not in all_linear
    assert by["adapter_pfeiffer"]["method"]["placement"] == "pfeiffer"
    assert by["adapter_houlsby"]["method"]["train_layernorm"] is True
    assert by["full"]["train"]["test_limit"] == 0 and by["full"]["train"]["eval_limit"] == 0   # whole splits

    glue = sweep.load_definition(os.path.join(ROOT, "experiments/glue_roberta_base/grid.py"))
    cells = sweep.expand(glue)
    assert len(cells) == 8 * 5 * (1 + 3)
    mrpc = [c.config for c in cells if c.task == "mrpc_heldout" and c.variant == "lora"][0]
    # LoRA Table 9: MRPC 30 epochs of batch 16 at 4e-4, r 8, alpha 8, max length 512; an epoch
    # is 90% of MRPC's 3,668 training pairs (10% held out for validation).
    assert mrpc["train"]["steps"] == 30 * 207 and mrpc["train"]["learning_rate"] == 4e-4
    assert mrpc["task"]["name"] == "mrpc_heldout"
    assert (mrpc["method"]["rank"], mrpc["method"]["alpha"], mrpc["task"]["max_length"]) == (8, 8.0, 512)
    assert mrpc["train"]["batch_size"] == 16 and mrpc["train"]["warmup_ratio"] == 0.06


def test_find_cell_wants_exactly_one_label_containing_the_text():
    cells = sweep.expand(definition())
    one = sweep.find_cell(cells, "polarity/lora[rank=2,learning_rate=0.002]/seed=1")
    assert (one.task, one.variant, one.seed) == ("tweet_polarity", "lora", 1)
    assert one.hp == {"method.rank": 2, "train.learning_rate": 2e-3}
    with pytest.raises(ValueError, match=r"--cell='lora\[' matches \d+ cells \(one needed\); they are:"):
        sweep.find_cell(cells, "lora[")
    with pytest.raises(ValueError, match=r"--cell='dora' matches 0 cells \(one needed\); labels look like:\n  tiny-bert/"):
        sweep.find_cell(cells, "dora")


def test_dry_run_cli_lists_cells_with_count():
    out = subprocess.run([sys.executable, "scripts/sweep.py", "--config=experiments/glue_roberta_base/grid.py",
                          "--dry_run", "--only=/mnli_heldout/lora/seed=[01]$"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("2 cells (1 variants, 1 tasks, 1 models, 2 seeds)")
    assert [line.split()[-1] for line in lines[:-1]] == [
        f"roberta-base/mnli_heldout/lora/seed={s}" for s in (0, 1)]
    # Without --only, and --only matching nothing: what the script prints, in this process (an
    # interpreter start with its imports is 7-8 s of CPU; one is enough for the command line).
    cells, deferred = sweep.expand_with_selection(
        sweep.load_definition(os.path.join(ROOT, "experiments", "glue_roberta_base", "grid.py")))
    listing = sweep.describe(sweep.select(None, cells, deferred)[0]).splitlines()
    assert listing[-1] == "160 cells (2 variants, 8 tasks, 1 models, 5 seeds)" and not deferred
    assert any(line.endswith("  roberta-base/mnli_heldout/lora/seed=0") for line in listing) and len(listing) == 161
    with pytest.raises(ValueError, match=r"--only='no-such-cell' matches no cell; labels look like roberta-base/"):
        sweep.select("no-such-cell", cells, deferred)
    with pytest.raises(ValueError, match=r"--only='\[' is not a regular expression"):
        sweep.select("[", cells, deferred)


def test_every_experiment_definition_dry_runs():
    """Every sweep definition under experiments/ expands with its values checked (as --dry_run):
    a definition broken by a later change fails here (tweet_methods/smoke.py did, after the
    LoRA rank grid was removed)."""
    import glob

    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*", "*.py"))):
        source = open(path).read()
        if "def get_config" not in source or "DEFINE_" in source:
            continue  # a script with flags (experiments/decoder_tweets/run.py), not a definition
        definition = sweep.load_definition(path)
        if "variants" in definition:
            assert sweep.expand(definition), path
            found.append(os.path.relpath(path, ROOT))
    assert {"experiments/tweet_methods/grid.py", "experiments/tweet_methods/smoke.py",
            "experiments/tweet_methods/convergence.py",
            "experiments/glue_roberta_base/grid.py"} <= set(found)


def test_two_stage_selection_defers_the_other_seeds_until_the_choice():
    d = definition()
    d["selection_seeds"] = [0]
    d["tasks"] = ["tweet_sentiment"]
    d.pop("task_overrides", None)
    d["variants"]["full"].pop("task_overrides", None)
    cells, deferred = sweep.expand_with_selection(d)
    lora = [c for c in cells if c.variant == "lora"]
    assert {c.seed for c in lora} == {0} and len({json.dumps(c.hp) for c in lora}) > 1
    assert deferred and all(c.variant == "lora" and c.seed != 0 for c in deferred)
    assert {c.seed for c in cells if c.variant == "full"} == set(d["seeds"])   # no grid: all seeds
    # the selection cells finish; the best validation score picks the hp run on the other seeds
    best = max(lora, key=lambda c: json.dumps(c.hp))
    results = [{"cell": c.id, "status": "ok", "model": c.model, "task": c.task, "variant": c.variant,
                "method": c.method, "seed": c.seed, "hp": c.hp, "primary_metric": "accuracy",
                "metrics": {"validation": {"accuracy": 0.9 if c is best else 0.5}}} for c in lora]
    more, deferred = sweep.expand_with_selection(d, results)
    assert not deferred
    others = [c for c in more if c.variant == "lora" and c.seed != 0]
    assert others and all(c.hp == best.hp for c in others)
    with pytest.raises(sweep.GridError, match="selection_seeds"):
        sweep.expand({**definition(), "selection_seeds": [7]})


def test_quantization_fields_at_their_neutral_defaults_keep_cell_ids():
    """model.quant / model.double_quant (issue 20) were added after grids had run: a float base
    must keep the ids cells had without the fields; a quantized base is another cell."""
    config = {"model": {"name": "all-MiniLM-L6-v2"}, "method": {"name": "lora", "rank": 8}}
    with_fields = copy.deepcopy(config)
    with_fields["model"].update(quant="none", double_quant=True)
    assert sweep.cell_id(with_fields) == sweep.cell_id(config)
    ids = {sweep.cell_id(config)}
    for quant, dq in (("nf4", True), ("nf4", False), ("int8", True), ("none", False)):
        cfg = copy.deepcopy(config)
        cfg["model"].update(quant=quant, double_quant=dq)
        ids.add(sweep.cell_id(cfg))
    assert len(ids) == 5
    # model.quant_matmul (the fused kernel, added later again) at "auto": the quantized cells too
    nf4 = copy.deepcopy(config)
    nf4["model"].update(quant="nf4", double_quant=True)
    assert sweep.cell_id({**nf4, "model": {**nf4["model"], "quant_matmul": "auto"}}) == sweep.cell_id(nf4)


def test_report_fields_are_checked_and_do_not_change_cells():
    plain = {c.id for c in sweep.expand(definition())}
    floor = {"order": ["full", "lora"], "min_over_majority": {"tweet_sentiment": 15}}
    assert {c.id for c in sweep.expand({**definition(), "report": floor})} == plain
    for bad, match in (({"min_over_majority": {"sst2": 15}}, "min_over_majority"),
                       ({"min_over_majority": {"tweet_sentiment": "15"}}, "min_over_majority"),
                       ({"order": ["nope"]}, "nope"), ({"colour": 1}, "colour")):
        with pytest.raises(sweep.GridError, match=match):
            sweep.expand({**definition(), "report": bad})
