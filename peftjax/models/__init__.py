"""The Flax model zoo: encoder (BERT/RoBERTa/MiniLM) and decoder (Llama) families.

Importing this package registers every family.
"""

from peftjax.models import bert  # noqa: F401  (registers the family)
from peftjax.models import hooks
from peftjax.models.registry import (Family, Model, build_model, family_for, register_family,
                                     supported_model_types)

try:  # the decoder family lands in its own module
    from peftjax.models import llama  # noqa: F401
except ImportError as e:  # pragma: no cover - only while llama.py is absent
    if "peftjax.models.llama" not in str(e) and "llama" not in str(e):
        raise

__all__ = ["Family", "Model", "build_model", "family_for", "register_family",
           "supported_model_types", "hooks"]
