"""Honest baselines for a sweep's classification tasks, as results rows beside its cells.

* ``majority``: always the training set's most frequent class — the class prior a method must
  leave to have learned anything.
* ``bag_of_words``: multinomial Naive Bayes (McCallum & Nigam 1998) on the model's own wordpiece
  counts over the *whole* training split, Laplace smoothing α chosen on validation from a grid
  (one row per α, so the report's validation-based selection applies to it as to any variant):

      log p(c | x) ∝ log π_c + Σ_v x_v log θ_cv,   θ_cv = (N_cv + α) / (N_c + α |V|)

  with x_v the count of token v in the example and N_cv the count of v in class c's training
  examples. A fine-tuned transformer that does not beat it has not used its pretraining.

The rows use the same tokeniser and the same length-sorted order of the test split as the runs
of the sweep (``peftjax.data.formats.encode_split``), so their test predictions pair with the
cells' example by example for the bootstrap intervals (``peftjax.grid.stats``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

NB_ALPHAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def naive_bayes_fit(ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, num_classes: int,
                    vocab: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``(log priors (C,), log θ (C, V))`` from token ids (n, L) with their attention mask."""
    rows = np.repeat(np.asarray(labels, np.int64), ids.shape[1]).reshape(ids.shape)
    keep = np.asarray(mask, bool)
    counts = np.zeros((num_classes, vocab))
    np.add.at(counts, (rows[keep], np.asarray(ids)[keep]), 1.0)
    log_theta = np.log(counts + alpha) - np.log(counts.sum(axis=1, keepdims=True) + alpha * vocab)
    prior = np.bincount(labels, minlength=num_classes) / len(labels)
    return np.log(np.maximum(prior, 1e-12)), log_theta


def naive_bayes_predict(model: tuple[np.ndarray, np.ndarray], ids: np.ndarray,
                        mask: np.ndarray) -> np.ndarray:
    log_prior, log_theta = model
    scores = log_theta[:, np.asarray(ids)] * np.asarray(mask, bool)[None]   # (C, n, L)
    return np.argmax(log_prior[:, None] + scores.sum(axis=2), axis=0)


def baseline_rows(config: Any, *, alphas: Sequence[float] = NB_ALPHAS) -> list[dict]:
    """Results rows of the majority class and the Naive Bayes grid for one composed train config
    (its model's tokeniser, its task; the whole splits)."""
    from peftjax import data as data_lib
    from peftjax.data import formats
    from peftjax.train.compose import build, family_heads
    from peftjax.train.loop import class_string

    task, _, tokenizer, _, _ = build(config, with_weights=False)
    if task.kind != "classification":
        raise ValueError(f"baselines are for classification tasks; {task.name} is {task.kind}")
    heads = family_heads(config)
    enc = {split: formats.encode_split(config.task, task, tokenizer, name, None, family_heads=heads,
                                       data_dir=config.data_dir or None, for_eval=split != "train")
           for split, name in zip(("train", "validation", "test"), task.splits)}
    y = {k: np.asarray(v["labels"], np.int64) for k, v in enc.items()}
    c = task.num_labels
    model_name = config.model.name
    base = {"model": model_name, "task": task.name, "seed": 0, "status": "ok",
            # the metric the sweep selects on for this task (train.select_metric), so α is
            # chosen as the cells' settings are
            "primary_metric": config.train.get("select_metric", "") or task.primary_metric,
            "task_kind": task.kind, "head_params": 0,
            "majority_rate": data_lib.majority_rate(y["test"])}

    def row(variant: str, hp: dict, preds: dict[str, np.ndarray], params: int) -> dict:
        hp_text = ",".join(f"{k}={v}" for k, v in hp.items())
        return {**base, "cell": f"baseline:{model_name}/{task.name}/{variant}[{hp_text}]",
                "label": f"{model_name}/{task.name}/{variant}" + (f"[{hp_text}]" if hp else ""),
                "variant": variant, "method": variant, "hp": hp, "trainable_params": params,
                "metrics": {split: data_lib.compute_metrics(task, preds[split], y[split])
                            for split in ("validation", "test")},
                "test_predictions": {"predictions": class_string(preds["test"]),
                                     "labels": class_string(y["test"])}}

    majority = int(np.bincount(y["train"], minlength=c).argmax())
    rows = [row("majority", {}, {s: np.full_like(y[s], majority) for s in ("validation", "test")}, 0)]
    vocab = int(max(int(v["input_ids"].max()) for v in enc.values())) + 1
    for alpha in alphas:
        nb = naive_bayes_fit(enc["train"]["input_ids"], enc["train"]["attention_mask"], y["train"],
                             c, vocab, alpha)
        preds = {s: naive_bayes_predict(nb, enc[s]["input_ids"], enc[s]["attention_mask"])
                 for s in ("validation", "test")}
        rows.append(row("bag_of_words", {"nb.alpha": float(alpha)}, preds, c * vocab + c))
    return rows
