"""FishMask (Sung et al. 2021): a fixed sparse mask of the top 0.5% params by empirical Fisher
(first 1024 training examples at batch size 1), the classifier counted inside the budget."""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("fishmask"))


def train_defaults() -> dict:
    # The paper trains its 0.5% masks with Adam at 1e-4 (GLUE, BERT-large).
    return dict(learning_rate=1e-4)
