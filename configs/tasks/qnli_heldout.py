"""Task config: qnli_heldout, GLUE qnli with 10% of train held out as validation and the GLUE dev
set as test (peftjax.data.tasks: GLUE's own test labels are hidden)."""

import ml_collections

from configs.tasks import qnli


def get_config() -> ml_collections.ConfigDict:
    config = qnli.get_config()
    config.name = "qnli_heldout"
    return config
