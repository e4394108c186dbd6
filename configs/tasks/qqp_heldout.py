"""Task config: qqp_heldout, GLUE qqp with 10% of train held out as validation and the GLUE dev
set as test (peftjax.data.tasks: GLUE's own test labels are hidden)."""

import ml_collections

from configs.tasks import qqp


def get_config() -> ml_collections.ConfigDict:
    config = qqp.get_config()
    config.name = "qqp_heldout"
    return config
