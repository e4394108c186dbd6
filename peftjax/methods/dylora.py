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
from peftjax.models import hooks as hooks_lib


@dataclasses.dataclass(frozen=True)
class DyLoRAConfig:
    rank: int = 8              # r_max
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = lora.DEFAULT_TARGETS
    frozen: bool = True        # only the b-th component gets gradient
    eval_rank: int = 0         # rank used for evaluation and merge; 0: r_max
    use_rslora: bool = False   # not in DyLoRA; kept so LoRA's validation applies unchanged
    init: str = "default"


class DyLoRAHooks(hooks_lib.Hooks):
    def __init__(self, method: "DyLoRA", added: core.Flat, train: bool, b: jax.Array):
        self.method, self.added, self.train, self.b = method, added, train, b

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        if site not in self.method.targets:
            return y
        return y + self.method.truncated_delta(module, site, x, self.added, self.train, self.b)


@core.register("dylora")
class DyLoRA(lora.LoRA):
    """LoRA trained at a random rank b each step, usable at any rank b ≤ r_max."""

    Config = DyLoRAConfig
    inits = ("default", "gaussian")

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

    def hooks(self, added, state, *, train, rng):
        if train and rng is not None:
            b = self.sample_rank(rng)
        else:
            b = jnp.asarray(self.eval_rank)
        return DyLoRAHooks(self, added, train, b)

    def factors(self, site: str, added, b, *, frozen: bool):
        """(A ⊙ mask, B ⊙ mask, alpha / b): the first b components, lower ones detached if frozen."""
        a, bm = added[site + ".lora_A"], added[site + ".lora_B"]
        idx = jnp.arange(self.config.rank)
        if frozen:
            lower = (idx < b - 1).astype(a.dtype)
            top = (idx == b - 1).astype(a.dtype)
            a = jax.lax.stop_gradient(a) * lower[None, :] + a * top[None, :]
            bm = jax.lax.stop_gradient(bm) * lower[:, None] + bm * top[:, None]
        else:
            active = (idx < b).astype(a.dtype)
            a, bm = a * active[None, :], bm * active[:, None]
        return a, bm, self.config.alpha / b.astype(jnp.float32)

    def truncated_delta(self, module, site, x, added, train, b):
        a, bm, scale = self.factors(site, added, b, frozen=train and self.config.frozen)
        x = core.input_dropout(module, x, self.config.dropout, train)
        return (x @ a.astype(x.dtype)) @ bm.astype(x.dtype) * scale.astype(x.dtype)

    def delta_weight(self, site, added, rank: int | None = None):
        """ΔW at ``rank`` (default ``eval_rank``): (alpha / b) A[:, :b] B[:b]."""
        b = rank or self.eval_rank
        a, bm = added[site + ".lora_A"][:, :b], added[site + ".lora_B"][:b]
        return (self.config.alpha / b) * (a @ bm)

    def transform_base(self, base, added):
        return base
