"""BitFit (Ben Zaken et al., ACL 2022): train only the bias terms (and the task head).

Default: every bias, LayerNorm β included (bert-base-uncased: 102,912 params, 0.094%).
``subset="query_intermediate"`` is the paper's intro variant: the query biases and the
"middle-of-MLP" (intermediate) biases only, about half the bias params. ``biases`` takes any
regex over param paths for other ablations.
"""

from __future__ import annotations

import dataclasses
import re

from peftjax.methods import core

SUBSETS = {
    "all": r"\.bias$",
    # BERT names, and Llama's closest equivalents (q_proj; gate/up_proj form the MLP middle).
    "query_intermediate": r"(attention\.self\.query|self_attn\.q_proj|intermediate\.dense|"
                          r"mlp\.gate_proj|mlp\.up_proj)\.bias$",
}


@core.register("bitfit")
class BitFit(core.Method):

    @dataclasses.dataclass(frozen=True)
    class Config:
        subset: str = "all"
        biases: str = ""  # a custom regex over param paths; overrides ``subset`` when set

    family = "selection"

    def validate(self) -> None:
        c = self.config
        core.check_range("bitfit", "subset", c.subset, f"one of {sorted(SUBSETS)}", c.subset in SUBSETS)
        self._rx = re.compile(c.biases or SUBSETS[c.subset])
        paths = [p for p in _base_paths(self.model) if not self.sites.is_head(p)]
        if not any(self._rx.search(p) for p in paths):
            biases = [p for p in paths if p.endswith(".bias")]
            raise ValueError(
                f"bitfit: pattern {self._rx.pattern!r} selects no bias of this model; "
                + (f"its biases:\n  {core.summarize_paths(biases)}" if biases else
                   "the model has no bias terms (for Llama set attention_bias/mlp_bias in its config)"))

    def trains_base(self, path: str) -> bool:
        return path.endswith(".bias") and bool(self._rx.search(path))


def _base_paths(model) -> list[str]:
    from flax import traverse_util

    return list(traverse_util.flatten_dict(model.abstract_params(), sep="."))
