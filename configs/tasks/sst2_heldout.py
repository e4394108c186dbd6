"""Task config: sst2_heldout, GLUE sst2 with 10% of train held out as validation and the GLUE dev
set as test (peftjax.data.tasks: GLUE's own test labels are hidden)."""

import ml_collections

from configs.tasks import sst2


def get_config() -> ml_collections.ConfigDict:
    config = sst2.get_config()
    config.name = "sst2_heldout"
    return config
