"""FishMask (Sung et al. 2021): a fixed sparse mask of the top 0.5% params by empirical Fisher
(first 1024 training examples at batch size 1), the classifier counted inside the budget."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="fishmask", keep_ratio=0.005, num_examples=1024,
                                          head_in_budget=True, fisher_chunk=8, progress=True,
                                          representation="sparse"))


def train_defaults() -> dict:
    # The paper trains its 0.5% masks with Adam at 1e-4 (GLUE, BERT-large).
    return dict(learning_rate=1e-4)
