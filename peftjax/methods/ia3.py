"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al., NeurIPS
2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", §3.3).

The paper rescales keys, values and the FFN's inner activation with learned vectors,
softmax(Q (l_k ⊙ K)ᵀ / √d)(l_v ⊙ V) and (l_ff ⊙ γ(W1 x)) W2, initialised to ones so the model
starts equal to the base. As in Hugging Face PEFT (``tuners/ia3``), the vectors sit on linear
layers: in flax layout (kernel W0 (in, out))

    a target layer:        y = (x W0 + b) ⊙ l,    l: (out,)   the layer's output (keys, values)
    a feedforward target:  y = (x ⊙ l) W0 + b,    l: (in,)    the layer's input (the FFN's inner
                                                              activation, when it is W2)

``l`` starts at 1 (PEFT ``init_ia3_weights=True``). Defaults are PEFT's per model type
(``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` and ``..._FEEDFORWARD_MODULES_MAPPING``
in ``peft/utils/constants.py``), matched PEFT's way: a target list item selects a module equal
to it or ending with ``.item``; a feedforward item is a plain suffix test (PEFT's
``key.endswith(item)``). Hence on BERT/RoBERTa ``output.dense`` selects both the FFN output
*and* the attention output projection (``attention.output.dense``) as feedforward targets:
PEFT's default also rescales the attention heads' concatenated output on its way into that
projection. We keep it (parity of counts and files with PEFT); bert-base: 12 × (768 + 768 + 768
+ 3072) = 64,512 vectors entries.

Forward: the output scaling multiplies the hook's y; the input scaling recomputes the layer as
(x ⊙ l) W0 + b inside the ``linear`` hook (y is then unused and XLA drops it), one GEMM as the
base layer.

Merge (PEFT's ``Linear.merge``): the output scaling folds into the kernel's columns and the
bias, W0 diag(l), b ⊙ l; the input scaling into its rows, diag(l) W0 (the bias is untouched).
Unmerge divides them out again (exact unless an entry of l is 0, where PEFT adds 1e-8 and is
inaccurate as well).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp

from peftjax.methods import core
from peftjax.models import hooks as hooks_lib

# PEFT 0.21's defaults for the model types peftjax builds: (target_modules, feedforward_modules).
PEFT_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
}
DEFAULT = "default"


def feedforward_regex(items) -> str:
    """PEFT's list rule for feedforward_modules (a plain ``endswith``) as a regex."""
    return r"(?:" + "|".join(re.escape(t) for t in items) + r")$"


@dataclasses.dataclass(frozen=True)
class IA3Config:
    # "default": PEFT's targets for the model type; else a regex or list of regexes (re.search
    # over module paths, as every peftjax target).
    targets: str | tuple[str, ...] = DEFAULT
    # Targets whose INPUT is scaled ("default": PEFT's for the model type; a regex or list
    # searched among the targets; an empty list: none).
    feedforward: str | tuple[str, ...] = DEFAULT


class IA3Hooks(hooks_lib.Hooks):
    """Scales the targeted layers' outputs, or their inputs at the feedforward targets."""

    def __init__(self, method: "IA3", added: core.Flat):
        self.method, self.added = method, added

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        scale = self.added.get(site + ".ia3_l")
        if scale is None:
            return y
        if site in self.method.feedforward:
            out = jnp.dot(x * scale.astype(x.dtype), kernel)
            return out if bias is None else out + bias
        return y * scale.astype(y.dtype)


@core.register("ia3")
class IA3(core.Method):
    """Learned vectors rescaling the targeted layers' outputs (keys, values) or inputs (FFN)."""

    Config = IA3Config
    family = "additional"
    mergeable = True
    peft_format = "IA3"

    def validate(self) -> None:
        c = self.config
        model_type = self.model.hf_config.model_type
        default = PEFT_DEFAULTS.get(model_type)
        if default is None and DEFAULT in (c.targets, c.feedforward):
            raise ValueError(f"ia3 has no default targets for model type {model_type!r} (PEFT's "
                             f"defaults cover {', '.join(sorted(PEFT_DEFAULTS))}): set targets "
                             "and feedforward")
        targets = core.module_names_regex(default[0]) if c.targets == DEFAULT else c.targets
        self.targets = core.match_targets(targets, self.sites.backbone_linear)
        feedforward = c.feedforward
        if feedforward == DEFAULT:
            feedforward = feedforward_regex(default[1]) if default[1] else ()
        self.feedforward = (frozenset(core.match_targets(feedforward, self.targets, "feedforward"))
                            if feedforward else frozenset())

    def size(self, site: str) -> int:
        info = self.sites.linear[site]
        return info["in_features"] if site in self.feedforward else info["out_features"]

    def init(self, rng, base, ctx):
        return {f"{s}.ia3_l": jnp.ones((self.size(s),), base[s + ".kernel"].dtype) for s in self.targets}

    def hooks(self, added, state, *, train, rng):
        return IA3Hooks(self, added)

    # -- merge ----------------------------------------------------------------------------
    def _fold(self, params: core.Flat, added: core.Flat, inverse: bool) -> core.Flat:
        out = dict(params)
        for site in self.targets:
            scale = added[site + ".ia3_l"].astype(jnp.float32)
            scale = 1.0 / scale if inverse else scale
            k = site + ".kernel"
            kernel = params[k].astype(jnp.float32)
            if site in self.feedforward:
                out[k] = (kernel * scale[:, None]).astype(params[k].dtype)
                continue
            out[k] = (kernel * scale[None, :]).astype(params[k].dtype)
            if site + ".bias" in params:
                b = params[site + ".bias"]
                out[site + ".bias"] = (b.astype(jnp.float32) * scale).astype(b.dtype)
        return out

    def merge(self, base, added, state):
        return self._fold(base, added, inverse=False)

    def unmerge(self, merged, added, state):
        return self._fold(merged, added, inverse=True)

    # -- Hugging Face PEFT format -----------------------------------------------------------
    def peft_config(self, *, conv1d: bool) -> dict[str, Any]:
        return {"feedforward_modules": sorted(self.feedforward), "init_ia3_weights": True,
                "fan_in_fan_out": conv1d, "exclude_modules": None}

    def peft_tensors(self) -> dict[str, tuple[core.PeftTensor, ...]]:
        """``ia3_l`` as PEFT shapes it: (1, in) for a feedforward target, (out, 1) otherwise."""
        return {s: (core.PeftTensor("ia3_l", "ia3_l",
                                    (1, self.size(s)) if s in self.feedforward else (self.size(s), 1)),)
                for s in self.targets}

    @classmethod
    def config_from_peft(cls, peft_config, targets):
        ff = peft_config.get("feedforward_modules")
        if ff is None:
            raise ValueError("feedforward_modules is missing (PEFT writes the resolved list)")
        if isinstance(ff, str):
            ff = rf"^(?:{ff})$"           # PEFT: re.fullmatch
        else:
            ff = feedforward_regex(ff) if ff else ()
        return {"targets": targets(peft_config.get("target_modules")), "feedforward": ff}
