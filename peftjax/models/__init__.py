"""The Flax model zoo: encoder (BERT/RoBERTa/MiniLM) and decoder (Llama) families.

Importing this package registers every family.
"""

from peftjax.models import bert  # noqa: F401  (registers the family)
from peftjax.models import hooks
from peftjax.models.registry import (Family, Model, build_model, family_for, register_family,
                                     supported_model_types)

try:  # the decoder family lands in its own module
    from peftjax.models import llama  # noqa: F401
except ImportError:  # pragma: no cover - TEMPORARY while llama.py is being written
    pass

__all__ = ["Family", "Model", "build_model", "family_for", "register_family",
           "supported_model_types", "hooks"]
