"""scripts/describe_data.py runs from the repo root and prints a table plus a JSON line."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from peftjax.data import load_examples, majority_rate

REPO = pathlib.Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # import must work without it
    return subprocess.run([sys.executable, "scripts/describe_data.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


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
