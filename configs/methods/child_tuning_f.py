"""Child-tuning_F (Xu et al. 2021): full fine-tuning with a fresh Bernoulli(reserve_p) gradient
mask each step, rescaled by 1/reserve_p."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="child_tuning_f", reserve_p=0.3, mask_head=True, seed=0))


def train_defaults() -> dict:
    # The paper fine-tunes BERT-large/RoBERTa with full fine-tuning's rates (1e-5..4e-5).
    return dict(learning_rate=5e-5)
