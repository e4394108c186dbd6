"""HiRA: Hadamard high-rank adaptation (Huang et al., ICLR 2025, §3).

The update is the Hadamard product of the frozen weight with a low-rank matrix, so its rank is
not bounded by r (only rank(W0 ⊙ AB) ≤ rank(W0)·r) at LoRA's parameter count. In flax layout
(kernel W0 (in, out))

    h = x (W0 + W0 ⊙ (A B)) + b = y + dropout(x) (W0 ⊙ (A B)),    A: (in, r), B: (r, out)

with no scaling factor, as Hugging Face PEFT (``tuners/hira/layer.py``, ``Linear.forward``:
``F.linear(dropout(x), W * (B A))``; ``HiraConfig`` has no alpha). Init as PEFT's
``reset_hira_parameters``: A ~ kaiming-uniform(a=√5) (U(±1/√in)), or N(0, 1/r²) with
``init="gaussian"``; B = 0, so the adapted model starts equal to the base. Defaults: PEFT's
``HiraConfig`` (r 32, dropout 0) on PEFT's HiRA targets (LoRA's: query/value projections).

Written on LoRA's variant surface: ``scaling`` is 1, ``forward`` multiplies A B' into the kernel,
``merge_kernel`` folds W0 ⊙ (1 + A B) and ``unmerge_kernel`` divides it out again (PEFT keeps a
copy of W0 instead; the division is exact unless an entry of 1 + A B is 0). The update is not a
low-rank term on W0, so ``additive`` is False (``low_rank_factors`` is None: an ``AdapterSet``
refuses it) and ``delta_weight`` is the Hadamard factor A B (ΔW = W0 ⊙ it). The forward computes
W0 ⊙ (A B) (in × out) per layer and step, and the gradient of A, B passes through an (in × out)
weight gradient: training costs about full fine-tuning's compute at LoRA's memory for the
optimizer state.

PEFT files (``peft_type`` HIRA): ``<module>.hira_A`` (r, in) and ``hira_B`` (out, r), our
``lora_A`` / ``lora_B`` transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from peftjax.methods import core, lora
from peftjax.models.layers import dot_rows


@dataclasses.dataclass(frozen=True)
class HiRAConfig:
    rank: int = 32                 # PEFT's HiraConfig r
    dropout: float = 0.0
    targets: str | tuple[str, ...] = lora.DEFAULT_TARGETS
    init: str = "default"          # default (kaiming-uniform A, B = 0) | gaussian (A ~ N(0, 1/r²))


@core.register("hira")
class HiRA(lora.LoRA):
    """W0 ⊙ (A B) added to each targeted kernel."""

    Config = HiRAConfig
    inits = ("default", "gaussian")
    additive = False           # W0 ⊙ (A B) is not a low-rank term
    peft_lora_flags = None     # not a PEFT LoraConfig: its own peft_type
    peft_format = "HIRA"

    @property
    def scaling(self) -> float:
        return 1.0

    def forward(self, call: lora.LinearCall, params: dict, context: Any) -> jax.Array:
        """``x (W0 ⊙ (1 + A B)) + b`` as one GEMM in float32 without active dropout, else
        ``y + dropout(x) (W0 ⊙ A B)`` (bf16 would round A B away in 1 + A B)."""
        a, b = self.factors(params, call.x.dtype, context)
        kernel = call.kernel.astype(call.x.dtype)
        if self.merged_forward(call.x, call.kernel, call.train):
            # On rows (dot_rows): A and B's gradients pass through the full-size one of W0 ⊙ A B.
            y = dot_rows(call.x, kernel + kernel * (a @ b))    # y = x W0 + bias is then unused
            return y if call.bias is None else y + call.bias
        x = core.input_dropout(call.module, call.x, self.config.dropout, call.train)
        return call.y + dot_rows(x, kernel * (a @ b))

    def merge_kernel(self, site, kernel, params, state):
        w = kernel.astype(jnp.float32)
        return (w + w * self.delta_weight(site, params, state)).astype(kernel.dtype)

    def unmerge_kernel(self, site, merged, params, state):
        factor = 1.0 + self.delta_weight(site, params, state)
        return (merged.astype(jnp.float32) / factor).astype(merged.dtype)

    # -- Hugging Face PEFT format -----------------------------------------------------------
    def peft_config(self, *, conv1d: bool) -> dict[str, Any]:
        c = self.config
        return {"r": int(c.rank), "hira_dropout": float(c.dropout),
                "init_weights": "gaussian" if c.init == "gaussian" else True,
                "fan_in_fan_out": conv1d, "exclude_modules": None, "rank_pattern": {},
                "layers_to_transform": None, "layers_pattern": None}

    def peft_tensors(self) -> dict[str, tuple[core.PeftTensor, ...]]:
        r, linear = self.config.rank, self.sites.linear
        return {s: (core.PeftTensor("hira_A", "lora_A", (r, linear[s]["in_features"]), True),
                    core.PeftTensor("hira_B", "lora_B", (linear[s]["out_features"], r), True))
                for s in self.targets}

    @classmethod
    def config_from_peft(cls, peft_config, targets):
        return {"rank": int(peft_config.get("r", 32)),
                "dropout": float(peft_config.get("hira_dropout", 0.0) or 0.0),
                "targets": targets(peft_config.get("target_modules")),
                "init": "gaussian" if peft_config.get("init_weights") == "gaussian" else "default"}
