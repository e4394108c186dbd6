"""LoRA+ (Hayou, Ghosh & Yu, ICML 2024, "LoRA+: Efficient Low Rank Adaptation of Large
Models", arXiv:2402.12354): LoRA whose B matrices learn λ times faster than its A matrices.

The model, init, forward, merge, counts and files are LoRA's (``peftjax/methods/lora.py``); only
the learning rates differ. The paper's argument (an infinite-width analysis): with one rate for
both factors, feature learning in wide models is inefficient, because B (r, out) and A (in, r)
need rates of different orders in the width; setting

    η_B = λ · η_A,   λ = ``lr_ratio`` (the paper recommends λ ≈ 2⁴ = 16; PEFT's
                     ``loraplus_lr_ratio``)

fixes it. Here that is the protocol's ``lr_multipliers``: the optimizer's *update* of every B is
multiplied by λ after AdamW (``peftjax/train/optim.py``), which is exactly training B at rate
λ·η — Adam normalises the gradient, so scaling it would change nothing, while scaling the update
−η (m̂/(√v̂+ε) + wd·θ) scales the decoupled weight decay term with it, as PyTorch's AdamW applies
lr · weight_decay per param group.

Which params get λ follows Hugging Face PEFT's ``create_loraplus_optimizer``
(``peft/optimizers/loraplus.py``): every trainable param whose name contains ``lora_B``, *and*
every trainable 1-D param (its ``param.ndim == 1`` rule), which on a PEFT LoRA model are the
biases (and norm scales) of the task head (``modules_to_save``): here the head's 1-D params,
listed from the model's shapes. Everything else (A, the head's matrices) trains at η. PEFT's
third group, ``loraplus_lr_embedding`` (an absolute rate, default 1e-6, for LoRA on
``nn.Embedding`` layers), has nothing to act on: peftjax's LoRA adapts linear layers only.

Weight decay: PEFT gives all its groups ``loraplus_weight_decay`` (default 0.0, whatever the
optimizer's own ``weight_decay``) except the B params outside its decay list (biases, LayerNorm
weights: 0); here the run's AdamW decays with ``train.weight_decay`` and skips biases and norm
scales (``optim._decay_mask``) — the same split, so ``train.weight_decay`` plays the role of
``loraplus_weight_decay`` (set it to 0 for PEFT's default).

Saving and Hugging Face PEFT export are plain LoRA's (PEFT records no learning rates in an
adapter: a LoRA+ run's file is a LoRA file, and imports as ``lora``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from peftjax.methods import core, lora


@dataclasses.dataclass(frozen=True)
class LoRAPlusConfig(lora.LoRAConfig):
    lr_ratio: float = 16.0   # λ = η_B / η_A (PEFT's loraplus_lr_ratio; the paper's 2⁴)


@core.register("lora_plus")
class LoRAPlus(lora.LoRA):
    """LoRA with B's learning rate λ × A's (after AdamW, through ``lr_multipliers``)."""

    Config = LoRAPlusConfig

    def validate(self) -> None:
        super().validate()
        ratio = self.config.lr_ratio
        core.check_range(self.name, "lr_ratio", ratio, "a finite number > 0 (the paper: ~16)",
                         isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0)

    def ratio_params(self) -> tuple[str, ...]:
        """Keys (``"head.<path>"``) of the trainable 1-D params outside the adapters that PEFT's
        ``ndim == 1`` rule puts in B's group: the task head's biases and norm scales."""
        from flax import traverse_util

        flat = traverse_util.flatten_dict(self.model.abstract_params(), sep=".")
        return tuple(f"head.{p}" for p, v in flat.items()
                     if self.sites.is_head(p) and np.ndim(v) == 1)

    def lr_multipliers(self) -> tuple[tuple[str, float], ...]:
        ratio = float(self.config.lr_ratio)
        rules = [(r"^added\..+\.lora_B$", ratio)]
        head = self.ratio_params()
        if head:
            rules.append((core.exact_paths_regex(head), ratio))
        return tuple(rules)
