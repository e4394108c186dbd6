"""scripts/describe_data.py runs from the repo root and prints a table plus a JSON line."""

from __future__ import annotations

import json
import subprocess

from peftjax.data import load_examples, majority_rate
from tests.helpers import run_script


def run(*args: str) -> subprocess.CompletedProcess:
    return run_script("describe_data.py", *args, timeout=120)


def test_describe_tweet_sentiment(tweet_data_dir):
    proc = run("--task=tweet_sentiment", f"--data_dir={tweet_data_dir}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "task: tweet_sentiment (classification)"
    assert lines[1].split() == ["split", "size", "negative", "neutral", "positive", "majority_rate"]
    summary = json.loads(next(l for l in lines if l.startswith("JSON: "))[len("JSON: "):])
    assert list(summary["splits"]) == ["train", "validation", "test"]
    for split, s in summary["splits"].items():
        labels = [e["label"] for e in load_examples("tweet_sentiment", split, tweet_data_dir)]
        counts = tuple(labels.count(i) for i in range(3))
        assert tuple(s["counts"].values()) == counts
        assert s["size"] == len(labels)
        assert s["majority_rate"] == round(majority_rate(labels), 4)
        assert any(line.split()[:2] == [split, str(len(labels))] for line in lines)


def test_describe_unknown_task():
    proc = run("--task=nope")
    assert proc.returncode != 0
    assert "tweet_sentiment" in proc.stderr
