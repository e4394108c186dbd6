"""Training parity with Hugging Face PEFT on tiny random BERT and Llama classifiers: every method
both frameworks implement trains 20 steps both ways (``peftjax.interop.train_parity``, the code
behind scripts/train_vs_peft.py) and the per-step losses agree to 1e-4 relative.

A regression anywhere in a method's training semantics — init, scaling, what is trainable,
weight-decay exclusions, the schedule, clipping, AdaLoRA's budget and masking, prefix
reparameterisation — moves one side only and fails here. Each run also checks that training
actually moved the tensors (a parity of two frozen runs would prove nothing) and that clipping was
active on some steps (its path is exercised). Both runs start from one draw, so the init's
*distribution* is checked apart: our initial tensors against PEFT's own init of the same config
(``init_vs_peft``; the old VeRA bound fails it, ``test_a_wrong_init_bound_is_caught``).

The checkpoints are written by transformers in the test (no download). Llama rows are unpadded:
under prompt tuning transformers' LlamaForSequenceClassification gets ``inputs_embeds`` and
reads the last position, whatever the padding (PEFT's behaviour; peftjax reads the last real
token), so padded rows would compare two different heads.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from peftjax.interop import train_parity as tp  # noqa: E402

STEPS, BATCH, ROWS, LENGTH = 20, 8, 48, 12
TOL = 1e-4
# Small configurations; everything else is the method's default (configs/methods).
OVERRIDES = {"lora": {"rank": 4}, "rslora": {"rank": 4}, "dora": {"rank": 4}, "pissa": {"rank": 4},
             "loraplus": {"rank": 4}, "adalora": {"init_r": 4, "target_r": 2}, "vera": {"rank": 16},
             "prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
             "bitfit": {}, "full": {}, "olora": {"rank": 4},
             "lora_ga": {"rank": 4, "num_examples": 16, "batch_size": 8}, "lora_fa": {"rank": 4},
             "hira": {"rank": 4}, "ia3": {}, "ln_tuning": {}}
# PEFT's LoRA-FA optimizer is transformers' legacy AdamW: ε added to √v before the bias
# correction (an effective ε/√(1-β₂ᵗ)), where optax adds it to √v̂. On these tiny models some of
# B's gradients are ~1e-7, where that changes the update (final B differs by 2e-3 at ε=1e-8,
# while the losses agree to 1e-6); at ε=1e-14 both placements vanish and the runs agree to 5e-8.
TRAIN_OVERRIDES = {"lora_fa": {"eps": 1e-14}}
# Clipping at this global norm is active on some steps of each family's runs.
CLIP = {"bert": 0.05, "llama": 1.0}


def _checkpoint(family: str, folder: str) -> int:
    if family == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=37,
                                         max_position_embeddings=64)
        torch.manual_seed(0)
        net = transformers.BertModel(config)
    else:   # GQA, biases on (BitFit needs some), a pad token for the sequence classifier
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64,
                                          pad_token_id=0, initializer_range=0.1,
                                          attention_bias=True, mlp_bias=True)
        torch.manual_seed(0)
        net = transformers.LlamaModel(config)
    net.save_pretrained(folder)
    return config.vocab_size


def _encoded(family: str, vocab: int) -> dict:
    rs = np.random.RandomState(0)
    ids = rs.randint(3, vocab, (ROWS, LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    if family == "bert":   # right padding of varied lengths
        mask = (np.arange(LENGTH)[None] < rs.randint(4, LENGTH + 1, ROWS)[:, None]).astype(np.int32)
        ids = ids * mask
    out = {"input_ids": ids, "attention_mask": mask, "labels": rs.randint(0, 3, ROWS).astype(np.int32)}
    if family == "bert":
        out["token_type_ids"] = np.zeros_like(ids)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: torch's intra-op threads only spin against XLA's and each other (a 20-step
    tiny run takes 0.08 s on one thread, seconds on two of a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(family: str, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"{family}_parity"))
    vocab = _checkpoint(family, folder)
    base = tp.load_base(folder, num_labels=3)
    return family, base, _encoded(family, vocab), tp.torch_base(base)


@pytest.fixture(scope="module")
def bert_setup(tmp_path_factory):
    return _setup("bert", tmp_path_factory)


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    return _setup("llama", tmp_path_factory)


# Every method on both families; ``make test`` runs each method on one of them (time budget:
# about 3 s a run, mostly compiling our step), chosen so that the family-specific paths run there
# — prompt and prefix tuning, BitFit's biases and the head's 1-D LoRA+ group on the GQA decoder,
# AdaLoRA on both — and the rest under ``-m slow`` (make test-all).
IN_MAKE_TEST = {"bert": {"lora", "dora", "pissa", "adalora", "vera", "full", "olora", "hira",
                         "ln_tuning"},
                "llama": {"rslora", "loraplus", "adalora", "prompt_tuning", "prefix_tuning", "bitfit",
                          "lora_ga", "lora_fa", "ia3"}}
CASES = [pytest.param(family, method, id=f"{family}-{method}",
                      marks=() if method in IN_MAKE_TEST[family] else pytest.mark.slow)
         for family in ("bert", "llama") for method in tp.METHODS]


@pytest.mark.parametrize("family, method", CASES)
def test_training_matches_peft_step_by_step(request, family, method):
    family, base, encoded, template = request.getfixturevalue(f"{family}_setup")
    r = tp.run_method(method, base, encoded, steps=STEPS, batch_size=BATCH, torch_net=template,
                      method_overrides=OVERRIDES[method],
                      train_overrides={"clip_norm": CLIP[family], **TRAIN_OVERRIDES.get(method, {})})
    print(f"\n{family} {method}: max rel loss diff {r['max_rel_loss_diff']:.2e}, final max|Δθ| "
          f"{r['final_param_max_abs_diff']:.2e} (moved {r['param_max_abs_update']:.2e}), clipped "
          f"{r['clipped_steps_peft']}/{STEPS}")
    assert len(r["loss_ours"]) == len(r["loss_peft"]) == STEPS
    assert r["initial_param_max_abs_diff"] == 0 and r["initial_frozen_max_abs_diff"] == 0
    assert r["max_rel_loss_diff"] <= TOL
    assert r["final_param_max_abs_diff"] <= TOL
    assert r["param_max_abs_update"] > 100 * max(r["final_param_max_abs_diff"], 1e-7)
    assert r["clipped_steps_peft"] > 0
    if tp.spec(method, STEPS).carry == "file" or method in ("prompt_tuning", "prefix_tuning"):
        assert r["init_vs_peft"]["ok"], r["init_vs_peft"]   # PiSSA, OLoRA: compared below
    if method == "adalora":
        assert r["rank_patterns_equal"], (r["ranks_ours"], r["ranks_peft"])
        assert sum(r["ranks_ours"].values()) == 2 * len(r["ranks_ours"])   # the target budget
        assert r["importance_max_rel_diff"] <= 1e-3
    if method in ("pissa", "olora"):
        assert r[f"{method}_init_vs_peft"]["update_max_rel_diff"] <= TOL
        assert r[f"{method}_init_vs_peft"]["residual_max_rel_diff"] <= TOL
    if method == "lora_fa":   # A frozen on both sides, B's gradient projected (PEFT's optimizer)
        assert r["trainable_tensors"] == r["optimizer"]["tensors"]
        assert "lora_A" in r["init_vs_peft"]["kinds"]
    if method == "loraplus":
        assert r["optimizer"]["lr_multipliers"] == [1.0, tp.LORAPLUS_RATIO]


# ------------------------------------------------------------------ the optimizer facts, in code


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules_equal_transformers_step_by_step(schedule):
    """optax's warm-up + decay (make_optimizer) against transformers' LambdaLR, indexed as the
    loops use them: the k-th update reads optax's count k and the LambdaLR after k
    ``scheduler.step()`` calls (stepped after ``optimizer.step()``); the first update's rate is 0."""
    from peftjax.train.optim import make_optimizer

    s = tp.spec("lora", 50)
    tc = tp.train_config(s, steps=50, batch_size=8, overrides={"schedule": schedule})
    _, ours = make_optimizer(tc, 50)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=tc.learning_rate)
    sched = tp.torch_schedule(opt, tc, 50)
    assert tp.warmup_steps(tc, 50) == 3
    for k in range(50):
        assert abs(float(ours(k)) - opt.param_groups[0]["lr"]) <= 1e-6 * tc.learning_rate, k   # optax: fp32
        opt.step()
        sched.step()
    assert float(ours(0)) == 0.0   # warm-up starts at 0 (constant too: get_constant_schedule_with_warmup)


def test_a_decay_exclusion_mismatch_is_refused(bert_setup):
    """The per-tensor optimizer check catches a torch optimizer that decays biases."""
    import jax

    from peftjax.methods import core

    _, base, _, template = bert_setup
    s = tp.spec("bitfit", STEPS)
    method = core.create("bitfit", base.model, tp.method_config(s))
    peft = method.setup(jax.random.PRNGKey(0), base.params)
    net, _ = tp.peft_side(s, method, base.model, peft, template, "")
    pairs = tp.pair_trainables(method, base.model, peft.trainable, net)
    tc = tp.train_config(s, steps=STEPS, batch_size=BATCH)
    good = tp.torch_optimizer(s, tc, net, base.model)
    assert tp.check_optimizers(tc, method, peft.trainable, pairs, good)["decayed"] == 1   # the head's weight
    every = torch.optim.AdamW([p.param for p in pairs], lr=tc.learning_rate, weight_decay=tc.weight_decay)
    with pytest.raises(tp.OptimizerMismatch, match="decay"):
        tp.check_optimizers(tc, method, peft.trainable, pairs, every)


def test_a_wrong_init_bound_is_caught(bert_setup, monkeypatch):
    """VeRA's projections drawn with torch's default kaiming bound (1/√fan_in) instead of PEFT's
    √(6/fan_in) — the bug review found — fail the init check (std ratio ≈ 0.41)."""
    import math

    from peftjax.methods import vera

    _, base, encoded, template = bert_setup
    monkeypatch.setattr(vera, "kaiming_bound", lambda fan_in: 1.0 / math.sqrt(fan_in))
    r = tp.run_method("vera", base, encoded, steps=2, batch_size=BATCH, torch_net=template,
                      method_overrides=OVERRIDES["vera"])
    kinds = r["init_vs_peft"]["kinds"]
    assert not r["init_vs_peft"]["ok"]
    assert kinds["vera_A"]["std_ratio"] < 0.5 and kinds["vera_B"]["std_ratio"] < 0.5


def test_a_stopped_report_resumes_only_under_the_same_settings(tmp_path):
    """``run_all`` keeps the methods an earlier run of the same settings finished (a 17-method
    MiniLM run takes over an hour); any other model, weights, steps or noise floor reruns them."""
    import json

    settings = {k: 1 for k in tp.RESUME_KEYS}
    path = tmp_path / "train_vs_peft.json"
    path.write_text(json.dumps({**settings, "methods": [{"method": "lora", "noise_floor": {"max_ours": 0}},
                                                         {"method": "dora"}]}))
    assert set(tp.finished_records(str(path), settings, noise_floor=True)) == {"lora"}
    assert set(tp.finished_records(str(path), settings, noise_floor=False)) == {"dora"}
    assert tp.finished_records(str(path), {**settings, "steps": 2}, noise_floor=True) == {}
    assert tp.finished_records(str(tmp_path / "missing.json"), settings, noise_floor=True) == {}
