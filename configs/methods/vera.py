"""VeRA (Kopiczko et al. 2024). Defaults: PEFT's ``VeraConfig`` (r 256, d_initial 0.1,
dropout 0, projection_prng_key 0) on the query/value projections.

The shared random A/B are generated from ``projection_prng_key`` and kept in the method state
(checkpointed; PEFT's ``save_projection=True``). The learning rate default (1e-2) is an
assumption, not a paper setting: VeRA trains very few params and wants larger rates than LoRA.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="vera",
        rank=256,
        d_initial=0.1,
        dropout=0.0,
        targets=r"\.(query|value|q_proj|v_proj|c_attn|query_key_value|q|v)$",
        projection_prng_key=0,
    ))


def train_defaults() -> dict:
    return dict(learning_rate=1e-2)
