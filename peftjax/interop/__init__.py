"""Interoperability with other PEFT ecosystems (Hugging Face PEFT adapter folders)."""

from peftjax.interop.hf_peft import (AdapterError, SUPPORTED_PEFT_TYPES, export_adapter,
                                     import_adapter, peft_params, read_adapter)

__all__ = ["AdapterError", "SUPPORTED_PEFT_TYPES", "export_adapter", "import_adapter",
           "peft_params", "read_adapter"]
