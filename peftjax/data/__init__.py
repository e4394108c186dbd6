"""peftjax data layer: tasks, offline/GLUE datasets, tokenised fixed-shape batches, metrics.

Typical use::

    from peftjax import data
    task = data.get_task("tweet_sentiment")
    train = data.encode(data.load_examples(task.name, task.train_split), tokenizer, 64)
    for batch in data.train_batches(train, batch_size=32, seed=0):
        ...
    dev = data.encode(data.load_examples(task.name, task.eval_split), tokenizer, 64)
    for batch in data.eval_batches(dev, batch_size=64):
        ...  # keep predictions where batch["mask"]
    data.compute_metrics(task, predictions, labels)

Datasets are TFDS builders stored as array_record and read without TensorFlow; see
`peftjax.data.storage` for where they live.
"""

from peftjax.data.examples import Example, to_example
from peftjax.data.glue import glue_to_example
from peftjax.data.metrics import (
    METRICS,
    accuracy,
    compute_metrics,
    f1,
    macro_f1,
    majority_rate,
    matthews_corrcoef,
    mcc,
    pearson,
    rankdata,
    spearman,
)
from peftjax.data.pipeline import (
    bucket_length,
    encode,
    epoch_order,
    eval_batches,
    length_buckets,
    load_examples,
    num_eval_batches,
    num_rows,
    padding_fraction,
    prepare,
    steps_per_epoch,
    train_batches,
)
from peftjax.data.storage import DATA_DIR_ENV, default_data_dir
from peftjax.data.tasks import Task, get_task, list_tasks, register_task

__all__ = [
    "DATA_DIR_ENV",
    "METRICS",
    "Example",
    "Task",
    "accuracy",
    "bucket_length",
    "compute_metrics",
    "default_data_dir",
    "encode",
    "epoch_order",
    "eval_batches",
    "f1",
    "get_task",
    "glue_to_example",
    "length_buckets",
    "list_tasks",
    "load_examples",
    "macro_f1",
    "majority_rate",
    "matthews_corrcoef",
    "mcc",
    "num_eval_batches",
    "num_rows",
    "padding_fraction",
    "pearson",
    "prepare",
    "rankdata",
    "register_task",
    "spearman",
    "steps_per_epoch",
    "to_example",
    "train_batches",
]
