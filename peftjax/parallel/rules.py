"""Sharding rules: which mesh axes split which dimensions of each parameter, by parameter path.

A rule is ``(regex, PartitionSpec)``; the regex is searched in the dotted parameter path
(``model.layers.3.self_attn.q_proj.kernel``) and the first matching rule wins. Families register
explicit rules (Megatron-style tensor parallelism plus FSDP, below: BERT, Llama, GPT-2, BLOOM,
T5); every path no rule matches gets the generic fallback:

* arrays with at least 2 dims and at least ``min_elements`` entries: their largest dimension
  divisible by the ``fsdp`` axis size is split over ``fsdp`` (ZeRO-3 style: every big tensor is
  spread evenly over the FSDP group, whatever its role);
* smaller or 1-D arrays (biases, norms, LoRA vectors, sparse-delta values): replicated — sharding
  them costs more in collectives than it saves in memory.

So a new model family (GPT-2, BLOOM, T5, ...) trains sharded with no rules of its own, and may
register explicit ones (``register_rules``) for tensor parallelism.

**Divisibility.** GSPMD needs every sharded dimension to divide evenly by the product of the mesh
axes it is split over. A rule whose dimension does not divide (a 3-class head over 8 devices, a
GQA key projection of 2 heads over 4 tensor shards) falls back to replication *for that
dimension only*; the fallback is recorded in the ``Placement`` (``replicated_dims``) and shown by
``describe``, never an error: a rule set must work on every mesh shape.

Flax kernels are ``(in_features, out_features)``. Tensor parallelism (Shoeybi et al. 2019, §3):
the first projection of a pair (Q/K/V, FFN up/gate) is column-parallel — its output dim is split
over ``tensor`` — and the second (attention output, FFN down) is row-parallel — its input dim is
split over ``tensor`` — so the pair needs one all-reduce. The other dim is split over ``fsdp``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, Sequence

from jax.sharding import PartitionSpec as P

Rule = tuple[str, P]

DEFAULT_MIN_ELEMENTS = 1024

# Explicit rules per model family (the registry's ``Family.name``).
_FAMILY_RULES: dict[str, tuple[Rule, ...]] = {}


def register_rules(family: str, rules: Iterable[Rule]) -> None:
    """Sets explicit sharding rules for a model family (replacing any it had).

    Each rule's regex must compile and its spec name only ``data``/``fsdp``/``tensor``.
    """
    checked = []
    for pattern, spec in rules:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"sharding rule {pattern!r} of family {family!r} is not a valid regex: {e}") from None
        if not isinstance(spec, P):
            raise ValueError(f"sharding rule {pattern!r} of family {family!r}: spec must be a "
                             f"PartitionSpec, got {spec!r}")
        _axes_of(spec, where=f"rule {pattern!r} of family {family!r}")
        checked.append((pattern, spec))
    _FAMILY_RULES[family] = tuple(checked)


def rules_for(family: str) -> tuple[Rule, ...]:
    """The family's explicit rules; ``()`` for a family without any (the fallback covers it)."""
    return _FAMILY_RULES.get(family, ())


def _axes_of(spec: P, where: str) -> list[tuple[str, ...]]:
    from peftjax.parallel.mesh import AXES

    out, seen = [], set()
    for entry in spec:
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        for a in axes:
            if a not in AXES:
                raise ValueError(f"{where}: unknown mesh axis {a!r} in {spec}; valid: {', '.join(AXES)}")
            if a in seen:
                raise ValueError(f"{where}: mesh axis {a!r} used twice in {spec}")
            seen.add(a)
        out.append(axes)
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one array goes: the final spec, which rule chose it, and the dims a rule wanted
    sharded but that did not divide (replicated instead)."""

    path: str
    shape: tuple[int, ...]
    spec: P
    rule: str                                   # the regex, "fallback" or a named special case
    replicated_dims: tuple[tuple[int, tuple[str, ...]], ...] = ()


def fit_spec(spec: P, shape: Sequence[int], mesh_shape: Mapping[str, int], where: str = "spec"
             ) -> tuple[P, tuple[tuple[int, tuple[str, ...]], ...]]:
    """``spec`` padded to ``len(shape)`` with every non-dividing dimension replicated.

    A spec with more entries than the array has dims is an error (a rule meant for another kind
    of array matched): silently dropping entries would hide a wrong rule.
    """
    axes = _axes_of(spec, where)
    if len(axes) > len(shape):
        raise ValueError(f"{where}: spec {spec} has {len(axes)} entries but the array has shape "
                         f"{tuple(shape)}; the rule's regex matches an array it was not written for")
    entries, dropped = [], []
    for dim, size in enumerate(shape):
        dim_axes = tuple(a for a in (axes[dim] if dim < len(axes) else ()) if mesh_shape[a] > 1)
        ways = math.prod(mesh_shape[a] for a in dim_axes)
        if dim_axes and size % ways:
            dropped.append((dim, dim_axes))
            dim_axes = ()
        entries.append(None if not dim_axes else (dim_axes[0] if len(dim_axes) == 1 else dim_axes))
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries), tuple(dropped)


def fallback_spec(shape: Sequence[int], mesh_shape: Mapping[str, int],
                  min_elements: int = DEFAULT_MIN_ELEMENTS) -> P:
    """The generic rule: the largest ``fsdp``-divisible dim of a big (≥2-D, ≥ ``min_elements``)
    array over ``fsdp``; everything else replicated."""
    fsdp = mesh_shape.get("fsdp", 1)
    if len(shape) < 2 or math.prod(shape) < min_elements or fsdp == 1:
        return P()
    candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda d: (shape[d], -d))
    return P(*([None] * dim + ["fsdp"]))


class ShardingRules:
    """Ordered explicit rules plus the fallback; ``place`` gives one array's ``Placement``."""

    def __init__(self, rules: Iterable[Rule] = (), min_elements: int = DEFAULT_MIN_ELEMENTS) -> None:
        if min_elements < 0:
            raise ValueError(f"min_elements={min_elements} is invalid; valid: >= 0")
        self.rules = tuple(rules)
        self._compiled = [(re.compile(p), p, s) for p, s in self.rules]
        self.min_elements = int(min_elements)

    @classmethod
    def for_family(cls, family: str, min_elements: int = DEFAULT_MIN_ELEMENTS,
                   extra: Iterable[Rule] = ()) -> "ShardingRules":
        """``extra`` rules (e.g. a method's) first, then the family's, then the fallback."""
        return cls((*extra, *rules_for(family)), min_elements)

    def match(self, path: str) -> Rule | None:
        for rx, pattern, spec in self._compiled:
            if rx.search(path):
                return pattern, spec
        return None

    def place(self, path: str, shape: Sequence[int], mesh_shape: Mapping[str, int]) -> Placement:
        shape = tuple(int(s) for s in shape)
        hit = self.match(path)
        if hit is None:
            return Placement(path, shape, fallback_spec(shape, mesh_shape, self.min_elements), "fallback")
        spec, dropped = fit_spec(hit[1], shape, mesh_shape, where=f"sharding rule {hit[0]!r} for {path}")
        return Placement(path, shape, spec, hit[0], dropped)


def describe(placements: Iterable[Placement]) -> str:
    """One line per array (layer indices folded): spec, rule, and any divisibility fallback."""
    rows: dict[tuple, int] = {}
    for p in placements:
        key = (re.sub(r"\.\d+(?=\.|$)", ".*", p.path), p.shape, str(p.spec), p.rule,
               ", ".join(f"dim {d} not divisible by {'x'.join(a)}" for d, a in p.replicated_dims))
        rows[key] = rows.get(key, 0) + 1
    lines = []
    for (path, shape, spec, rule, note), n in rows.items():
        lines.append(f"{path}{f' (x{n})' if n > 1 else ''} {shape} -> {spec} [{rule}]"
                     + (f" replicated: {note}" if note else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Explicit family rules. Kernels are (in, out).

_COLUMN = P("fsdp", "tensor")     # input projections: out over tensor, in over fsdp
_ROW = P("tensor", "fsdp")        # output projections: in over tensor, out over fsdp

# Llama and the Llama-architecture families (same module names; Qwen2's q/k/v biases, Qwen3's
# per-head q_norm / k_norm scales and Gemma 2's extra block norms fall under the bias and norm rules).
_LLAMA = [
    (r"self_attn\.(q|k|v)_proj\.kernel$", _COLUMN),
    (r"self_attn\.(q|k|v)_proj\.bias$", P("tensor")),
    (r"self_attn\.o_proj\.kernel$", _ROW),
    (r"mlp\.(gate|up)_proj\.kernel$", _COLUMN),
    (r"mlp\.(gate|up)_proj\.bias$", P("tensor")),
    (r"mlp\.down_proj\.kernel$", _ROW),
    (r"(o_proj|down_proj)\.bias$", P()),
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),   # vocab over tensor, hidden over fsdp
    (r"(^|\.)lm_head\.kernel$", _COLUMN),                  # (hidden, vocab): vocab over tensor
    (r"norm\.scale$", P()),
]
for _family in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"):
    register_rules(_family, _LLAMA)

# Mixture of experts (Qwen3-MoE): expert parallelism over ``fsdp`` — each FSDP shard holds whole
# experts (the stacked axis split), so a grouped matmul's experts are local — with the experts'
# own matrices split Megatron-style over ``tensor`` (gate_up column-parallel, down row-parallel).
# The router (hidden × experts) is small: replicated. LoRA's per-expert factors follow their
# experts (their expert axis over fsdp).
_MOE = [
    (r"mlp\.experts\.gate_up_proj$", P("fsdp", None, "tensor")),
    (r"mlp\.experts\.down_proj$", P("fsdp", "tensor")),
    (r"mlp\.experts\.(gate_up_proj|down_proj)\.lora_(A|B)$", P("fsdp")),
    (r"mlp\.gate\.kernel$", P()),
]
register_rules("qwen3_moe", _MOE + _LLAMA)

register_rules("bert", [
    (r"attention\.self\.(query|key|value)\.kernel$", _COLUMN),
    (r"attention\.self\.(query|key|value)\.bias$", P("tensor")),
    (r"intermediate\.dense\.kernel$", _COLUMN),
    (r"intermediate\.dense\.bias$", P("tensor")),
    (r"output\.dense\.kernel$", _ROW),                     # attention.output.dense and output.dense
    (r"output\.dense\.bias$", P()),
    (r"word_embeddings\.embedding$", P("tensor", "fsdp")),
    (r"(position|token_type)_embeddings\.embedding$", P(None, "fsdp")),
    (r"pooler\.dense\.kernel$", _COLUMN),
    (r"pooler\.dense\.bias$", P("tensor")),
    (r"LayerNorm\.(scale|bias)$", P()),
])

# GPT-2: Conv1D kernels are kept (in, out) like every other kernel here, so the same column/row
# split applies; c_attn is the fused q/k/v projection (out = 3·hidden over tensor: GSPMD keeps
# the result exact whichever head a shard's columns belong to).
register_rules("gpt2", [
    (r"attn\.c_attn\.kernel$", _COLUMN),
    (r"attn\.c_attn\.bias$", P("tensor")),
    (r"mlp\.c_fc\.kernel$", _COLUMN),
    (r"mlp\.c_fc\.bias$", P("tensor")),
    (r"(attn|mlp)\.c_proj\.kernel$", _ROW),
    (r"c_proj\.bias$", P()),
    (r"wte\.embedding$", P("tensor", "fsdp")),
    (r"wpe\.embedding$", P(None, "fsdp")),
    (r"ln_(1|2|f)\.(scale|bias)$", P()),
])

# BLOOM: fused per-head query_key_value, then dense; MLP h→4h, 4h→h; embedding LayerNorm.
register_rules("bloom", [
    (r"self_attention\.query_key_value\.kernel$", _COLUMN),
    (r"self_attention\.query_key_value\.bias$", P("tensor")),
    (r"mlp\.dense_h_to_4h\.kernel$", _COLUMN),
    (r"mlp\.dense_h_to_4h\.bias$", P("tensor")),
    (r"(self_attention\.dense|mlp\.dense_4h_to_h)\.kernel$", _ROW),
    (r"(self_attention\.dense|mlp\.dense_4h_to_h)\.bias$", P()),
    (r"word_embeddings\.embedding$", P("tensor", "fsdp")),
    (r"(layernorm|ln_f)\.(scale|bias)$", P()),
])

# T5 / mT5: q/k/v/o of self- and cross-attention, the (gated) FFN, the shared embedding and the
# untied LM head (v1.1 / mT5); the relative-position bias table (buckets × heads) is small.
register_rules("t5", [
    (r"(SelfAttention|EncDecAttention)\.(q|k|v)\.kernel$", _COLUMN),
    (r"(SelfAttention|EncDecAttention)\.o\.kernel$", _ROW),
    (r"DenseReluDense\.(wi|wi_0|wi_1)\.kernel$", _COLUMN),
    (r"DenseReluDense\.wo\.kernel$", _ROW),
    (r"relative_attention_bias\.embedding$", P()),
    (r"(^|\.)shared\.embedding$", P("tensor", "fsdp")),
    (r"(^|\.)lm_head\.kernel$", _COLUMN),
    (r"layer_norm\.scale$", P()),
])
