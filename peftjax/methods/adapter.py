"""Bottleneck adapters: Houlsby et al. (ICML 2019) and Pfeiffer et al. (EACL 2021) placements.

An adapter is a bottleneck (Houlsby §2.1, Fig. 2)::

    f(z) = act(z W_down + b_down) W_up + b_up,   W_down: (d, m), W_up: (m, d)

with 2md + d + m params, added to a block's output with a residual. Where it sits relative to the
block's residual add and LayerNorm is what distinguishes the two placements, so both run in the
models' ``block_output`` hook, which receives the block's projected output ``h`` (after its
dropout), the residual ``x`` the model adds back and the block's post-sum LayerNorm ``LN`` (the
identity in pre-LN models: Llama, GPT-2, BLOOM, T5):

* ``houlsby`` (default): two per layer, after the attention output projection and after the FFN,
  on ``h`` before the residual add and the LayerNorm (Houlsby Fig. 2; AdapterHub's
  ``DoubleSeqBnConfig``)::

      out = LN(h + f(h) + x)

* ``pfeiffer``: one per layer, after the FFN only, ReLU, reduction factor 16 (m = d/16 with
  ``bottleneck=0``), at AdapterHub's ``SeqBnConfig`` position (``original_ln_before``,
  ``original_ln_after``, ``residual_before_ln``; adapters ``Adapter.pre_forward`` / ``forward`` /
  ``post_forward`` in src/adapters/methods/modeling.py): the adapter reads the block's normalised
  output, its own residual is ``h``, and the block's LayerNorm (same params) is applied again::

      z = LN(h + x);   a = f(z) + h;   out = LN(a + x)

  In pre-LN models (AdapterHub passes ``layer_norm=None`` there) ``out = f(h + x) + h + x``.

Initialisation (``init``, ``init_scale``), each placement's reference by default:

* ``adapter_bert`` (Houlsby's default): google-research/adapter-bert ``feedforward_adapter``,
  both kernels ~ TF's truncated normal (redrawn beyond 2σ) with σ = 1e-3, zero biases: the
  adapter starts near the identity (Houlsby §2.1).
* ``bert`` (Pfeiffer's default): AdapterHub's ``init_weights="bert"`` (BERT's
  ``init_bert_weights``), both kernels ~ N(0, σ²) with σ = 0.02, zero biases, so runs compare
  with AdapterHub's ``SeqBnConfig`` as it ships.

``init_scale`` overrides σ (0 = the init's own σ); ``init`` picks the distribution independently
of the placement.

LayerNorms: Houlsby et al. train the base model's layer-normalisation parameters per task with
the adapters (§2.1 and Fig. 2, whose trained "green" layers include them; adapter-bert's
``create_optimizer`` trains the ``adapters``, ``layer_norm`` and ``head`` variable collections);
``train_layernorm=True`` is that setting. It is off
by default so that counts match the published 2,379,264 for RoBERTa-base (m = 64, adapters only)
and AdapterHub, which leaves the LayerNorms frozen for both placements. Any comparison should say
which setting it used.
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
INITS = {"adapter_bert": 1e-3, "bert": 0.02}   # init -> its default σ
DEFAULT_INIT = {"houlsby": "adapter_bert", "pfeiffer": "bert"}
_NORM = re.compile(r"(?i)norm")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    placement: str = "houlsby"
    bottleneck: int = 64          # m; 0 = hidden // reduction_factor
    reduction_factor: int = 16
    activation: str = ""          # '' = the placement's default (gelu / relu)
    init: str = ""                # '' = the placement's: adapter_bert (houlsby) / bert (pfeiffer)
    init_scale: float = 0.0       # σ of the kernels; 0 = the init's own (1e-3 / 0.02)
    train_layernorm: bool = False  # the Houlsby paper's setting is True


class AdapterHooks(hooks_lib.Hooks):
    def __init__(self, method: "Adapter", added: core.Flat):
        self.method, self.added = method, added

    def block_output(self, module, kind, h, residual, norm):
        site = hooks_lib.site(module)
        if site not in self.method.targets:
            return hooks_lib.residual_output(h, residual, norm)
        p = lambda n: self.added[f"{site}.adapter.{n}"].astype(h.dtype)
        down = lambda z: self.method.act(z @ p("down.kernel") + p("down.bias"))
        if self.method.config.placement == "pfeiffer":
            # z = LN(h + x); a = f(z) + h (residual_before_ln: the adapter's residual is h);
            # out = LN(a + x) with the same LN.
            z = hooks_lib.residual_output(h, residual, norm)
            a = (down(z) @ p("up.kernel") + p("up.bias")) + h
            return hooks_lib.residual_output(a, residual, norm)
        # Houlsby: out = LN(h + f(h) + x), summed in the order of the earlier code (bit-identical).
        a = h + down(h) @ p("up.kernel") + p("up.bias")
        return hooks_lib.residual_output(a, residual, norm)


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
        init = c.init or DEFAULT_INIT[c.placement]
        core.check_range("adapter", "init", c.init, f"'' (the placement's) or one of {sorted(INITS)}",
                         init in INITS)
        core.check_range("adapter", "init_scale", c.init_scale, ">= 0 (0 = the init's own)",
                         c.init_scale >= 0)
        self.init_kind = init
        self.init_std = c.init_scale or INITS[init]

    def size(self, hidden: int) -> int:
        c = self.config
        return c.bottleneck or max(1, hidden // c.reduction_factor)

    def trains_base(self, path: str) -> bool:
        module = path.rpartition(".")[0]
        return self.config.train_layernorm and bool(_NORM.search(module.rpartition(".")[2]))

    def init(self, rng, base, ctx):
        added = {}
        std = self.init_std
        if self.init_kind == "adapter_bert":
            draw = lambda key, shape: std * jax.random.truncated_normal(key, -2, 2, shape)
        else:
            draw = lambda key, shape: std * jax.random.normal(key, shape)
        for i, site in enumerate(self.targets):
            d = self.sites.blocks[site]["hidden"]
            m = self.size(d)
            k1, k2 = jax.random.split(jax.random.fold_in(rng, i))
            added[f"{site}.adapter.down.kernel"] = draw(k1, (d, m))
            added[f"{site}.adapter.down.bias"] = jnp.zeros((m,))
            added[f"{site}.adapter.up.kernel"] = draw(k2, (m, d))
            added[f"{site}.adapter.up.bias"] = jnp.zeros((d,))
        return added

    def hooks(self, added, state, *, train, rng):
        return AdapterHooks(self, added)
