"""peftjax.files: one atomic write — the old file or the new one, never half of either, no
temporary left behind on failure, and the permissions an ordinary write would give."""

import os
import stat

import pytest

from peftjax.files import atomic_write, write_json_atomic, write_text_atomic


def test_replaces_whole_and_keeps_ordinary_permissions(tmp_path):
    path = tmp_path / "result.json"
    write_text_atomic(path, "old")
    write_json_atomic(path, {"a": 1})
    assert path.read_text().strip().startswith("{") and os.listdir(tmp_path) == ["result.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask   # not mkstemp's private 0600


def test_a_writer_that_replaces_the_temporary_still_gives_ordinary_permissions(tmp_path):
    """safetensors' save_file left adapters and the grid's Fisher cache private (0600)."""
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "adapter.safetensors"
    atomic_write(path, lambda tmp: save_file({"w": np.zeros(3, np.float32)}, tmp))

    def private_replace(tmp):
        fd = os.open(str(tmp) + ".own", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.replace(str(tmp) + ".own", tmp)

    other = tmp_path / "other.bin"
    atomic_write(other, private_replace)
    umask = os.umask(0)
    os.umask(umask)
    for p in (path, other):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask, p


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    write_text_atomic(path, "kept")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "kept" and os.listdir(tmp_path) == ["report.md"]
