"""AdaLoRA specifics: the cubic budget, global masking to the budget, the orthogonality penalty,
the final rank report, and ``total_step`` (validated; filled from the run length by the loop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import methods
from peftjax.methods.adalora import budget_schedule, orth_penalty
from peftjax.methods.core import InitContext
from tests.helpers import tiny_model

CFG = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 1, "total_step": 16,
       "targets": r"\.(query|key|value)$"}


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def test_budget_schedule_at_key_steps():
    kw = dict(init_bgt=24, target_bgt=16, tinit=10, tfinal=20, total_step=100, deltaT=5)
    assert budget_schedule(0, **kw) == (24, False)
    assert budget_schedule(10, **kw) == (24, False)               # warm-up, t <= t_init
    assert budget_schedule(11, **kw) == (23, False)               # int(16 + 8 (69/70)^3) = 23; 11 % 5
    assert budget_schedule(45, **kw) == (17, True)                # halfway: 16 + 8/8
    assert budget_schedule(80, **kw) == (16, True)                # t = T - t_final: b_T
    assert budget_schedule(81, **kw) == (16, True)                # final phase
    assert budget_schedule(100, **kw) == (16, True)


def test_schedule_table_matches_function(bert):
    m = methods.create("adalora", bert[0], CFG)
    assert m.init_bgt == 4 * 6 and m.target_bgt == 2 * 6         # 2 layers x q,k,v
    for t in range(17):
        b, mask = budget_schedule(t, init_bgt=24, target_bgt=12, tinit=2, tfinal=4, total_step=16,
                                  deltaT=1)
        assert (int(m.budgets[t]), bool(m.mask_steps[t])) == (b, mask)


def _random_grads(peft, seed):
    rng = np.random.default_rng(seed)
    return {**jax.tree.map(jnp.zeros_like, peft.trainable),
            "added": {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
                      for k, v in peft.trainable["added"].items()}}


def _ones_e(trainable):
    added = {k: (jnp.ones_like(v) if k.endswith(".lora_E") else v) for k, v in trainable["added"].items()}
    return {**trainable, "added": added}


def test_masking_keeps_exactly_the_budget_of_top_triplets(bert):
    m = methods.create("adalora", bert[0], CFG)
    peft = m.setup(jax.random.PRNGKey(0), bert[1])
    update = jax.jit(m.update_state)
    state, trainable = peft.state, peft.trainable
    for t in range(8):  # budget phase: steps 3..12 mask every step
        state, trainable = update(state, _ones_e(trainable), _random_grads(peft, t), jnp.asarray(t))
        budget = int(m.budgets[t])
        e = np.concatenate([np.asarray(trainable["added"][s + ".lora_E"]) for s in m.targets])
        if t <= 2:
            assert (e != 0).sum() == 24, t                         # warm-up: nothing masked
            continue
        assert (e != 0).sum() == budget, (t, budget)
        scores = np.concatenate([np.asarray(m.triplet_scores(state, s)) for s in m.targets])
        kept = set(np.flatnonzero(e != 0))
        assert kept == set(np.argsort(-scores)[:budget])           # the highest-scoring triplets
        pattern = np.concatenate([np.asarray(state[s + ".rank_mask"]) for s in m.targets])
        np.testing.assert_array_equal(pattern, e != 0)


def test_final_pattern_is_fixed_reapplied_and_reported(bert):
    m = methods.create("adalora", bert[0], CFG)
    peft = m.setup(jax.random.PRNGKey(0), bert[1])
    update = jax.jit(m.update_state)
    state, trainable = peft.state, peft.trainable
    for t in range(13):  # t = 12 = T - t_final: forced mask at b_T, EMAs reset
        state, trainable = update(state, _ones_e(trainable), _random_grads(peft, t), jnp.asarray(t))
    assert all(not np.asarray(state[k]).any() for k in state if k.endswith((".ipt", ".unc")))
    ranks = m.report(trainable, state)["rank_allocation"]
    assert sum(ranks.values()) == m.target_bgt == 12
    pattern = {s: np.asarray(state[s + ".rank_mask"]) for s in m.targets}
    for t in range(13, 16):  # E regrows (all ones) but the fixed pattern is re-applied
        state, trainable = update(state, _ones_e(trainable), _random_grads(peft, t), jnp.asarray(t))
        for s in m.targets:
            np.testing.assert_array_equal(np.asarray(trainable["added"][s + ".lora_E"]), pattern[s])
    assert m.report(trainable, state)["rank_allocation"] == ranks


def test_orth_regulariser_zero_for_orthonormal_factors(bert):
    m = methods.create("adalora", bert[0], CFG)
    peft = m.setup(jax.random.PRNGKey(0), bert[1])
    rng = np.random.default_rng(0)
    added = {}
    for s in m.targets:
        q_in, _ = np.linalg.qr(rng.normal(size=(32, 4)))           # (in, r), orthonormal columns
        q_out, _ = np.linalg.qr(rng.normal(size=(32, 4)))          # (out, r) -> B (r, out) rows
        added[s + ".lora_A"], added[s + ".lora_B"] = jnp.asarray(q_in, jnp.float32), jnp.asarray(q_out.T, jnp.float32)
    assert float(orth_penalty(added, m.targets)) < 1e-5
    trainable = {**peft.trainable, "added": {**peft.trainable["added"], **added}}
    assert float(m.regularizer(trainable, peft.state)) < 1e-5
    # random factors: mean of ||A^T A - I||_F and ||B B^T - I||_F, times the weight 0.5
    a, b = peft.trainable["added"][m.targets[0] + ".lora_A"], peft.trainable["added"][m.targets[0] + ".lora_B"]
    expected = np.mean([np.linalg.norm(np.asarray(peft.trainable["added"][s + ".lora_A"]).T
                                       @ np.asarray(peft.trainable["added"][s + ".lora_A"]) - np.eye(4))
                        for s in m.targets] +
                       [np.linalg.norm(np.asarray(peft.trainable["added"][s + ".lora_B"])
                                       @ np.asarray(peft.trainable["added"][s + ".lora_B"]).T - np.eye(4))
                        for s in m.targets])
    np.testing.assert_allclose(float(m.regularizer(peft.trainable, peft.state)), 0.5 * expected, rtol=1e-5)
    assert np.isfinite(np.asarray(jax.grad(lambda ad: orth_penalty(ad, m.targets))(added)[
        m.targets[0] + ".lora_A"])).all()


def test_scaling_is_alpha_over_init_rank_and_merge(bert):
    model, base = bert
    m = methods.create("adalora", model, {**CFG, "alpha": 8.0})
    assert abs(m.scaling - 2.0) < 1e-5                             # PEFT: lora_alpha / (ranknum + 1e-5)
    peft = m.setup(jax.random.PRNGKey(0), base)
    s = m.targets[0]
    ad = {**peft.trainable["added"], s + ".lora_E": jnp.arange(1.0, 5.0)}
    merged = m.merge(base, ad, peft.state)
    expected = base[s + ".kernel"] + m.scaling * (ad[s + ".lora_A"] * ad[s + ".lora_E"]) @ ad[s + ".lora_B"]
    np.testing.assert_allclose(np.asarray(merged[s + ".kernel"]), np.asarray(expected), atol=1e-6)


def test_total_step_comes_from_the_run_through_prepare(bert):
    """total_step=0 is the run's length, declared through InitContext (no patch of the config)."""
    model, base = bert
    with pytest.raises(ValueError, match=r"more than tinit \+ tfinal = 5 \+ 5"):
        methods.create("adalora", model, {"tinit": 5, "tfinal": 5, "total_step": 10})
    m = methods.create("adalora", model, {"tinit": 5, "tfinal": 5})
    with pytest.raises(ValueError, match="total_steps"):
        m.setup(jax.random.PRNGKey(0), base)
    with pytest.raises(ValueError, match="more than tinit"):
        m.setup(jax.random.PRNGKey(0), base, InitContext(total_steps=10))
    m.setup(jax.random.PRNGKey(0), base, InitContext(total_steps=600))
    assert m.config.total_step == 0 and m.total_step == 600 and len(m.budgets) == 601
    from configs.train import get_config
    from peftjax.train.compose import build, init_context, total_steps

    config = get_config("model=tiny-bert,method=adalora")
    config.train.steps, config.train.grad_accum_steps = 300, 2
    _, model2, _, method, _ = build(config, with_weights=False, with_tokenizer=False)
    assert total_steps(config) == 600
    ctx = init_context(model2, None, {"input_ids": np.zeros((2, 4), np.int32)}, total_steps=600)
    method.prepare(ctx)
    assert method.total_step == 600


def test_importance_reads_the_gradient_after_the_runs_clipping(bert):
    """PEFT's ``update_and_allocate`` reads ``p.grad`` after the training loop's
    ``clip_grad_norm_`` has rescaled it in place (transformers' Trainer, the AdaLoRA reference
    code), so with clipping active I = |w · g · c/‖g‖| (‖g‖ over every trainable tensor, head
    included); the clip norm is a run fact (``InitContext.clip_norm``, train.clip_norm).
    Found by the training-parity run (tests/interop/test_train_parity.py), where the importance
    averages differed from PEFT's by the clip factor whenever clipping was active."""
    import optax

    model, base = bert
    site_key = None
    for clip in (0.5, None, 1e6):   # clipped; no clipping configured; a norm below the clip
        m = methods.create("adalora", model, {**CFG, "tinit": 8})   # no masking at step 0
        peft = m.setup(jax.random.PRNGKey(0), base, InitContext(total_steps=16, clip_norm=clip))
        grads = _random_grads(peft, 0)
        grads["head"] = {k: jnp.ones_like(v) for k, v in grads["head"].items()}
        norm = float(optax.global_norm(grads))
        assert norm > 0.5
        state, _ = jax.jit(m.update_state)(peft.state, peft.trainable, grads, jnp.asarray(0))
        site_key = m.targets[0] + ".lora_A"
        scale = 0.5 / norm if clip == 0.5 else 1.0
        w, g = peft.trainable["added"][site_key], grads["added"][site_key]
        expected = (1 - 0.85) * np.abs(np.asarray(w) * np.asarray(g) * scale)
        np.testing.assert_allclose(np.asarray(state[site_key + ".ipt"]), expected, rtol=1e-5, atol=1e-12)
