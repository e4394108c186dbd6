"""Child-tuning_D (Xu et al. 2021): a fixed child network, the top reserve_p of the encoder-layer
params by Fisher information from one pass over the training set; no rescaling."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="child_tuning_d", reserve_p=0.3, max_grad_norm=1.0,
                                          progress=True, representation="sparse"))


def train_defaults() -> dict:
    # The paper uses full fine-tuning's rates for BERT-large/RoBERTa (1e-5..4e-5).
    return dict(learning_rate=5e-5)
