"""DyLoRA: dynamic search-free low-rank adaptation (Valipour et al., EACL 2023).

LoRA with a maximum rank r_max (``rank``) whose leading components form usable adapters at every
rank b ≤ r_max. Each training step draws b ~ U{1..r_max} (one b per step shared by all layers,
from the rng the hooks receive) and the forward uses the first b components::

    h = x W0 + (alpha / b) · dropout(x) A[:, :b] B[:b, :]      A: (in, r_max), B: (r_max, out)

Reference code (huawei-noah/Efficient-NLP ``DyLoRA/loralib``): ``scaling = alpha / r_max`` and
each truncated factor is multiplied by sqrt(r_max / b), i.e. alpha / b overall, as here.
"Frozen" mode (``frozen=True``, the paper's default, reference ``dynamic(..., frozen=True)``):
components 1..b-1 are detached, so only the b-th column of A and the b-th row of B receive a
gradient in that step; ``frozen=False`` trains all of the first b.

Evaluation (and merge) use ``eval_rank`` (0 means r_max): any rank can be chosen after training
without retraining (``scripts/dylora_sweep.py`` evaluates a list of ranks from a run's checkpoint).
Init as LoRA (reference: kaiming-uniform A, zero B). Defaults: the paper's RoBERTa-base GLUE
setting, r_max 8, alpha 16, on the query/value projections.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.methods import core, lora


@dataclasses.dataclass(frozen=True)
class DyLoRAConfig:
    rank: int = 8              # r_max; each step trains rank b ~ U{1..r_max}
    alpha: float = 16.0        # scale alpha / b
    dropout: float = 0.0
    targets: str | tuple[str, ...] = lora.DEFAULT_TARGETS
    frozen: bool = True        # detach components 1..b-1 (paper default): only the b-th trains
    eval_rank: int = 0         # rank used for evaluation and merge; 0: r_max
    use_rslora: bool = False   # not in DyLoRA; kept so LoRA's validation applies unchanged
    init: str = "default"      # default (kaiming-uniform A, B=0) | gaussian


@core.register("dylora")
class DyLoRA(lora.LoRA):
    """LoRA trained at a random rank b each step, usable at any rank b ≤ r_max.

    Written on LoRA's variant surface: ``forward_context`` draws b once per training forward
    (the evaluation rank otherwise) and ``factors`` truncates A, B to it, so LoRA's forward,
    merge and export apply unchanged.
    """

    Config = DyLoRAConfig
    inits = ("default", "gaussian")
    eval_rank_field = "eval_rank"
    peft_lora_flags = None   # PEFT has no LoRA trained at a random rank per step

    def validate(self) -> None:
        super().validate()
        c = self.config
        core.check_range(self.name, "use_rslora", c.use_rslora, "False (DyLoRA scales by alpha / b)",
                         not c.use_rslora)
        core.check_range(self.name, "eval_rank", c.eval_rank, f"0 (= rank) or 1..rank={c.rank}",
                         isinstance(c.eval_rank, int) and 0 <= c.eval_rank <= c.rank)

    @property
    def eval_rank(self) -> int:
        return self.config.eval_rank or self.config.rank

    def sample_rank(self, rng) -> jax.Array:
        return jax.random.randint(rng, (), 1, self.config.rank + 1)

    def forward_context(self, state, *, train, rng):
        """``(b, train)``: the rank drawn for this training step (one b for every layer), or
        the evaluation rank."""
        if train and rng is not None:
            return self.sample_rank(rng), True
        return jnp.asarray(self.eval_rank), False

    def factors(self, params, dtype, context=None):
        """(A ⊙ mask, (alpha / b) · B ⊙ mask): the first b components; in a frozen-mode training
        step components 1..b-1 are detached, so only the b-th receives a gradient."""
        b, training = context if context is not None else (jnp.asarray(self.eval_rank), False)
        a, bm = params["lora_A"], params["lora_B"]
        idx = jnp.arange(self.config.rank)
        if training and self.config.frozen:
            lower = (idx < b - 1).astype(a.dtype)
            top = (idx == b - 1).astype(a.dtype)
            a = jax.lax.stop_gradient(a) * lower[None, :] + a * top[None, :]
            bm = jax.lax.stop_gradient(bm) * lower[:, None] + bm * top[:, None]
        else:
            active = (idx < b).astype(a.dtype)
            a, bm = a * active[None, :], bm * active[:, None]
        scale = (self.config.alpha / b.astype(jnp.float32)).astype(dtype)
        return a.astype(dtype), bm.astype(dtype) * scale
