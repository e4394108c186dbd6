"""A fast stand-in for training, for the runner tests: each cell "trains" for ``train.steps``
steps of ``FAKE_STEP_SECONDS`` seconds, checkpointing its step to ``celldir/progress`` and
resuming from it, as the real loop does. Variants listed in ``FAKE_FAIL_VARIANTS`` raise; those
in ``FAKE_CRASH_VARIANTS`` end their process at once (as a segfault or the OOM killer would);
cells at a learning rate ≥ ``FAKE_DIVERGE_FROM_LR`` diverge (NaN at step 2)."""

import os
import time


def cell(cell, celldir: str) -> dict:
    if cell.variant in os.environ.get("FAKE_FAIL_VARIANTS", "").split(","):
        raise RuntimeError(f"fake failure of {cell.variant}")
    lr = cell.config["train"]["learning_rate"]
    if lr >= float(os.environ.get("FAKE_DIVERGE_FROM_LR", "inf")):
        from peftjax.train import NonFiniteLossError

        raise NonFiniteLossError(f"loss is NaN at step 2 (lr={lr})", step=2)
    if cell.variant in os.environ.get("FAKE_CRASH_VARIANTS", "").split(","):
        os._exit(3)
    started = time.time()
    progress = os.path.join(celldir, "progress")
    start = int(open(progress).read()) if os.path.exists(progress) else 0
    with open(os.path.join(celldir, "starts"), "a") as f:  # one line per (re)start of the cell
        f.write(f"{start}\n")
    steps = cell.config["train"]["steps"]
    for step in range(start, steps):
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0")))
        tmp = progress + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(step + 1))
        os.replace(tmp, progress)
    score = 0.5 + 0.01 * cell.seed + 0.1 * cell.config["train"]["learning_rate"]
    return {"method": cell.method, "metrics": {"validation": {"accuracy": score, "macro_f1": score},
                                               "test": {"accuracy": score - 0.01, "macro_f1": score}},
            "trainable_params": 1000, "trainable_percent": 1.0, "step_time_s": 0.01,
            "peak_memory_bytes": 1e6, "config": cell.config, "resumed_from": start,
            "pid": os.getpid(), "started": started}
