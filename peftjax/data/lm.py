"""Classification and regression tasks for decoders: prompts, verbalisers, label scoring.

A decoder has no classification head; it learns a task as text (Brown et al. 2020; Schick &
Schütze 2021): each example becomes ``template(example) + verbaliser(label)`` and the causal-LM
loss is taken on the verbaliser tokens only (the prompt tokens are masked with -100). At
evaluation every class's verbaliser is scored by its summed log-likelihood after the prompt and
the best-scoring class is the prediction, so accuracy/F1 are computed exactly as for encoders.

The template is a ``str.format`` pattern over ``text_a`` / ``text_b``; only the example texts are
truncated, so the instruction and the answer cue always survive.
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import numpy as np

from peftjax.data.examples import Example
from peftjax.data.tasks import Task

IGNORE = -100
DEFAULT_TEMPLATE = "{text_a}\nAnswer:"


def verbalizers(task: Task) -> tuple[str, ...]:
    """The words that name each class (the task's label names, with a leading space)."""
    if task.kind != "classification":
        raise ValueError(f"task {task.name!r} is {task.kind}: decoders score classes through "
                         "verbalisers, so only classification tasks have an LM format")
    return tuple(" " + name.replace("_", " ") for name in task.label_names)


def _pieces(template: str) -> list[str | None]:
    """Splits a template into literal text and field names (None marks no field)."""
    parts: list = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append(("lit", literal))
        if field is not None:
            if field not in ("text_a", "text_b"):
                raise ValueError(f"template field {{{field}}} is unknown; valid: {{text_a}}, {{text_b}}")
            parts.append(("field", field))
    return parts


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _prompt_ids(tokenizer, parts, example: Example, budget: int) -> list[int]:
    """Template tokens with the example texts truncated (longest first) to fit ``budget``."""
    fixed, fields = [], {}
    for kind, value in parts:
        if kind == "field":
            fields[value] = _ids(tokenizer, example[value] or "")
    fixed_len = sum(len(_ids(tokenizer, v)) for k, v in parts if k == "lit")
    room = budget - fixed_len
    if room < 0:
        raise ValueError(f"the template alone needs {fixed_len} tokens, more than max_length allows")
    while sum(len(v) for v in fields.values()) > room:
        longest = max(fields, key=lambda f: len(fields[f]))
        fields[longest] = fields[longest][:-1]
    for kind, value in parts:
        fixed.extend(_ids(tokenizer, value) if kind == "lit" else fields[value])
    return fixed


def prompt_ids(tokenizer: Any, example: Example, template: str = DEFAULT_TEMPLATE,
               max_text_tokens: int | None = None) -> list[int]:
    """One example's template tokens (no BOS, no answer), its texts cut (longest first) to
    ``max_text_tokens`` in total; ``None`` keeps them whole (used for in-context demonstrations)."""
    parts = _pieces(template)
    fixed_len = sum(len(_ids(tokenizer, v)) for k, v in parts if k == "lit")
    if max_text_tokens is None:
        max_text_tokens = sum(len(_ids(tokenizer, example[v] or "")) for k, v in parts if k == "field")
    return _prompt_ids(tokenizer, parts, example, fixed_len + max_text_tokens)


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    return bos, eos


def encode_seq2seq(examples: Sequence[Example], tokenizer: Any, max_length: int, task: Task,
                   template: str = DEFAULT_TEMPLATE, *, candidates: bool = False) -> dict[str, np.ndarray]:
    """Tokenises examples text-to-text for an encoder-decoder (T5; Raffel et al. 2020, T0 / Sanh
    et al. 2022): the encoder reads the prompt, the decoder's targets are the class's words.

    Returns ``input_ids`` / ``attention_mask`` (the template tokens, texts truncated, then EOS as T5
    tokenizers append it), ``labels`` (the verbaliser tokens + EOS at the start of the row, -100
    after) and ``class_labels``; with ``candidates=True`` also ``cand{k}_labels`` (class k's words
    as targets) for scoring every class by its log-likelihood. Targets share ``max_length`` with
    the input so that batching cuts both to the input's length bucket; a prompt shorter than the
    longest target is therefore refused.
    """
    words = verbalizers(task)
    parts = _pieces(template)
    _, eos = _specials(tokenizer)
    word_ids = [_ids(tokenizer, w) + eos for w in words]
    longest = max(len(w) for w in word_ids)
    budget = max_length - len(eos)
    if longest > max_length:
        raise ValueError(f"a class's target needs {longest} tokens, more than max_length={max_length}")
    n = len(examples)
    ids = np.zeros((n, max_length), np.int32)
    mask = np.zeros((n, max_length), np.int32)
    for i, e in enumerate(examples):
        prompt = _prompt_ids(tokenizer, parts, e, budget) + eos
        if len(prompt) < longest:
            raise ValueError(f"example {i} has a {len(prompt)}-token prompt, shorter than the "
                             f"{longest}-token longest target; use a longer template")
        ids[i, :len(prompt)] = prompt
        mask[i, :len(prompt)] = 1

    def targets(rows: list[list[int]]) -> np.ndarray:
        labels = np.full((n, max_length), IGNORE, np.int32)
        for i, answer in enumerate(rows):
            labels[i, :len(answer)] = answer
        return labels

    classes = np.asarray([e["label"] for e in examples], np.int32)
    out = {"input_ids": ids, "attention_mask": mask,
           "labels": targets([word_ids[c] if c >= 0 else [] for c in classes])}
    if candidates:
        for k, w in enumerate(word_ids):
            out[f"cand{k}_labels"] = targets([w] * n)
    out["class_labels"] = classes
    return out


def encode_lm(examples: Sequence[Example], tokenizer: Any, max_length: int, task: Task,
              template: str = DEFAULT_TEMPLATE, *, candidates: bool = False,
              prefixes: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Tokenises examples as prompt + verbaliser sequences for causal-LM training/evaluation.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (token ids on the verbaliser and EOS,
    -100 elsewhere), and ``class_labels`` (int32 class ids). With ``candidates=True`` it also
    returns, for every class k, ``cand{k}_input_ids`` / ``cand{k}_attention_mask`` /
    ``cand{k}_labels`` (the prompt followed by class k's verbaliser), which ``attention_mask``
    then covers so that batching keeps them whole.

    ``prefixes`` (one token-id list per example, e.g. in-context demonstrations) go after BOS and
    before the prompt; they count against ``max_length`` and are never truncated.
    """
    words = verbalizers(task)
    parts = _pieces(template)
    bos, eos = _specials(tokenizer)
    word_ids = [_ids(tokenizer, w) for w in words]
    longest = max(len(w) for w in word_ids) + len(eos)
    budget = max_length - len(bos) - longest
    n = len(examples)
    out: dict[str, np.ndarray] = {}

    def fill(prefix: str, rows: list[tuple[list[int], list[int]]]) -> None:
        ids = np.zeros((n, max_length), np.int32)
        mask = np.zeros((n, max_length), np.int32)
        labels = np.full((n, max_length), IGNORE, np.int32)
        for i, (prompt, answer) in enumerate(rows):
            seq = prompt + answer
            ids[i, :len(seq)] = seq
            mask[i, :len(seq)] = 1
            labels[i, len(prompt):len(seq)] = answer
        out[f"{prefix}input_ids"], out[f"{prefix}attention_mask"], out[f"{prefix}labels"] = ids, mask, labels

    if prefixes is None:
        prefixes = [[]] * n
    elif len(prefixes) != n:
        raise ValueError(f"prefixes has {len(prefixes)} entries for {n} examples; give one per example")
    prompts = []
    for e, pre in zip(examples, prefixes):
        if budget - len(pre) < 0:
            raise ValueError(f"a prefix of {len(pre)} tokens leaves no room for the prompt in "
                             f"max_length={max_length}; raise max_length or shorten the prefix")
        prompts.append(bos + list(pre) + _prompt_ids(tokenizer, parts, e, budget - len(pre)))
    classes = np.asarray([e["label"] for e in examples], np.int32)
    fill("", [(p, word_ids[c] + eos if c >= 0 else []) for p, c in zip(prompts, classes)])
    if candidates:
        for k, w in enumerate(word_ids):
            fill(f"cand{k}_", [(p, w + eos) for p in prompts])
        out["attention_mask"] = np.maximum.reduce(
            [out["attention_mask"]] + [out[f"cand{k}_attention_mask"] for k in range(len(words))])
    out["class_labels"] = classes
    return out
