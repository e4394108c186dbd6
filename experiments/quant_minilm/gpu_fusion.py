"""Does XLA:GPU fuse peftjax's dequantization into the matmul? One 4096 × 4096 layer, compiled for
an H100 on a machine without one (peftjax/gpu_target.py; needs `make gpu-aot`):

    XLA_FLAGS=--xla_gpu_autotune_level=0 python experiments/quant_minilm/gpu_fusion.py

prints, per variant of ``x @ kernel`` (x: 512 × 4096 bf16), the fusions of the compiled program's
entry computation and its temporary bytes. A kernel fused into the GEMM leaves one fusion (the
``__triton_*gemm`` one) and no 32 MiB bf16 kernel among the temporaries. Add
``--xla_gpu_experimental_enable_subchannel_dequantisation_fusion=true`` to XLA_FLAGS for XLA's
experimental pass that fuses per-block scales (gpu_fusion_h100_subchannel.txt).

The last rows are peftjax's own fused kernel (peftjax/models/quant_matmul.py, a Pallas Triton
kernel that reads the packed codes): one custom call per product, forward and backward, and no
float kernel among the temporaries.
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from peftjax.gpu_target import compiling_for, placed, target_device  # noqa: E402  (before JAX starts its backends)

DEVICE = target_device("h100")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from peftjax.models import quant, quant_matmul  # noqa: E402

N = 4096


def report(name: str, fn, *args) -> None:
    with compiling_for(DEVICE):  # quant_matmul's "auto" follows the target
        compiled = jax.jit(fn).lower(*placed(args, DEVICE)).compile()
    text = compiled.as_text()
    entry = text[text.index("ENTRY"):]
    fusions = re.findall(r"%([\w.]+) = (\S+) fusion\(", entry)
    kernels = re.findall(r"%([\w.]+) = (\S+) custom-call\(.*?custom_call_target=\"([^\"]+)\"", entry)
    temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
    print(f"{name}: temporaries {temp:.0f} MiB; fusions: "
          + ", ".join(f"{n} -> {shape}" for n, shape in fusions)
          + "".join(f"; custom call {n} ({target}) -> {shape}" for n, shape, target in kernels))


def main() -> None:
    x = jax.ShapeDtypeStruct((512, N), jnp.bfloat16)
    w8 = jax.ShapeDtypeStruct((N, N), jnp.int8)
    scale = jax.ShapeDtypeStruct((N,), jnp.float32)
    report("int8 -> bf16 convert only", lambda w, x: x @ w.astype(jnp.bfloat16), w8, x)
    report("int8 -> bf16 times a constant", lambda w, x: x @ (w.astype(jnp.bfloat16) * 3.0), w8, x)
    report("int8 times a per-channel scale", lambda w, s, x: x @ (w.astype(jnp.float32) * s).astype(jnp.bfloat16),
           w8, scale, x)
    # per-block scales (64 rows each, as NF4's absmaxes), the product in bf16 or in f32
    wb = jax.ShapeDtypeStruct((N // 64, 64, N), jnp.int8)
    report("int8 times per-block scales, product in bf16",
           lambda w, s, x: x @ (w.astype(jnp.bfloat16) * s).reshape(N, N),
           wb, jax.ShapeDtypeStruct((N // 64, 1, N), jnp.bfloat16), x)
    report("int8 times per-block scales, product in f32",
           lambda w, s, x: x @ (w.astype(jnp.float32) * s).astype(jnp.bfloat16).reshape(N, N),
           wb, jax.ShapeDtypeStruct((N // 64, 1, N), jnp.float32), x)
    for kind in ("int8", "nf4"):
        q = quant.abstract(quant.quantize(jnp.zeros((N, N), jnp.float32) + 0.01, kind, double_quant=True))
        report(f"peftjax quant.dequantize ({kind})",
               lambda q, x: x @ quant.dequantize(q, jnp.bfloat16, trigger=x), q, x)
    dy = jax.ShapeDtypeStruct((512, N), jnp.bfloat16)
    for kind in ("int8", "nf4"):
        q = quant.abstract(quant.quantize(jnp.zeros((N, N), jnp.float32) + 0.01, kind, double_quant=True))
        report(f"peftjax fused kernel ({kind})", lambda q, x: quant_matmul.matmul(x, q), q, x)

        def forward_backward(q, x, dy):
            y, vjp = jax.vjp(lambda x: quant_matmul.matmul(x, q), x)
            return y, vjp(dy)[0]

        report(f"peftjax fused kernel ({kind}), forward and input gradient", forward_backward, q, x, dy)


if __name__ == "__main__":
    main()
