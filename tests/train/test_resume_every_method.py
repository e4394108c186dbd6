"""Kill-and-resume equals an uninterrupted run for every method, not only LoRA.

A checkpoint holds the trainable side alone (tests/train/test_loop.py), so everything else a
method builds must come back the same on resume: a base rewritten from the init's factors
(PiSSA, OLoRA, LoRA-GA: W0 − s·B₀A₀, not from the trained ones), masks from a Fisher pass
(FishMask, Child-tuning_D), a base quantized on load (QLoRA), rank schedules (AdaLoRA, DyLoRA), frozen projections (VeRA, LoRA-FA's
A). The grid resumes killed cells under every method, so a method that resumed differently
would silently change a committed result. Two data-dependent inits run in ``make test``; the
rest are ``slow``.
"""

import pytest

from peftjax import methods
from peftjax.train import train_and_evaluate
from tests.train.test_loop import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


# Settings a 64-example tiny run needs (the defaults ask for more data or a wider model).
SMALL = {"fishmask": {"num_examples": 32}, "lora_ga": {"num_examples": 32}, "adapter": {"bottleneck": 8}}
FAST = {"lora_ga", "fishmask"}
CASES = [m if m in FAST else pytest.param(m, marks=pytest.mark.slow)
         for m in sorted(methods.registered())] + [pytest.param("pissa", marks=pytest.mark.slow),
                                                   pytest.param("lora_nf4", marks=pytest.mark.slow)]


def test_every_registered_method_is_covered():
    assert {c if isinstance(c, str) else c.values[0] for c in CASES} >= set(methods.registered())


@pytest.mark.parametrize("method", CASES)
def test_kill_and_resume_equals_uninterrupted(data_dir, tmp_path, method, caplog):
    config = tiny_config(data_dir, method="lora" if method in ("pissa", "lora_nf4") else method)
    if method == "pissa":
        config.method.init = "pissa"
    if method == "lora_nf4":   # a base quantized on load, as the grid's lora_nf4 cells
        config.model.quant, config.model.double_quant = "nf4", True
    for key, value in SMALL.get(method, {}).items():
        config.method[key] = value
    a = train_and_evaluate(config, str(tmp_path / "a"))
    assert train_and_evaluate(config, str(tmp_path / "b"), stop_after_step=5) == {"stopped_at": 5}
    with caplog.at_level("INFO"):
        b = train_and_evaluate(config, str(tmp_path / "b"))
    assert "resumed from step 3" in caplog.text   # not a fresh run that happens to agree
    assert a["metrics"] == b["metrics"] and a["best_step"] == b["best_step"]
    logs = [open(tmp_path / w / "metrics.jsonl").read().splitlines() for w in ("a", "b")]
    assert logs[0] == logs[1]   # every logged loss, gradient norm and evaluation, bit for bit
