"""peftjax.host: the CPU a timing ran on, named so that machines of one kind share a label."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftjax import host
from tests.helpers import ROOT

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
cpu MHz\t\t: 2445.422
flags\t\t: fpu sse4_2 avx fma avx2 bmi2

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu avx512f
"""
SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
stepping\t: 8
flags\t\t: fpu sse4_2 avx fma avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_cpu_reads_the_first_processor(tmp_path):
    info = host.cpu(write(tmp_path, ZEN3))
    assert (info["vendor"], info["family"], info["model"], info["stepping"]) == ("AuthenticAMD", 25, 1, 1)
    assert info["model_name"] == "AMD EPYC" and info["mhz"] == pytest.approx(2445.422)
    # Only the first processor's flags: the second block's avx512f is not this CPU's (listed in ISA order).
    assert info["isa"] == ["sse4_2", "avx", "avx2", "fma"]
    assert info["cpus"] == host.cpus() >= 1


def test_labels_tell_generations_and_isas_apart(tmp_path):
    zen3 = host.label(host.cpu(write(tmp_path, ZEN3)))
    spr = host.label(host.cpu(write(tmp_path, SAPPHIRE)))
    n = host.cpus()
    assert zen3 == f"amd-epyc-f25m1-avx2-{n}cpu"
    assert spr == f"intel-xeon-platinum-8481c-f6m143-amx-{n}cpu"
    # Without /proc/cpuinfo (macOS): still a label, from the platform.
    bare = host.cpu(str(tmp_path / "missing"))
    assert bare["isa"] is None and host.label(bare).endswith(f"-{n}cpu")


def test_cli_prints_the_label_run_sh_names_its_folder_with():
    env = {**os.environ, "PYTHONPATH": ROOT}
    label = subprocess.run([sys.executable, "-m", "peftjax.host", "--label"], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert label == host.label()


def test_describe_records_the_cpu_and_a_measured_matmul_rate():
    described = host.describe(measure=False)
    assert described["cpu"] == host.cpu() and described["label"] == host.label()
    assert "xla_matmul_gflops" not in described
    assert host.matmul_gflops(n=256, repeats=2) > 0
    json.dumps(described)   # goes into benchmark JSONs as it is
