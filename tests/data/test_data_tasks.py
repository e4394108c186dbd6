"""Task registry: contents, GLUE facts matching TFDS's builders, error messages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tensorflow_datasets.text.glue  # noqa: F401

from peftjax.data import Task, get_task, list_tasks, register_task
from peftjax.data.tasks import _REGISTRY

GLUE = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


def test_all_tasks_registered():
    assert list_tasks() == sorted(GLUE + [f"{t}_heldout" for t in GLUE]
                                  + ["tweet_polarity", "tweet_sentiment"])


def test_unknown_task_error_lists_registered_names():
    with pytest.raises(ValueError) as err:
        get_task("sst-2")
    msg = str(err.value)
    assert "'sst-2'" in msg
    for name in list_tasks():
        assert name in msg


def test_tweet_tasks():
    s, p = get_task("tweet_sentiment"), get_task("tweet_polarity")
    assert s.label_names == ("negative", "neutral", "positive") and s.num_labels == 3
    assert p.label_names == ("negative", "positive") and p.num_labels == 2
    for t in (s, p):
        assert t.kind == "classification" and not t.is_pair
        assert t.metrics == ("accuracy", "macro_f1") and t.primary_metric == "accuracy"


@pytest.mark.parametrize(
    "name,metrics",
    [("cola", ("mcc",)), ("stsb", ("pearson", "spearman")), ("mrpc", ("accuracy", "f1")),
     ("qqp", ("accuracy", "f1")), ("sst2", ("accuracy",)), ("rte", ("accuracy",)),
     ("qnli", ("accuracy",)), ("mnli", ("accuracy",))],
)
def test_glue_metrics(name, metrics):
    task = get_task(name)
    assert task.metrics == metrics
    assert task.primary_metric in metrics


def test_mnli_and_stsb_specifics():
    mnli = get_task("mnli")
    assert (mnli.eval_split, mnli.test_split) == ("validation_matched", "test_matched")
    stsb = get_task("stsb")
    assert stsb.kind == "regression" and stsb.num_labels == 1 and stsb.label_names == ()


@pytest.mark.parametrize("name", GLUE)
def test_glue_tasks_match_tfds_features(name, tmp_path):
    """Label names and text fields agree with TFDS's glue builder (built, not downloaded)."""
    task = get_task(name)
    features = tfds.builder(f"glue/{name}", data_dir=str(tmp_path)).info.features
    assert set(features) == {*task.text_fields, "label", "idx"}
    if task.kind == "classification":
        assert tuple(features["label"].names) == task.label_names
    else:
        assert np.dtype(features["label"].np_dtype) == np.float32


def test_register_task_rejects_conflicting_redefinition():
    task = get_task("sst2")
    assert register_task(task) is task  # identical re-registration is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_task(dataclasses.replace(task, metrics=("accuracy", "f1")))
    custom = dataclasses.replace(task, name="sst2_copy")
    try:
        register_task(custom)
        assert get_task("sst2_copy") == custom
    finally:
        _REGISTRY.pop("sst2_copy", None)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(kind="ranking"), "kind"), (dict(num_labels=3), "classification"),
     (dict(metrics=("bleu",)), "unknown metrics"), (dict(primary_metric="f1"), "primary_metric"),
     (dict(text_fields=()), "text_fields")],
)
def test_task_validation(kwargs, match):
    base = dict(name="t", kind="classification", num_labels=2, label_names=("a", "b"),
                text_fields=("text",), metrics=("accuracy",), primary_metric="accuracy", tfds_name="x")
    with pytest.raises(ValueError, match=match):
        Task(**{**base, **kwargs})


def test_task_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("sst2").num_labels = 5
