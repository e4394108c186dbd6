"""PEFT methods, registered by name. Importing this package registers every method."""

from peftjax.methods import adapter, bitfit, full, lora, prompt_tuning  # noqa: F401  (register)
from peftjax.methods import adalora, child_tuning, dora, dylora, fishmask, vera  # noqa: F401  (register)
from peftjax.methods import hira, ia3, linear_probe, ln_tuning, olora, prefix_tuning  # noqa: F401  (register)
from peftjax.methods import lora_fa, lora_ga, lora_plus  # noqa: F401  (register)
from peftjax.methods.core import (InitContext, Method, PeftParams, Sites, count_params, create,
                                  default_config, match_targets, method_class, register, registered)

__all__ = ["InitContext", "Method", "PeftParams", "Sites", "count_params", "create", "default_config",
           "match_targets", "method_class", "register", "registered"]
