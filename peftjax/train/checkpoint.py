"""Orbax checkpoints of the trainable tree, optimizer state, method state and step only.

A checkpoint is adapter-sized: the frozen base is never written (it is reloaded from the
pretrained weights). Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save resumes from the previous complete step.

What can still go wrong on disk — a truncated data file, garbage metadata, a state that holds
NaN (written by an older peftjax, which checked only the loss) — is handled by
``restore_latest``: it tries the steps from the newest down, moves each unreadable or
non-finite one aside to ``<directory>.bad/<step>`` with one warning line naming it, and resumes
from the newest good step; only when none is usable does it fail, with one paragraph.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be restored."""


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is free of NaN and inf (one fused pass)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2) -> None:
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        self._open()

    def _open(self) -> None:
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep,
                                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, tree: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(tree), force=True)

    def restore(self, like: Any, step: int | None = None, shardings: Any = None) -> Any:
        """Restores into the structure (and dtypes) of ``like``.

        Sharding-aware: each array is read straight onto the sharding of the matching leaf of
        ``shardings`` (a tree of ``jax.sharding.Sharding``) or, without it, the sharding ``like``'s
        arrays have — so a checkpoint saved on one mesh restores onto another (orbax reads each
        device's slice; no process ever holds a whole array it does not need).
        """
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        if shardings is not None:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_latest(self, like: Any, *, finite: Any = None) -> tuple[int, Any] | None:
        """``(step, tree)`` of the newest step that restores into ``like`` and whose subtree
        ``finite(tree)`` is all finite; unusable steps are moved aside with a warning. None when
        the directory has no step; ``CheckpointError`` when no step is usable."""
        steps = self.all_steps()
        if not steps:
            return None
        bad: list[str] = []
        for step in reversed(steps):
            try:
                tree = self.restore(like, step)
            except Exception as e:  # noqa: BLE001 — orbax/tensorstore/JSON errors alike
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            else:
                if finite is None or bool(all_finite(finite(tree))):
                    if bad:
                        self._reopen()
                    return step, tree
                reason = "it holds NaN or inf values"
            moved = self._set_aside(step)
            bad.append(f"step {step} ({reason})")
            log.warning("checkpoint step %d in %s is unusable (%s); moved to %s, trying the previous "
                        "step", step, self.directory, reason, moved)
        self._reopen()
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: " + "; ".join(bad) + ". The unusable steps "
            f"were moved to {self.directory}.bad/ for inspection. Start the run again in a new "
            "workdir (or delete this one's checkpoints/ to start it afresh).")

    def _set_aside(self, step: int) -> str:
        self.manager.wait_until_finished()
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory + ".bad", str(step))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        if os.path.exists(src):
            shutil.move(src, dst)
        return dst

    def _reopen(self) -> None:
        """A fresh manager after steps were moved (orbax caches the step list)."""
        self.manager.close()
        self._open()

    def restore_raw(self, step: int | None = None) -> Any:
        """Restores a step as saved, without a template (named tuples come back as dicts)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.StandardRestore())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def exact_scalar(value: float) -> np.ndarray:
    """A float64 as two uint32 words, so a checkpoint (float32 without jax's x64 mode) keeps it
    bit for bit: the best validation metrics of a resumed run then equal an uninterrupted run's."""
    return np.frombuffer(np.float64(value).tobytes(), np.uint32).copy()


def from_exact_scalar(words: Any) -> float:
    return float(np.frombuffer(np.asarray(words, np.uint32).tobytes(), np.float64)[0])
