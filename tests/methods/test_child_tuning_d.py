"""Child-tuning_D: the encoder-layer child network by clipped Fisher, exact size, fixed."""

import re

import jax
import numpy as np
import optax
import pytest

from peftjax import methods
from peftjax.losses import params_loss_fn
from peftjax.methods import fisher
from peftjax.train import init_state, make_train_step
from tests.helpers import fisher_context, learnable_batch, tiny_model, tree_size

LAYER = re.compile(r"\.layers?\.\d+\.")


@pytest.fixture(scope="module", params=["bert", "llama"])
def setup(request):
    model, base = tiny_model(request.param)
    method = methods.create("child_tuning_d", model, {"reserve_p": 0.3, "progress": False})
    peft = method.setup(jax.random.PRNGKey(0), base, fisher_context(model))
    return model, base, method, peft


def test_kept_fraction_is_exact_and_only_layers_are_masked(setup):
    model, base, method, peft = setup
    layer = {p: v for p, v in base.items() if LAYER.search(p) and not method.sites.is_head(p)}
    assert layer
    selected = sum(np.size(peft.state[p + ".indices"]) for p in layer if p + ".indices" in peft.state)
    assert selected == int(round(0.3 * tree_size(layer)))
    for p in base:
        if not LAYER.search(p) and not method.sites.is_head(p):
            assert np.shape(peft.trainable["base"][p]) == np.shape(base[p])  # trained whole
    counts = methods.count_params(method)
    assert counts["trainable_params"] == tree_size(peft.trainable["base"])


def test_mask_is_top_p_of_the_clipped_batch_fisher(setup):
    model, base, method, peft = setup
    batch = learnable_batch(model)
    loss_fn = params_loss_fn(model)
    paths = [p for p in base if LAYER.search(p) and not method.sites.is_head(p)]
    g = jax.grad(lambda c: loss_fn({**base, **c}, batch))({p: base[p] for p in paths})
    ref = {}
    for p in paths:
        x = np.asarray(g[p], np.float64)
        x = x * min(1.0, 1.0 / (np.linalg.norm(x) + 1e-6))
        ref[p] = x ** 2
    mask = method.dense_mask(peft.state, peft.frozen)
    kept = np.concatenate([ref[p][mask[p]] for p in paths])
    dropped = np.concatenate([ref[p][~mask[p]] for p in paths])
    assert kept.min() >= dropped.max() * (1 - 1e-3) - 1e-12


def test_entries_outside_the_child_network_stay_bit_identical(setup):
    model, base, method, peft = setup
    tx = optax.adam(3e-3)
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(method, tx, seed=0))
    for _ in range(3):
        state, _ = step(state, peft.frozen, learnable_batch(model))
    eff = method.effective_base(state.trainable, peft.frozen, state.method_state)
    mask = method.dense_mask(state.method_state, peft.frozen)
    for p in base:
        if LAYER.search(p) and not method.sites.is_head(p):
            a, b = np.asarray(eff[p]), np.asarray(base[p])
            np.testing.assert_array_equal(a[~mask[p]], b[~mask[p]], err_msg=p)


def test_bad_reserve_p_is_refused():
    model, _ = tiny_model("bert")
    for p in (0.0, 1.2):
        with pytest.raises(ValueError, match="reserve_p"):
            methods.create("child_tuning_d", model, {"reserve_p": p})
