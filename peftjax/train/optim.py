"""The optimizer: AdamW with warmup then linear/cosine decay, clipping and accumulation (optax).

Weight decay skips biases and normalisation scales (as transformers' Trainer does), since
decaying a LayerNorm gain towards zero is not regularisation. A method's own gradient
transformation (Child-tuning_F's Bernoulli mask) runs first, on the raw gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("linear", "cosine", "constant")


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int, kind: str) -> optax.Schedule:
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule={kind!r} is invalid; valid: {', '.join(SCHEDULES)}")
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def _decay_mask(params: Any) -> Any:
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith(".bias") or name.endswith(".scale"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: Any, total_steps: int, method_transform: optax.GradientTransformation | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``cfg``: learning_rate, warmup_steps (or warmup_ratio), schedule, weight_decay, clip_norm, grad_accum_steps,
    b1, b2, eps. ``total_steps`` counts optimizer updates."""
    if cfg.learning_rate <= 0:
        raise ValueError(f"train.learning_rate={cfg.learning_rate} is invalid; valid: > 0")
    if cfg.grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps={cfg.grad_accum_steps} is invalid; valid: >= 1")
    warmup = cfg.warmup_steps or int(round(cfg.get("warmup_ratio", 0.0) * total_steps))
    schedule = learning_rate_schedule(cfg.learning_rate, total_steps, warmup, cfg.schedule)
    parts = []
    if method_transform is not None:
        parts.append(method_transform)
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    tx = optax.chain(*parts)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx, schedule
