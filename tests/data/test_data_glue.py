"""GLUE without the internet: TFDS's real glue builder code on tiny local TSV files.

`LocalGlue` subclasses TFDS's `Glue` and only replaces where the files come from, so the features
(`_info`) and the TSV parsing (`_generate_examples`, including MRPC's special files and STS-B's
float scores) are TFDS's own. Patching `peftjax.data.glue.builder` to return it runs the real
`load_examples` path end to end.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.text import glue as tfds_glue

from peftjax.data import encode, eval_batches, get_task, glue, glue_to_example, load_examples, train_batches
from peftjax.data.tasks import _REGISTRY, heldout_variant

TSV = {
    "sst2": {
        "train.tsv": "sentence\tlabel\nit 's a charming journey \t1\na dull , lifeless film \t0\n"
                     "warm and funny \t1\nnever gets going \t0\n",
        "dev.tsv": "sentence\tlabel\nan utterly delightful film \t1\nbad acting \t0\nmostly fine \t1\n",
        "test.tsv": "index\tsentence\n0\tno label here\n1\tnor here\n",
    },
    "stsb": {
        "train.tsv": "index\tgenre\tsentence1\tsentence2\tscore\n"
                     "0\tnews\tA man is playing a flute.\tA man plays the flute.\t4.8\n"
                     "1\tnews\tA cat sleeps.\tThe stock market fell.\t0.2\n",
        "dev.tsv": "index\tgenre\tsentence1\tsentence2\tscore\n"
                   "0\tnews\tA girl is riding a horse.\tA girl rides a horse.\t5.0\n"
                   "1\tnews\tTwo dogs play.\tA dog runs.\t2.5\n",
        "test.tsv": "index\tgenre\tsentence1\tsentence2\n0\tnews\tA bird flies.\tA plane flies.\n",
    },
    "mrpc": {
        # MSR paraphrase files as TFDS downloads them; train has a UTF-8 BOM.
        "msr_train.txt": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                         "1\t11\t12\tHe said yes.\tHe agreed.\n"
                         "0\t13\t14\tIt rained.\tShares rose.\n"
                         "1\t15\t16\tThe vote passed.\tThe bill was approved.\n",
        "dev_ids.tsv": "15\t16\n",
        "msr_test.txt": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t21\t22\tHi there.\tHello there.\n",
    },
}


class LocalGlue(tfds_glue.Glue, skip_registration=True):
    """TFDS's Glue builder reading local files instead of downloading."""

    SOURCE_DIR = ""

    def _split_generators(self, dl_manager):
        d = os.path.join(self.SOURCE_DIR, self.builder_config.name)
        if self.builder_config.name == "mrpc":
            files = {"train": f"{d}/msr_train.txt", "dev_ids": f"{d}/dev_ids.tsv", "test": f"{d}/msr_test.txt"}
            return {split: self._generate_examples(data_file=None, split=raw, mrpc_files=files)
                    for split, raw in (("train", "train"), ("validation", "dev"), ("test", "test"))}
        return {split: self._generate_examples(data_file=f"{d}/{raw}.tsv", split=raw)
                for split, raw in (("train", "train"), ("validation", "dev"), ("test", "test"))}


@pytest.fixture(scope="module")
def local_glue(tmp_path_factory):
    """(data_dir, builder factory) with the local GLUE files written out."""
    source = tmp_path_factory.mktemp("glue_source")
    for config, files in TSV.items():
        os.makedirs(source / config)
        for fname, content in files.items():
            (source / config / fname).write_text(content, encoding="utf-8")
    LocalGlue.SOURCE_DIR = str(source)
    data_dir = str(tmp_path_factory.mktemp("glue_tfds"))

    def make(task, data_dir=None):
        task = glue._glue_task(task)
        return LocalGlue(config=task.tfds_config, data_dir=glue.storage.default_data_dir(data_dir),
                         file_format="array_record")

    return data_dir, make


@pytest.fixture
def patched(local_glue, monkeypatch):
    data_dir, make = local_glue
    monkeypatch.setattr(glue, "builder", make)
    return data_dir


@pytest.mark.parametrize("config", ["sst2", "stsb", "mrpc"])
def test_local_builder_has_tfds_glue_features(local_glue, config, tmp_path):
    _, make = local_glue
    ours = make(config, str(tmp_path)).info.features
    real = tfds.builder(f"glue/{config}", data_dir=str(tmp_path)).info.features
    assert ours.to_json_content() == real.to_json_content()


def test_sst2_load_examples(patched):
    # TFDS stores GLUE in its own (fixed) shuffled order; idx is the row in the TSV file.
    train = sorted(load_examples("sst2", "train", data_dir=patched), key=lambda e: e["idx"])
    assert train[0] == {"text_a": "it 's a charming journey ", "text_b": None, "label": 1, "idx": 0}
    assert [e["label"] for e in train] == [1, 0, 1, 0]
    dev = load_examples("sst2", "validation", data_dir=patched)
    assert sorted((e["idx"], e["label"]) for e in dev) == [(0, 1), (1, 0), (2, 1)]
    test = load_examples("sst2", "test", data_dir=patched)
    assert {e["label"] for e in test} == {-1}  # GLUE test labels are hidden


def test_stsb_regression_labels(patched):
    dev = sorted(load_examples("stsb", "validation", data_dir=patched), key=lambda e: e["idx"])
    assert dev[0] == {"text_a": "A girl is riding a horse.", "text_b": "A girl rides a horse.", "label": 5.0, "idx": 0}
    assert isinstance(dev[1]["label"], float) and dev[1]["label"] == 2.5
    assert load_examples("stsb", "test", data_dir=patched)[0]["label"] == -1.0


def test_mrpc_pairs_from_msr_files(patched):
    train = load_examples("mrpc", "train", data_dir=patched)
    dev = load_examples("mrpc", "validation", data_dir=patched)
    assert {(e["text_a"], e["text_b"], e["label"]) for e in train} == {
        ("He said yes.", "He agreed.", 1), ("It rained.", "Shares rose.", 0)}
    assert [(e["text_a"], e["label"]) for e in dev] == [("The vote passed.", 1)]


def test_prepare_twice_is_noop(patched):
    b = glue.prepare("sst2", patched)
    files = {f: os.path.getmtime(os.path.join(b.data_dir, f)) for f in os.listdir(b.data_dir)}
    b2 = glue.prepare("sst2", patched)
    assert {f: os.path.getmtime(os.path.join(b2.data_dir, f)) for f in os.listdir(b2.data_dir)} == files


def test_pipeline_on_local_glue(patched, tokenizer):
    examples = load_examples("stsb", "train", data_dir=patched) + load_examples("stsb", "validation", data_dir=patched)
    enc = encode(examples, tokenizer, max_length=128)
    assert enc["labels"].dtype == np.float32
    assert (enc["token_type_ids"].max(axis=1) == 1).all()  # pairs are encoded as pairs
    batches = list(eval_batches(enc, batch_size=3))
    assert [b["input_ids"].shape for b in batches] == [(3, 16), (3, 16)]
    assert batches[1]["mask"].tolist() == [True, False, False]
    np.testing.assert_allclose(batches[0]["labels"], [e["label"] for e in examples[:3]])
    first = next(train_batches(enc, batch_size=2, seed=0))
    assert first["input_ids"].shape == (2, 16) and first["mask"].all()
    sst2 = encode(load_examples("sst2", "train", data_dir=patched), tokenizer, max_length=128)
    assert sst2["labels"].dtype == np.int32 and (sst2["token_type_ids"] == 0).all()


@pytest.mark.parametrize(
    "task,record,expected",
    [
        ("sst2", {"sentence": b"great film", "label": np.int64(1), "idx": np.int32(7)},
         {"text_a": "great film", "text_b": None, "label": 1, "idx": 7}),
        ("mnli", {"premise": b"A p\xc3\xa9re.", "hypothesis": b"H.", "label": 2, "idx": 0},
         {"text_a": "A p\u00e9re.", "text_b": "H.", "label": 2, "idx": 0}),
        ("qnli", {"question": "Q?", "sentence": "S.", "label": 0, "idx": 3},
         {"text_a": "Q?", "text_b": "S.", "label": 0, "idx": 3}),
        ("qqp", {"question1": b"a", "question2": b"b", "label": -1, "idx": 1},
         {"text_a": "a", "text_b": "b", "label": -1, "idx": 1}),
        ("stsb", {"sentence1": b"x", "sentence2": b"y", "label": np.float32(3.8), "idx": 2},
         {"text_a": "x", "text_b": "y", "label": pytest.approx(3.8), "idx": 2}),
    ],
)
def test_glue_to_example_is_pure_mapping(task, record, expected):
    out = glue_to_example(task, record)
    assert out == expected
    assert type(out["label"]) is (float if get_task(task).kind == "regression" else int)
    assert type(out["idx"]) is int


def test_glue_to_example_errors():
    with pytest.raises(KeyError, match="sentence2"):
        glue_to_example("rte", {"sentence1": b"a", "label": 0, "idx": 0})
    with pytest.raises(ValueError, match="not a GLUE task"):
        glue_to_example("tweet_sentiment", {"text": b"a", "label": 0, "idx": 0})


def test_real_glue_download_is_blocked_in_tests(tmp_path):
    """Guard: the suite's network block turns an accidental download into an immediate error."""
    with pytest.raises(RuntimeError, match="internet"):
        glue.prepare("rte", str(tmp_path))


def test_heldout_variant_splits_train_and_tests_on_dev(patched, monkeypatch):
    """<task>_heldout: train and validation partition GLUE train, test is the public dev set."""
    assert get_task("sst2_heldout").splits == ("train[:90%]", "train[90%:]", "validation")
    # The local sst2 train has 4 rows, so hold out half of them (10% would be none).
    task = heldout_variant(get_task("sst2"), 50, name="sst2_heldout50")
    monkeypatch.setitem(_REGISTRY, task.name, task)  # registered for this test only
    train = load_examples(task.name, task.train_split, data_dir=patched)
    held = load_examples(task.name, task.eval_split, data_dir=patched)
    full = load_examples("sst2", "train", data_dir=patched)
    assert sorted(e["idx"] for e in train + held) == sorted(e["idx"] for e in full)
    assert not {e["idx"] for e in train} & {e["idx"] for e in held} and held
    test = load_examples(task.name, task.test_split, data_dir=patched)
    assert sorted((e["idx"], e["label"]) for e in test) == [(0, 1), (1, 0), (2, 1)]  # dev, labelled
    assert get_task("mnli_heldout").test_split == "validation_matched"
    assert get_task("stsb_heldout").kind == "regression"
