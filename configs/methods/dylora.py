"""DyLoRA (Valipour et al. 2023). Defaults: the paper's RoBERTa-base GLUE setting, r_max 8,
alpha 16, query/value projections, "frozen" mode (only the sampled b-th component is trained).

Evaluate at another rank: ``--config.method.eval_rank=4``; sweep ranks of a finished run:
``python scripts/dylora_sweep.py --workdir=runs/dylora --ranks=1,2,4,8``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="dylora",
        rank=8,            # r_max; each step trains rank b ~ U{1..r_max}
        alpha=16.0,        # scale alpha / b
        dropout=0.0,
        targets=r"\.(query|value|q_proj|v_proj|c_attn|query_key_value|q|v)$",
        frozen=True,       # detach components 1..b-1 (paper default)
        eval_rank=0,       # rank for evaluation and merge; 0: r_max
        use_rslora=False,
        init="default",    # default (kaiming-uniform A, B=0) | gaussian
    ))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)
