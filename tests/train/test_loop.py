"""The training loop: resume equals an uninterrupted run, NaN stops cleanly, configs fail early."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.train import get_config
from peftjax import methods
from peftjax.train import NonFiniteLossError, init_state, make_optimizer, make_train_step, train_and_evaluate
from peftjax.train.checkpoint import Checkpointer
from tests.helpers import learnable_batch, tiny_model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, method="lora", model="tiny-bert", **train):
    config = get_config(f"model={model},method={method},task=tweet_sentiment")
    config.data_dir = data_dir
    values = dict(steps=8, batch_size=8, eval_batch_size=16, train_limit=64, eval_limit=32,
                  eval_every=4, checkpoint_every=3, log_every=1, progress=False)
    values.update(train)
    for k, v in values.items():
        config.train[k] = v
    return config


def test_kill_and_resume_equals_uninterrupted(data_dir, tmp_path):
    config = tiny_config(data_dir)
    a = train_and_evaluate(config, str(tmp_path / "a"))
    stopped = train_and_evaluate(config, str(tmp_path / "b"), stop_after_step=5)
    assert stopped == {"stopped_at": 5}
    # As after a kill: the newest checkpoint is step 3, steps 4-5 are redone on resume.
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == 3
    b = train_and_evaluate(config, str(tmp_path / "b"))
    assert a["metrics"] == b["metrics"] and a["best_step"] == b["best_step"]
    files = [open(tmp_path / w / "metrics.jsonl").read().splitlines() for w in ("a", "b")]
    assert files[0] == files[1]
    ca = Checkpointer(str(tmp_path / "a" / "checkpoints"))
    cb = Checkpointer(str(tmp_path / "b" / "checkpoints"))
    ta, tb = ca.restore_raw(8), cb.restore_raw(8)
    assert jax.tree.structure(ta) == jax.tree.structure(tb)
    leaves = list(zip(jax.tree.leaves(ta), jax.tree.leaves(tb)))
    assert len(leaves) > 10 and int(ta["state"]["step"]) == 8
    for x, y in leaves:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    result = json.load(open(tmp_path / "b" / "result.json"))
    for key in ("method", "model", "task", "trainable_params", "head_params", "total_params",
                "step_time_s", "peak_memory_bytes"):
        assert result[key] is not None, key
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1


def test_checkpoint_holds_only_the_trainable_side(data_dir, tmp_path):
    config = tiny_config(data_dir, steps=3)
    train_and_evaluate(config, str(tmp_path))
    state = Checkpointer(str(tmp_path / "checkpoints")).restore_raw(3)["state"]
    sizes = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state))
    trainable = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state["trainable"]))
    assert trainable > 0
    # trainable + Adam's two moments (+ a few scalars); no frozen base params.
    assert trainable < 10_000 and sizes < 3 * trainable + 16


def test_prepare_builds_the_state_the_loop_trains(data_dir, tmp_path):
    """``loop.prepare`` is the loop's set-up (scripts/bench_cell.py times a cell from it): its
    state, stepped on the run's own batches, is bit-identical to the loop's checkpoint."""
    from peftjax import data as data_lib
    from peftjax.train import loop

    config = tiny_config(data_dir, steps=2, checkpoint_every=2, eval_every=2)
    train_and_evaluate(config, str(tmp_path))
    saved = Checkpointer(str(tmp_path / "checkpoints")).restore_raw(2)["state"]
    run = loop.prepare(config)
    assert int(run.state.step) == 0 and run.lm_classes == 0 and run.fmt
    step = jax.jit(make_train_step(run.method, run.tx))
    batches = data_lib.train_batches(run.encoded["train"], config.train.batch_size, config.seed,
                                     group_by_length=config.train.group_by_length,
                                     bucket_multiple=config.train.bucket_multiple)
    state = run.state
    for _ in range(2):
        state, _ = step(state, run.frozen, run.placement.put_batch(next(batches)))
    for tree in ("trainable", "opt_state"):
        got, want = jax.tree.leaves(getattr(state, tree)), jax.tree.leaves(saved[tree])
        assert len(got) == len(want) > 0
        for x, y in zip(got, want):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir, method="full", steps=6, checkpoint_every=1, learning_rate=1e38,
                         clip_norm=0.0, warmup_ratio=0.0)
    with pytest.raises(NonFiniteLossError) as e:
        train_and_evaluate(config, str(tmp_path))
    msg = str(e.value)
    assert "last good checkpoint" in msg
    bad_step = int(msg.split("at step ")[1].split()[0])
    assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == bad_step - 1


def test_task_model_mismatch_fails_before_compute(data_dir, tmp_path):
    config = tiny_config(data_dir)
    config.task.format = "lm"  # a causal-LM format on an encoder
    with pytest.raises(ValueError, match="task/model mismatch"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_config_key_is_an_error():
    config = get_config("model=tiny-bert,method=lora,task=tweet_sentiment")
    with pytest.raises(AttributeError):
        config.train.learnig_rate = 1e-3
    with pytest.raises(ValueError, match="unknown method"):
        get_config("model=tiny-bert,method=lorra")
    with pytest.raises(ValueError, match="unknown model"):
        get_config("model=bert-huge")


def test_gradient_accumulation_matches_the_large_batch():
    """Two accumulated half batches make the same update as one full batch (dropout off)."""
    from flax import traverse_util

    from configs import models as model_configs
    from peftjax.models import build_model

    hf = model_configs.get("tiny-bert").hf_config.to_dict()
    hf.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = build_model(hf, head="classification", num_labels=3)
    base = traverse_util.flatten_dict(model.init(jax.random.PRNGKey(0)), sep=".")
    m = methods.create("lora", model, {"rank": 4})
    peft = m.setup(jax.random.PRNGKey(0), base)
    peft.trainable["added"].update(
        {k: v + 0.1 for k, v in peft.trainable["added"].items() if k.endswith("lora_B")})
    batch = learnable_batch(model, batch=8)
    cfg = get_config("model=tiny-bert,method=lora").train
    cfg.warmup_ratio, cfg.schedule = 0.0, "constant"
    big_tx, _ = make_optimizer(cfg, 10)
    cfg.grad_accum_steps = 2
    acc_tx, _ = make_optimizer(cfg, 10)

    def run(tx, batches):
        state = init_state(peft.trainable, peft.state, tx)
        step = jax.jit(make_train_step(m, tx, seed=0))
        for b in batches:
            state, _ = step(state, peft.frozen, b)
        return state.trainable

    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    big, acc = run(big_tx, [batch]), run(acc_tx, halves)
    for k in big["added"]:
        assert not np.array_equal(np.asarray(big["added"][k]), np.asarray(peft.trainable["added"][k]))
        np.testing.assert_allclose(np.asarray(acc["added"][k]), np.asarray(big["added"][k]), atol=1e-6)


def test_schedule_warms_up_then_decays():
    cfg = get_config().train
    cfg.learning_rate, cfg.warmup_steps, cfg.schedule = 1.0, 10, "linear"
    _, sched = make_optimizer(cfg, 110)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.5) and float(sched(110)) == pytest.approx(0.0)
    cfg.schedule = "cosine"
    _, sched = make_optimizer(cfg, 110)
    assert float(sched(60)) == pytest.approx(0.5, abs=1e-6)
    cfg.schedule = "triangle"
    with pytest.raises(ValueError, match="train.schedule"):
        make_optimizer(cfg, 10)


def test_bf16_compute_trains(data_dir, tmp_path):
    config = tiny_config(data_dir, steps=4, dtype="bfloat16")
    result = train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(result["metrics"]["test"]["accuracy"])


@pytest.mark.parametrize("method,overrides", [
    ("fishmask", {"num_examples": 16, "keep_ratio": 0.05, "progress": False}),
    ("child_tuning_d", {"progress": False}),
    ("child_tuning_f", {}),
])
def test_selection_methods_train_through_the_loop(data_dir, tmp_path, method, overrides):
    """The loop hands Fisher methods the training rows and a per-example loss (InitContext)."""
    config = tiny_config(data_dir, method=method, steps=2, eval_every=2, checkpoint_every=2)
    for k, v in overrides.items():
        config.method[k] = v
    result = train_and_evaluate(config, str(tmp_path))
    assert all(np.isfinite(v) for v in result["metrics"]["test"].values())


def test_fishmask_more_examples_than_the_training_set_is_refused(data_dir, tmp_path):
    config = tiny_config(data_dir, method="fishmask", steps=2)
    config.method.num_examples = 65
    config.method.progress = False
    with pytest.raises(ValueError, match="num_examples=65 is larger than the training set"):
        train_and_evaluate(config, str(tmp_path))


def test_select_metric_chooses_the_best_step_and_is_validated(data_dir, tmp_path):
    """train.select_metric=macro_f1 (an imbalanced task's main metric) picks the best step by
    validation macro-F1; the sweep row records it as the metric its settings are chosen on."""
    from peftjax.grid.runner import _task_info
    from peftjax.train.compose import validate_config

    config = tiny_config(data_dir, steps=8, eval_every=2, select_metric="macro_f1", learning_rate=3e-3)
    result = train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
    val = [(r["step"], r["macro_f1"]) for r in rows if r.get("split") == "validation"]
    best = max(val, key=lambda sv: (sv[1], -sv[0]))   # the first step reaching the best macro-F1
    assert result["best_step"] == best[0] and result["metrics"]["validation"]["macro_f1"] == best[1]
    assert _task_info("tweet_sentiment", config.to_dict())["primary_metric"] == "macro_f1"
    assert _task_info("tweet_sentiment", {})["primary_metric"] == "accuracy"
    config.train.select_metric = "f1"
    with pytest.raises(ValueError, match=r"train.select_metric.*accuracy \| macro_f1"):
        validate_config(config)


def test_scan_layers_trains_as_the_unrolled_stack(data_dir, tmp_path):
    """train.scan_layers=True (one lax.scan over a decoder's layers) reaches the training loop:
    the same losses and validation scores as the unrolled stack; a non-bool value is refused;
    a sweep cell without the field keeps its id (False is the neutral default)."""
    from peftjax.grid import sweep

    runs = {}
    for scan in (False, True):
        config = tiny_config(data_dir, model="tiny-llama", steps=3, eval_every=3, scan_layers=scan)
        result = train_and_evaluate(config, str(tmp_path / str(scan)))
        losses = [r["loss"] for r in map(json.loads, open(tmp_path / str(scan) / "metrics.jsonl"))
                  if r.get("split") == "train"]
        runs[scan] = (losses, result["metrics"]["validation"])
    assert len(runs[True][0]) == 3
    np.testing.assert_allclose(runs[True][0], runs[False][0], atol=1e-5)
    assert runs[True][1]["accuracy"] == runs[False][1]["accuracy"]
    with pytest.raises(TypeError, match="scan_layers"):   # ml_collections keeps it a bool
        config.train.scan_layers = "yes"
    plain = get_config("model=tiny-llama,method=lora").to_dict()
    without = {**plain, "train": {k: v for k, v in plain["train"].items() if k != "scan_layers"}}
    assert sweep.cell_id(plain) == sweep.cell_id(without)
