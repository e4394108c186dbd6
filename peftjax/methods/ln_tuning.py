"""LayerNorm tuning (Zhao et al., ICLR 2024, "Tuning LayerNorm in Attention: Towards Efficient
Multi-Modal LLM Finetuning", arXiv:2312.11420): train only the normalisation layers' params.

Every LayerNorm (γ ``scale``, β ``bias``) or RMSNorm (``scale`` alone) of the targeted modules
is trained, the rest of the base frozen; the task head is trained as for every method. Nothing
is added, so the trained values *are* the model (nothing to merge). As Hugging Face PEFT
(``tuners/ln_tuning``: it trains a copy of each targeted norm module, all its params), the
targets are PEFT's per model type (``TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING``,
matched PEFT's way: a module equal to an item or ending with ``.item``):

    llama   input_layernorm, post_attention_layernorm, norm (the final RMSNorm); mistral alike
    qwen2   post_attention_layernorm (qwen3 alike: not its per-head q_norm / k_norm)
    gemma2, gemma3_text  the four block norms and norm (not Gemma 3's q_norm / k_norm)
    bloom   input_layernorm, post_attention_layernorm, ln_f (not the embedding LayerNorm)
    gpt2    ln_1, ln_2, ln_f
    t5/mt5  layer_norm, final_layer_norm

PEFT has no default for BERT/RoBERTa (it asks for target_modules); peftjax's default there is
every LayerNorm (``LayerNorm``: embeddings, attention output, FFN output), bert-base 38,400
params (25 × 2 × 768). ``targets`` takes any regex (or list) over the norm modules' paths.

Counts equal PEFT's trainable figure; PEFT's *total* is larger by the copies it keeps of the
targeted norms (the base module and its trained copy), which peftjax does not need.
"""

from __future__ import annotations

import dataclasses

from peftjax.methods import core

PEFT_DEFAULTS: dict[str, tuple[str, ...]] = {
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
    "qwen2": ("post_attention_layernorm",),   # PEFT's choice for Qwen: the FFN's norm only
    "qwen3": ("post_attention_layernorm",),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"),
    "gemma3_text": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"),
    "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "t5": ("layer_norm", "final_layer_norm"),
    "mt5": ("layer_norm", "final_layer_norm"),
    # not in PEFT's mapping (PEFT requires target_modules there): every LayerNorm
    "bert": ("LayerNorm",),
    "roberta": ("LayerNorm",),
}
DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class LNTuningConfig:
    # "default": the norm modules above for the model type; else a regex or list of regexes
    # (re.search over the norm modules' paths).
    targets: str | tuple[str, ...] = DEFAULT


@core.register("ln_tuning")
class LNTuning(core.Method):
    """Trains the scales and biases of the targeted LayerNorm/RMSNorm modules."""

    Config = LNTuningConfig
    family = "selection"

    def validate(self) -> None:
        from flax import traverse_util

        paths = traverse_util.flatten_dict(self.model.abstract_params(), sep=".")
        # every normalisation layer of the zoo (LayerNorm, RMSNorm) holds a `scale`; nothing else does
        norms = [p.rpartition(".")[0] for p in paths
                 if p.endswith(".scale") and not self.sites.is_head(p)]
        targets = self.config.targets
        if targets == DEFAULT:
            model_type = self.model.hf_config.model_type
            if model_type not in PEFT_DEFAULTS:
                raise ValueError(f"ln_tuning has no default targets for model type {model_type!r}: "
                                 f"set targets; its norm modules:\n  {core.summarize_paths(norms)}")
            items = PEFT_DEFAULTS[model_type]
            targets = core.module_names_regex(items)
        self.modules = frozenset(core.match_targets(targets, norms, "norm target"))

    def trains_base(self, path: str) -> bool:
        return path.rpartition(".")[0] in self.modules
