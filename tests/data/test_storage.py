"""peftjax.data.storage: preparing a dataset once when several processes ask at the same time."""

from __future__ import annotations

import os
import threading
import time

from peftjax.data import storage


class _FakeBuilder:
    """Just what `prepare_once` reads of a TFDS builder: where it lives and whether it is there."""

    name = "fake"

    def __init__(self, root: str):
        self.data_dir_root = root
        self.data_path = os.path.join(root, "fake", "1.0.0")

    def is_prepared(self) -> bool:
        return os.path.exists(os.path.join(self.data_path, "dataset_info.json"))


def test_prepare_once_prepares_a_single_time_under_concurrent_callers(tmp_path):
    # Each thread opens the lock file itself, so flock serialises them as it does processes
    # (the grid's workers). Without the lock both would see "not prepared" and both prepare:
    # TFDS's second rename onto the finished folder then fails the second cell.
    root = str(tmp_path)
    calls = []
    start = threading.Barrier(3)

    def prepare(b: _FakeBuilder) -> None:
        calls.append(threading.get_ident())
        time.sleep(0.2)  # long enough for the other callers to arrive while this one works
        os.makedirs(b.data_path)
        with open(os.path.join(b.data_path, "dataset_info.json"), "w") as f:
            f.write("{}")

    results = []

    def worker() -> None:
        start.wait()
        results.append(storage.prepare_once(lambda: _FakeBuilder(root), prepare))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 3 and all(b.is_prepared() for b in results)


def test_prepare_once_is_a_no_op_when_prepared(tmp_path):
    b = _FakeBuilder(str(tmp_path))
    os.makedirs(b.data_path)
    open(os.path.join(b.data_path, "dataset_info.json"), "w").close()

    def refuse(_):
        raise AssertionError("prepared again")

    assert storage.prepare_once(lambda: _FakeBuilder(str(tmp_path)), refuse).is_prepared()
    assert not os.path.exists(os.path.join(str(tmp_path), ".fake.prepare.lock"))
