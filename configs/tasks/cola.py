"""Task config: GLUE CoLA (8.5k sentences).

Data-side defaults only; the learning rate is method-specific and lives in configs/methods.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the cola defaults (name must match peftjax.data.get_task)."""
    config = ml_collections.ConfigDict()
    config.name = "cola"
    config.max_length = 128
    config.batch_size = 32
    config.eval_batch_size = 128
    return config
