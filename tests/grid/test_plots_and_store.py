"""Report building blocks: the kill-safe results store, the rank-allocation heat map and the
score-vs-parameters plot."""

import json
import os

import numpy as np

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


def _kept_figure(monkeypatch, draw):
    """``(draw(), its figure)``: a plots function closes its figure once saved; this keeps it
    open so a test can inspect what was drawn (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    out = draw()
    monkeypatch.undo()
    (fig,) = closed
    return out, fig


def test_score_axis_breaks_only_at_a_gap_wider_than_half_the_range():
    from peftjax.grid.plots import _axis_break

    # A class-prior baseline 40 points below the methods: broken between it and the rest.
    assert _axis_break([81.6, 81.5, 80.0, 74.1, 68.1, 42.9]) == (42.9, 68.1)
    assert _axis_break([81.6, 80.0, 76.0, 72.0]) is None   # no gap that wide
    assert _axis_break([80.0, 40.0]) is None               # two points: nothing to squeeze


def test_crowded_labels_do_not_overlap(tmp_path, monkeypatch):
    """Twenty methods within two points of each other (a comparison's usual top cluster) and a
    far baseline: every label stays inside its panel and clear of every other label."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from peftjax.grid import plots

    rng = np.random.default_rng(0)
    points = [{"label": f"method_{i}", "params": float(10 ** rng.uniform(4, 7)),
               "mean": float(80 + 2 * rng.random()), "std": 0.3} for i in range(20)]
    points.append({"label": "majority", "params": 0, "mean": 42.9, "std": 0.0})
    paths, fig = _kept_figure(monkeypatch, lambda: plots.score_vs_params(
        points, str(tmp_path / "pareto"), ylabel="acc", title="t"))
    assert sorted(os.path.basename(p) for p in paths) == ["pareto.pdf", "pareto.png"]
    fig.canvas.draw()   # the last draw was the PDF's, shifted to its tight bounding box
    renderer = fig.canvas.get_renderer()
    top, bottom = fig.axes[:2]              # the break put the prior in a panel of its own
    assert bottom.get_ylim()[1] < 80 < top.get_ylim()[0] + 5
    boxes = []
    for ax in (top, bottom):
        frame = ax.get_window_extent(renderer)
        for t in ax.texts:
            b = Text.get_window_extent(t, renderer)   # the words, not the leader line
            assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
            boxes.append((t.get_text(), b))
    assert sorted(name for name, _ in boxes) == sorted(p["label"] for p in points)
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            assert not ba.overlaps(bb), (a, b)
    plt.close(fig)


def test_every_series_of_a_long_legend_has_its_own_line():
    from peftjax.grid.plots import line_style

    styles = [line_style(i) for i in range(40)]
    keys = {(s["color"], s["linestyle"], s["marker"]) for s in styles}
    assert len(keys) == 40
    assert styles[0]["color"] == styles[10]["color"] and styles[0]["linestyle"] != styles[10]["linestyle"]


def test_bars_leave_out_labels_without_a_value(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from peftjax.grid import plots

    _, fig = _kept_figure(monkeypatch, lambda: plots.grouped_bars(
        ["full", "lora", "majority"], {"a": [2.0, 1.0, None], "b": [None, 1.5, None]},
        str(tmp_path / "bars"), ylabel="MB"))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["full", "lora"]
    plt.close(fig)


def test_curves_take_a_style_per_series(tmp_path, monkeypatch):
    """The convergence plot draws a method's two runs in one colour, the long one dashed."""
    import matplotlib.pyplot as plt

    from peftjax.grid import plots

    _, fig = _kept_figure(monkeypatch, lambda: plots.curves(
        {"a, 4 steps": ([1, 2], [0.5, 0.6], [0, 0]), "a, 16 steps": ([1, 2], [0.4, 0.7], [0, 0])},
        str(tmp_path / "c"), xlabel="step", ylabel="acc",
        styles={"a, 4 steps": {"color": "red"}, "a, 16 steps": {"color": "red", "linestyle": "--"}}))
    short, long = fig.axes[0].get_lines()
    assert short.get_color() == long.get_color() == "red"
    assert (short.get_linestyle(), long.get_linestyle()) == ("-", "--")
    plt.close(fig)


def test_small_multiples_floor_keeps_a_collapse_from_flattening_the_rest(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from peftjax.grid import plots

    panels = {"lora": {"x": [3e-4, 1e-3, 3e-3], "y": [78.8, 80.4, 76.3], "chosen": 1e-3, "note": ""},
              "lora_qv": {"x": [3e-4, 1e-3, 1e-2], "y": [75.9, 78.6, 45.3], "chosen": 1e-3, "note": "2 of 3"}}
    paths, fig = _kept_figure(monkeypatch, lambda: plots.small_multiples(
        panels, str(tmp_path / "s"), xlabel="lr", ylabel="acc", floor=65.4))
    assert len(paths) == 2
    low, high = fig.axes[0].get_ylim()
    assert 64 < low < 65.4 and high > 80.4          # the collapse at 45 is not in the range...
    qv = fig.axes[1]
    assert "45" in [t.get_text() for t in qv.texts]  # ...but marked on the floor with its value
    plt.close(fig)
