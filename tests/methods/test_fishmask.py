"""FishMask: exact budget, the Fisher it ranks by, fixed sparse training, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.losses import params_loss_fn
from peftjax.methods import fisher
from peftjax.models import build_model
from peftjax.train import init_state, make_train_step
from peftjax.train.compose import init_context
from tests.helpers import fisher_context, learnable_batch, tiny_model, tree_size

CFG = {"keep_ratio": 0.05, "num_examples": 8, "progress": False}


@pytest.fixture(scope="module")
def setup():
    model, base = tiny_model("bert")
    method = methods.create("fishmask", model, CFG)
    peft = method.setup(jax.random.PRNGKey(0), base, fisher_context(model))
    return model, base, method, peft


def test_kept_fraction_is_exact(setup):
    model, base, method, peft = setup
    total = tree_size(base)
    head = tree_size(peft.trainable["head"])
    assert tree_size(peft.trainable["base"]) + head == int(round(0.05 * total))
    counts = methods.count_params(method)
    assert counts["trainable_params"] + counts["head_params"] == int(round(0.05 * total))
    assert counts["total_params"] == total
    for path, vals in peft.trainable["base"].items():
        idx = np.asarray(peft.state[path + ".indices"])
        assert idx.dtype == np.int32 and idx.shape == vals.shape
        assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < np.size(base[path])
        np.testing.assert_array_equal(np.asarray(vals), np.asarray(base[path]).reshape(-1)[idx])


def test_bert_large_budget_is_half_a_percent_of_all_params():
    cfg = model_configs.get("bert-large-uncased")
    model = build_model(cfg.hf_config.to_dict(), head="classification", num_labels=2)
    method = methods.create("fishmask", model, {})
    c = methods.count_params(method)
    assert c["trainable_params"] + c["head_params"] == int(round(0.005 * c["total_params"]))
    assert method.accounting()["count_rule"].startswith("head inside the budget")
    out = methods.create("fishmask", model, {"head_in_budget": False})
    assert methods.count_params(out)["trainable_params"] == int(round(0.005 * c["total_params"]))
    assert out.accounting()["count_rule"].startswith("head outside the budget")


def test_mask_is_the_global_top_k_of_the_empirical_fisher(setup):
    model, base, method, peft = setup
    batch = learnable_batch(model)
    loss_fn = params_loss_fn(model)
    paths = [p for p in base if not method.sites.is_head(p)]
    # Reference: one example at a time, plain jax.grad, squared and summed.
    ref = {p: np.zeros(np.shape(base[p]), np.float32) for p in paths}
    for i in range(8):
        ex = {k: np.asarray(v)[i:i + 1] for k, v in batch.items()}
        g = jax.grad(lambda c: loss_fn({**base, **c}, ex))({p: base[p] for p in paths})
        for p in paths:
            ref[p] += np.square(np.asarray(g[p]))
    got, used = fisher.empirical_fisher(loss_fn, base, paths, iter([batch]), 8, progress=False)
    assert used == 8
    for p in paths:
        np.testing.assert_allclose(np.asarray(got[p]), ref[p], rtol=1e-4, atol=1e-9)
    # Every kept entry scores at least as high as every dropped one.
    mask = method.dense_mask(peft.state, peft.frozen)
    kept = np.concatenate([ref[p][mask[p]] for p in paths])
    dropped = np.concatenate([ref[p][~mask[p]] for p in paths])
    assert kept.min() >= dropped.max() * (1 - 1e-4)


def test_only_examples_up_to_n_count():
    model, base = tiny_model("bert")
    loss_fn = params_loss_fn(model)
    batch = learnable_batch(model)
    paths = ["bert.pooler.dense.bias"]
    first3, used = fisher.empirical_fisher(loss_fn, base, paths, iter([batch]), 3, progress=False)
    sub = {k: np.asarray(v)[:3] for k, v in batch.items()}
    again, _ = fisher.empirical_fisher(loss_fn, base, paths, iter([sub]), 8, progress=False)
    assert used == 3
    np.testing.assert_allclose(np.asarray(first3[paths[0]]), np.asarray(again[paths[0]]), rtol=1e-6)


def _train(method, peft, tx, steps=5):
    model = method.model
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(method, tx, seed=0))
    batch = learnable_batch(model)
    for _ in range(steps):
        state, _ = step(state, peft.frozen, batch)
    return state


def test_entries_outside_the_mask_are_bit_identical_after_training(setup):
    model, base, method, peft = setup
    state = _train(method, peft, optax.adam(1e-2))
    eff = method.effective_base(state.trainable, peft.frozen, state.method_state)
    mask = method.dense_mask(peft.state, peft.frozen)
    moved = 0
    for p, m in mask.items():
        a, b = np.asarray(eff[p]), np.asarray(base[p])
        np.testing.assert_array_equal(a[~m], b[~m], err_msg=p)
        moved += int(np.sum(a[m] != b[m]))
    assert moved > 0  # (selected entries with zero gradient on this batch stay put)


def test_sparse_and_dense_masked_trajectories_agree(setup):
    """representation="dense" (whole params, masked) follows the sparse run step for step, under
    AdamW with weight decay and global-norm clipping; outside the mask it stays bit-identical."""
    model, base, method, peft = setup
    tx = optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(1e-2, weight_decay=0.1))
    sparse = _train(method, peft, tx)
    dmethod = methods.create("fishmask", model, {**CFG, "representation": "dense"})
    dpeft = dmethod.setup(jax.random.PRNGKey(0), base, fisher_context(model))
    mask = method.dense_mask(peft.state, peft.frozen)
    dmask = dmethod.dense_mask(dpeft.state, dpeft.frozen)
    for p in mask:
        np.testing.assert_array_equal(mask[p], dmask[p], err_msg=p)   # the same selection
    # dense: whole params in the trainable tree (the comparison the sparse mode is built to avoid)
    assert tree_size(dpeft.trainable["base"]) > 10 * tree_size(peft.trainable["base"])
    dense = _train(dmethod, dpeft, tx)
    eff = method.effective_base(sparse.trainable, peft.frozen, sparse.method_state)
    deff = dmethod.effective_base(dense.trainable, dpeft.frozen, dense.method_state)
    for p in mask:
        np.testing.assert_array_equal(np.asarray(deff[p])[~mask[p]], np.asarray(base[p])[~mask[p]])
        if p.endswith("attention.self.key.bias"):
            # The key bias adds the same q·b_k to every score of a query, which the softmax
            # cancels: its gradient is exactly zero, and what either run computes for it is
            # rounding noise that the two representations sum in different orders (Adam then
            # scales noise like signal). Both must stay where they started, not agree.
            for run in (eff, deff):
                np.testing.assert_allclose(np.asarray(run[p]), np.asarray(base[p]), atol=1e-5, err_msg=p)
            continue
        np.testing.assert_allclose(np.asarray(eff[p]), np.asarray(deff[p]), rtol=1e-5, atol=1e-6,
                                   err_msg=p)
    for p in peft.trainable["head"]:
        np.testing.assert_allclose(np.asarray(sparse.trainable["head"][p]),
                                   np.asarray(dense.trainable["head"][p]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"representation='packed' is invalid; valid: sparse \| dense"):
        methods.create("fishmask", model, {**CFG, "representation": "packed"})


def test_bad_input_is_refused_before_compute():
    model, base = tiny_model("bert")
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            methods.create("fishmask", model, {"keep_ratio": ratio})
    with pytest.raises(ValueError, match="head"):
        methods.create("fishmask", model, {"keep_ratio": 1e-5})
    method = methods.create("fishmask", model, {"num_examples": 9, "progress": False})

    def no_data():
        raise AssertionError("the training data must not be read")

    ctx = fisher_context(model)
    ctx = type(ctx)(train_batches=no_data, loss_fn=ctx.loss_fn, num_train_examples=8)
    with pytest.raises(ValueError, match="num_examples=9 is larger than the training set"):
        method.setup(jax.random.PRNGKey(0), base, ctx)
    with pytest.raises(ValueError, match="train_batches"):
        method.setup(jax.random.PRNGKey(0), base)


def test_loop_init_context_yields_the_training_rows_in_order():
    model, base = tiny_model("bert")
    batch = learnable_batch(model)
    encoded = {k: v for k, v in batch.items() if k != "mask"}
    ctx = init_context(model, None, encoded, chunk=3)
    assert ctx.num_train_examples == 8
    got = list(ctx.train_batches())
    assert [b["input_ids"].shape for b in got] == [(3, 12)] * 3
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in got]),
                                  np.arange(9) < 8)
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in got])[:8],
                                  batch["input_ids"])
    method = methods.create("fishmask", model, CFG)
    a = method.setup(jax.random.PRNGKey(0), base, ctx)
    b = method.setup(jax.random.PRNGKey(0), base, fisher_context(model))
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        np.testing.assert_array_equal(np.asarray(a.state[k]), np.asarray(b.state[k]))


def test_saved_adapter_size_is_proportional_to_k(tmp_path):
    """8 bytes per kept entry (an fp32 value + an int32 index) plus the head: the file grows with
    k, not with the model; the dense comparison mode saves whole params."""
    from peftjax.methods import saving

    model, base = tiny_model("bert")
    ctx = fisher_context(model)
    sizes = {}
    for ratio in (0.02, 0.04, 0.08):
        method = methods.create("fishmask", model, {**CFG, "keep_ratio": ratio,
                                                    "head_in_budget": False})
        peft = method.setup(jax.random.PRNGKey(0), base, ctx)
        k = methods.count_params(method)["trainable_params"]
        assert k == int(round(ratio * tree_size(base)))
        size = saving.save_adapter(str(tmp_path / str(ratio)), method, peft.trainable, peft.state)
        with open(tmp_path / str(ratio) / saving.WEIGHTS, "rb") as f:   # safetensors: u64 header
            header = 8 + int.from_bytes(f.read(8), "little")           # length, JSON, then data
        assert header < 16 * 1024
        sizes[ratio] = size - header
        assert sizes[ratio] == 8 * k + 4 * tree_size(peft.trainable["head"])
    head = 4 * tree_size(peft.trainable["head"])
    assert (sizes[0.08] - head) / (sizes[0.02] - head) == pytest.approx(4.0, rel=1e-3)
    dense = methods.create("fishmask", model, {**CFG, "keep_ratio": 0.02, "head_in_budget": False,
                                               "representation": "dense"})
    dpeft = dense.setup(jax.random.PRNGKey(0), base, ctx)
    dsize = saving.save_adapter(str(tmp_path / "dense"), dense, dpeft.trainable, dpeft.state)
    assert dsize > 0.5 * 4 * tree_size(base) > 10 * sizes[0.02]
