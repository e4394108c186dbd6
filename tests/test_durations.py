"""tests/durations.py: the order make test hands files to its workers."""

import os

from tests import durations
from tests.helpers import ROOT

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.methods.test_a" name="test_x" time="1.5"/>
<testcase classname="tests.methods.test_a" name="test_y[p]" time="2.0"/>
<testcase classname="tests.test_b.TestGroup" name="test_z" time="0.25"/>
</testsuite></testsuites>"""


def test_junit_seconds_are_summed_per_file(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    assert durations.from_junit(str(path)) == {"tests/methods/test_a.py": 3.5, "tests/test_b.py": 0.2}


def test_longest_first_weighs_unlisted_files_by_their_tests():
    nodeids = ["a.py::t1", "b.py::t1", "b.py::t2", "c.py::t1", "c.py::t2", "c.py::t3", "d.py::t1"]
    # a and b listed: 3 tests, 12 s -> 4 s a test; c (3 tests) weighs 12, d (1 test) 4
    seconds = {"a.py": 2.0, "b.py": 10.0, "gone.py": 99.0}
    assert durations.longest_first(nodeids, seconds) == ["c.py", "b.py", "d.py", "a.py"]
    # nothing listed: by number of tests, ties in collection order
    assert durations.longest_first(nodeids, {}) == ["c.py", "b.py", "a.py", "d.py"]


def test_the_committed_durations_name_existing_files():
    listed = durations.load()
    assert listed, "tests/durations.json is missing or empty"
    missing = [f for f in listed if not os.path.exists(os.path.join(ROOT, f))]
    assert not missing, f"tests/durations.json lists files that no longer exist: {missing}"
