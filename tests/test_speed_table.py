"""experiments/speed/make_table.py: the committed runs load per host, and every train-step row
reaches the table with its host's CPU line (the speed README is this script's output)."""

from __future__ import annotations

import os

from tests.helpers import ROOT, load_file_module

SPEED = os.path.join(ROOT, "experiments", "speed")


def make_table():
    return load_file_module("experiments/speed/make_table.py", "make_table")


def test_each_host_folder_gives_its_tables_and_cpu_line(tmp_path):
    mt = make_table()
    hosts = mt.hosts()
    assert "cpu-unrecorded" in hosts and len(hosts) >= 2
    by_host = {}
    for name in hosts:
        steps, decoding, scans, machines = mt.load(os.path.join(mt.RUNS, name))
        assert steps, f"{name}: no train-step runs"
        line = mt.describe_host(name, machines, steps)
        if name == "cpu-unrecorded":
            assert not machines and "CPU not recorded" in line
        else:   # a recorded host: its folder is named by the label of the CPU its runs recorded
            from peftjax import host

            assert {host.label(m["cpu"]) for m in machines} == {name}
            assert "XLA" in line and "PyTorch" in line
        table = mt.tables(steps, decoding, scans)
        rows = [r for r in table.splitlines() if " × " in r and not r.startswith("| model")]
        assert len(rows) == len(steps)
        by_host[name] = steps
    mt.plot(by_host, str(tmp_path / "ratios.png"))
    assert (tmp_path / "ratios.png").stat().st_size > 0
