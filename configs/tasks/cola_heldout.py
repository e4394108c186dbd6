"""Task config: cola_heldout, GLUE cola with 10% of train held out as validation and the GLUE dev
set as test (peftjax.data.tasks: GLUE's own test labels are hidden)."""

import ml_collections

from configs.tasks import cola


def get_config() -> ml_collections.ConfigDict:
    config = cola.get_config()
    config.name = "cola_heldout"
    return config
