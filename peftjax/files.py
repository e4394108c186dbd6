"""One way to write a file so that a crash never leaves half of it: write aside, then rename.

Every result a run or a sweep leaves behind (result.json, adapters, reports, plots, checkpoint
indexes) goes through ``atomic_write``: the content is written to a temporary file in the same
folder, flushed and fsynced, and moved over the target with ``os.replace``, which POSIX makes
atomic within a file system. A reader (or a resumed run) therefore sees the old file or the new
one, never a truncated mix, and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from typing import Any, Callable, Iterator


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """Calls ``write(tmp_path)`` to produce the file, then moves it to ``path`` atomically.

    ``write`` receives a path (so libraries that open files themselves, such as safetensors'
    ``save_file`` or matplotlib's ``savefig``, fit); the temporary file keeps the target's
    extension, which matplotlib uses to choose the format.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.tmp-", suffix=os.path.splitext(base)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes the file private (0600), and so does a writer that replaces ``tmp``
        # with its own temporary (safetensors' save_file does); the result gets the permissions
        # an ordinary open() would give it (0666 less the umask), so this is set after writing.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:  # the bytes are on disk before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``text`` to ``path`` (UTF-8), atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2,
                      sort_keys: bool = False) -> None:
    """``obj`` as JSON to ``path``, atomically (non-JSON values are written with ``str``)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str,
                                       ensure_ascii=False))


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike[str]) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``lock_path`` (created if missing) for the block: the
    one way processes here take turns at something only one should do (preparing a dataset,
    computing a cached data pass)."""
    lock_path = os.fspath(lock_path)
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
