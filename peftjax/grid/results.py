"""A JSONL results store that survives kills: one line per finished cell.

Each result is appended as one ``write`` of a complete line followed by fsync, so a kill leaves
either the whole line or a truncated tail without a newline; reading ignores (and the next
append first removes) such a tail. A rerun skips every cell whose key has a line.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


class ResultsStore:
    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def _lines(self) -> Iterator[str]:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        # Everything before the last newline is complete; what follows it is empty or torn.
        for raw in data.split(b"\n")[:-1]:
            if raw.strip():
                yield raw.decode("utf-8")

    def read(self) -> list[dict[str, Any]]:
        rows = []
        for line in self._lines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn line from a kill mid-write
                continue
        return rows

    def done(self) -> set[str]:
        return {r["cell"] for r in self.read() if "cell" in r}

    def _drop_torn_tail(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, row: dict[str, Any]) -> None:
        self._drop_torn_tail()
        line = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replaces the store's lines with ``rows`` in one atomic step (a kill leaves the old
        store or the new one, never a mix)."""
        from peftjax.files import write_text_atomic

        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
