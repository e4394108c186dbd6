"""Lets the scripts run from a checkout (``python scripts/x.py``) without installing peftjax."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Imported first so that peftjax's allocator setting (peftjax.runtime) is in place before jax
# or torch start their threads.
import peftjax  # noqa: E402,F401
