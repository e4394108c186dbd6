"""In-context learning (ICL) baseline: k-shot prompts, no parameter updated (Brown et al. 2020),
optionally with contextual calibration (Zhao et al. 2021).

Each evaluation example ``x`` is preceded by ``k`` demonstrations drawn from the training set,
each written in the same format the decoder fine-tuning uses (``peftjax.data.lm``)::

    [BOS] P(d_1) v(y_1) sep  …  P(d_k) v(y_k) sep  P(x)

with ``P`` the task template, ``v`` the class verbaliser and ``sep`` the separator. GPT-3 writes
its few-shot prompts as plain text, demonstrations separated by newlines (Brown et al. 2020,
Fig. 2.1 and App. G); the default separator is a blank line (``"\\n\\n"``) rather than a single
``"\\n"`` because the task templates span several lines (``"Tweet: {text}\\nSentiment:"``): a
single newline would look like one more line of the same example, while Zhao et al. (2021,
the prompt formats of their appendix and their released code, ``"Review: …\\nSentiment: …\\n\\n"``)
separate such two-line demonstrations by an empty line. ``eos_after_demo=True`` restores the earlier layout
``P(d) v(y) [EOS] sep`` (an EOS ends each demonstration, as in the decoder fine-tuning data).

Scoring: the prediction is the class whose verbaliser is most likely after the prompt,
``argmax_c s_c`` with ``s_c = Σ_t log p(v(c)_t | prompt, v(c)_<t)`` (GPT-3 §2.4 scores
multiple-choice tasks by the LM likelihood of each completion; here the completion is the label
word, as in the decoder fine-tuning evaluation), so ICL, a tuned decoder and proxy-tuning are
scored alike. The query's completion ends as the demonstrations' answers do: with
``eos_after_demo`` it is ``v(c) [EOS]`` (EOS's log-probability included in ``s_c``), otherwise
``v(c)`` alone — the demonstrations never show EOS after an answer, so its probability there
would only add noise.

Contextual calibration (``calibration="contextual"``; Zhao, Wallace, Feng, Klein & Singh, ICML
2021, "Calibrate Before Use", §5): an LM prompted with demonstrations is biased toward some
labels (majority / recency / common-token bias), which shows as a skewed class distribution even
for an input that carries no content. With ``p(x) = softmax_c(s_c(x))`` the class probabilities
of the query and, for each content-free string ``u`` (default the paper's ``"N/A"``, ``""`` and
``"[MASK]"``), ``p(u)`` those of the same prompt with the query's text fields replaced by ``u``::

    p_cf = mean_u p(u) / Σ_c mean_u p(u)_c               (averaged, renormalised)
    q(x) = softmax(W p(x) + b),  W = diag(p_cf)^-1, b = 0
    ŷ    = argmax_c p(x)_c / p_cf,c

so a content-free input is mapped to the uniform distribution. ``p_cf`` depends on the
demonstrations: it is computed for each distinct demonstration set — once with
``selection="fixed"`` (or ``k=0``), once per query with ``selection="random"`` (queries that
happen to draw the same set share it). Cost: one extra scored prompt per content-free string per
demonstration set, i.e. with ``random`` selection scoring costs ``1 + len(content_free)`` times as
much as uncalibrated ICL, with ``fixed`` only ``len(content_free)`` prompts more. Differences from the
reference: the class probabilities come from the whole (possibly multi-token) verbaliser's
log-likelihood rather than the first label token's probability, and each ``p(u)`` is normalised
over the classes before averaging (their code averages the unnormalised label-token
probabilities, which weighs the strings by how much mass they put on the labels).

Why not a registered method: ICL trains nothing and its input is not one example but a prompt
assembled from the training set; the training loop has nothing to optimise and its data
pipeline encodes one example at a time. ICL is therefore an evaluator over a ``CausalLM``
(``evaluate_icl``), usable with any base or adapted model (``proxy_tuning.CausalLM``) or any
function that scores the class verbalisers of a batch.

Selection is seeded: ``selection="random"`` draws a fresh set of ``k`` training examples for
every evaluation example (GPT-3's protocol), from ``default_rng([seed, i])`` for example ``i``,
so a prediction does not depend on which other examples are evaluated; ``"fixed"`` draws one set
(``default_rng([seed])``) for all. ``balanced=True`` cycles over the classes in a random order so
every class appears ``⌊k/C⌋`` or ``⌈k/C⌉`` times (then the demonstrations are shuffled).
Demonstration texts are cut to ``max_demo_tokens``; the query keeps the task's usual budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from peftjax.data import lm as lm_data
from peftjax.data.examples import Example
from peftjax.data.tasks import Task
from peftjax.methods.proxy_tuning import CausalLM, as_causal_lm, lm_class_scores

SELECTIONS = ("random", "fixed")
CALIBRATIONS = ("none", "contextual")
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021, §5

ScoreFn = Callable[[Mapping[str, np.ndarray]], Any]


@dataclasses.dataclass(frozen=True)
class ICLConfig:
    """k-shot prompting settings.

    Attributes:
      k: demonstrations per prompt (0 = zero-shot).
      seed: seeds the choice of demonstrations.
      selection: ``random`` (a fresh draw per evaluation example) | ``fixed`` (one draw for all).
      balanced: draw the demonstrations round-robin over the classes.
      template: the task template (``str.format`` over ``text_a`` / ``text_b``).
      separator: text after each demonstration (so between demonstrations and before the
        query); default a blank line (see the module docstring).
      eos_after_demo: end each demonstration's answer with EOS before the separator, and score
        the query's answer with its EOS (the layout before issue 15).
      max_demo_tokens: each demonstration's example text is cut to this many tokens.
      max_length: token budget of the query part (template + text + verbaliser), as a task's
        ``max_length``; the demonstrations come on top.
      calibration: ``none`` | ``contextual`` (Zhao et al. 2021: divide the class probabilities by
        those of content-free inputs under the same demonstrations).
      content_free: the content-free strings whose class probabilities are averaged into ``p_cf``.
    """

    k: int = 4
    seed: int = 0
    selection: str = "random"
    balanced: bool = False
    template: str = lm_data.DEFAULT_TEMPLATE
    separator: str = "\n\n"
    eos_after_demo: bool = False
    max_demo_tokens: int = 48
    max_length: int = 64
    calibration: str = "none"
    content_free: tuple[str, ...] = CONTENT_FREE

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"icl.k={self.k} is invalid; valid: >= 0 (0 = zero-shot)")
        if self.selection not in SELECTIONS:
            raise ValueError(f"icl.selection={self.selection!r} is invalid; valid: {', '.join(SELECTIONS)}")
        if self.max_demo_tokens < 1:
            raise ValueError(f"icl.max_demo_tokens={self.max_demo_tokens} is invalid; valid: >= 1")
        if self.max_length < 2:
            raise ValueError(f"icl.max_length={self.max_length} is invalid; valid: >= 2")
        if not isinstance(self.separator, str):
            raise TypeError(f"icl.separator must be a string, got {type(self.separator).__name__}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"icl.calibration={self.calibration!r} is invalid; valid: {', '.join(CALIBRATIONS)}")
        if isinstance(self.content_free, str) or not all(isinstance(u, str) for u in self.content_free):
            raise TypeError(f"icl.content_free must be a sequence of strings, got {self.content_free!r}")
        object.__setattr__(self, "content_free", tuple(self.content_free))
        if self.calibration == "contextual" and not self.content_free:
            raise ValueError("icl.calibration='contextual' needs at least one content-free string "
                             f"(icl.content_free; the paper's are {list(CONTENT_FREE)})")


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
    its label, EOS when ``config.eos_after_demo`` (and the tokenizer has one), then the separator."""
    words = lm_data.verbalizers(task)
    label = int(example["label"])
    if not 0 <= label < len(words):
        raise ValueError(f"demonstration {example.get('idx')} has label {label}; valid: 0..{len(words) - 1}")
    ids = lm_data.prompt_ids(tokenizer, example, config.template, config.max_demo_tokens)
    ids += list(tokenizer(words[label], add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if config.eos_after_demo and eos is not None:
        ids.append(int(eos))
    if config.separator:
        ids += list(tokenizer(config.separator, add_special_tokens=False)["input_ids"])
    return ids


def _drop_answer_eos(encoded: dict[str, np.ndarray], num_classes: int) -> None:
    """Removes the EOS ``encode_lm(..., candidates=True)`` appends to every answer (its last
    labelled token): it becomes padding, so the scored completion is the verbaliser alone.
    ``attention_mask`` is there the union of the candidates' masks and is rebuilt from them."""
    cands = [f"cand{c}_" for c in range(num_classes)]
    for f in [""] + cands:
        labels = encoded[f"{f}labels"]
        scored = labels != lm_data.IGNORE
        rows = np.flatnonzero(scored.any(axis=1))
        last = labels.shape[1] - 1 - np.argmax(scored[:, ::-1], axis=1)[rows]
        encoded[f"{f}input_ids"][rows, last] = 0
        labels[rows, last] = lm_data.IGNORE
        if f:
            encoded[f"{f}attention_mask"][rows, last] = 0
    encoded["attention_mask"] = np.maximum.reduce([encoded[f"{f}attention_mask"] for f in cands])


def _encode(queries: Sequence[Example], prefixes: Sequence[list[int]], tokenizer: Any, task: Task,
            config: ICLConfig) -> dict[str, np.ndarray]:
    longest = max((len(p) for p in prefixes), default=0)
    encoded = lm_data.encode_lm(queries, tokenizer, config.max_length + longest, task, config.template,
                                candidates=True, prefixes=prefixes)
    if not config.eos_after_demo and getattr(tokenizer, "eos_token_id", None) is not None:
        _drop_answer_eos(encoded, task.num_labels)
    return encoded


def _prefixes(chosen: np.ndarray, demonstrations: Sequence[Example], tokenizer: Any, task: Task,
              config: ICLConfig) -> list[list[int]]:
    cache: dict[int, list[int]] = {}
    prefixes = []
    for row in chosen:
        ids: list[int] = []
        for j in row:
            if int(j) not in cache:
                cache[int(j)] = demonstration_ids(tokenizer, task, demonstrations[int(j)], config)
            ids += cache[int(j)]
        prefixes.append(ids)
    return prefixes


def _choose(demonstrations: Sequence[Example], num_queries: int, task: Task, config: ICLConfig) -> np.ndarray:
    return select_demonstrations([e["label"] for e in demonstrations], num_queries, config.k,
                                 seed=config.seed, selection=config.selection,
                                 balanced=config.balanced, num_classes=task.num_labels)


def encode_icl(queries: Sequence[Example], demonstrations: Sequence[Example], tokenizer: Any, task: Task,
               config: ICLConfig) -> dict[str, np.ndarray]:
    """k-shot prompts as ``encode_lm(..., candidates=True)`` arrays, plus ``demo_indices``
    ``(N, k)`` (which training examples each prompt shows)."""
    chosen = _choose(demonstrations, len(queries), task, config)
    encoded = _encode(queries, _prefixes(chosen, demonstrations, tokenizer, task, config), tokenizer, task, config)
    encoded["demo_indices"] = chosen
    return encoded


def content_free_example(text: str) -> Example:
    """A query whose every text field is ``text`` (Zhao et al. replace the whole test input)."""
    return {"text_a": text, "text_b": text, "label": -1, "idx": -1}


def encode_content_free(demo_sets: np.ndarray, demonstrations: Sequence[Example], tokenizer: Any, task: Task,
                        config: ICLConfig) -> dict[str, np.ndarray]:
    """Prompts for ``p_cf``: for each row of ``demo_sets`` ``(S, k)`` and each content-free string
    ``u`` (outer loop), the demonstrations followed by the query ``u``; ``S * len(content_free)``
    rows, row ``m * S + s`` is string ``m`` on demonstration set ``s``."""
    prefixes = _prefixes(demo_sets, demonstrations, tokenizer, task, config)
    queries = [content_free_example(u) for u in config.content_free for _ in prefixes]
    return _encode(queries, prefixes * len(config.content_free), tokenizer, task, config)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def content_free_log_probs(cf_scores: np.ndarray) -> np.ndarray:
    """``log p_cf`` ``(..., K)`` from verbaliser log-likelihoods ``(M, ..., K)`` of ``M``
    content-free strings: per string the class softmax, averaged over the strings, renormalised
    (in log space, so that a vanishing class probability stays finite as long as it can)."""
    logp = _log_softmax(cf_scores)
    m = logp.max(axis=0)
    log_mean = m + np.log(np.exp(logp - m).mean(axis=0))
    return _log_softmax(log_mean)


def calibrated_predictions(scores: np.ndarray, log_p_cf: np.ndarray) -> np.ndarray:
    """``argmax_c p(c|x) / p_cf(c)`` with ``p = softmax(scores)``: contextual calibration with
    ``W = diag(p_cf)^-1, b = 0`` (the final softmax and p's normaliser do not move the argmax)."""
    return np.argmax(_log_softmax(scores) - log_p_cf, axis=-1)


def class_scores(score_fn: ScoreFn, encoded: Mapping[str, np.ndarray], batch_size: int, num_classes: int, *,
                 progress: bool = False, desc: str = "scoring") -> np.ndarray:
    """``(N, K)`` verbaliser log-likelihoods (float64) of every row of an ``encode_lm(...,
    candidates=True)`` set, in row order; rows are scored in length order (less padding)."""
    import jax
    from tqdm.auto import tqdm

    from peftjax import data as data_lib

    n = len(encoded["class_labels"])
    order = np.argsort(encoded["attention_mask"].sum(axis=1), kind="stable")
    sorted_enc = {k: v[order] for k, v in encoded.items()}
    parts = []
    for batch in tqdm(data_lib.eval_batches(sorted_enc, batch_size), desc=desc, unit="batch",
                      total=data_lib.num_eval_batches(sorted_enc, batch_size), disable=not progress):
        s = np.asarray(jax.device_get(score_fn(batch)), np.float64)
        if s.shape != (batch_size, num_classes):
            raise ValueError(f"the scoring function returned shape {s.shape}; expected "
                             f"({batch_size}, {num_classes}) verbaliser log-likelihoods")
        parts.append(s[np.asarray(batch["mask"], bool)])
    out = np.zeros((n, num_classes), np.float64)
    if parts:
        out[order] = np.concatenate(parts)
    return out


def _score_fn(lm: CausalLM | tuple | ScoreFn, num_classes: int) -> ScoreFn:
    if callable(lm) and not isinstance(lm, (CausalLM, tuple)):
        return lm
    lm = as_causal_lm(lm)
    return lambda b: lm_class_scores(lm, b, num_classes)


def evaluate_icl(lm: CausalLM | tuple | ScoreFn, tokenizer: Any, task: Task, demonstrations: Sequence[Example],
                 queries: Sequence[Example], config: ICLConfig, *, batch_size: int = 32,
                 progress: bool = False) -> dict[str, Any]:
    """k-shot predictions of ``lm`` on ``queries`` and their metrics; no parameter changes.

    ``lm`` is a ``CausalLM``, a ``(model, params)`` pair, or a function mapping a candidate batch
    (``encode_lm(..., candidates=True)`` keys) to ``(B, K)`` verbaliser log-likelihoods (e.g.
    ``proxy_class_scores`` bound to its three models).

    Returns ``metrics`` (the task's, of the calibrated predictions when calibrating),
    ``predictions`` (N,), ``demo_indices`` (N, k), ``class_probs`` (N, K: the uncalibrated
    ``softmax`` of the verbaliser log-likelihoods), the mean number of tokens the model reads per
    scored sequence (prompt with demonstrations + answer), and with ``calibration="contextual"``
    ``p_cf`` (N, K: each query's content-free class probabilities), ``p_cf_mean`` (K,),
    ``uncalibrated_predictions`` (N,) with their ``uncalibrated_metrics``, and
    ``content_free_prompts`` (the extra prompts scored); without calibration those are None / 0.
    """
    from peftjax.data import compute_metrics

    K = task.num_labels
    score_fn = _score_fn(lm, K)
    chosen = _choose(demonstrations, len(queries), task, config)
    encoded = _encode(queries, _prefixes(chosen, demonstrations, tokenizer, task, config), tokenizer, task, config)
    scores = class_scores(score_fn, encoded, batch_size, K, progress=progress, desc=f"icl k={config.k}")
    raw_preds = np.argmax(scores, axis=-1)
    lengths = encoded["attention_mask"].sum(axis=1)
    out: dict[str, Any] = {"demo_indices": chosen, "class_probs": np.exp(_log_softmax(scores)),
                           "mean_sequence_tokens": float(lengths.mean()) if len(lengths) else 0.0,
                           "p_cf": None, "p_cf_mean": None, "uncalibrated_predictions": None,
                           "uncalibrated_metrics": None, "content_free_prompts": 0}
    preds = raw_preds
    if config.calibration == "contextual" and len(queries):
        # One p_cf per distinct demonstration set: once for "fixed" (and k=0), per query for "random".
        if config.k:
            sets, inverse = np.unique(chosen, axis=0, return_inverse=True)
            inverse = np.asarray(inverse).reshape(-1)
        else:
            sets, inverse = chosen[:1], np.zeros(len(chosen), np.int64)
        cf_enc = encode_content_free(sets, demonstrations, tokenizer, task, config)
        cf_scores = class_scores(score_fn, cf_enc, batch_size, K, progress=progress,
                                 desc=f"icl k={config.k} content-free")
        log_p_cf = content_free_log_probs(cf_scores.reshape(len(config.content_free), len(sets), K))[inverse]
        preds = calibrated_predictions(scores, log_p_cf)
        p_cf = np.exp(log_p_cf)
        out.update(p_cf=p_cf, p_cf_mean=p_cf.mean(axis=0), uncalibrated_predictions=raw_preds,
                   uncalibrated_metrics=compute_metrics(task, raw_preds, encoded["class_labels"]),
                   content_free_prompts=len(cf_enc["class_labels"]))
    out["predictions"] = preds
    out["metrics"] = compute_metrics(task, preds, encoded["class_labels"])
    return out
