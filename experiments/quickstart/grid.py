"""The quickstart grid (`make run`): five methods, one per family plus the baseline, on
all-MiniLM-L6-v2 x tweet_sentiment, one seed, sized to finish in <= 15 minutes on 2 CPU cores.

    python scripts/quickstart.py   # = make run; writes runs/quickstart/{results.jsonl,report.md}

Budget choices (2 cores, fp32): every method sees the same data stream (same seed, same batches)
for the same number of steps; sequences are padded to length buckets (16/32/64 tokens);
validation and test use fixed 1,000-tweet unbiased samples of their splits (the splits are stored
in hash order, so a prefix is a random sample) to keep evaluation cheap. Learning rates are each
method's configs/methods/<name>.py defaults unless overridden here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "all-MiniLM-L6-v2"
    c.task = "tweet_sentiment"
    c.seed = 0
    # What the classification head reads: "" keeps the model config's default
    # (configs/models/all_minilm_l6_v2.py); "cls" or "mean" overrides it for every cell, e.g.
    # `python scripts/quickstart.py --grid.pooling=mean --out=runs/quickstart_mean`
    # (experiments/quickstart/README.md).
    c.pooling = ""
    c.methods = ["full", "lora", "bitfit", "adapter", "prompt_tuning"]
    # Overrides of configs/train.py's `train` section, shared by every cell.
    c.train = ml_collections.ConfigDict(dict(
        steps=100,
        batch_size=32,
        eval_batch_size=128,
        eval_every=50,
        checkpoint_every=50,
        eval_limit=1000,
        warmup_ratio=0.1,
    ))
    # Per-method overrides of sections of the composed train config.
    c.overrides = ml_collections.ConfigDict({
        "full": {"train": {"learning_rate": 1e-4}},
        "lora": {"train": {"learning_rate": 2e-3}, "method": {"rank": 8, "alpha": 16.0}},
        "bitfit": {"train": {"learning_rate": 3e-3}},
        "adapter": {"train": {"learning_rate": 2e-3}},
        "prompt_tuning": {"train": {"learning_rate": 3e-2}},
    })
    return c
