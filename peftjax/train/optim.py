"""The optimizer: AdamW with warmup then linear/cosine decay, clipping, accumulation, and
per-parameter learning-rate multipliers (optax).

The chain, in order, for each update::

    clip_by_global_norm(clip_norm)          the raw gradient's global norm (transformers' Trainer)
    method.gradient_transform(rng)          e.g. Child-tuning_F's Bernoulli mask, after clipping
                                            (it may read the method state: the train step passes
                                            ``method_state=`` to ``update``)
    adamw(schedule / lr, b1, b2, eps, wd)   weight decay skips biases and normalisation scales
    × lr                                    the peak rate, an optimizer-state value (no recompile)
    lr multipliers                          updates of matching params × m (after AdamW)

Weight decay skips biases and normalisation scales (as transformers' Trainer does), since
decaying a LayerNorm gain towards zero is not regularisation.

Why multipliers act on the *updates*, after the optimizer (big_vision's ``lr_mults``): Adam
divides each gradient by its running RMS, so scaling a gradient before Adam changes nothing
(up to ε); scaling the update u = −η (m̂/(√v̂+ε) + λθ) by m is exactly training that param at
learning rate m·η — the decoupled weight decay term included, as PyTorch's AdamW applies
lr·wd·θ per param group. LoRA+ (Hayou et al. 2024) is B's multiplier = ratio.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant")
GRADIENT_STREAM = 0x67726164  # fold_in tag ("grad") of the key a method's gradient transform gets


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


def _leaf_key(path) -> str:
    """``"added.<name>"``-style key of a leaf of the ``{"base", "added", "head"}`` tree."""
    return ".".join(str(getattr(k, "key", k)) for k in path)


def _decay_mask(params: Any) -> Any:
    def decays(path, _):
        name = _leaf_key(path)
        return not (name.endswith(".bias") or name.endswith(".scale"))

    return jax.tree_util.tree_map_with_path(decays, params)


def parse_lr_mults(value: Any) -> tuple[tuple[str, float], ...]:
    """``train.lr_mults`` as ``((regex, multiplier), ...)``.

    Accepts a sequence of pairs or a string ``"regex=m,regex=m"`` (the command line's form).
    Each regex must compile and each multiplier be finite and >= 0.
    """
    if not value:
        return ()
    if isinstance(value, str):
        pairs = []
        for item in filter(None, (p.strip() for p in value.split(","))):
            pattern, sep, mult = item.rpartition("=")
            if not sep:
                raise ValueError(f"train.lr_mults item {item!r} is invalid; valid: 'regex=multiplier', "
                                 "comma-separated (e.g. 'lora_B$=16')")
            pairs.append((pattern, mult))
    else:
        pairs = [tuple(p) for p in value]
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"train.lr_mults entry {pair!r} is invalid; valid: (regex, multiplier)")
        pattern, mult = pair
        try:
            re.compile(pattern)
            mult = float(mult)
        except (re.error, TypeError, ValueError) as e:
            raise ValueError(f"train.lr_mults entry {pair!r} is invalid ({e}); valid: "
                             "(regex, multiplier >= 0)") from None
        if not (mult >= 0 and mult != float("inf")):
            raise ValueError(f"train.lr_mults multiplier {mult!r} for {pattern!r} is invalid; "
                             "valid: a finite number >= 0")
        out.append((str(pattern), mult))
    return tuple(out)


def scale_by_lr_mults(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies the update of each leaf whose key matches a rule's regex (``re.search``, first
    match wins) by that rule's multiplier; other leaves are unchanged. Stateless."""
    compiled = [(re.compile(p), m) for p, m in rules]

    def mult_of(path) -> float:
        key = _leaf_key(path)
        return next((m for rx, m in compiled if rx.search(key)), 1.0)

    def update_fn(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: u if mult_of(path) == 1.0 else u * jnp.asarray(mult_of(path), u.dtype),
            updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: Any, total_steps: int, method: Any = None, seed: int = 0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``cfg``: learning_rate, warmup_steps (or warmup_ratio), schedule, weight_decay, clip_norm,
    grad_accum_steps, b1, b2, eps, lr_mults. ``total_steps`` counts optimizer updates.

    ``method`` (a ``peftjax.methods.Method``) contributes its gradient transform (given a key
    derived from ``seed``, the run's seed) and its learning-rate multipliers, which come after
    the config's ``lr_mults`` (a config rule matching a param wins).
    """
    lr = cfg.learning_rate
    if not (isinstance(lr, (int, float)) and lr > 0 and lr != float("inf")):
        raise ValueError(f"train.learning_rate={lr!r} is invalid; valid: a finite number > 0")
    if cfg.grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps={cfg.grad_accum_steps} is invalid; valid: >= 1")
    warmup = cfg.warmup_steps or int(round(cfg.get("warmup_ratio", 0.0) * total_steps))
    # The schedule's shape runs at peak 1 inside AdamW and the peak rate multiplies the update
    # last, as an optimizer-state value (inject_hyperparams): the compiled step then does not
    # depend on the learning rate, so a learning-rate grid compiles its programs once.
    unit = learning_rate_schedule(1.0, total_steps, warmup, cfg.schedule)
    schedule = lambda count: lr * unit(count)  # noqa: E731 — what the run's rate is at ``count``
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if method is not None:
        key = jax.random.fold_in(jax.random.PRNGKey(seed), GRADIENT_STREAM)
        transform = method.gradient_transform(key)
        if transform is not None:
            parts.append(transform)
    parts.append(optax.adamw(unit, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    parts.append(optax.inject_hyperparams(optax.scale)(step_size=float(lr)))
    rules = parse_lr_mults(cfg.get("lr_mults", ""))
    if method is not None:
        rules += parse_lr_mults(method.lr_multipliers())
    if rules:
        parts.append(scale_by_lr_mults(rules))
    tx = optax.chain(*parts)
    if cfg.grad_accum_steps > 1:
        multi = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
        # MultiSteps forwards extra arguments (the method state a gradient transform may read)
        # to the inner chain, but is not typed as taking them: say so, or optax drops them.
        tx = optax.GradientTransformationExtraArgs(multi.init, multi.update)
    return tx, schedule
