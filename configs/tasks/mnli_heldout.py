"""Task config: mnli_heldout, GLUE mnli with 10% of train held out as validation and the GLUE dev
set as test (peftjax.data.tasks: GLUE's own test labels are hidden)."""

import ml_collections

from configs.tasks import mnli


def get_config() -> ml_collections.ConfigDict:
    config = mnli.get_config()
    config.name = "mnli_heldout"
    return config
