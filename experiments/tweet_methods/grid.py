"""tweet_methods: every PEFT method of peftjax on all-MiniLM-L6-v2 × tweet_sentiment (all
variants) and tweet_polarity (a stated subset), each variant tuned, with intervals and baselines.

    python scripts/sweep.py --config=experiments/tweet_methods/grid.py --workdir=runs/tweet_methods --dry_run
    python scripts/sweep.py --config=experiments/tweet_methods/grid.py --workdir=runs/tweet_methods --workers=2
    python scripts/baselines.py --config=experiments/tweet_methods/grid.py --workdir=runs/tweet_methods
    python scripts/report.py runs/tweet_methods --out=experiments/tweet_methods

The protocol (issue 18):

* **Every variant tuned.** Each has a learning-rate grid of 3 log-spaced values around its
  published range (below). The grid runs on seed 0 (``selection_seeds``); the value with the
  best validation score runs on seeds 1 and 2. The report flags a choice at a grid's end (then
  the grid is extended here and the sweep rerun: finished cells are skipped).
* **One budget for every method**: ``STEPS`` updates of batch 32 (length-grouped batches,
  padded to multiples of 8 tokens), AdamW, linear decay after 6% warm-up, clipping 1.0;
  validation on the whole validation split every ``EVAL_EVERY`` steps, the best step kept; test
  on the whole test split, once, at that step. convergence.py runs full fine-tuning and LoRA at
  4× the budget to show they have converged (< 1 point of validation to gain).
* **Baselines**: majority class and bag-of-wordpieces Naive Bayes on the whole training split
  (scripts/baselines.py), the linear probe (head alone on the frozen encoder) as a variant.
* **The head**: all-MiniLM-L6-v2's default, mean pooling (chosen on the quickstart's
  validation; experiments/quickstart/README.md). Houlsby adapters train the LayerNorms as the
  paper does (``train_layernorm=True``); Pfeiffer adapters sit at AdapterHub's position.
* **Uncertainty**: 95% paired-bootstrap intervals over test examples × seeds (the report).

Learning-rate grids (the published range they are centred on): full fine-tuning and
Child-tuning 3e-5..3e-4 (BERT/RoBERTa fine-tuning 1e-5..1e-4, higher for a 22M-parameter model);
LoRA family, adapters, BitFit, FishMask 3e-4..3e-3 (LoRA 4e-4..5e-4, Houlsby 3e-5..3e-3, BitFit
1e-4..1e-3); VeRA 3e-3..3e-2 (the paper: 4e-3..1e-2 for the vectors); prompt tuning 3e-3..3e-1
(Lester et al. 0.3 with Adafactor); prefix tuning 1e-3..1e-2; the linear probe 1e-3..1e-1.
Issue 19's methods: LoRA+ 1e-4..1e-3 (A's rate; B's is 16× — the paper keeps A near LoRA's best
rate or below); OLoRA and LoRA-GA 1e-4..1e-3 (inits that start from W0's or the gradient's top
directions train at or below LoRA's rate, as PiSSA); LoRA-FA, HiRA and LN tuning LoRA's
3e-4..3e-3; (IA)³ 1e-3..1e-2 (T-Few: 3e-3).
"""

import ml_collections

# Updates of batch 32: 51,200 tweets, 1.7 epochs of tweet_sentiment's training split.
# 400 (0.43 epoch) was the first budget; its convergence check failed: at 4x the steps, at the
# rates chosen on 400, full fine-tuning gained 2.8 points of validation accuracy (78.1 -> 80.9)
# and LoRA 2.2 (76.4 -> 78.6) on tweet_sentiment (experiments/tweet_methods/results/convergence/).
# Both curves flatten after ~1200 of those 1600 steps; convergence.py checks 1600 against 6400.
STEPS = 1600
# Validation on the whole split every 200 steps (8 evaluations): an evaluation costs ~30 s here,
# so every 100 steps would add ~4 min to each 1600-step cell.
EVAL_EVERY = 200
BATCH = 32
# The low-rank family adapts every linear layer of the encoder (Q, K, V, the attention output and
# both feed-forward matrices; not the pooler, which mean pooling does not use), as QLoRA (Dettmers
# et al. 2023, §4: LoRA on all linear layers is needed to match full fine-tuning), AdaLoRA, DoRA,
# PiSSA and HiRA do. The paper's original placement (query, value) is the lora_qv row: at this
# budget it has not converged (+1.56 points of validation accuracy at 4x the steps on
# tweet_sentiment, experiments/tweet_methods/results/convergence/), which is why the reference
# LoRA row is the all-linear one.
ALL_LINEAR = r"\.(query|key|value|intermediate\.dense|output\.dense)$"
LOW_RANK = {"alpha": 16.0, "targets": ALL_LINEAR}  # alpha/r = 2 at r = 8
LOW_RANK_QV = {"alpha": 16.0}  # the method's default targets: query, value


def lrs(*values):
    return {"grid": {"train": {"learning_rate": list(values)}}}


FULL_LR = lrs(3e-5, 1e-4, 3e-4)
LOW_LR = lrs(3e-4, 1e-3, 3e-3)

VARIANTS = {
    # At 1600 steps 3e-5 won tweet_polarity's validation macro-F1 at the grid's lower edge (89.58
    # vs 89.54 at 1e-4): extended (tweet_sentiment chose 1e-4, inside; its 1e-5 cell runs too).
    # On tweet_polarity 1e-5 then scored 88.07, so 3e-5 is interior.
    "full": {"method": "full", **lrs(1e-5, 3e-5, 1e-4, 3e-4)},
    "linear_probe": {"method": "linear_probe", **lrs(1e-3, 1e-2, 1e-1)},
    "lora": {"method": "lora", "overrides": {"method": dict(LOW_RANK)}, **LOW_LR},
    # At the 400-step budget 3e-3 won tweet_sentiment's validation at the grid's upper edge (76.4
    # vs 74.5 at 1e-3; 1e-2 then stayed at the majority class): extended.
    "lora_qv": {"method": "lora", "overrides": {"method": dict(LOW_RANK_QV)}, **lrs(3e-4, 1e-3, 3e-3, 1e-2)},
    "rslora": {"method": "lora", "overrides": {"method": {"use_rslora": True, "alpha": 8.0,
                                                          "targets": ALL_LINEAR}}, **LOW_LR},
    "dora": {"method": "dora", "overrides": {"method": dict(LOW_RANK)}, **LOW_LR},
    "pissa": {"method": "lora", "overrides": {"method": {**LOW_RANK, "init": "pissa"}}, **lrs(1e-4, 3e-4, 1e-3)},
    # AdaLoRA: budget 12 → 8 triplets per matrix, cubic schedule after 10% warm-up, the final
    # 20% with the pattern fixed, masking every 10 steps; the official scripts' orthogonality weight.
    "adalora": {"method": "adalora", "overrides": {"method": dict(
        init_r=12, target_r=8, alpha=16.0, targets=ALL_LINEAR, tinit=STEPS // 10, tfinal=STEPS // 5, deltaT=10,
        orth_reg_weight=0.1)},
        # At the 400-step budget 3e-3 won at the grid's upper edge (val 75.2 vs 71.7 at 1e-3): extended.
        **lrs(3e-4, 1e-3, 3e-3, 1e-2)},
    # DyLoRA: r_max 8; evaluated at ranks 1, 2, 4, 8 after training, without retraining.
    "dylora": {"method": "dylora", "overrides": {"method": {"targets": ALL_LINEAR}}, "rank_sweep": [1, 2, 4, 8], **LOW_LR},
    # At 1600 steps 3e-2 won tweet_sentiment's validation at the grid's upper edge (79.45 vs
    # 79.34 at 1e-2, 77.17 at 3e-3; best step the last one): extended. VeRA trains only scaling
    # vectors over frozen random matrices, so its rates sit an order above LoRA's. 1e-1 then
    # scored 60.44 (collapsed part-way, macro-F1 43.9), so 3e-2 is interior.
    "vera": {"method": "vera", "overrides": {"method": {"targets": ALL_LINEAR}}, **lrs(3e-3, 1e-2, 3e-2, 1e-1)},
    "adapter_houlsby": {"method": "adapter", "overrides": {"method": {
        "placement": "houlsby", "train_layernorm": True}}, **LOW_LR},
    # At 1600 steps 3e-3 won tweet_sentiment's validation at the grid's upper edge (80.04 vs 78.99
    # at 1e-3, 77.03 at 3e-4): extended.
    "adapter_pfeiffer": {"method": "adapter", "overrides": {"method": {
        "placement": "pfeiffer", "bottleneck": 0}}, **lrs(3e-4, 1e-3, 3e-3, 1e-2)},
    # At 1600 steps 3e-3 won tweet_sentiment's validation at the grid's lower edge (76.01 vs 75.01
    # at 3e-2; best step the last one): extended by a half-decade step on both tasks (AdamW, not
    # the paper's Adafactor at 0.3). 1e-3 then scored 73.64, so 3e-3 is interior on sentiment; on
    # polarity 3e-2 won (macro-F1 87.14 vs 86.28 at 3e-3, 84.98 at 1e-3, 84.46 at 3e-1), interior.
    "prompt_tuning": {"method": "prompt_tuning", **lrs(1e-3, 3e-3, 3e-2, 3e-1)},
    # At 1600 steps 1e-3 won tweet_sentiment's validation at the grid's lower edge (77.43; best step
    # the last one); 3e-3 stayed at the class prior (validation 42.9-44.3: training loss back at
    # ln 3 once warm-up reached the peak rate): extended downwards, towards Li & Liang's rates for
    # prefixes trained through the MLP (5e-5..8e-5 on GPT-2), as these are.
    "prefix_tuning": {"method": "prefix_tuning", **lrs(3e-4, 1e-3, 3e-3, 1e-2)},
    # At 1600 steps 3e-3 won tweet_sentiment's validation at the grid's upper edge (77.97 vs
    # 76.44 at 1e-3, 74.21 at 3e-4; best step the last one at every rate): extended, on both tasks.
    # 1e-2 then scored 77.17 on sentiment and 87.28 macro-F1 on polarity (3e-3: 88.52), so 3e-3 is
    # interior on both.
    "bitfit": {"method": "bitfit", **lrs(3e-4, 1e-3, 3e-3, 1e-2)},
    # At 1600 steps 3e-4 won tweet_sentiment's validation at the grid's upper edge (80.66 vs 80.26
    # at 1e-4, 78.1 at 3e-5; best step the last one): extended.
    "child_tuning_f": {"method": "child_tuning_f", **lrs(3e-5, 1e-4, 3e-4, 1e-3)},
    # At 1600 steps 3e-4 won tweet_sentiment's validation at the grid's upper edge (80.26 vs 79.9
    # at 1e-4, 77.7 at 3e-5; best step the last one): extended. Seed 0's Fisher pass is cached.
    "child_tuning_d": {"method": "child_tuning_d", **lrs(3e-5, 1e-4, 3e-4, 1e-3)},
    "fishmask": {"method": "fishmask", **LOW_LR},
    # The methods of issue 19, at the LoRA rows' rank and alpha where they have them.
    "lora_plus": {"method": "lora_plus", "overrides": {"method": dict(LOW_RANK)}, **lrs(1e-4, 3e-4, 1e-3)},
    # At 1600 steps 3e-3 won tweet_sentiment's validation at the grid's upper edge (79.53 vs
    # 79.02 at 1e-3, 77.27 at 3e-4; best step the last one): extended (A frozen at its init, B
    # alone carries the update). 1e-2 then scored 76.92, so 3e-3 is interior.
    "lora_fa": {"method": "lora_fa", "overrides": {"method": dict(LOW_RANK)}, **lrs(3e-4, 1e-3, 3e-3, 1e-2)},
    "olora": {"method": "olora", "overrides": {"method": dict(LOW_RANK)}, **lrs(1e-4, 3e-4, 1e-3)},
    # At 1600 steps 1e-3 won tweet_sentiment's validation at the grid's upper edge (79.94 vs
    # 79.40 at 3e-4, 77.49 at 1e-4): extended. 3e-3 then scored 57.75 (its best at step 200), so
    # 1e-3 is interior.
    "lora_ga": {"method": "lora_ga", "overrides": {"method": {**LOW_RANK, "progress": False}},
                **lrs(1e-4, 3e-4, 1e-3, 3e-3)},
    # At 1600 steps 3e-3 won tweet_sentiment's validation at the grid's upper edge (80.39 vs
    # 78.62 at 1e-3, 76.04 at 3e-4): extended.
    "hira": {"method": "hira", "overrides": {"method": {"targets": ALL_LINEAR}},
             **lrs(3e-4, 1e-3, 3e-3, 1e-2)},
    # At 1600 steps 1e-2 won tweet_sentiment's validation at the grid's upper edge (79.08 vs
    # 77.92 at 3e-3, 75.8 at 1e-3; best step the last one): extended. 3e-2 then scored 78.21, so
    # 1e-2 is interior.
    "ia3": {"method": "ia3", **lrs(1e-3, 3e-3, 1e-2, 3e-2)},
    # At 1600 steps 3e-3 won tweet_sentiment's validation at the grid's upper edge (77.92 vs
    # 77.11 at 1e-3, 74.61 at 3e-4; best step the last one): extended. 1e-2 then scored 77.06,
    # so 3e-3 is interior.
    "ln_tuning": {"method": "ln_tuning", **lrs(3e-4, 1e-3, 3e-3, 1e-2)},
    # Issue 20's quality check: LoRA on a quantized frozen base (QLoRA's NF4 + double quant;
    # int8) at LoRA's chosen rate on tweet_sentiment at this budget (every linear layer, 1e-3:
    # validation accuracy 80.39 at 1600 steps, 3e-4 78.81, 3e-3 76.30), 3 seeds; the report's Δ
    # vs lora gives the cost with its interval (target: NF4 within 1.5 points, int8 within 0.5).
    "lora_nf4": {"method": "lora", "overrides": {"method": dict(LOW_RANK), "train": {"learning_rate": 1e-3},
                                                  "model": {"quant": "nf4", "double_quant": True}}},
    "lora_int8": {"method": "lora", "overrides": {"method": dict(LOW_RANK), "train": {"learning_rate": 1e-3},
                                                   "model": {"quant": "int8"}}},
}
# tweet_polarity (positive vs negative; 71/29): the stated subset, one per family plus the
# strongest baselines, to fit the 2-core budget.
POLARITY = ("full", "linear_probe", "lora", "lora_qv", "adapter_houlsby", "bitfit", "prompt_tuning")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "tweet_methods"
    c.description = ("Every PEFT method on all-MiniLM-L6-v2 x tweet_sentiment (and a subset on "
                     "tweet_polarity): learning rates tuned on validation, 3 seeds, whole splits.")
    c.models = ["all-MiniLM-L6-v2"]
    c.tasks = ["tweet_sentiment", "tweet_polarity"]
    c.seeds = [0, 1, 2]
    c.selection_seeds = [0]
    c.base = {"train": dict(steps=STEPS, batch_size=BATCH, eval_batch_size=256, eval_every=EVAL_EVERY,
                            checkpoint_every=EVAL_EVERY, eval_limit=0, test_limit=0, train_limit=0,
                            warmup_ratio=0.06, log_every=10, group_by_length=50, bucket_multiple=8)}
    # tweet_polarity's classes are 71/29: steps and settings are chosen on macro-F1, the
    # report's main metric there (accuracy rewards leaning to the majority class).
    c.task_overrides = {"tweet_polarity": {"train": {"select_metric": "macro_f1"}}}
    c.variants = {name: v if name in POLARITY else {**v, "tasks": ["tweet_sentiment"]}
                  for name, v in VARIANTS.items()}
    # Issue 18: every chosen row on tweet_sentiment should be >= 15 accuracy points above the
    # majority class (42.9% there); the report checks it under that task's table.
    c.report = {"order": list(VARIANTS), "min_over_majority": {"tweet_sentiment": 15}}
    return c
