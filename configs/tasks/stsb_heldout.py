"""Task config: stsb_heldout, GLUE stsb with 10% of train held out as validation and the GLUE dev
set as test (peftjax.data.tasks: GLUE's own test labels are hidden)."""

import ml_collections

from configs.tasks import stsb


def get_config() -> ml_collections.ConfigDict:
    config = stsb.get_config()
    config.name = "stsb_heldout"
    return config
