"""Loading shared by the decoding-time scripts (icl.py, proxy_tune.py)."""

from __future__ import annotations

import os


def load_causal_lm(spec: str):
    """(CausalLM, tokenizer) from a checkpoint folder or a built-in model name."""
    from configs import models
    from peftjax.methods.proxy_tuning import CausalLM
    from peftjax.models import hf_io

    if os.path.isdir(spec):
        model, params = hf_io.load_pretrained(spec, head="causal_lm")
        return CausalLM.plain(model, params), hf_io.load_tokenizer(spec)
    model, params, tokenizer = hf_io.load_from_config(models.get(spec), head="causal_lm")
    if tokenizer is None:
        raise ValueError(f"model {spec!r} has no tokenizer; pass a checkpoint folder that holds one")
    return CausalLM.plain(model, params), tokenizer


def task_template(task_name: str, override: str = "") -> str:
    """The prompt template: ``override``, else the task config's ``lm_template``, else the default."""
    from configs.train import _load
    from peftjax.data.lm import DEFAULT_TEMPLATE

    return override or _load("tasks", task_name).get_config().get("lm_template", "") or DEFAULT_TEMPLATE
