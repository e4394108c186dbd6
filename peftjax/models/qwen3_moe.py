"""Decoder family: Qwen3 mixture-of-experts models (``model_type="qwen3_moe"``) in Flax linen.

Qwen3-MoE (Yang et al. 2025, "Qwen3 technical report", §2; Qwen3-30B-A3B: 48 layers, 128 experts,
8 routed per token, 3.3 B of 30.5 B parameters active) is Qwen3's decoder (``qwen3.py``: q/k
RMSNorm before RoPE, no qkv bias, GQA) whose FFN is a sparse mixture of experts
(``moe.sparse_moe``: softmax router ``mlp.gate``, top-k, renormalised when ``norm_topk_prob``,
SwiGLU experts ``mlp.experts.gate_up_proj`` / ``down_proj`` stacked over experts). A layer is
sparse iff it is not in ``mlp_only_layers`` and ``(layer + 1) % decoder_sparse_step == 0``
(transformers' ``Qwen3MoeDecoderLayer``); the others keep a dense SwiGLU FFN of
``intermediate_size`` (``mlp.gate_proj``...). No shared expert (Qwen2-MoE's), no router bias.

Sliding-window attention, when ``use_sliding_window``, applies to every layer (transformers'
``Qwen3MoeAttention`` passes ``config.sliding_window`` to all layers), as Mistral's.

Checkpoints keep one Linear per expert (``mlp.experts.7.up_proj.weight``); ``hf_io`` stacks
them on load and splits them on save (``Family.stacked_params``), as transformers v5 does.

The auxiliary load-balancing loss is added to training when the config asks for it as
transformers does (``output_router_logits=True``; weight ``router_aux_loss_coef``):
``aux_loss`` below, called by ``registry.Model.apply``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models import llama, moe, qwen3, registry


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(llama.LlamaConfig):
    """Qwen3's facts plus the experts'."""

    sliding_window: int | None = None
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001

    @classmethod
    def from_hf(cls, hf: Any) -> "Qwen3MoeConfig":
        get = lambda name, default: default if getattr(hf, name, None) is None else getattr(hf, name)
        window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", False) else None
        experts = int(get("num_experts", get("num_local_experts", cls.num_experts)))
        top_k = int(get("num_experts_per_tok", cls.num_experts_per_tok))
        step = int(get("decoder_sparse_step", 1))
        if experts < 1 or not 1 <= top_k <= experts:
            raise ValueError(f"qwen3_moe needs num_experts >= 1 and 1 <= num_experts_per_tok <= "
                             f"num_experts, got {experts} and {top_k}")
        if step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
        return dataclasses.replace(
            super().from_hf(hf), mlp_bias=False,
            sliding_window=None if window is None else int(window),
            num_experts=experts, num_experts_per_tok=top_k,
            moe_intermediate_size=int(get("moe_intermediate_size", cls.moe_intermediate_size)),
            norm_topk_prob=bool(get("norm_topk_prob", False)), decoder_sparse_step=step,
            mlp_only_layers=tuple(int(i) for i in (get("mlp_only_layers", ()) or ())),
            output_router_logits=bool(get("output_router_logits", False)),
            router_aux_loss_coef=float(get("router_aux_loss_coef", cls.router_aux_loss_coef)))

    def attention_window(self, layer: int) -> int | None:
        return self.sliding_window

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer``'s FFN is the mixture of experts (transformers' rule)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


class Qwen3MoeSparseBlock(nn.Module):
    """``mlp`` of a sparse layer: router ``gate`` and stacked ``experts`` (``moe.sparse_moe``)."""

    config: Qwen3MoeConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        return moe.sparse_moe(self, x, num_experts=c.num_experts, top_k=c.num_experts_per_tok,
                              intermediate_size=c.moe_intermediate_size, normalize=c.norm_topk_prob,
                              hidden_act=c.hidden_act, dtype=self.dtype,
                              initializer_range=c.initializer_range)


class Qwen3MoeDecoderLayer(qwen3.Qwen3DecoderLayer):
    """Qwen3's layer; its FFN is sparse or dense by the layer's index (its name in the stack)."""

    @property
    def mlp_cls(self):
        return Qwen3MoeSparseBlock if self.config.is_sparse(int(self.name)) else llama.LlamaMLP


class Qwen3MoeLayerStack(llama.LlamaLayerStack):
    layer_cls = Qwen3MoeDecoderLayer
    scan_refusal = ("the qwen3_moe family's layers differ (sparse or dense by index) and sow "
                    "their router logits, which one scanned body cannot express; run it unrolled")


class Qwen3MoeModel(llama.LlamaModel):
    stack_cls = Qwen3MoeLayerStack


class Qwen3MoeForCausalLM(llama.LlamaForCausalLM):
    model_cls = Qwen3MoeModel


class Qwen3MoeForSequenceClassification(llama.LlamaForSequenceClassification):
    model_cls = Qwen3MoeModel


def aux_loss(config: Qwen3MoeConfig, router_logits: list[jax.Array],
             attention_mask: jax.Array | None) -> jax.Array | None:
    """``router_aux_loss_coef ·`` the load-balancing loss when the config enables it
    (``output_router_logits``, transformers' switch for adding it to the loss), else None."""
    if not config.output_router_logits or not router_logits:
        return None
    return config.router_aux_loss_coef * moe.load_balancing_loss(
        router_logits, config.num_experts, config.num_experts_per_tok, attention_mask)


# Hub checkpoints: mlp.experts.{e}.{gate,up,down}_proj.weight, one nn.Linear per expert.
EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

FAMILY = registry.register_family(registry.Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    config_from_hf=Qwen3MoeConfig.from_hf,
    build=llama.make_build(Qwen3MoeModel, Qwen3MoeForCausalLM, Qwen3MoeForSequenceClassification),
    heads=llama.HEADS,
    head_prefixes=llama.head_prefixes,
    backbone_prefix=llama.backbone_prefix,
    input_names=("input_ids", "attention_mask"),
    stacked_params=lambda path, shape: moe.stacked_hf_names(path, shape, EXPERT_PARTS),
    aux_loss=aux_loss,
))
