"""Task config: rte_heldout, GLUE rte with 10% of train held out as validation and the GLUE dev
set as test (peftjax.data.tasks: GLUE's own test labels are hidden)."""

import ml_collections

from configs.tasks import rte


def get_config() -> ml_collections.ConfigDict:
    config = rte.get_config()
    config.name = "rte_heldout"
    return config
