"""In-context learning (ICL) baseline: k-shot prompts, no parameter updated (Brown et al. 2020).

Each evaluation example ``x`` is preceded by ``k`` demonstrations drawn from the training set,
each written in the same format the decoder fine-tuning uses (``peftjax.data.lm``)::

    [BOS] P(d_1) v(y_1) [EOS] sep  …  P(d_k) v(y_k) [EOS] sep  P(x)

with ``P`` the task template, ``v`` the class verbaliser and ``sep`` a separator (default a blank
line). The prediction is the class whose verbaliser is most likely after that prompt,
``argmax_c Σ_t log p(v(c)_t | prompt, v(c)_<t)`` (GPT-3 §2.4 scores multiple-choice tasks by
the LM likelihood of each completion; here the completion is the label word, as in the
decoder fine-tuning evaluation), so ICL, a tuned decoder and proxy-tuning are scored alike.

Why not a registered method: ICL trains nothing and its input is not one example but a prompt
assembled from the training set; the training loop has nothing to optimise and its data
pipeline encodes one example at a time. ICL is therefore an evaluator over a ``CausalLM``
(``evaluate_icl``), usable with any base or adapted model (``proxy_tuning.CausalLM``).

Selection is seeded: ``selection="random"`` draws a fresh set of ``k`` training examples for
every evaluation example (GPT-3's protocol), from ``default_rng([seed, i])`` for example ``i``,
so a prediction does not depend on which other examples are evaluated; ``"fixed"`` draws one set
(``default_rng([seed])``) for all. ``balanced=True`` cycles over the classes in a random order so
every class appears ``⌊k/C⌋`` or ``⌈k/C⌉`` times (then the demonstrations are shuffled).
Demonstration texts are cut to ``max_demo_tokens``; the query keeps the task's usual budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from peftjax.data import lm as lm_data
from peftjax.data.examples import Example
from peftjax.data.tasks import Task
from peftjax.methods.proxy_tuning import CausalLM, as_causal_lm, classify, lm_class_scores

SELECTIONS = ("random", "fixed")


@dataclasses.dataclass(frozen=True)
class ICLConfig:
    """k-shot prompting settings.

    Attributes:
      k: demonstrations per prompt (0 = zero-shot).
      seed: seeds the choice of demonstrations.
      selection: ``random`` (a fresh draw per evaluation example) | ``fixed`` (one draw for all).
      balanced: draw the demonstrations round-robin over the classes.
      template: the task template (``str.format`` over ``text_a`` / ``text_b``).
      separator: text between demonstrations and before the query.
      max_demo_tokens: each demonstration's example text is cut to this many tokens.
      max_length: token budget of the query part (template + text + verbaliser), as a task's
        ``max_length``; the demonstrations come on top.
    """

    k: int = 4
    seed: int = 0
    selection: str = "random"
    balanced: bool = False
    template: str = lm_data.DEFAULT_TEMPLATE
    separator: str = "\n\n"
    max_demo_tokens: int = 48
    max_length: int = 64

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"icl.k={self.k} is invalid; valid: >= 0 (0 = zero-shot)")
        if self.selection not in SELECTIONS:
            raise ValueError(f"icl.selection={self.selection!r} is invalid; valid: {', '.join(SELECTIONS)}")
        if self.max_demo_tokens < 1:
            raise ValueError(f"icl.max_demo_tokens={self.max_demo_tokens} is invalid; valid: >= 1")
        if self.max_length < 2:
            raise ValueError(f"icl.max_length={self.max_length} is invalid; valid: >= 2")


def select_demonstrations(train_labels: Sequence[int], num_queries: int, k: int, *, seed: int = 0,
                          selection: str = "random", balanced: bool = False,
                          num_classes: int | None = None) -> np.ndarray:
    """``(num_queries, k)`` indices into the training set, without repetition within a prompt."""
    labels = np.asarray(train_labels, np.int64)
    n = len(labels)
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is invalid; valid: {', '.join(SELECTIONS)}")
    if k > n:
        raise ValueError(f"k={k} demonstrations cannot be drawn from {n} training examples")
    classes = np.arange(num_classes if num_classes is not None else (labels.max() + 1 if n else 0))

    def draw(rng: np.random.Generator) -> np.ndarray:
        if not balanced:
            return rng.choice(n, size=k, replace=False)
        pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
        order = rng.permutation(classes)
        picks = [order[j % len(order)] for j in range(k)]
        for c in set(picks):
            if picks.count(c) > len(pools[c]):
                raise ValueError(f"balanced selection needs {picks.count(c)} examples of class {c}, "
                                 f"the training set has {len(pools[c])}")
        taken = {c: 0 for c in classes}
        out = []
        for c in picks:
            out.append(pools[c][taken[c]])
            taken[c] += 1
        return rng.permutation(np.asarray(out, np.int64))

    if selection == "fixed":
        row = draw(np.random.default_rng([seed])) if k else np.zeros((0,), np.int64)
        return np.tile(row, (num_queries, 1)).astype(np.int64)
    return np.stack([draw(np.random.default_rng([seed, i])) if k else np.zeros((0,), np.int64)
                     for i in range(num_queries)]).reshape(num_queries, k).astype(np.int64)


def demonstration_ids(tokenizer: Any, task: Task, example: Example, config: ICLConfig) -> list[int]:
    """One demonstration: template tokens (text cut to ``max_demo_tokens``), the verbaliser of
    its label, EOS when the tokenizer has one, then the separator."""
    words = lm_data.verbalizers(task)
    label = int(example["label"])
    if not 0 <= label < len(words):
        raise ValueError(f"demonstration {example.get('idx')} has label {label}; valid: 0..{len(words) - 1}")
    ids = lm_data.prompt_ids(tokenizer, example, config.template, config.max_demo_tokens)
    ids += list(tokenizer(words[label], add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(int(eos))
    if config.separator:
        ids += list(tokenizer(config.separator, add_special_tokens=False)["input_ids"])
    return ids


def encode_icl(queries: Sequence[Example], demonstrations: Sequence[Example], tokenizer: Any, task: Task,
               config: ICLConfig) -> dict[str, np.ndarray]:
    """k-shot prompts as ``encode_lm(..., candidates=True)`` arrays, plus ``demo_indices``
    ``(N, k)`` (which training examples each prompt shows)."""
    chosen = select_demonstrations([e["label"] for e in demonstrations], len(queries), config.k,
                                   seed=config.seed, selection=config.selection,
                                   balanced=config.balanced, num_classes=task.num_labels)
    cache: dict[int, list[int]] = {}
    prefixes = []
    for row in chosen:
        ids: list[int] = []
        for j in row:
            if int(j) not in cache:
                cache[int(j)] = demonstration_ids(tokenizer, task, demonstrations[int(j)], config)
            ids += cache[int(j)]
        prefixes.append(ids)
    longest = max((len(p) for p in prefixes), default=0)
    encoded = lm_data.encode_lm(queries, tokenizer, config.max_length + longest, task, config.template,
                                candidates=True, prefixes=prefixes)
    encoded["demo_indices"] = chosen
    return encoded


def evaluate_icl(lm: CausalLM | tuple, tokenizer: Any, task: Task, demonstrations: Sequence[Example],
                 queries: Sequence[Example], config: ICLConfig, *, batch_size: int = 32,
                 progress: bool = False) -> dict[str, Any]:
    """k-shot predictions of ``lm`` on ``queries`` and their metrics; no parameter changes.

    Returns ``metrics`` (the task's), ``predictions`` (N,), ``demo_indices`` (N, k) and the mean
    number of tokens the model reads per scored sequence (prompt with demonstrations + answer).
    """
    from peftjax.data import compute_metrics

    lm = as_causal_lm(lm)
    encoded = encode_icl(queries, demonstrations, tokenizer, task, config)
    demo_indices = encoded.pop("demo_indices")
    lengths = encoded["attention_mask"].sum(axis=1)
    order = np.argsort(lengths, kind="stable")  # batches of similar length pad less
    sorted_enc = {k: v[order] for k, v in encoded.items()}
    preds_sorted = classify(lambda b: lm_class_scores(lm, b, task.num_labels), sorted_enc, batch_size,
                            progress=progress, desc=f"icl k={config.k}")
    preds = np.empty_like(preds_sorted)
    preds[order] = preds_sorted
    return {"metrics": compute_metrics(task, preds, encoded["class_labels"]),
            "predictions": preds, "demo_indices": demo_indices,
            "mean_sequence_tokens": float(lengths.mean()) if len(lengths) else 0.0}
