"""The shared method contract: every method × every model family, on tiny random models.

Each registered method must: count exactly what it trains (abstract count == real tree == the
method's formula), leave frozen params bit-identical after training, decrease the loss on a
small learnable task, keep optimizer state only for the trainable tree, round-trip through a
checkpoint, and (where defined) give the same outputs merged as unmerged.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax

from flax import traverse_util

from peftjax import methods
from peftjax.train import init_state, make_train_step
from peftjax.methods import saving
from peftjax.train.checkpoint import Checkpointer
from tests.helpers import DECODER_SUBSETS, FAMILIES, SEQ2SEQ_FAMILIES, fisher_context, METHOD_CONFIGS, formula_count, learnable_batch, tiny_model, tree_size

CASES = ([(m, f) for m in sorted(METHOD_CONFIGS) for f in FAMILIES]
         + [(m, f) for f, ms in SEQ2SEQ_FAMILIES.items() for m in ms]
         + [(m, f) if m in ms else pytest.param(m, f, marks=pytest.mark.slow)
            for f, ms in DECODER_SUBSETS.items() for m in sorted(METHOD_CONFIGS)])


def test_every_registered_method_is_in_the_matrix():
    assert set(methods.registered()) <= set(METHOD_CONFIGS), (
        "add new methods to tests/helpers.py METHOD_CONFIGS so the contract covers them")


# AdaLoRA starts from E = 0 with A, B ~ N(0, 0.02²) (the reference init): it needs a larger step.
METHOD_CONFIGS_LR = {"linear_probe": 3e-2, "full": 3e-3, "child_tuning_f": 3e-3, "child_tuning_d": 3e-3, "prompt_tuning": 3e-2, "adalora": 5e-2,
                     "vera": 1e-1,  # VeRA: two scaling vectors per layer (the paper also uses large rates)
                     # N(0, 1) prefixes (PEFT's init) on the tiny models: 1e-2 gives loss x0.91 in 25 steps.
                     "prefix_tuning": 5e-2,
                     # T5's embeddings have unit scale (init N(0, 1)); Lester et al. prompt-tune T5 at 0.3.
                     ("prompt_tuning", "t5"): 3e-1,
                     # PEFT's Qwen default tunes one RMSNorm per layer (post_attention_layernorm):
                     # 128 scales on the tiny models.
                     ("ln_tuning", "qwen2"): 5e-2, ("ln_tuning", "qwen3"): 5e-2,
                     ("ln_tuning", "qwen3_moe"): 5e-2}
TRAIN_STEPS = 25


# Cells a method refuses by design, with the reason its error must give.
REFUSED = {("linear_probe", f): "has no params of its own"
           for f in ("llama", "gpt2", "bloom", "t5", "qwen2", "qwen3", "mistral", "gemma2", "gemma3",
                     "qwen3_moe")}
# Qwen3 (attention_bias false, as released), Mistral and Gemma 2/3 have no bias terms at all.
REFUSED.update({("bitfit", f): "the model has no bias terms"
                for f in ("qwen3", "mistral", "gemma2", "gemma3", "qwen3_moe")})
# PEFT ships no (IA)³ or LN-tuning default targets for qwen3_moe (TRANSFORMERS_MODELS_TO_IA3_*,
# *_LNTUNING_*): the user names them.
REFUSED[("ia3", "qwen3_moe")] = "no default targets for model type 'qwen3_moe'"
REFUSED[("ln_tuning", "qwen3_moe")] = "no default targets for model type 'qwen3_moe'"


class Case:
    """One (method, family) cell, trained once and shared by the contract tests."""

    def __init__(self, method_name: str, family: str, config: dict | None = None,
                 lr: float | None = None):
        self.model, self.base = tiny_model(family)
        self.method = methods.create(method_name, self.model,
                                     METHOD_CONFIGS[method_name] if config is None else config)
        self.peft = self.method.setup(jax.random.PRNGKey(1), self.base, fisher_context(self.model))
        self.frozen_before = jax.tree.map(np.array, self.peft.frozen)
        self.batch = learnable_batch(self.model)
        if lr is None:
            lr = METHOD_CONFIGS_LR.get((method_name, family), METHOD_CONFIGS_LR.get(method_name, 1e-2))
        self.tx = optax.adam(lr)
        transform = self.method.gradient_transform(jax.random.PRNGKey(2))
        if transform is not None:  # Child-tuning_F's gradient mask
            self.tx = optax.chain(transform, self.tx)
        state = init_state(self.peft.trainable, self.peft.state, self.tx)
        step = jax.jit(make_train_step(self.method, self.tx, seed=0))
        self.losses = []
        for _ in range(TRAIN_STEPS):
            state, m = step(state, self.peft.frozen, self.batch)
            self.losses.append(float(m["loss"]))
        self.state = state
        self.apply = jax.jit(lambda trainable, state: self.method.apply(
            trainable, self.peft.frozen, state, self.batch))


@pytest.fixture(scope="module")
def case():
    cache: dict = {}

    def get(method_name: str, family: str) -> Case:
        reason = REFUSED.get((method_name, family))
        if reason is not None:  # refused with a clear message, not silently useless
            with pytest.raises(ValueError, match=reason):
                methods.create(method_name, tiny_model(family)[0], METHOD_CONFIGS[method_name])
            pytest.skip(f"{method_name} is refused on {family} ({reason})")
        if (method_name, family) not in cache:
            cache[method_name, family] = Case(method_name, family)
        return cache[method_name, family]

    return get


# The contract, one function per clause; the parametrised tests below run every registered
# method through them, and tests/methods/test_extension.py runs a variant defined elsewhere.


def check_counts(c: Case, expected: int) -> None:
    """Abstract count == real trainable tree == an independent formula; head and total exact."""
    base, method, peft = c.base, c.method, c.peft
    counts = methods.count_params(method)
    real = tree_size(peft.trainable["base"]) + tree_size(peft.trainable["added"])
    assert counts["trainable_params"] == real == expected
    assert counts["head_params"] == tree_size(peft.trainable["head"])
    assert counts["total_params"] == tree_size(base) + tree_size(peft.trainable["added"])


def check_training(c: Case) -> None:
    """The loss decreases, frozen params stay bit-identical, and the added/base params moved."""
    peft, state, losses = c.peft, c.state, c.losses
    assert losses[-1] < 0.9 * losses[0], losses
    for path, value in peft.frozen.items():
        np.testing.assert_array_equal(np.asarray(value), c.frozen_before[path], err_msg=path)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.trainable, peft.trainable)
    if peft.trainable["added"] or peft.trainable["base"]:
        assert any(jax.tree.leaves(moved["added"]) + jax.tree.leaves(moved["base"]))
    else:  # a head-only method (the linear probe): the head is what trains
        assert all(jax.tree.leaves(moved["head"]))


def check_optimizer_state(c: Case, trains_everything: bool = False) -> None:
    """AdamW holds two moments per trainable value and nothing for frozen params."""
    base, peft = c.base, c.peft
    state = init_state(peft.trainable, peft.state, optax.adamw(1e-3))
    moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moments == 2 * tree_size(peft.trainable)
    assert tree_size(peft.trainable) < tree_size(base) or trains_everything


def check_checkpoint(c: Case, tmp_path) -> None:
    """Orbax round trip of the whole train state; the restored model gives the same outputs."""
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(TRAIN_STEPS, {"state": c.state})
    ckpt.close()
    fresh = init_state(c.peft.trainable, c.peft.state, c.tx)
    restored = Checkpointer(str(tmp_path / "ckpt")).restore({"state": fresh})["state"]
    for a, b in zip(jax.tree.leaves(c.state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out_a = c.apply(c.state.trainable, c.state.method_state)
    # As host arrays: orbax restores arrays committed to the device, which the jitted apply
    # would compile again for (a second compile per cell, ~1/4 of this check).
    out_b = c.apply(*jax.tree.map(np.asarray, (restored[1], restored[3])))
    np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


def check_adapter_file(c: Case, tmp_path) -> None:
    """save_adapter → load_adapter on the pretrained base gives the same model (no training data
    needed: a Fisher mask travels as indices), and the file holds no frozen param."""
    size = saving.save_adapter(str(tmp_path / "adapter"), c.method, c.state.trainable,
                               c.state.method_state, initial_added=c.peft.trainable["added"])
    method, trainable, state, frozen = saving.load_adapter(str(tmp_path / "adapter"), c.model, c.base)
    assert method.name == c.method.name and method.config == c.method.config
    assert set(frozen) == set(c.peft.frozen)
    for tree in ("base", "added", "head"):
        assert set(trainable[tree]) == set(c.state.trainable[tree])
    initial = tree_size(c.peft.trainable["added"]) if c.method.rewrites_base else 0
    payload = 4 * (tree_size(c.state.trainable) + tree_size(c.state.method_state) + initial)
    assert payload <= size < payload + 64 * 1024   # tensors + a JSON header, nothing frozen
    for k in frozen:
        np.testing.assert_array_equal(np.asarray(frozen[k]), np.asarray(c.peft.frozen[k]), err_msg=k)
    np.testing.assert_array_equal(np.asarray(c.apply(c.state.trainable, c.state.method_state)),
                                  np.asarray(c.apply(trainable, state)))


def check_merge(c: Case) -> None:
    """The plain model on merged params gives the adapted model's outputs; unmerge restores."""
    method, state = c.method, c.state
    unmerged = c.apply(state.trainable, state.method_state)
    merged = method.merged_params(state.trainable, c.peft.frozen, state.method_state)
    plain = jax.jit(c.model.apply)(traverse_util.unflatten_dict(merged, sep="."), c.batch)
    # float32 rounding of W0 + ΔW vs x W0 + x ΔW grows with the activations' scale, not per entry
    scale = max(1.0, float(np.abs(np.asarray(unmerged)).max()))
    np.testing.assert_allclose(np.asarray(plain), np.asarray(unmerged), atol=1e-5 * scale, rtol=1e-5)
    back = method.unmerge(merged, state.trainable["added"], state.method_state)
    full_base = method.effective_base(state.trainable, c.peft.frozen, state.method_state)
    for k in full_base:
        np.testing.assert_allclose(np.asarray(back[k]), np.asarray(full_base[k]), atol=1e-6)


@pytest.mark.parametrize("method_name,family", CASES)
def test_trainable_count_matches_formula(case, method_name, family):
    c = case(method_name, family)
    check_counts(c, formula_count(c.method, c.base))


@pytest.mark.parametrize("method_name,family", CASES)
def test_training_decreases_loss_and_keeps_frozen_params(case, method_name, family):
    check_training(case(method_name, family))


@pytest.mark.parametrize("method_name,family", CASES)
def test_optimizer_state_exists_only_for_trainable(case, method_name, family):
    check_optimizer_state(case(method_name, family), method_name in ("full", "child_tuning_f"))


@pytest.mark.parametrize("method_name,family", CASES)
def test_checkpoint_round_trip(case, method_name, family, tmp_path):
    check_checkpoint(case(method_name, family), tmp_path)


@pytest.mark.parametrize("method_name,family", CASES)
def test_adapter_file_round_trip(case, method_name, family, tmp_path):
    check_adapter_file(case(method_name, family), tmp_path)


@pytest.mark.parametrize("method_name,family",
                         [c for c in CASES if methods.method_class(
                             (c.values if hasattr(c, "values") else c)[0]).mergeable])
def test_merge_equals_unmerged(case, method_name, family):
    check_merge(case(method_name, family))
