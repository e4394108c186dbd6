"""Report building blocks: the kill-safe results store and the rank-allocation heat map."""

import json

from peftjax.grid import ResultsStore, markdown_table, rank_allocation_heatmap
from peftjax.grid.plots import split_site


def test_store_ignores_and_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"cell": "a", "x": 1}\n{"cell": "b", "x"')  # killed mid-write
    store = ResultsStore(str(path))
    assert store.done() == {"a"}
    store.append({"cell": "c", "x": 3})
    assert [r["cell"] for r in store.read()] == ["a", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_markdown_table_formats_nested_fields():
    rows = [{"method": "lora", "metrics": {"test": {"accuracy": 0.731}}},
            {"method": "full", "metrics": {"test": {}}}]
    table = markdown_table(rows, [("method", "method", str),
                                  ("acc", "metrics.test.accuracy", lambda v: f"{100 * v:.1f}")])
    assert table.splitlines()[2] == "| lora | 73.1 |" and table.splitlines()[3] == "| full | n/a |"


def test_rank_heatmap_writes_png_and_pdf(tmp_path):
    ranks = {f"bert.encoder.layer.{i}.attention.self.{m}": (i + j) % 5
             for i in range(3) for j, m in enumerate(("query", "value"))}
    paths = rank_allocation_heatmap(ranks, str(tmp_path / "ranks"))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "pdf"]
    assert all((tmp_path / f"ranks.{e}").stat().st_size > 1000 for e in ("png", "pdf"))
    assert split_site("model.layers.12.mlp.up_proj") == (12, "mlp.up_proj")
