"""LoRA (Hu et al. 2022). Defaults: PEFT's (r=8, alpha=8, query/value projections).

Paper settings: RoBERTa-base r=8 on query,value, alpha 8 (repo scripts 16), lr 5e-4;
rsLoRA: ``--config.method.use_rslora=True``; PiSSA: ``--config.method.init=pissa``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="lora",
        rank=8,
        alpha=8.0,
        dropout=0.0,
        targets=r"\.(query|value|q_proj|v_proj|c_attn|query_key_value|q|v)$",
        use_rslora=False,
        init="default",   # default (kaiming-uniform A, B=0) | gaussian | pissa (SVD of W0, residual base)
    ))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)  # LoRA Table 9, RoBERTa-base GLUE
