"""The Flax model zoo: encoder (BERT/RoBERTa/MiniLM), decoder (Llama, Qwen2, Qwen3, Qwen3-MoE,
Mistral, Gemma 2/3, GPT-2, BLOOM) and encoder-decoder (T5/mT5) families.

Importing this package imports every module in it, and a family module registers itself
(``registry.register_family``) when imported: a new family is one file here, listed nowhere.
"""

import importlib
import pkgutil

from peftjax.models import hooks
from peftjax.models.registry import (Family, Model, build_model, family_for, register_family,
                                     supported_model_types)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # registers the families

__all__ = ["Family", "Model", "build_model", "family_for", "register_family",
           "supported_model_types", "hooks"]
