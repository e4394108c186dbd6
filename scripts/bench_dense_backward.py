"""One dense layer's backward (dx and the weight gradient) in the two forms of its product.

    python scripts/bench_dense_backward.py --rows=8,128 --features=512,1536

``x @ W`` on a (batch, seq, n) input against ``peftjax.models.layers.dot_rows`` (the input
flattened to rows), each under a SiLU-gated cotangent as in a Llama MLP (the elementwise
producer XLA fuses the layout change into). Prints a JSON object: per form, the median time of the
jitted backward, and the number of arrays in its optimized HLO of the transposed cotangent's
shape (out, rows) — the strided copies the rows form avoids (issue 22; experiments/speed).
"""

import json

import _bootstrap
from absl import flags

flags.DEFINE_list("rows", ["8", "128"], "leading dims of the input (batch, seq)")
flags.DEFINE_list("features", ["512", "1536"], "in and out features of the kernel")
flags.DEFINE_integer("steps", 30, "timed calls per form (median)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import math
    import re

    import jax
    import jax.numpy as jnp

    from peftjax import host
    from peftjax.models.layers import dot_rows
    from peftjax.train import measure

    lead = tuple(int(d) for d in FLAGS.rows)
    n, m = (int(d) for d in FLAGS.features)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (*lead, n))
    w = jax.random.normal(keys[1], (n, m)) * n ** -0.5
    up, gate, res = (jax.random.normal(k, (*lead, m)) for k in keys[2:])

    def cotangent(up, gate, res):   # d/dgate of up * silu(gate), times the incoming gradient
        s = jax.nn.sigmoid(gate)
        return res * up * s + res * up * gate * s * (1 - s)

    rows = math.prod(lead)
    out = {"host": host.label(), "input": [*lead, n], "kernel": [n, m], "forms": {}}
    for name, product in (("jnp.dot", jnp.dot), ("dot_rows", dot_rows)):
        def backward(x, w, up, gate, res, product=product):
            _, vjp = jax.vjp(product, x, w)
            return vjp(cotangent(up, gate, res))

        compiled = jax.jit(backward).lower(x, w, up, gate, res).compile()
        transposed = len(re.findall(rf"= f32\[{m},({rows}|{','.join(map(str, lead))})\]",
                                    compiled.as_text()))

        def call(compiled=compiled):
            jax.block_until_ready(compiled(x, w, up, gate, res))

        times = measure.time_calls(call, FLAGS.steps, warmup=3)
        out["forms"][name] = {"backward_ms": round(1e3 * measure.median(times), 2),
                              "transposed_cotangent_arrays": transposed}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)
