"""VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024, Eq. 1).

One pair of frozen random matrices is shared by every targeted layer; each layer trains only two
scaling vectors. In flax layout (kernels (in, out))::

    h = x W0 + ((dropout(x) A[:in]) ⊙ d) B[:, :out] ⊙ b        (paper: Λ_b B Λ_d A x)

    A: (in_max, r), B: (r, out_max)   shared, frozen, sliced to each layer's (in, out)
    d: (r,)   trainable, init d_initial = 0.1  (paper §3.2 / PEFT ``d_initial``)
    b: (out,) trainable, init 0, so the adapted model starts equal to the base

in_max / out_max are the largest in/out features among the targeted layers (PEFT
``VeraModel._find_dim``; PEFT slices ``vera_A[:, :in]`` and ``vera_B[:out, :]`` in its (r, in) /
(out, r) layout). A and B follow PEFT 0.21's ``_kaiming_init`` (``tuners/vera/model.py``):
gain √2, std = gain/√fan_in, bound √3·std, i.e. U(±√(6/fan_in)), *not* torch's default
``kaiming_uniform_(a=√5)`` (±1/√fan_in), which would make ΔW ~6× smaller for the same d, b.
In torch layout A (r, in_max) has fan-in in_max and B (out_max, r) fan-in r, so
A ~ U(±√(6/in_max)), B ~ U(±√(6/r)).

Where A and B live: in the method ``state`` (non-trainable, checkpointed with the adapter),
drawn by ``init_state``. This is PEFT's ``save_projection=True`` (its default). Their key:
``projection_prng_key`` when >= 0 (PEFT pins it, default 0, so every run of a comparison shares
one projection), else the run's seed (``init_state``'s rng): then seeds vary the projections
too, which is what a seed should measure. Defaults: PEFT's ``VeraConfig`` (r 256, d_initial 0.1,
dropout 0) on the query/value projections, the projection key from the run.

Merge: W = W0 + (A[:in] ⊙ d) B[:, :out] ⊙ b (columns scaled by b).

This module is the worked example of ``docs/adding_a_low_rank_variant.md``: it uses only the
public protocol of ``peftjax.methods.core``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from peftjax.methods import core
from peftjax.models import hooks as hooks_lib


def kaiming_bound(fan_in: int) -> float:
    """PEFT's ``_kaiming_init`` bound: √3 · gain / √fan_in with gain √2, i.e. √(6 / fan_in)."""
    return math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)


@dataclasses.dataclass(frozen=True)
class VeRAConfig:
    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    targets: str | tuple[str, ...] = r"\.(query|value|q_proj|v_proj|c_attn|query_key_value|q|v)$"
    projection_prng_key: int = -1   # -1: from the run's seed; a key >= 0 pins it (PEFT: 0)


class VeRAHooks(hooks_lib.Hooks):
    """Adds ``((x A) ⊙ d) B ⊙ b`` at the targeted linear sites."""

    def __init__(self, method: "VeRA", added: core.Flat, state: core.Flat, train: bool):
        self.method, self.added, self.state, self.train = method, added, state, train

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        if site not in self.method.targets:
            return y
        m = self.method
        a, b = m.projections(self.state, site)
        d = self.added[site + ".vera_lambda_d"].astype(x.dtype)
        scale_b = self.added[site + ".vera_lambda_b"].astype(x.dtype)
        x = core.input_dropout(module, x, m.config.dropout, self.train)
        return y + (((x @ a.astype(x.dtype)) * d) @ b.astype(x.dtype)) * scale_b


@core.register("vera")
class VeRA(core.Method):
    """Shared frozen random projections, per-layer trainable scaling vectors."""

    Config = VeRAConfig
    family = "low_rank"
    mergeable = True

    def validate(self) -> None:
        c = self.config
        core.check_range(self.name, "rank", c.rank, "an integer >= 1", isinstance(c.rank, int) and c.rank >= 1)
        core.check_range(self.name, "dropout", c.dropout, "0 <= dropout < 1", 0 <= c.dropout < 1)
        key = c.projection_prng_key
        core.check_range(self.name, "projection_prng_key", key, "-1 (the run's seed) or a key >= 0",
                         isinstance(key, int) and not isinstance(key, bool) and key >= -1)
        self.targets = core.match_targets(c.targets, self.sites.backbone_linear)
        self.in_max = max(self.sites.linear[s]["in_features"] for s in self.targets)
        self.out_max = max(self.sites.linear[s]["out_features"] for s in self.targets)

    # -- params and state -----------------------------------------------------------------
    def init(self, rng, base, ctx):
        added = {}
        for site in self.targets:
            dtype = base[site + ".kernel"].dtype
            out = self.sites.linear[site]["out_features"]
            added[site + ".vera_lambda_d"] = jnp.full((self.config.rank,), self.config.d_initial, dtype)
            added[site + ".vera_lambda_b"] = jnp.zeros((out,), dtype)
        return added

    def init_state(self, rng, base, added, ctx):
        r, key = self.config.rank, self.config.projection_prng_key
        ka, kb = jax.random.split(rng if key < 0 else jax.random.PRNGKey(key))
        bound_a, bound_b = kaiming_bound(self.in_max), kaiming_bound(r)
        return {"vera_A": jax.random.uniform(ka, (self.in_max, r), jnp.float32, -bound_a, bound_a),
                "vera_B": jax.random.uniform(kb, (r, self.out_max), jnp.float32, -bound_b, bound_b)}

    def projections(self, state, site: str) -> tuple[jax.Array, jax.Array]:
        """This layer's slices of the shared A (in, r) and B (r, out)."""
        info = self.sites.linear[site]
        return state["vera_A"][:info["in_features"]], state["vera_B"][:, :info["out_features"]]

    # -- forward --------------------------------------------------------------------------
    def hooks(self, added, state, *, train, rng):
        return VeRAHooks(self, added, state, train)

    # -- merge ----------------------------------------------------------------------------
    def delta_weight(self, site, added, state) -> jax.Array:
        a, b = self.projections(state, site)
        d, scale_b = added[site + ".vera_lambda_d"], added[site + ".vera_lambda_b"]
        return ((a * d[None, :]) @ b) * scale_b[None, :]

    def low_rank_factors(self, added, state):
        """(A[:in] ⊙ d, B[:, :out] ⊙ b) per site: ΔW = Λ_b B Λ_d A in the kernel's layout."""
        out = {}
        for site in self.targets:
            a, b = self.projections(state, site)
            d, scale_b = added[site + ".vera_lambda_d"], added[site + ".vera_lambda_b"]
            out[site] = (a * d[None, :], b * scale_b[None, :])
        return out

    def merge(self, base, added, state):
        out = dict(base)
        for site in self.targets:
            k = site + ".kernel"
            out[k] = base[k] + self.delta_weight(site, added, state).astype(base[k].dtype)
        return out

    def unmerge(self, merged, added, state):
        out = dict(merged)
        for site in self.targets:
            k = site + ".kernel"
            out[k] = merged[k] - self.delta_weight(site, added, state).astype(merged[k].dtype)
        return out
