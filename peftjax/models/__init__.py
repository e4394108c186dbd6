"""The Flax model zoo: encoder (BERT/RoBERTa/MiniLM) and decoder (Llama, GPT-2, BLOOM) families.

Importing this package registers every family.
"""

from peftjax.models import bert, llama  # noqa: F401  (register the families)
from peftjax.models import bloom, gpt2  # noqa: F401  (decoders: BLOOM, GPT-2)
from peftjax.models import t5  # noqa: F401  (encoder-decoder: T5, mT5)
from peftjax.models import hooks
from peftjax.models.registry import (Family, Model, build_model, family_for, register_family,
                                     supported_model_types)

__all__ = ["Family", "Model", "build_model", "family_for", "register_family",
           "supported_model_types", "hooks"]
