"""The public extension API: a variant defined in this file alone trains, counts, saves and merges
through the same machinery as the built-in methods (``docs/adding_a_low_rank_variant.md``).

The variant is IA³-style output scaling (Liu et al. 2022): y' = (x W0 + bias) ⊙ l with a trainable
vector l (out,) initialised to 1 at the targeted linear layers; merged, W = W0 ⊙ l, bias ⊙ l.
It is registered under a test-only name and removed from the registry afterwards.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from peftjax import methods
from peftjax.methods import core
from peftjax.models import hooks as hooks_lib
from peftjax.train import init_state, make_train_step
from peftjax.train.checkpoint import Checkpointer
from tests.helpers import learnable_batch, tiny_model

NAME = "_test_output_scaling"


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    targets: str = r"\.(query|value|q_proj|v_proj|intermediate\.dense|up_proj)$"


class ScalingHooks(hooks_lib.Hooks):
    def __init__(self, method, added):
        self.method, self.added = method, added

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        if site not in self.method.targets:
            return y
        return y * self.added[site + ".scale"].astype(y.dtype)


class OutputScaling(core.Method):
    Config = ScalingConfig
    family = "low_rank"
    mergeable = True

    def validate(self):
        self.targets = core.match_targets(self.config.targets, self.sites.backbone_linear)

    def init(self, rng, base, ctx):
        return {s + ".scale": jnp.ones((self.sites.linear[s]["out_features"],), base[s + ".kernel"].dtype)
                for s in self.targets}

    def hooks(self, added, state, *, train, rng):
        return ScalingHooks(self, added)

    def _scaled(self, params, added, inverse):
        out = dict(params)
        for s in self.targets:
            l = added[s + ".scale"]
            l = 1.0 / l if inverse else l
            out[s + ".kernel"] = params[s + ".kernel"] * l[None, :]
            if s + ".bias" in params:
                out[s + ".bias"] = params[s + ".bias"] * l
        return out

    def merge(self, base, added, state):
        return self._scaled(base, added, inverse=False)

    def unmerge(self, merged, added, state):
        return self._scaled(merged, added, inverse=True)


@pytest.fixture
def registered():
    cls = core.register(NAME)(OutputScaling)
    try:
        yield cls
    finally:
        core._METHODS.pop(NAME, None)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_variant_trains_counts_saves_and_merges(registered, family, tmp_path):
    assert NAME in methods.registered()
    model, base = tiny_model(family)
    method = methods.create(NAME, model, {})
    peft = method.setup(jax.random.PRNGKey(0), base)

    # counts: abstract == real == independent formula (one scale per output unit per target)
    counts = methods.count_params(method)
    real = sum(int(np.prod(v.shape)) for v in peft.trainable["added"].values())
    assert counts["trainable_params"] == real == sum(method.sites.linear[s]["out_features"]
                                                     for s in method.targets) > 0

    # trains through the shared train step; frozen params untouched
    batch = learnable_batch(model)
    tx = optax.adam(3e-2)
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(method, tx, seed=0))
    frozen_before = jax.tree.map(np.array, peft.frozen)
    losses = []
    for _ in range(20):
        state, m = step(state, peft.frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses
    for k, v in peft.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), frozen_before[k])

    # checkpoint round trip
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(20, {"state": state})
    ckpt.close()
    restored = Checkpointer(str(tmp_path / "ckpt")).restore(
        {"state": init_state(peft.trainable, peft.state, tx)})["state"]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # merge == unmerged, unmerge restores
    unmerged = method.apply(restored[1], peft.frozen, restored[3], batch)
    merged = method.merged_params(restored[1], peft.frozen, restored[3])
    plain = model.apply(traverse_util.unflatten_dict(merged, sep="."), batch)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(unmerged), atol=1e-4, rtol=1e-5)
    back = method.unmerge(merged, restored[1]["added"], restored[3])
    full = method.effective_base(restored[1], peft.frozen, restored[3])
    for k in full:
        np.testing.assert_allclose(np.asarray(back[k]), np.asarray(full[k]), atol=1e-5)


def test_registry_is_clean_after_the_test():
    assert NAME not in methods.registered()  # the contract matrix sees only real methods


# --------------------------------------------------------------------------------------------
# A low-rank variant written in a temporary module through LoRA's variant surface alone, run
# through the contract matrix's checks (docs/adding_a_low_rank_variant.md).

VARIANT = "_test_gained_lora"
VARIANT_SOURCE = '''
"""LoRA with a trainable per-output gain on the update: ΔW = s · A B diag(g), g₀ = 1."""

import dataclasses

import jax.numpy as jnp

from peftjax.methods import core, lora


@dataclasses.dataclass(frozen=True)
class GainedLoRAConfig(lora.LoRAConfig):
    gain_init: float = 1.0


@core.register("%s")
class GainedLoRA(lora.LoRA):
    Config = GainedLoRAConfig
    inits = ("default", "gaussian")

    def init_site(self, rng, site, kernel):
        params = super().init_site(rng, site, kernel)
        params["lora_gain"] = jnp.full((kernel.shape[1],), self.config.gain_init, kernel.dtype)
        return params

    def factors(self, params, dtype, context=None):
        a, b = super().factors(params, dtype, context)
        return a, b * params["lora_gain"].astype(dtype)[None, :]
''' % VARIANT


@pytest.fixture
def variant_module(tmp_path):
    from tests.helpers import load_file_module

    path = tmp_path / "gained_lora.py"
    path.write_text(VARIANT_SOURCE)
    module = load_file_module(str(path), "gained_lora")   # registers the variant
    try:
        yield module
    finally:
        core._METHODS.pop(VARIANT, None)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_variant_from_a_temporary_module_passes_the_contract(variant_module, family, tmp_path):
    from tests.methods import test_contract as contract

    c = contract.Case(VARIANT, family, config={"rank": 4, "alpha": 8.0})
    sites = c.method.sites.linear
    expected = sum(4 * (sites[s]["in_features"] + sites[s]["out_features"]) + sites[s]["out_features"]
                   for s in c.method.targets)     # A, B and one gain per output unit
    contract.check_counts(c, expected)
    contract.check_training(c)
    contract.check_optimizer_state(c)
    contract.check_checkpoint(c, tmp_path)
    contract.check_adapter_file(c, tmp_path)
    contract.check_merge(c)
    # the gain trained, and the surface's factors are what the model ran: the adapter set
    # (which reads low_rank_factors) reproduces the adapted model
    gains = [v for k, v in c.state.trainable["added"].items() if k.endswith("lora_gain")]
    assert any(not np.allclose(np.asarray(g), 1.0) for g in gains)
    from peftjax.adapters import AdapterSet

    aset = AdapterSet(c.model, {**c.peft.frozen, **c.state.trainable["head"]})
    aset.add("gained", c.method, c.state.trainable)
    np.testing.assert_allclose(np.asarray(aset.apply(c.batch, "gained")),
                               np.asarray(c.apply(c.state.trainable, c.state.method_state)),
                               atol=1e-4, rtol=1e-4)


def test_variant_registry_is_clean_after_the_test():
    assert VARIANT not in methods.registered()
