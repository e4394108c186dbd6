"""Several named LoRA adapters on one frozen base (``peftjax.adapters``)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from peftjax.adapters import DISABLED, AdapterSet, truncate
from peftjax.interop import export_adapter
from peftjax.methods import core
from tests.helpers import learnable_batch, tiny_model

TOL = 1e-5


def _adapter(model, params, seed, **config):
    method = core.create("lora", model, config)
    p = method.setup(jax.random.PRNGKey(seed), params)
    rs = np.random.RandomState(seed)
    added = {k: (v + 0.5 * rs.standard_normal(v.shape).astype(np.float32)) if k.endswith("lora_B") else v
             for k, v in p.trainable["added"].items()}
    head = {k: v + 0.5 * rs.standard_normal(v.shape).astype(np.float32) for k, v in p.trainable["head"].items()}
    return method, p._replace(trainable={"base": {}, "added": added, "head": head})


@pytest.fixture(scope="module")
def setup():
    model, params = tiny_model("bert")
    a = _adapter(model, params, 1, rank=2, alpha=4.0, targets=r"\.(query|value)$")
    b = _adapter(model, params, 2, rank=4, alpha=8.0, use_rslora=True,
                 targets=r"\.(value|attention\.output\.dense|intermediate\.dense)$")
    aset = AdapterSet(model, params)
    aset.add("a", a[0], a[1].trainable)
    aset.add("b", b[0], b[1].trainable)
    batch = {k: v for k, v in learnable_batch(model, batch=4, seq=10).items() if k in model.input_names}
    return model, params, aset, {"a": a, "b": b}, batch


def _own(method, p, batch):
    return np.asarray(jax.jit(lambda t, f, b: method.apply(t, f, {}, b))(p.trainable, p.frozen, batch))


def test_switching_gives_each_adapters_own_output_without_recompiling(setup):
    model, params, aset, adapters, batch = setup
    outs = {}
    for name in ["a", "b", None, "a", DISABLED, 1]:
        outs[name] = np.asarray(aset.apply(batch, name))
    assert aset.traces == 1  # one compiled program for every adapter and for disabled
    for name, (method, p) in adapters.items():
        delta = float(np.abs(outs[name] - _own(method, p, batch)).max())
        print(f"\nadapter {name}: max|Δ| vs its own method {delta:.2e}")
        assert delta <= TOL
    base = np.asarray(jax.jit(model.apply)(traverse_util.unflatten_dict(params, sep="."), batch))
    np.testing.assert_allclose(outs[None], base, atol=TOL, rtol=0)
    np.testing.assert_array_equal(outs[DISABLED], outs[None])
    np.testing.assert_array_equal(outs[1], outs["b"])
    assert np.abs(outs["a"] - outs["b"]).max() > 1e-2 and np.abs(outs["a"] - base).max() > 1e-2


def test_combined_cat_is_the_weighted_sum_and_merges(setup):
    model, params, aset, adapters, batch = setup
    w = (0.7, -0.4)
    method, trainable = aset.combine("mix", ["a", "b"], w)
    assert method.config.rank == 6 and method.scaling == 1.0
    da, db = aset.delta_weights("a"), aset.delta_weights("b")
    got = aset.delta_weights("mix")
    assert set(got) == set(da) | set(db)
    err = max(float(np.abs(got[s] - (w[0] * da.get(s, 0) + w[1] * db.get(s, 0))).max()) for s in got)
    print(f"\ncat combination: max|ΔW - Σ w_i ΔW_i| {err:.2e}")
    assert err <= TOL
    # As a plain LoRA: unmerged == merged, and the set serves it too.
    p = method.setup(jax.random.PRNGKey(0), params)
    p = p._replace(trainable=trainable | {"head": p.trainable["head"]})
    unmerged = _own(method, p, batch)
    merged = np.asarray(jax.jit(model.apply)(
        traverse_util.unflatten_dict(method.merged_params(p.trainable, p.frozen, {}), sep="."), batch))
    assert float(np.abs(unmerged - merged).max()) <= TOL
    assert float(np.abs(np.asarray(aset.apply(batch, "mix")) - unmerged).max()) <= TOL
    aset.remove("mix")


def test_svd_truncation(setup):
    model, params, aset, adapters, batch = setup
    target = {s: 0.5 * aset.delta_weights("a").get(s, 0) + 0.5 * aset.delta_weights("b").get(s, 0)
              for s in set(aset.delta_weights("a")) | set(aset.delta_weights("b"))}
    full, _ = aset.combine("full", ["a", "b"], [0.5, 0.5], rank=6)
    low, _ = aset.combine("low", ["a", "b"], [0.5, 0.5], rank=3)
    assert low.config.rank == 3
    got_full, got_low = aset.delta_weights("full"), aset.delta_weights("low")
    for site, dw in target.items():
        dw = np.asarray(dw, np.float64)
        assert float(np.abs(got_full[site] - dw).max()) <= TOL  # rank Σr: exact
        u, s, vt = np.linalg.svd(dw)
        best = (u[:, :3] * s[:3]) @ vt[:3]  # Eckart–Young
        assert float(np.abs(got_low[site] - best).max()) <= TOL
    a, b = truncate(np.ones((5, 2), np.float32), np.ones((2, 7), np.float32), 4)  # pads
    assert a.shape == (5, 4) and b.shape == (4, 7) and np.allclose(a @ b, 2.0, atol=1e-5)
    aset.remove("full")
    aset.remove("low")


def test_load_from_peft_folder_and_refusals(setup, tmp_path):
    model, params, aset, adapters, batch = setup
    method, p = adapters["a"]
    export_adapter(method, p.trainable, str(tmp_path))
    other = AdapterSet(model, params)
    other.load("a", str(tmp_path))
    np.testing.assert_allclose(np.asarray(other.apply(batch, "a")), np.asarray(aset.apply(batch, "a")),
                               atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="already used"):
        other.add("a", method, p.trainable)
    with pytest.raises(ValueError, match="no adapter named 'zz'; adapters: a"):
        other.apply(batch, "zz")
    pt = core.create("prompt_tuning", model, {"num_virtual_tokens": 2})
    with pytest.raises(ValueError, match="not an additive low-rank update"):
        other.add("p", pt, {})
    if "dora" in core.registered():
        dora = core.create("dora", model, {"rank": 2})
        with pytest.raises(ValueError, match="DoRA re-normalises"):
            other.add("d", dora, {})


def test_mixed_batch_rows_equal_each_adapter_alone(setup):
    """PEFT's adapter_names per row: one compiled forward for any assignment, each row's output
    equal to its adapter (or the base model) run alone, task heads included."""
    model, params, aset, adapters, batch = setup
    names = ["a", "base", "b", "a"]
    mixed = np.asarray(aset.apply(batch, names))
    for i, n in enumerate(names):
        alone = np.asarray(aset.apply(batch, None if n == "base" else n))[i]
        np.testing.assert_allclose(mixed[i], alone, atol=1e-5, rtol=1e-5)
    traces = aset.traces
    again = np.asarray(aset.apply(batch, ["b", "b", "a", "base"]))
    assert aset.traces == traces   # another assignment: no new trace
    np.testing.assert_allclose(again[2], np.asarray(aset.apply(batch, "a"))[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one per row"):
        aset.apply(batch, ["a"])


def test_merges_are_the_formulas_on_the_adapters_updates(setup):
    """TIES, DARE and magnitude pruning of the set's updates (scalings folded in, rsLoRA's
    α/√r included) equal peftjax.merging applied to the explicit ΔW matrices."""
    from peftjax import merging

    model, params, aset, adapters, batch = setup
    da, db = aset.delta_weights("a"), aset.delta_weights("b")
    # rsLoRA: b's scale is alpha / sqrt(r) = 8 / 2
    m_b, p_b = adapters["b"]
    site = next(iter(db))
    expected_b = 4.0 * np.asarray(p_b.trainable["added"][site + ".lora_A"]) @ np.asarray(
        p_b.trainable["added"][site + ".lora_B"])
    np.testing.assert_allclose(np.asarray(db[site]), expected_b, atol=1e-5)
    for combination in ("ties", "dare_ties", "magnitude_prune", "dare_linear"):
        method, _ = aset.combine(combination, ["a", "b"], [0.6, 0.8], combination=combination,
                                 density=0.5, seed=3)
        want = merging.merge_task_vectors([{s: np.asarray(v) for s, v in da.items()},
                                           {s: np.asarray(v) for s, v in db.items()}],
                                          [0.6, 0.8], combination, density=0.5, seed=3)
        got = aset.delta_weights(combination)
        assert set(got) == set(want)
        for s in want:
            np.testing.assert_allclose(np.asarray(got[s]), want[s], atol=1e-4)
        aset.remove(combination)
