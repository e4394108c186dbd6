"""tests/conftest.py's file order: every file it puts first exists (a renamed file would
otherwise drop silently to its collection place and the workers' end times drift apart)."""

import os

from tests.conftest import HEAVY_FIRST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_heavy_first_names_existing_test_files():
    missing = [path for path in HEAVY_FIRST if not os.path.isfile(os.path.join(ROOT, path))]
    assert not missing, f"tests/conftest.py HEAVY_FIRST names files that do not exist: {missing}"
    assert len(set(HEAVY_FIRST)) == len(HEAVY_FIRST)
