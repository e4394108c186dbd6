"""configs/tasks/*.py: one per registered task, loadable by file path like config_flags does."""

from __future__ import annotations

import pathlib

import pytest

from peftjax.data import get_task, list_tasks
from tests.helpers import load_file_module

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tasks"


def load(path: pathlib.Path):
    return load_file_module(str(path), f"task_config_{path.stem}").get_config()


# Instruction-tuning task configs (not registry tasks; tested in tests/data/test_instructions.py).
INSTRUCTION_CONFIGS = {"tweet_instructions", "jsonl", "tfds"}


def test_one_config_per_task():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in INSTRUCTION_CONFIGS) == list_tasks()


@pytest.mark.parametrize("name", list_tasks())
def test_config_fields(name):
    config = load(CONFIG_DIR / f"{name}.py")
    assert config.name == name
    get_task(config.name)
    assert config.max_length >= 16 and config.batch_size >= 1 and config.eval_batch_size >= 1
    assert "learning_rate" not in config  # method-specific
    if name.startswith("tweet_"):
        assert config.max_length == 64
