"""A data pass's result kept on disk, so that runs which would compute the same thing read it.

Why: Child-tuning_D's Fisher pass runs over the whole training set (one gradient per batch of
8 rows: 3,400 gradients of all-MiniLM-L6-v2 on tweet_sentiment, over an hour on 2 CPU cores),
and it depends neither on the learning rate nor on anything that changes when a run resumes. A
sweep's learning-rate grid and every resume of an interrupted cell repeated it; with a cache
directory (the sweep passes ``<workdir>/cache``) the pass runs once per distinct input.

The key is a SHA-256 over everything the pass reads:

* the pass' name and its settings (``max_grad_norm``, the example count, ...),
* ``InitContext.fingerprint``: the model family, its config, head and dtype — what fixes the
  loss function besides its params,
* every base param (path, dtype, shape and bytes — the task head's random init included, so
  another seed is another key),
* every training batch the context yields (each array's name, dtype, shape and bytes),
* the jax version and ``FORMAT`` (bumped whenever a pass' arithmetic changes).

So a hit returns exactly the arrays the pass would compute (bit for bit, as computed the first
time). Files are safetensors (no pickle), written atomically; a process that finds another one
computing the same key waits for it (``fcntl.flock``) instead of computing it twice. A file
that cannot be read is recomputed and replaced, with a warning. Under tracing (abstract params,
``jax.eval_shape``) nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

from peftjax.files import atomic_write, exclusive_lock

Flat = dict
FORMAT = 1


def fingerprint(model: Any) -> str:
    """What, besides its params, fixes ``losses.params_loss_fn(model)``."""
    family = getattr(getattr(model, "family", None), "name", "")
    dtype = getattr(model, "dtype", None)
    return (f"family={family}|config={getattr(model, 'config', None)!r}|"
            f"head={getattr(model, 'head', None)}|num_labels={getattr(model, 'num_labels', None)}|"
            f"dtype={np.dtype(dtype).name if dtype is not None else None}")


def _hash_array(h: Any, name: str, x: Any) -> None:
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())


def key(name: str, settings: dict, base: Flat, batches: Callable[[], Any], model_fingerprint: str
        ) -> str:
    """The hex SHA-256 of a pass' inputs (module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "name": name, "settings": settings, "jax": jax.__version__,
                         "model": model_fingerprint}, sort_keys=True, default=str).encode())
    for path in sorted(base):
        for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(base[path])[0]:
            _hash_array(h, path + jax.tree_util.keystr(leaf_path), leaf)
    for i, batch in enumerate(batches()):
        h.update(f"batch {i}".encode())
        for k in sorted(batch):
            _hash_array(h, k, batch[k])
    return h.hexdigest()


def _concrete(base: Flat) -> bool:
    return all(isinstance(leaf, (np.ndarray, np.generic, jax.Array))
               and not isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(base))


def cached(ctx: Any, name: str, settings: dict, base: Flat,
           compute: Callable[[], tuple[Flat, int]]) -> tuple[Flat, int]:
    """``compute()`` — (a dict of arrays, a count) — or its stored result for the same inputs.

    Without ``ctx.cache_dir`` (or under tracing) it simply calls ``compute``.
    """
    folder = getattr(ctx, "cache_dir", None)
    if not folder or ctx.train_batches is None or not _concrete(base):
        return compute()
    digest = key(name, settings, base, ctx.train_batches, getattr(ctx, "fingerprint", ""))
    path = os.path.join(folder, f"{name}-{digest[:40]}.safetensors")
    with exclusive_lock(path + ".lock"):
        if os.path.exists(path):
            try:
                return _read(path)
            except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
                logging.warning("pass cache: %s is unreadable (%s); recomputing it", path, e)
        out, count = compute()
        _write(path, out, count, name)
        return out, count


def _write(path: str, out: Flat, count: int, name: str) -> None:
    from safetensors.numpy import save_file

    tensors = {p: np.ascontiguousarray(np.asarray(v)) for p, v in out.items()}
    # The dict's order is kept (safetensors sorts its keys): global_top_k breaks ties by it.
    meta = {"count": str(int(count)), "pass": name, "order": json.dumps(list(out))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read(path: str) -> tuple[Flat, int]:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        out = {p: f.get_tensor(p) for p in json.loads(meta["order"])}
        count = int(meta["count"])
    return out, count
