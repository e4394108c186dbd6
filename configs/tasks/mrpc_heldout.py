"""Task config: mrpc_heldout, GLUE mrpc with 10% of train held out as validation and the GLUE dev
set as test (peftjax.data.tasks: GLUE's own test labels are hidden)."""

import ml_collections

from configs.tasks import mrpc


def get_config() -> ml_collections.ConfigDict:
    config = mrpc.get_config()
    config.name = "mrpc_heldout"
    return config
