"""peftjax.train.op_profile: a traced step's op time joined with its HLO."""

import jax
import jax.numpy as jnp

from peftjax.train import op_profile


def _compiled():
    f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(0) * 2.0)
    x, w = jnp.ones((256, 128)), jnp.ones((128, 64)) * 0.01
    return f.lower(x, w).compile(), (x, w)


def test_hlo_ops_find_the_matmul_and_its_source():
    compiled, _ = _compiled()
    ops = op_profile.hlo_ops(compiled.as_text())
    matmuls = [op for op in ops.values() if op["matmul"]]
    assert matmuls, ops
    assert any("dot_general" in op["source"] for op in matmuls)
    assert all(op["shape"].startswith(("f32", "(", "pred", "s32", "u32")) for op in ops.values())


def test_profile_attributes_the_step_to_its_ops(tmp_path):
    compiled, args = _compiled()
    prof = op_profile.profile(lambda: jax.block_until_ready(compiled(*args)), compiled, 3,
                              str(tmp_path / "trace"), top=5)
    ops = op_profile.hlo_ops(compiled.as_text())
    assert prof["steps"] == 3 and prof["trace"].endswith(".trace.json.gz")
    assert prof["op_ms_per_step"] > 0
    assert abs(sum(prof["by_kind_ms"].values()) - prof["op_ms_per_step"]) < 0.1
    assert prof["top"] and all(t["op"] in ops for t in prof["top"])
    assert prof["by_kind_ms"].get("matmul", 0) > 0


def test_summarize_counts_only_the_module_ops():
    hlo = ("HloModule m\n\n%fused_dot (p: f32[4,4]) -> f32[4,4] {\n"
           "  ROOT %dot.1 = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}\n}\n\n"
           "ENTRY %main (a: f32[4,4]) -> f32[4,4] {\n"
           "  %a = f32[4,4]{1,0} parameter(0)\n"
           '  %ynn_fusion.2 = f32[4,4]{1,0} fusion(%a), kind=kCustom, calls=%fused_dot, '
           'metadata={op_name="jit(f)/dot_general"}\n'
           "  ROOT %copy_fusion.7 = f32[4,4]{0,1} copy(%ynn_fusion.2)\n}\n")
    events = [{"ph": "X", "name": "ynn_fusion.2", "dur": 3000.0},
              {"ph": "X", "name": "copy_fusion.7", "dur": 1000.0},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000.0},
              {"ph": "i", "name": "ynn_fusion.2"}]
    s = op_profile.summarize(events, hlo, steps=2)
    assert s["op_ms_per_step"] == 2.0
    assert s["by_kind_ms"] == {"matmul": 1.5, "copy_fusion": 0.5}
    assert s["top"][0]["source"] == "jit(f)/dot_general" and s["top"][0]["matmul"]
