"""Task-arithmetic merges (peftjax.merging) against their definitions on explicit matrices."""

import jax
import numpy as np
import pytest

from peftjax import merging
from peftjax.methods import core
from tests.helpers import tiny_model

T1 = np.array([[3.0, -1.0, 0.5], [-2.0, 0.1, 4.0]])
T2 = np.array([[-1.0, 2.0, 0.2], [1.0, -0.3, 1.0]])


def test_linear_and_magnitude_prune():
    np.testing.assert_allclose(merging.combine_tensors([T1, T2], [0.5, 2.0], "linear"), 0.5 * T1 + 2 * T2)
    # density 0.5 keeps the 3 largest |entries| of each
    p1 = np.array([[3.0, 0, 0], [-2.0, 0, 4.0]])
    p2 = np.array([[-1.0, 2.0, 0], [1.0, 0, 1.0]])
    np.testing.assert_allclose(merging.combine_tensors([T1, T2], [1, 1], "magnitude_prune", density=0.5),
                               p1 + p2)


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    out = merging.combine_tensors([T1, T2], [1.0, 1.0], "ties", density=0.5)
    # trimmed: p1, p2 as above; elected sign of p1 + p2: [[+, +, 0], [-, 0, +]]
    # agreeing entries: (0,0) only T1 (3), (0,1) only T2 (2), (1,0) only T1 (-2), (1,2) both (4+1)/2
    np.testing.assert_allclose(out, [[3.0, 2.0, 0.0], [-2.0, 0.0, 2.5]])


def test_dare_drops_and_rescales_seeded():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(200, 200))
    out = merging.combine_tensors([t], [1.0], "dare_linear", density=0.3, rng=np.random.default_rng(1))
    kept = out != 0
    assert abs(kept.mean() - 0.3) < 0.01
    np.testing.assert_allclose(out[kept], t[kept] / 0.3)
    again = merging.combine_tensors([t], [1.0], "dare_linear", density=0.3, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(out, again)
    with pytest.raises(ValueError, match="density"):
        merging.combine_tensors([t], [1.0], "ties", density=0.0)
    with pytest.raises(ValueError, match="combination"):
        merging.combine_tensors([t], [1.0], "average")


def test_task_vectors_include_rslora_and_dora_scalings():
    """The task vector comes from the method's own merge: rsLoRA's α/√r and DoRA's magnitude
    and norm are in it (PEFT's add_weighted_adapter combines the raw factors)."""
    model, base = tiny_model("bert")
    rng = np.random.default_rng(0)
    for name, cfg in (("lora", {"rank": 4, "alpha": 8.0, "use_rslora": True}), ("dora", {"rank": 4, "alpha": 8.0})):
        m = core.create(name, model, cfg)
        p = m.setup(jax.random.PRNGKey(0), base)
        added = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in p.trainable["added"].items()}
        trainable = {**p.trainable, "added": added}
        tv = merging.task_vectors(m, trainable, p.frozen, p.state)
        site = m.targets[0]
        w0 = np.asarray(base[site + ".kernel"], np.float64)
        a, b = (np.asarray(added[f"{site}.{n}"], np.float64) for n in ("lora_A", "lora_B"))
        if name == "lora":
            want = (8.0 / 2.0) * a @ b
        else:
            w = w0 + 2.0 * a @ b
            want = w * (np.asarray(added[site + ".lora_magnitude"]) / np.linalg.norm(w, axis=0))[None] - w0
        np.testing.assert_allclose(tv[site], want, atol=1e-5)


def test_svd_refactoring_to_a_target_rank():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(8, 5)) @ rng.normal(size=(5, 6))
    a, b = merging.refactor(d, 2)
    u, s, vt = np.linalg.svd(d)
    np.testing.assert_allclose(a @ b, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)
    a, b = merging.refactor(d, None)
    assert a.shape[1] == 5 and np.allclose(a @ b, d, atol=1e-4)
