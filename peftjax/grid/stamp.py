"""The reproducibility stamp of a run or report: git commit (and whether the tree was dirty),
package versions, device and date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata

from peftjax import host

PACKAGES = ("peftjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections",
            "numpy", "transformers", "tensorflow-datasets", "matplotlib")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """Commit hash, and ``dirty``: whether tracked files of the code (not results) differ from it."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", "peftjax", "configs",
                   "scripts", "experiments/*/grid.py", "setup.py")
    return {"commit": commit, "dirty": bool(changed), "dirty_files": changed.splitlines() if changed else []}


def package_versions(packages=PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device() -> dict:
    """The accelerator JAX uses and the host (CPU model and vector ISA, CPU count, platform): cells'
    timings are comparable only between machines of one kind (``peftjax.host``)."""
    info = {"host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "cpu": host.cpu()}
    try:
        import jax

        devs = jax.devices()
        info.update(backend=jax.default_backend(), device_kind=devs[0].device_kind,
                    device_count=len(devs))
    except Exception as e:  # noqa: BLE001 - a stamp must not fail a report
        info["backend_error"] = f"{type(e).__name__}: {e}"
    return info


def stamp() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **git_state(), "packages": package_versions(), "device": device()}
