"""The data-pass cache: a hit returns exactly what the pass computed; any input that differs
(settings, a base param, a training row, the model) is a miss; damaged files are recomputed."""

import dataclasses
import logging
import os

import jax
import numpy as np
import pytest

from peftjax import methods
from peftjax.methods import fisher, pass_cache
from tests.helpers import fisher_context, learnable_batch, tiny_model


def _ctx(model, tmp_path, batch=None):
    return dataclasses.replace(fisher_context(model, batch), cache_dir=str(tmp_path),
                               fingerprint=pass_cache.fingerprint(model))


def _counting(result):
    calls = []

    def compute():
        calls.append(1)
        return result, 7
    return compute, calls


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def test_a_hit_returns_the_stored_arrays_in_their_order_and_count(bert, tmp_path):
    model, base = bert
    ctx = _ctx(model, tmp_path)
    # Not sorted: global_top_k breaks ties by the dict's order, so the order must survive.
    result = {"z": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.float32([1.5, -2.0])}
    compute, calls = _counting(result)
    first = pass_cache.cached(ctx, "p", {"s": 1}, base, compute)
    again, count = pass_cache.cached(ctx, "p", {"s": 1}, base, compute)
    assert len(calls) == 1 and count == 7 and first[1] == 7
    assert list(again) == ["z", "a"]
    for k in result:
        np.testing.assert_array_equal(again[k], result[k])
        assert again[k].dtype == result[k].dtype
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 1


def test_every_input_is_in_the_key(bert, tmp_path):
    model, base = bert
    ctx = _ctx(model, tmp_path)
    compute, calls = _counting({"x": np.zeros(2, np.float32)})
    pass_cache.cached(ctx, "p", {"s": 1}, base, compute)
    pass_cache.cached(ctx, "p", {"s": 2}, base, compute)                      # a setting
    pass_cache.cached(ctx, "q", {"s": 1}, base, compute)                      # another pass
    name = next(iter(base))
    other = {**base, name: np.asarray(base[name]).copy()}
    other[name].reshape(-1)[0] += 1e-3
    pass_cache.cached(ctx, "p", {"s": 1}, other, compute)                     # one base entry
    batch = learnable_batch(model)
    batch = {**batch, "labels": 1 - np.asarray(batch["labels"])}
    pass_cache.cached(_ctx(model, tmp_path, batch), "p", {"s": 1}, base, compute)   # the labels
    pass_cache.cached(dataclasses.replace(ctx, fingerprint="another model"), "p", {"s": 1}, base,
                      compute)
    assert len(calls) == 6
    pass_cache.cached(ctx, "p", {"s": 1}, dict(base), compute)                # the same again
    assert len(calls) == 6


def test_no_cache_dir_or_abstract_params_compute_every_time(bert, tmp_path):
    model, base = bert
    compute, calls = _counting({"x": np.zeros(2, np.float32)})
    plain = fisher_context(model)
    pass_cache.cached(plain, "p", {}, base, compute)
    pass_cache.cached(plain, "p", {}, base, compute)
    ctx = _ctx(model, tmp_path)
    jax.eval_shape(lambda b: pass_cache.cached(ctx, "p", {}, b, compute)[0], base)
    assert len(calls) == 3 and not any(f.endswith(".safetensors") for f in os.listdir(tmp_path))


def test_a_damaged_file_is_recomputed_and_replaced(bert, tmp_path, caplog):
    model, base = bert
    ctx = _ctx(model, tmp_path)
    compute, calls = _counting({"x": np.ones(3, np.float32)})
    pass_cache.cached(ctx, "p", {}, base, compute)
    (path,) = [tmp_path / f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    path.write_bytes(path.read_bytes()[:20])
    with caplog.at_level(logging.WARNING):
        out, _ = pass_cache.cached(ctx, "p", {}, base, compute)
    assert len(calls) == 2 and "unreadable" in caplog.text
    np.testing.assert_array_equal(out["x"], np.ones(3, np.float32))
    pass_cache.cached(ctx, "p", {}, base, compute)
    assert len(calls) == 2


@pytest.mark.parametrize("name,cfg,pass_fn", [
    ("child_tuning_d", {"reserve_p": 0.3}, "clipped_batch_fisher"),
    ("fishmask", {"keep_ratio": 0.05, "num_examples": 4}, "empirical_fisher"),
])
def test_a_selection_from_the_cache_is_the_one_computed(bert, tmp_path, monkeypatch, name, cfg,
                                                        pass_fn):
    """Child-tuning_D and FishMask read their Fisher pass through the cache: a second setup
    (another learning rate, a resumed run) makes no pass and selects the same entries."""
    model, base = bert
    method = methods.create(name, model, {**cfg, "progress": False})
    ctx = _ctx(model, tmp_path)
    first = method.setup(jax.random.PRNGKey(0), base, ctx)
    real, calls = getattr(fisher, pass_fn), []
    monkeypatch.setattr(fisher, pass_fn, lambda *a, **k: calls.append(1) or real(*a, **k))
    again = method.setup(jax.random.PRNGKey(0), base, ctx)
    assert calls == []
    assert set(first.state) == set(again.state) and first.state
    for k in first.state:
        np.testing.assert_array_equal(np.asarray(first.state[k]), np.asarray(again.state[k]))
    uncached = method.setup(jax.random.PRNGKey(0), base, fisher_context(model))
    assert calls == [1]
    for k in first.state:
        np.testing.assert_array_equal(np.asarray(first.state[k]), np.asarray(uncached.state[k]))
