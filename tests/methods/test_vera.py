"""VeRA specifics: one frozen random A/B shared by all layers, vector init, counts, the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from peftjax import methods
from peftjax.models import build_model
from configs import models as model_configs
from tests.helpers import learnable_batch, tiny_model


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def test_shared_projections_identical_across_layers_and_not_trainable(bert):
    model, base = bert
    m = methods.create("vera", model, {"rank": 8})
    peft = m.setup(jax.random.PRNGKey(0), base)
    assert set(peft.state) == {"vera_A", "vera_B"}                  # one pair for the whole model
    assert not any("vera_A" in k or "vera_B" in k for k in peft.trainable["added"])
    a0, b0 = m.projections(peft.state, m.targets[0])
    for s in m.targets[1:]:
        a, b = m.projections(peft.state, s)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(a0))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(b0))
    # regenerated from the seed: a fresh setup gives the same matrices; another key differs
    again = m.setup(jax.random.PRNGKey(5), base).state
    np.testing.assert_array_equal(np.asarray(again["vera_A"]), np.asarray(peft.state["vera_A"]))
    other = methods.create("vera", model, {"rank": 8, "projection_prng_key": 1}).setup(jax.random.PRNGKey(0), base)
    assert not np.array_equal(np.asarray(other.state["vera_A"]), np.asarray(peft.state["vera_A"]))
    # init: d = 0.1, b = 0; kaiming-uniform bounds 1/sqrt(in_max) and 1/sqrt(r)
    d = peft.trainable["added"][m.targets[0] + ".vera_lambda_d"]
    np.testing.assert_allclose(np.asarray(d), 0.1)
    assert not np.asarray(peft.trainable["added"][m.targets[0] + ".vera_lambda_b"]).any()
    assert np.abs(np.asarray(peft.state["vera_A"])).max() <= 1 / np.sqrt(32)
    assert np.abs(np.asarray(peft.state["vera_B"])).max() <= 1 / np.sqrt(8)


def test_update_is_lambda_b_B_lambda_d_A(bert):
    model, base = bert
    m = methods.create("vera", model, {"rank": 8})
    peft = m.setup(jax.random.PRNGKey(0), base)
    rng = np.random.default_rng(0)
    added = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in peft.trainable["added"].items()}
    trainable = {**peft.trainable, "added": added}
    batch = learnable_batch(model)
    manual = dict(base)
    A, B = np.asarray(peft.state["vera_A"]), np.asarray(peft.state["vera_B"])
    for s in m.targets:  # torch layout: ΔW = Λ_b B Λ_d A, (out, in); flax kernel is its transpose
        d, b = np.asarray(added[s + ".vera_lambda_d"]), np.asarray(added[s + ".vera_lambda_b"])
        delta_torch = np.diag(b) @ B.T[:32] @ np.diag(d) @ A.T[:, :32]
        manual[s + ".kernel"] = base[s + ".kernel"] + delta_torch.T
    plain = model.apply(traverse_util.unflatten_dict(manual, sep="."), batch)
    out = m.apply(trainable, peft.frozen, peft.state, batch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-4)


def test_counts_on_bert_base():
    model = build_model(model_configs.get("bert-base-uncased").hf_config)
    counts = methods.count_params(methods.create("vera", model, {"rank": 256}))
    assert counts["trainable_params"] == 12 * 2 * (256 + 768)       # d (r) + b (out) on query, value
