"""How a task is presented to a model: an encoder's task head, a language model's verbalisers, or
instruction records — and the tokenised splits in that format.

Three formats (``task.format`` in a train config):

* ``head``: an encoder reads the text and a classification/regression head scores it
  (``peftjax.data.pipeline.encode``).
* ``lm``: a decoder (or an encoder-decoder, text-to-text) continues a prompt template with the
  class's verbaliser; evaluation scores each class's verbaliser by log-likelihood
  (``peftjax.data.lm``).
* ``instruction``: {instruction, input, output} records, the loss on the response only
  (``peftjax.data.instructions``); set by instruction tasks.

``auto`` picks ``head`` when the model family has a head for the task's kind, else ``lm``. The
data layer knows no model: callers pass the names of the heads the model family offers
(``Family.heads``), which is all the choice depends on.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from peftjax.data import tasks as tasks_lib

FORMATS = ("auto", "head", "lm", "instruction")
HEAD_FOR_TASK_KIND = {"classification": "classification", "regression": "regression",
                      "causal_lm": "causal_lm"}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def get_task(task_cfg: Any):
    """The registered task, or for ``format='instruction'`` the instruction task it describes."""
    if _get(task_cfg, "format", "auto") == "instruction":
        from peftjax.data import instructions

        return instructions.task_from_config(task_cfg)
    return tasks_lib.get_task(task_cfg.name)


def task_format(task_cfg: Any, task: Any, family_heads: Sequence[str]) -> str:
    """'head', 'lm' or 'instruction' for ``task`` on a model family offering ``family_heads``."""
    fmt = _get(task_cfg, "format", "auto")
    if fmt not in FORMATS:
        raise ValueError(f"task.format={fmt!r} is invalid; valid: {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    return "head" if HEAD_FOR_TASK_KIND[task.kind] in family_heads else "lm"


def lm_head(family_heads: Sequence[str]) -> str:
    """The LM head of a family: ``seq2seq_lm`` for an encoder-decoder (T5), whose encoder reads
    the prompt and whose decoder targets are the class words; else ``causal_lm`` (prompt and
    verbaliser in one sequence)."""
    return "seq2seq_lm" if "seq2seq_lm" in family_heads else "causal_lm"


def model_head(fmt: str, task: Any, family_heads: Sequence[str]) -> str:
    """The head the model is built with for a task in format ``fmt``."""
    if fmt == "instruction":
        return "causal_lm"
    if fmt == "lm":
        return lm_head(family_heads)
    return HEAD_FOR_TASK_KIND[task.kind]


def split_limits(train_cfg: Any) -> dict[str, int | None]:
    """Examples used per split (None: all) from ``train_limit``, ``eval_limit``, ``test_limit``.

    ``test_limit`` lets a budget validate often on a small sample and still report test on a
    larger one (model selection only ever sees validation); -1 means "as eval_limit".
    """
    test = _get(train_cfg, "test_limit", -1)
    test = train_cfg.eval_limit if test is None or test < 0 else test
    return {"train": train_cfg.train_limit or None, "validation": train_cfg.eval_limit or None,
            "test": test or None}


def _sorted_by_length(encoded: dict) -> dict:
    order = np.argsort(encoded["attention_mask"].sum(axis=1), kind="stable")
    return {k: v[order] for k, v in encoded.items()}


def encode_split(task_cfg: Any, task: Any, tokenizer: Any, split: str, limit: int | None, *,
                 family_heads: Sequence[str], hf_config: dict | None = None, data_dir: str | None = None,
                 for_eval: bool) -> dict:
    """Tokenised ``split`` of ``task`` in its format; evaluation splits are sorted by length.

    Sorting makes each eval batch pad to the smallest bucket that fits it (about half the
    compute on tweets); metrics do not depend on the order of examples. ``for_eval`` also gives
    LM-format rows one scored sequence per class (``cand{k}_*``).
    """
    fmt = task_format(task_cfg, task, family_heads)
    if fmt == "instruction":  # response-only labels, no classes
        from peftjax.data import instructions

        encoded = instructions.encode_split(task_cfg, split, tokenizer, limit=limit,
                                            hf_config=hf_config, data_dir=data_dir)
        return _sorted_by_length(encoded) if for_eval else encoded
    from peftjax.data.pipeline import encode, load_examples

    examples = load_examples(task.name, split, data_dir=data_dir, limit=limit)
    if fmt == "lm":
        from peftjax.data.lm import DEFAULT_TEMPLATE, encode_lm, encode_seq2seq

        encoder = encode_seq2seq if lm_head(family_heads) == "seq2seq_lm" else encode_lm
        encoded = encoder(examples, tokenizer, task_cfg.max_length, task,
                          _get(task_cfg, "lm_template", "") or DEFAULT_TEMPLATE, candidates=for_eval)
    else:
        encoded = encode(examples, tokenizer, task_cfg.max_length)
    return _sorted_by_length(encoded) if for_eval else encoded
