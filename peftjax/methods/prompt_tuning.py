"""Prompt tuning (Lester et al., EMNLP 2021): n trainable virtual-token embeddings.

The prompt P (n × d) is prepended to the input token embeddings; the attention mask (ones) and
token-type ids (zeros) are extended to match, and positions run over the extended sequence,
exactly as HF PEFT feeds ``inputs_embeds`` to the transformers model. So for a BERT classifier
the [CLS]-position pooler reads the first virtual token, as it does in PEFT. Decoders drop the
virtual positions from their logits so that labels keep their shape.

Init (PEFT's ``PromptTuningInit``): ``random`` — N(0, 1) as torch's ``nn.Embedding``;
``vocab`` — rows of the word-embedding table at uniformly sampled token ids; ``text`` — the
embeddings of ``init_text``'s tokens, repeated to n (Lester et al. §3.2 "class label" /
"sampled vocab" inits).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.methods import core
from peftjax.models import hooks as hooks_lib

INITS = ("random", "vocab", "text")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    # random | vocab | text. Lester et al. (§3.2, Fig. 3b) find sampled-vocabulary and class-label
    # inits well ahead of random ones at every size; their code samples the vocabulary. PEFT's
    # default is random: set init="random" to match it.
    init: str = "vocab"
    init_text: str = ""       # the text whose token embeddings start the prompt (init="text")


class PromptHooks(hooks_lib.Hooks):
    def __init__(self, prompt):
        self.prompt = prompt

    def embeddings(self, module, embeds, attention_mask, token_type_ids):
        b = embeds.shape[0]
        n = self.prompt.shape[0]
        p = jnp.broadcast_to(self.prompt.astype(embeds.dtype)[None], (b,) + self.prompt.shape)
        embeds = jnp.concatenate([p, embeds], axis=1)
        attention_mask = jnp.concatenate(
            [jnp.ones((b, n), attention_mask.dtype), attention_mask], axis=1)
        if token_type_ids is not None:
            token_type_ids = jnp.concatenate(
                [jnp.zeros((b, n), token_type_ids.dtype), token_type_ids], axis=1)
        return embeds, attention_mask, token_type_ids


@core.register("prompt_tuning")
class PromptTuning(core.Method):
    Config = PromptTuningConfig
    family = "additional"

    def validate(self) -> None:
        c = self.config
        core.check_range("prompt_tuning", "num_virtual_tokens", c.num_virtual_tokens, "an integer >= 1",
                         isinstance(c.num_virtual_tokens, int) and c.num_virtual_tokens >= 1)
        core.check_range("prompt_tuning", "init", c.init, f"one of {list(INITS)}", c.init in INITS)
        core.check_range("prompt_tuning", "init_text", c.init_text, "non-empty text when init='text'",
                         c.init != "text" or bool(c.init_text.strip()))
        if len(self.sites.embeddings) != 1:
            raise ValueError(f"prompt_tuning needs exactly one input-embedding hook, found "
                             f"{list(self.sites.embeddings)}")
        (self.site, info), = self.sites.embeddings.items()
        self.hidden = info["hidden"]

    def _table(self, base: core.Flat):
        """The input word-embedding table: the embedding under the site with vocabulary rows, else
        the model's only vocabulary-sized table (T5's ``shared``, which sits beside the encoder)."""
        vocab = self.model.config.vocab_size
        tables = {p: v for p, v in base.items() if p.endswith(".embedding") and v.shape[0] == vocab}
        for path, v in tables.items():
            if path.startswith(self.site + "."):
                return v
        if len(tables) == 1:
            return next(iter(tables.values()))
        raise ValueError(f"prompt_tuning: no word-embedding table under {self.site!r} "
                         f"(vocabulary-sized tables: {sorted(tables) or 'none'})")

    def init(self, rng, base, ctx):
        c = self.config
        n, d = c.num_virtual_tokens, self.hidden
        if c.init == "random":
            prompt = jax.random.normal(rng, (n, d))
        else:
            table = self._table(base)
            if c.init == "vocab":
                ids = jax.random.randint(rng, (n,), 0, table.shape[0])
            else:
                if ctx.tokenizer is None:
                    raise ValueError("prompt_tuning init='text' needs the model's tokenizer")
                tok = ctx.tokenizer(c.init_text, add_special_tokens=False)["input_ids"]
                if not tok:
                    raise ValueError(f"prompt_tuning.init_text={c.init_text!r} tokenises to nothing")
                ids = jnp.asarray(np.resize(np.asarray(tok), n))  # repeat/truncate to n, as PEFT
            prompt = jnp.take(table, ids, axis=0)
        return {f"{self.site}.prompt_embeddings": prompt.astype(jnp.float32)}

    def count_added(self, abstract_base) -> int:
        return self.config.num_virtual_tokens * self.hidden

    def hooks(self, added, state, *, train, rng):
        return PromptHooks(added[f"{self.site}.prompt_embeddings"])
