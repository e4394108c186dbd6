"""Orbax checkpoints of the trainable tree, optimizer state, method state and step only.

A checkpoint is adapter-sized: the frozen base is never written (it is reloaded from the
pretrained weights). Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save resumes from the previous complete step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2) -> None:
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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

    def restore_raw(self, step: int | None = None) -> Any:
        """Restores a step as saved, without a template (named tuples come back as dicts)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.StandardRestore())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
