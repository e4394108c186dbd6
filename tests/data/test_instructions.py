"""Instruction data: templates, response-only labels, truncation, JSONL and TFDS sources (offline)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from peftjax.data import instructions as ins
from peftjax.data import tweets

REC = ins.Instruction(instruction="Name the colour.", input="The sky on a clear day.", output="blue")
NO_INPUT = ins.Instruction(instruction="Say hello in French.", input="", output="bonjour")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_alpaca_template_picks_the_variant_by_input():
    t = ins.Template()
    assert t.prompt(REC) == ins.ALPACA_PROMPT_INPUT.format(instruction=REC["instruction"], input=REC["input"])
    assert t.prompt(REC).endswith("### Input:\nThe sky on a clear day.\n\n### Response:\n")
    assert t.prompt(NO_INPUT) == ins.ALPACA_PROMPT_NO_INPUT.format(instruction=NO_INPUT["instruction"])
    assert "### Input" not in t.prompt(NO_INPUT)
    custom = ins.Template("Q: {instruction} | {input}\nA:", "Q: {instruction}\nA:")
    assert custom.prompt(REC) == "Q: Name the colour. | The sky on a clear day.\nA:"


@pytest.mark.parametrize("with_input, no_input, match", [
    ("{instruction} {inputs}", "{instruction}", "unknown: \\['inputs'\\]"),
    ("{instruction}", "{instruction}", "must use exactly the fields \\['input', 'instruction'\\]"),
    ("{instruction} {input}", "{instruction} {input}", "prompt_template_no_input"),
    ("{instruction!r} {input}", "{instruction}", "format spec or conversion"),
])
def test_bad_templates_are_refused(with_input, no_input, match):
    with pytest.raises(ValueError, match=match):
        ins.Template(with_input, no_input)


def test_labels_cover_the_response_and_eos_only(tokenizer):
    template = ins.Template()
    enc = ins.encode_instructions([REC, NO_INPUT], tokenizer, 96, template, eos_token_id=102, bos_token_id=101)
    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    for i, rec in enumerate([REC, NO_INPUT]):
        prompt, response = ids(tokenizer, template.prompt(rec)), ids(tokenizer, rec["output"])
        seq = [101] + prompt + response + [102]
        n = len(seq)
        assert enc["input_ids"][i, :n].tolist() == seq and not enc["input_ids"][i, n:].any()
        assert enc["attention_mask"][i].tolist() == [1] * n + [0] * (96 - n)
        expect = [-100] * (1 + len(prompt)) + response + [102] + [-100] * (96 - n)
        assert enc["labels"][i].tolist() == expect
        assert enc["input_ids"].dtype == enc["labels"].dtype == np.int32


def test_left_truncation_keeps_bos_response_and_the_prompt_end(tokenizer, caplog):
    template = ins.Template("{instruction}\n{input}\nAnswer:", "{instruction}\nAnswer:")
    long = ins.Instruction(instruction="Summarise.", input="word " * 200, output="short answer")
    prompt, response = ids(tokenizer, template.prompt(long)), ids(tokenizer, long["output"])
    with caplog.at_level(logging.WARNING, logger=ins.__name__):
        enc = ins.encode_instructions([long, REC], tokenizer, 40, template, eos_token_id=102, bos_token_id=101)
    assert "1 of 2 instruction prompts were cut" in caplog.text
    row = enc["input_ids"][0].tolist()
    keep = 40 - 1 - len(response) - 1
    assert row == [101] + prompt[-keep:] + response + [102]  # full length, nothing padded
    assert enc["labels"][0].tolist() == [-100] * (1 + keep) + response + [102]
    with pytest.raises(ValueError, match="record 0: .* exceed max_length=40.*truncation='left'"):
        ins.encode_instructions([long], tokenizer, 40, template, eos_token_id=102, truncation="error")
    huge = ins.Instruction(instruction="Repeat.", input="", output="word " * 50)
    with pytest.raises(ValueError, match="record 0: its response \\+ EOS is 51 tokens"):
        ins.encode_instructions([huge], tokenizer, 40, template, eos_token_id=102, bos_token_id=101)
    with pytest.raises(ValueError, match="truncation='right' is invalid"):
        ins.encode_instructions([REC], tokenizer, 40, template, eos_token_id=102, truncation="right")


def test_special_tokens_come_from_the_tokenizer_then_the_model_config(tokenizer):
    # MiniLM's (BERT) tokenizer has neither, so tiny-llama's config decides.
    assert ins.special_tokens(tokenizer, {"bos_token_id": 101, "eos_token_id": 102}) == (101, 102)
    assert ins.special_tokens(tokenizer, {"eos_token_id": [7, 8]}) == (None, 7)

    class Tok:
        bos_token_id, eos_token_id = 1, 2

    assert ins.special_tokens(Tok(), {"bos_token_id": 101, "eos_token_id": 102}) == (1, 2)
    with pytest.raises(ValueError, match="needs an EOS token"):
        ins.special_tokens(tokenizer, {})


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_jsonl_maps_fields_and_optional_input(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "a", "input": "b", "output": "c"}, "",
        {"instruction": "d", "output": "e"}, {"instruction": "f", "input": None, "output": "g"}])
    assert ins.read_jsonl(path) == [{"instruction": "a", "input": "b", "output": "c"},
                                    {"instruction": "d", "input": "", "output": "e"},
                                    {"instruction": "f", "input": "", "output": "g"}]
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "input": "ignored"}])
    assert ins.read_jsonl(qa, {"instruction": "question", "input": "", "output": "answer"}) == \
        [{"instruction": "q", "input": "", "output": "a"}]
    with pytest.raises(ValueError, match="task.fields must map.*unknown keys \\['label'\\]"):
        ins.read_jsonl(qa, {"instruction": "question", "output": "answer", "label": "x"})


@pytest.mark.parametrize("line, match", [
    ('{"instruction": "a", "output": "b"', "d.jsonl:2: invalid JSON"),
    ('{"instruction": "a"}', "d.jsonl:2: missing field 'output'"),
    ('["a", "b"]', "d.jsonl:2: expected a JSON object"),
    ('{"instruction": 3, "output": "b"}', "d.jsonl:2: field 'instruction' must be a string, got int"),
    ('{"instruction": "  ", "output": "b"}', "d.jsonl:2: field 'instruction' .* is empty"),
    ('{"instruction": "a", "input": ["x"], "output": "b"}', "d.jsonl:2: field 'input' must be a string"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, match):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "fine"}, line])
    with pytest.raises(ValueError, match=match):
        ins.read_jsonl(path)


def test_empty_or_missing_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no records"):
        ins.read_jsonl(write_jsonl(tmp_path / "e.jsonl", ["", " "]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ins.read_jsonl(tmp_path / "nope.jsonl")


def records(n):
    return [ins.Instruction(instruction=f"task {i}", input="" if i % 3 else f"x{i}", output=f"y{i}")
            for i in range(n)]


def test_split_is_a_deterministic_order_free_partition():
    recs = records(200)
    a = ins.split_records(recs)
    assert [len(a[s]) for s in ins.SPLITS] == [180, 10, 10]
    assert sorted(r["instruction"] for s in ins.SPLITS for r in a[s]) == sorted(r["instruction"] for r in recs)
    shuffled = [recs[i] for i in np.random.default_rng(0).permutation(200)]
    b = ins.split_records(shuffled)
    for s in ins.SPLITS:  # same membership whatever the file order
        assert sorted(map(json.dumps, a[s])) == sorted(map(json.dumps, b[s]))
    assert a["train"] == [r for r in recs if r in a["train"]]  # file order kept inside a split
    dup = ins.split_records(recs + recs[:50])
    for r in recs[:50]:  # copies never straddle splits
        assert sum(r in dup[s] for s in ins.SPLITS) == 1
    with pytest.raises(ValueError, match="split fractions"):
        ins.split_records(recs, {"train": 0.9, "validation": 0.2, "test": 0.0})


def test_load_jsonl_file_and_directory_sources(tmp_path):
    recs = records(60)
    path = write_jsonl(tmp_path / "all.jsonl", recs)
    got = {s: ins.load_instructions(f"jsonl:{path}", s) for s in ins.SPLITS}
    assert got == ins.split_records(recs)
    assert ins.load_instructions(f"jsonl:{path}", "train", limit=5) == got["train"][:5]
    with pytest.raises(ValueError, match="split 'dev'"):
        ins.load_instructions(f"jsonl:{path}", "dev")
    with pytest.raises(ValueError, match="split 'validation' of .* is empty"):
        ins.load_instructions(f"jsonl:{write_jsonl(tmp_path / 'one.jsonl', recs[:1])}", "validation")
    d = tmp_path / "splits"
    d.mkdir()
    for s, part in zip(ins.SPLITS, (recs[:40], recs[40:50], recs[50:])):
        write_jsonl(d / f"{s}.jsonl", part)
    assert ins.load_instructions(f"jsonl:{d}", "validation") == recs[40:50]
    (d / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test.jsonl does not exist"):
        ins.load_instructions(f"jsonl:{d}", "test")
    for bad in ("csv:/x.csv", "jsonl:", "tweets"):
        with pytest.raises(ValueError, match="instruction source .* is invalid"):
            ins.load_instructions(bad, "train")


QA = {"train": [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Opposite of hot?", "cold")],
      "test": [("Colour of grass?", "green")]}


class TinyQaInstructions(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset with its own field names (question/answer, no input), registered by name."""

    VERSION = tfds.core.Version("0.1.0")

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"question": tfds.features.Text(), "answer": tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(rows) for split, rows in QA.items()}

    def _generate_examples(self, rows):
        for i, (q, a) in enumerate(rows):
            yield i, {"question": q, "answer": a}


def test_tfds_source_by_name_with_a_field_mapping(tmp_path):
    fields = {"instruction": "question", "input": "", "output": "answer"}
    got = ins.load_instructions("tfds:tiny_qa_instructions", "train", fields=fields, data_dir=tmp_path)
    assert got == [{"instruction": q, "input": "", "output": a} for q, a in QA["train"]]
    assert ins.load_instructions("tfds:tiny_qa_instructions", "test[:1]", fields=fields, data_dir=tmp_path) == \
        [{"instruction": "Colour of grass?", "input": "", "output": "green"}]
    with pytest.raises(ValueError, match="no split 'validation'; available"):
        ins.load_instructions("tfds:tiny_qa_instructions", "validation", fields=fields, data_dir=tmp_path)
    with pytest.raises(ValueError, match="record 0: missing field 'instruction'.*has \\['answer', 'question'\\]"):
        ins.load_instructions("tfds:tiny_qa_instructions", "train", data_dir=tmp_path)


def test_tweet_instructions_builder(tmp_path, monkeypatch):
    rows = [(f"tweet number {i} is {w}", i % 3) for i, w in enumerate(["sad", "fine", "great"] * 8)]
    splits = {"train": rows[:16], "validation": rows[16:20], "test": rows[20:]}
    monkeypatch.setattr(tweets, "sentiment_splits", lambda seed=0, path=None: (splits, {}))
    got = ins.load_instructions("tfds:tweet_instructions", "train", data_dir=tmp_path)
    assert got == [ins.tweet_instruction(t, y) for t, y in splits["train"]]
    assert [r["output"] for r in got] == [["negative", "neutral", "positive"][y] for _, y in splits["train"]]
    with_input = [r for r in got if r["input"]]
    assert 0 < len(with_input) < len(got)  # both Alpaca prompt variants occur
    assert all(r["instruction"] in ins.TWEET_INSTRUCTIONS for r in with_input)
    assert all(r["instruction"].endswith("Tweet: " + t) for r, (t, _) in zip(got, splits["train"]) if not r["input"])
    assert len(ins.load_instructions("tfds:tweet_instructions", "validation", data_dir=tmp_path)) == 4


def test_task_configs_and_their_checks(tmp_path):
    from configs.train import get_config

    config = get_config("model=tiny-llama,method=lora,task=tweet_instructions")
    assert config.task.format == "instruction" and config.task.source == "tfds:tweet_instructions"
    assert config.task.max_length == 128 and config.train.batch_size == 16
    task = ins.task_from_config(config.task)
    assert (task.name, task.kind, task.splits) == ("tweet_instructions", "causal_lm", ("train", "validation", "test"))
    path = write_jsonl(tmp_path / "mine.jsonl", records(30))
    config = get_config(f"model=tiny-llama,method=lora,task=jsonl:{path}")
    assert config.task.source == config.task.name == f"jsonl:{path}"
    config.task.fields.output = "answer"  # overridable like any field
    assert ins.task_from_config(config.task).source == f"jsonl:{path}"
    assert get_config("model=tiny-llama,method=lora,task=tfds:tiny_qa_instructions").task.source == \
        "tfds:tiny_qa_instructions"
    with pytest.raises(ValueError, match="needs a path"):
        get_config("model=tiny-llama,method=lora,task=jsonl")
    config.task.truncation = "middle"
    with pytest.raises(ValueError, match="task.truncation='middle' is invalid"):
        ins.task_from_config(config.task)
    config = get_config("model=tiny-llama,method=lora,task=tweet_sentiment")
    config.task.format = "instruction"
    with pytest.raises(ValueError, match="needs task.source .*tweet_sentiment.* is not an instruction task"):
        ins.task_from_config(config.task)
