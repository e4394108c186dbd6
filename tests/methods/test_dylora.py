"""DyLoRA specifics: frozen-mode gradients, evaluation at a chosen rank, the per-step rank draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from peftjax import methods
from tests.helpers import learnable_batch, tiny_model

SITE = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def _random_added(m, base, seed=0):
    peft = m.setup(jax.random.PRNGKey(0), base)
    rng = np.random.default_rng(seed)
    return peft, {k: jnp.asarray(rng.normal(size=v.shape) * 0.3, jnp.float32)
                  for k, v in peft.trainable["added"].items()}


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_mode_trains_only_the_sampled_component(bert, frozen):
    model, base = bert
    m = methods.create("dylora", model, {"rank": 6, "frozen": frozen})
    _, added = _random_added(m, base)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32)), jnp.float32)
    b = jnp.asarray(3)
    def delta(ad):
        a, bm = m.factors({"lora_A": ad[SITE + ".lora_A"], "lora_B": ad[SITE + ".lora_B"]},
                          jnp.float32, (b, True))   # a training step's context: rank b drawn
        return jnp.sum(jnp.sin((x @ a) @ bm))

    grads = jax.grad(delta)(added)
    ga = np.abs(np.asarray(grads[SITE + ".lora_A"])).sum(axis=0)   # per component (column of A)
    gb = np.abs(np.asarray(grads[SITE + ".lora_B"])).sum(axis=1)   # per component (row of B)
    trained = [2] if frozen else [0, 1, 2]
    for i in range(6):
        assert (ga[i] > 0) == (i in trained) and (gb[i] > 0) == (i in trained), (i, ga, gb)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_eval_at_rank_uses_exactly_its_components(bert, rank):
    model, base = bert
    m = methods.create("dylora", model, {"rank": 6, "alpha": 12.0, "eval_rank": rank})
    peft, added = _random_added(m, base)
    trainable = {**peft.trainable, "added": added}
    batch = learnable_batch(model)
    out = m.apply(trainable, peft.frozen, peft.state, batch)
    # explicit: W0 + (alpha / b) A[:, :b] B[:b] at every target
    manual = dict(base)
    for s in m.targets:
        manual[s + ".kernel"] = base[s + ".kernel"] + (12.0 / rank) * added[s + ".lora_A"][:, :rank] @ added[s + ".lora_B"][:rank]
    plain = model.apply(traverse_util.unflatten_dict(manual, sep="."), batch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-5)
    merged = m.merged_params(trainable, peft.frozen, peft.state)
    np.testing.assert_allclose(np.asarray(merged[SITE + ".kernel"]), np.asarray(manual[SITE + ".kernel"]), atol=1e-6)
    # components above the rank do not matter
    noisy = {k: (v.at[:, rank:].add(1.0) if k.endswith("lora_A") else v.at[rank:].add(1.0))
             for k, v in added.items()}
    out2 = m.apply({**trainable, "added": noisy}, peft.frozen, peft.state, batch)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-6)


def test_one_rank_per_step_drawn_uniformly(bert):
    m = methods.create("dylora", bert[0], {"rank": 4})
    draws = np.asarray(jax.vmap(m.sample_rank)(jax.random.split(jax.random.PRNGKey(0), 4000)))
    assert set(np.unique(draws)) == {1, 2, 3, 4}
    assert np.all(np.abs(np.bincount(draws)[1:] / 4000 - 0.25) < 0.03)
    assert methods.create("dylora", bert[0], {"rank": 4}).eval_rank == 4   # eval_rank 0: r_max
    with pytest.raises(ValueError, match="eval_rank"):
        methods.create("dylora", bert[0], {"rank": 4, "eval_rank": 5})


def test_rank_sweep_script_on_a_finished_run(tmp_path):
    """scripts/dylora_sweep.py restores the run's best adapter; at r_max it reproduces its test."""
    import json
    import sys

    from tests.train.test_loop import tiny_config
    from peftjax.train import train_and_evaluate

    sys.path.insert(0, "scripts")
    import dylora_sweep

    config = tiny_config(str(tmp_path / "tfds"), method="dylora", steps=4, eval_every=2,
                         train_limit=32, eval_limit=16)
    config.method.rank = 4
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(config, workdir)
    out = dylora_sweep.sweep(workdir, [1, 4])
    assert set(out["ranks"]) == {"1", "4"}
    assert out["ranks"]["4"]["test"] == result["metrics"]["test"]
    with open(tmp_path / "run" / "rank_sweep.json") as f:
        assert json.load(f) == out
