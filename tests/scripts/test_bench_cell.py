"""scripts/bench_cell.py: one sweep cell's train step and whole-split validation, timed.

Timings are noise on a shared machine: what is checked is that the cell is built as the sweep
builds it (its label and id), that every figure is there and consistent, and that a --cell
matching several cells is refused with their labels. Both are ``slow`` (a benchmark's smoke runs,
an interpreter each); ``make test`` checks the cell lookup (``sweep.find_cell``) in-process, in
tests/grid/test_sweep.py.
"""

import json
import textwrap

import pytest

from peftjax.grid import sweep
from tests.helpers import run_script

GRID = textwrap.dedent('''
    def get_config():
        return {"name": "bench_cell", "models": ["tiny-bert"], "tasks": ["tweet_sentiment"],
                "seeds": [0],
                "base": {"train": {"steps": 8, "eval_every": 4, "batch_size": 8, "eval_batch_size": 16,
                                   "train_limit": 64, "eval_limit": 40, "group_by_length": 4,
                                   "bucket_multiple": 8}},
                "variants": {"lora": {"method": "lora",
                                      "grid": {"train": {"learning_rate": [1e-3, 3e-3]}}}}}
''')


def bench(grid, *args):
    return run_script("bench_cell.py", f"--config={grid}", *args)


@pytest.fixture()
def grid(tmp_path):
    path = tmp_path / "grid.py"
    path.write_text(GRID)
    return str(path)


@pytest.mark.slow
def test_a_cell_that_matches_none_or_several_is_refused_with_the_labels(grid):
    proc = bench(grid, "--cell=lora[")   # both learning rates
    assert proc.returncode == 2
    assert "matches 2 cells" in proc.stderr and "learning_rate=0.003" in proc.stderr


@pytest.mark.slow
def test_times_the_cells_step_and_validation(grid):
    proc = bench(grid, "--cell=learning_rate=0.001", "--steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    (cell,) = [c for c in sweep.expand(sweep.load_definition(grid)) if "0.001" in c.label]
    assert out["cell"] == cell.label and out["cell_id"] == cell.id
    train, val = out["train"], out["validation"]
    assert train["steps_timed"] == len(train["step_s_all"]) == 3 and train["step_s"] > 0
    assert train["tokens_per_s"] > 0 and train["gflops_per_s"] > 0 and train["compile_s"] > 0
    assert all(s[0] == 8 and s[1] % 8 == 0 for s in train["shapes"])   # batch 8, buckets of 8
    assert val["rows"] == 40 and val["seconds"] > 0 and val["padded_tokens"] % 16 == 0
    assert 0.0 <= val["metrics"]["accuracy"] <= 1.0 and val["gflops_per_s"] > 0
    assert out["cell_estimate_s"] == pytest.approx(8 * train["step_s"] + 2 * val["seconds"], abs=0.2)
