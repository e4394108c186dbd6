"""The process's resident memory (Linux ``/proc/self``): current, peak, and the peak's reset.

Why not ``resource.getrusage``: ``ru_maxrss`` is the peak since the process started and cannot
be reset, so it cannot isolate one stage (loading a checkpoint) from what came before (imports,
compilation). Linux keeps the same high-water mark as ``VmHWM`` and resets it to the current
RSS when ``5`` is written to ``/proc/self/clear_refs`` (proc(5)). RSS counts file-backed pages
too: memory-mapped checkpoint pages a read touched are part of it, as they are of what a host
must have.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024   # kB
    raise RuntimeError(f"/proc/self/status has no {key} (not Linux?)")


def rss() -> int:
    """Bytes resident now."""
    return _status("VmRSS")


def peak() -> int:
    """Bytes resident at the high-water mark (since the start or the last ``reset_peak``)."""
    return _status("VmHWM")


def reset_peak() -> None:
    """Sets the high-water mark to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclasses.dataclass
class Rise:
    """What a block of code added to the process's peak: ``peak − rss at the start``."""

    start: int = 0
    peak: int = 0
    end: int = 0

    @property
    def bytes(self) -> int:
        return self.peak - self.start


@contextlib.contextmanager
def measure() -> Iterator[Rise]:
    """``with measure() as m: ...`` then ``m.bytes``: the peak RSS rise over the block."""
    import gc

    gc.collect()
    reset_peak()
    rise = Rise(start=rss())
    yield rise
    rise.peak, rise.end = peak(), rss()
