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
    # from the run's seed by default: another run seed draws other projections, the same one
    # the same; projection_prng_key pins them (PEFT's behaviour) whatever the run's seed
    again = m.setup(jax.random.PRNGKey(0), base).state
    np.testing.assert_array_equal(np.asarray(again["vera_A"]), np.asarray(peft.state["vera_A"]))
    other_seed = m.setup(jax.random.PRNGKey(5), base).state
    assert not np.array_equal(np.asarray(other_seed["vera_A"]), np.asarray(peft.state["vera_A"]))
    pinned = methods.create("vera", model, {"rank": 8, "projection_prng_key": 1})
    p1, p2 = (pinned.setup(jax.random.PRNGKey(k), base).state for k in (0, 5))
    np.testing.assert_array_equal(np.asarray(p1["vera_B"]), np.asarray(p2["vera_B"]))
    # init: d = 0.1, b = 0
    d = peft.trainable["added"][m.targets[0] + ".vera_lambda_d"]
    np.testing.assert_allclose(np.asarray(d), 0.1)
    assert not np.asarray(peft.trainable["added"][m.targets[0] + ".vera_lambda_b"]).any()


def test_projection_init_is_peft_kaiming_bound(bert):
    """PEFT 0.21 ``_kaiming_init``: gain √2, std gain/√fan_in, bound √3·std = √(6/fan_in), with
    fan_in = in_features for A (torch (r, in)) and r for B (torch (out, r)). The previous bound
    1/√fan_in made ΔW ~6× smaller."""
    import math

    model, base = bert
    m = methods.create("vera", model, {"rank": 64})
    state = m.setup(jax.random.PRNGKey(0), base).state
    a, b = np.asarray(state["vera_A"]), np.asarray(state["vera_B"])
    # the bound PEFT's code computes, written out as there
    peft_bound = lambda fan: math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan))
    for x, fan in ((a, m.in_max), (b, 64)):
        bound = peft_bound(fan)
        assert np.abs(x).max() <= bound
        assert np.abs(x).max() > 0.95 * bound                 # uniform over the whole range
        np.testing.assert_allclose(x.std(), bound / math.sqrt(3), rtol=0.1)


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
