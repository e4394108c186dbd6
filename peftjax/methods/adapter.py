"""Bottleneck adapters: Houlsby et al. (ICML 2019) and Pfeiffer et al. (EACL 2021) placements.

An adapter is a bottleneck with a residual (Houlsby §2.1, Fig. 2)::

    adapter(h) = h + act(h W_down + b_down) W_up + b_up,   W_down: (d, m), W_up: (m, d)

with 2md + d + m params. Placement:

* ``houlsby`` (default): two per layer, after the attention output projection and after the
  FFN, each before the residual + LayerNorm (the models' ``block_output`` hook).
* ``pfeiffer``: one per layer after the FFN only, ReLU, reduction factor 16 (m = d/16), as
  AdapterHub's ``SeqBnConfig``.

Near-identity initialisation as the reference code (google-research/adapter-bert
``feedforward_adapter``): both projections ~ truncated normal with std ``init_scale`` = 1e-3,
zero biases, GELU for Houlsby. The paper also trains the LayerNorms (``train_layernorm``; off by
default so that counts match the published 2,379,264 for RoBERTa-base, m = 64).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from peftjax.methods import core
from peftjax.models import hooks as hooks_lib
from peftjax.models.layers import ACTIVATIONS, activation

PLACEMENTS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}
DEFAULT_ACTIVATION = {"houlsby": "gelu", "pfeiffer": "relu"}
_NORM = re.compile(r"(?i)norm")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    placement: str = "houlsby"
    bottleneck: int = 64          # m; 0 = hidden // reduction_factor
    reduction_factor: int = 16
    activation: str = ""          # '' = the placement's default (gelu / relu)
    init_scale: float = 1e-3
    train_layernorm: bool = False


class AdapterHooks(hooks_lib.Hooks):
    def __init__(self, method: "Adapter", added: core.Flat):
        self.method, self.added = method, added

    def block_output(self, module, kind, h, residual, norm):
        site = hooks_lib.site(module)
        if site in self.method.targets:
            p = lambda n: self.added[f"{site}.adapter.{n}"].astype(h.dtype)
            z = self.method.act(h @ p("down.kernel") + p("down.bias"))
            h = h + z @ p("up.kernel") + p("up.bias")
        return hooks_lib.residual_output(h, residual, norm)


@core.register("adapter")
class Adapter(core.Method):
    Config = AdapterConfig
    family = "additional"

    def validate(self) -> None:
        c = self.config
        core.check_range("adapter", "placement", c.placement, f"one of {sorted(PLACEMENTS)}",
                         c.placement in PLACEMENTS)
        act = c.activation or DEFAULT_ACTIVATION[c.placement]
        core.check_range("adapter", "activation", act, f"one of {sorted(ACTIVATIONS)}", act in ACTIVATIONS)
        self.act = activation(act)
        kinds = PLACEMENTS[c.placement]
        self.targets = [s for s, v in self.sites.blocks.items() if v["kind"] in kinds]
        if not self.targets:
            raise ValueError("adapter: the model exposes no attention/FFN block outputs")
        hidden = min(self.sites.blocks[s]["hidden"] for s in self.targets)
        core.check_range("adapter", "reduction_factor", c.reduction_factor, f"1..{hidden}",
                         1 <= c.reduction_factor <= hidden)
        core.check_range("adapter", "bottleneck", c.bottleneck,
                         f"0 (= hidden/reduction_factor) or 1..{hidden}", 0 <= c.bottleneck <= hidden)
        core.check_range("adapter", "init_scale", c.init_scale, "> 0", c.init_scale > 0)

    def size(self, hidden: int) -> int:
        c = self.config
        return c.bottleneck or max(1, hidden // c.reduction_factor)

    def trains_base(self, path: str) -> bool:
        module = path.rpartition(".")[0]
        return self.config.train_layernorm and bool(_NORM.search(module.rpartition(".")[2]))

    def init(self, rng, base, ctx):
        added = {}
        std = self.config.init_scale
        for i, site in enumerate(self.targets):
            d = self.sites.blocks[site]["hidden"]
            m = self.size(d)
            k1, k2 = jax.random.split(jax.random.fold_in(rng, i))
            added[f"{site}.adapter.down.kernel"] = std * jax.random.truncated_normal(k1, -2, 2, (d, m))
            added[f"{site}.adapter.down.bias"] = jnp.zeros((m,))
            added[f"{site}.adapter.up.kernel"] = std * jax.random.truncated_normal(k2, -2, 2, (m, d))
            added[f"{site}.adapter.up.bias"] = jnp.zeros((d,))
        return added

    def hooks(self, added, state, *, train, rng):
        return AdapterHooks(self, added)
