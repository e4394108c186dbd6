"""Each test file's measured seconds, so that ``make test``'s workers take the longest files first.

``make test`` hands a whole test file to whichever of its two workers is free (pytest-xdist
``--dist loadfile``). xdist's own order is by number of tests, so the files of a few long
subprocess tests (the benchmark scripts' smoke runs, 10-20 s each) came last: on 2026-12-06 one
worker ran test_bench_sweep.py's single 17.7 s test while the other had nothing left (11 s of
one core idle before the end). Longest first (the LPT rule) leaves only short files for the end,
where the two workers even out; ``make test`` passes ``--no-loadscope-reorder`` so that xdist
keeps this order.

``tests/durations.json`` maps each file to its seconds in one ``make test`` run (any machine:
only the order matters). A file it does not list (a new one) is weighed by its number of tests
at the mean seconds per test of the listed files. A stale entry changes the order, never a
result. To refresh it::

    .venv/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow" --junitxml=/tmp/junit.xml tests
    .venv/bin/python -m tests.durations /tmp/junit.xml
"""

from __future__ import annotations

import collections
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from typing import Iterable

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def load(path: str = PATH) -> dict[str, float]:
    """``{file: seconds}``; empty when the file is missing (files are then weighed by their
    number of tests, xdist's own order)."""
    try:
        with open(path) as f:
            return {str(k): float(v) for k, v in json.load(f).items()}
    except FileNotFoundError:
        return {}


def longest_first(nodeids: Iterable[str], seconds: dict[str, float]) -> list[str]:
    """The test files of ``nodeids`` ("file::test"), longest first; ties keep collection order."""
    counts = collections.Counter(n.split("::", 1)[0] for n in nodeids)
    listed = [(s, counts[f]) for f, s in seconds.items() if counts.get(f)]
    per_test = sum(s for s, _ in listed) / sum(n for _, n in listed) if listed else 1.0
    weight = {f: seconds.get(f, n * per_test) for f, n in counts.items()}
    return sorted(counts, key=lambda f: -weight[f])   # stable: Counter keeps first-seen order


def from_junit(path: str) -> dict[str, float]:
    """``{file: seconds}`` summed over a JUnit XML report's test cases (pytest's ``--junitxml``)."""
    totals: dict[str, float] = collections.defaultdict(float)
    for case in ElementTree.parse(path).iter("testcase"):
        # classname: the module's dotted path, then its test class if any (tests.methods.test_x.Cls)
        module = [p for p in case.get("classname", "").split(".") if not p[:1].isupper()]
        totals["/".join(module) + ".py"] += float(case.get("time", 0.0))
    return {f: round(s, 1) for f, s in sorted(totals.items())}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(f"usage: python -m tests.durations JUNIT_XML   (rewrites {os.path.relpath(PATH)})")
    from peftjax.files import write_json_atomic

    seconds = from_junit(argv[1])
    write_json_atomic(PATH, seconds)
    print(f"{len(seconds)} files, {sum(seconds.values()):.0f} s in all -> {os.path.relpath(PATH)}")


if __name__ == "__main__":
    main(sys.argv)
