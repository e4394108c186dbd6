"""Task config: GLUE RTE (2.5k pairs).

Data-side defaults only; the learning rate is method-specific and lives in configs/methods.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the rte defaults (name must match peftjax.data.get_task)."""
    config = ml_collections.ConfigDict()
    config.name = "rte"
    config.max_length = 128
    config.batch_size = 32
    config.eval_batch_size = 128
    return config
