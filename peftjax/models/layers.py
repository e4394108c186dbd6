"""Building blocks shared by the model families, each calling its hook point.

Parameter names follow flax (``kernel`` of shape (in, out), ``scale``, ``bias``, ``embedding``);
module names follow Hugging Face, so a param path reads
``bert.encoder.layer.0.attention.self.query.kernel`` and PEFT target patterns carry over.
``peftjax.models.hf_io`` maps these names to the safetensors keys (``weight`` transposed).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models import hooks, quant, quant_matmul, threefry

Dtype = Any
Initializer = Callable[..., jax.Array]


def normal_init(std: float) -> Initializer:
    """Hugging Face initialises linear and embedding weights from N(0, initializer_range)."""
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """``y = x W + b`` whose output passes through the ``linear`` hook.

    The kernel and the input are cast to ``dtype`` (the compute dtype, e.g. bf16) while the
    stored parameter keeps ``param_dtype``.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = normal_init(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_variable("params", "kernel") and quant.is_quantized(
                stored := self.get_variable("params", "kernel")):
            return self._quantized(x, stored)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        y = dot_rows(x, kernel)
        if bias is not None:
            bias = bias.astype(self.dtype)
            y = y + bias
        return hooks.active().linear(self, x, y, kernel, bias)

    def _quantized(self, x: jax.Array, q: "quant.QuantizedTensor") -> jax.Array:
        """The layer on a quantized frozen kernel (``peftjax.models.quant``), dequantized in the
        compute dtype right before its matmul (``quantized_matmul``); the hooks receive the
        float kernel, so every method works on a quantized base unchanged."""
        expected = (x.shape[-1], self.features)
        if tuple(q.shape) != expected:
            raise ValueError(f"quantized kernel of {'.'.join(self.path)} has shape {q.shape}, "
                             f"the layer expects {expected}")
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x = x.astype(self.dtype)
        y = quantized_matmul(x, q)
        if bias is not None:
            bias = bias.astype(self.dtype)
            y = y + bias
        # For the hooks: computed only if a method reads it (XLA drops it otherwise), and not
        # before the layer's input exists (see quantized_matmul).
        kernel = quant.dequantize(q, self.dtype, trigger=x)
        return hooks.active().linear(self, x, y, kernel, bias)


def quantized_matmul(x: jax.Array, q: "quant.QuantizedTensor") -> jax.Array:
    """``x @ dequantize(q)`` in ``x``'s dtype, for a frozen quantized kernel.

    Why a custom VJP: the dequantized kernel depends on frozen values only, so autodiff would
    keep it from the forward pass for the backward's ``dy Wᵀ`` — every layer's float kernel
    alive at once, the memory the quantization was meant to save. Here the backward keeps the
    packed codes only and dequantizes again (what bitsandbytes' ``MatMul4Bit`` does). Each
    dequantization is made data-dependent on the value that needs it (the layer's input; in
    the backward, the output's cotangent: ``quant.after``), so that XLA neither computes them
    all at the start of the step nor merges the backward's with the forward's. The dependence
    enters at the packed codes, so the dequantize-matmul stays one fusable elementwise chain
    and nothing derived from the codes outlives its matmul (compiled, llama2-7b QLoRA: 8.9 GiB
    peak; with the dependence at the code table, XLA held every matrix's unpacked indices from
    forward to backward: 20.9 GiB).

    Compiled for a GPU, the product instead runs as one Pallas kernel that reads the packed
    codes (``quant_matmul``: XLA:GPU does not fuse the dequantization into its GEMM); its own
    custom VJP does the same for the backward.
    """
    mode = quant_matmul.mode_for(q)
    if mode != "xla":
        return quant_matmul.matmul(x, q, mode == "interpret")
    return _xla_quantized_matmul(x, q)


@jax.custom_vjp
def _xla_quantized_matmul(x: jax.Array, q: "quant.QuantizedTensor") -> jax.Array:
    return _quantized_matmul_fwd(x, q)[0]


def _quantized_matmul_fwd(x, q):
    return jnp.dot(x, quant.dequantize(q, x.dtype, trigger=x)), q


def _quantized_matmul_bwd(q, dy):
    dx = jnp.dot(dy, quant.dequantize(q, dy.dtype, trigger=dy).T)
    return dx, quant.zero_cotangents(q)


_xla_quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


class Embed(nn.Module):
    """Token (or position) embedding table; ``attend`` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Initializer = normal_init(0.02)

    def setup(self) -> None:
        self.embedding = self.param("embedding", self.embedding_init,
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        return dot_rows(h.astype(self.dtype), self.embedding.astype(self.dtype).T)


def dot_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x`` of any rank, computed on ``x`` flattened to rows: ``(…, n) @ (n, m)``.

    The same product as ``jnp.dot(x, w)``; why the reshape: the weight gradient autodiff derives
    from it is then one 2-D product ``x2ᵀ · dy2`` (rows × n)ᵀ · (rows × m). From the
    (batch, seq, n) form it is a dot_general contracting two axes, for which XLA:CPU's layout
    assignment materialises the cotangent transposed — a strided copy fused into the cotangent's
    producer — and runs the product outside its YNN kernels. Measured on 2 CPUs (AVX-512 host of
    experiments/speed; ``scripts/bench_dense_backward.py``): a (8, 128, 512) × (512, 1536)
    layer's backward behind a SiLU-gate cotangent, 43.4 ms from the 3-D form against 12.2 ms
    from the rows (dx and dW both); the small Llama's full fine-tuning step, 1.85 → 1.27 s.
    Only trained kernels pay it (a frozen kernel has no weight gradient), hence full
    fine-tuning's gap to PyTorch and not LoRA's.
    """
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def computed_once(x: jax.Array, finite: jax.Array) -> jax.Array:
    """``x`` unchanged, as a value XLA computes once and stores rather than recomputes in each
    consumer.

    Written ``x / (1 + 0·finite)`` with ``finite`` a finite array of ``x``'s shape: the divisor is
    exactly 1, so the result is bitwise ``x``. Why a divide: XLA's fusion (the CPU cost model
    above all) duplicates a producer into each of its consumer fusions when the producer is
    cheap (add, multiply, select, ...) and all consumers can fuse it; a floating-point divide
    counts as expensive and is never duplicated, so the value is written out once and a chain of
    cheap ops stops there. The divisor must be full-size and not a constant: XLA's algebraic
    simplifier folds a divide by a constant or by a broadcast into a multiply (and ``0·y`` is not
    folded for floats). ``jax.lax.optimization_barrier`` does not do this on CPU: the CPU pipeline
    drops barriers before fusion.
    """
    return x / (1.0 + 0.0 * finite.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis in fp32: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    A hand-written VJP (the standard closed form, e.g. Ba et al. 2016 / any LN backward):
    ``dx = (g - mean(g) - x̂ · mean(g · x̂)) / σ`` with ``g = dy · scale``. Autodiff of the forward
    produces a longer elementwise chain that XLA's CPU fusion duplicates into several consumers
    and recomputes; the closed form is fewer ops and fuses cleanly.

    ``dx`` leaves the backward through ``computed_once``. In a post-LN stack (BERT/RoBERTa)
    whose LayerNorm params are frozen (every method but full fine-tuning and the ones that train
    norms), the gradient flowing down the residual stream is elementwise from the head to the
    embeddings: LN backward, residual add, dropout backward (a select between ``dx`` and the
    next dense layer's ``dy Wᵀ``), with the GEMM outputs added in. XLA:CPU duplicates cheap
    elementwise producers into every consumer fusion, so without a materialised ``dx`` each
    layer's fusions recomputed the whole chain from the top layer down: quadratic in depth
    (unrolled MiniLM LoRA, 24 layers: 23.7 s compile, 2.84 s step against 1.29 s scanned). Full
    fine-tuning never showed it: its ``dscale``/``dbias`` reductions consume the gradient and
    force it into memory once per layer.
    """
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + epsilon)
    xhat = centered * inv
    y = (xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    return y, (xhat, inv, scale, bias)


def _layer_norm_bwd(epsilon, res, dy):
    xhat, inv, scale, bias = res
    dy32 = dy.astype(jnp.float32)
    g = dy32 * scale.astype(jnp.float32)
    dx = inv * (g - jnp.mean(g, axis=-1, keepdims=True)
                - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    reduce_axes = tuple(range(dy.ndim - 1))
    dscale = jnp.sum(dy32 * xhat, axis=reduce_axes).astype(scale.dtype)
    dbias = jnp.sum(dy32, axis=reduce_axes).astype(bias.dtype)
    dx = computed_once(dx, xhat)
    return dx.astype(dy.dtype), dscale, dbias  # y, hence dy, has x's dtype


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (as torch does for fp32 and autocast), params ``scale``/``bias``."""

    epsilon: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        return layer_norm(x.astype(self.dtype), scale, bias, self.epsilon)


class RMSNorm(nn.Module):
    """Llama's RMSNorm (Zhang & Sennrich 2019): ``x / rms(x) * scale``, statistics in fp32.

    Matches transformers' LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then
    multiply by the weight.
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def attention_weights_and_output(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                                 dropout: Callable[[jax.Array], jax.Array] | None = None,
                                 scale: float | None = None,
                                 bias: jax.Array | None = None,
                                 softcap: float | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    q ``(B, Q, H, D)``, k/v ``(B, K, KVH, D)`` with ``H % KVH == 0``, mask ``(B, 1|H, Q, K)`` bool
    (True = attend). Scores and softmax are computed in fp32. Grouped-query attention
    (Ainslie et al. 2023) shares each key/value head among ``H / KVH`` query heads; the
    reshape below computes it without materialising repeated keys. ``softcap`` (Gemma 2's
    attention-logit soft-capping) maps the scaled scores to ``c · tanh(s / c)`` before the mask.
    """
    b, ql, h, d = q.shape
    kvh = k.shape[2]
    groups = h // kvh
    scale = d ** -0.5 if scale is None else scale
    if groups == 1:
        # Plain multi-head attention keeps 4-D einsums: the grouped form's size-1 group axis
        # makes XLA:CPU lay the score and probability blocks out transposed and copy them back
        # (two extra passes over (B, H, Q, K) per layer, ~3 ms each at MiniLM's batch 32 x 64).
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    else:
        qg = q.reshape(b, ql, kvh, groups, d)
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k).astype(jnp.float32) * scale
        scores = scores.reshape(b, h, ql, k.shape[1])
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    if groups == 1:
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    probs = probs.reshape(b, kvh, groups, ql, k.shape[1])
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, ql, h, d)


def keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
    """A Bernoulli(1 - rate) keep mask from 16 random bits per element, and its exact keep rate.

    Why not ``jax.random.bernoulli``: it spends one threefry evaluation (64 bits) per element,
    and on CPU jax runs threefry as a rolled loop of five memory passes; in the MiniLM train step
    (batch 32 x 64, ~24M dropout draws) that was ~100 ms of a ~0.8 s LoRA step.
    ``threefry.uniform_bits16`` unrolls the hash into one fused pass and splits its words into
    16-bit draws (half an evaluation per draw).
    The keep probability is quantised to a multiple of 1/65536 (0.9 -> 0.899994); dividing by
    the returned exact rate keeps the expectation of the dropped-out activation exact.
    """
    threshold = min(max(round((1.0 - rate) * 65536), 1), 65535)
    return threefry.uniform_bits16(rng, shape) < jnp.uint16(threshold), threshold / 65536


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout with ``keep_mask``: kept entries scaled by 1 / keep rate, others zero."""
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    mask, keep = keep_mask(rng, x.shape, rate)
    # A multiply by the reciprocal, not a divide: the backward repeats it, and division is the
    # slowest elementwise op on CPU.
    return jnp.where(mask, x * jnp.asarray(1.0 / keep, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014) with the cheaper 16-bit keep masks of ``keep_mask``."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate <= 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU(x) = x Φ(x) with the exact normal CDF (Hendrycks & Gimpel 2016), BERT's ``"gelu"``.

    Written as PyTorch and transformers write it, ½x(1 + erf(x/√2)): XLA's float32 erf is one
    rational polynomial, where ``jax.nn.gelu(approximate=False)``'s erfc form evaluates two
    branches and an exp (~3× the forward time on CPU). The two differ only where GELU(x) is
    below ~1e-8 in magnitude (x < -5.5). The custom VJP writes the derivative in closed form,
    GELU'(x) = Φ(x) + x φ(x) with φ(x) = exp(-x²/2) / √(2π): one elementwise pass over the saved
    input, where autodiff of the formula re-evaluates erf and its derivative in separate passes
    (~12 ms per layer against ~2 ms for the forward in the MiniLM train step).
    """
    return _gelu_forward(x)


def _gelu_forward(x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * (2.0 ** -0.5)))).astype(x.dtype)


def _gelu_fwd(x):
    return _gelu_forward(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    # Φ(x) = ½(1 - erf(-x/√2)): written with the negated argument so that XLA does not merge it
    # with the forward's erf(x/√2) (common-subexpression elimination would then store erf for
    # the backward: two extra passes over the (tokens, 4·hidden) activations).
    cdf = 0.5 * (1.0 - jax.lax.erf(x32 * -(2.0 ** -0.5)))
    pdf = jnp.exp(-0.5 * x32 * x32) * (2.0 * math.pi) ** -0.5
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation by its Hugging Face ``hidden_act`` name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


# Rematerialisation (gradient checkpointing, Chen et al. 2016, "Training Deep Nets with Sublinear
# Memory Cost"): a transformer block wrapped in ``nn.remat`` keeps only its input for the backward
# pass and recomputes its forward inside it; a policy says which intermediates are kept anyway.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: every intermediate the backward pass needs is stored
    # keep nothing inside a block: one forward recomputation per block (~1/3 more FLOPs)
    "block": jax.checkpoint_policies.nothing_saveable,
    # keep the outputs of weight matmuls (dots without batch dims); recompute attention scores,
    # softmax, norms and activations (cheap elementwise work)
    "block_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_name(remat: bool | str) -> str:
    """The policy name of a ``remat`` setting (``True``/``False`` mean ``"block"``/``"none"``)."""
    if isinstance(remat, bool) or remat is None:
        return "block" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is invalid; valid: {', '.join(REMAT_POLICIES)} "
                         "(or True/False)")
    return remat


def remat_block(cls: type[nn.Module], remat: bool | str, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """``cls`` wrapped for rematerialisation under ``remat``'s policy (``cls`` itself for none).

    ``static_argnums`` counts ``self`` as 0, as ``nn.remat`` does (the ``train`` flag is static).
    """
    name = remat_name(remat)
    if name == "none":
        return cls
    return nn.remat(cls, static_argnums=static_argnums, policy=REMAT_POLICIES[name])


def last_valid_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the rightmost real token of each row (left or right padding)."""
    valid = attention_mask.astype(bool)
    return valid.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)


def last_token_score(h: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, num_labels: int,
                     dtype: Any, initializer_range: float) -> jax.Array:
    """The decoders' sequence-classification head: ``score`` (Linear, no bias) on the hidden state
    of each row's last real token (transformers' ``*ForSequenceClassification``). Call inside a
    compact ``__call__``: the Dense is named ``score`` in the caller's scope. ``h`` may carry
    positions in front of the input (virtual tokens of prompt tuning); they are dropped."""
    h = h[:, h.shape[1] - input_ids.shape[1]:]
    idx = last_valid_index(attention_mask)
    pooled = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
    return Dense(num_labels, use_bias=False, dtype=dtype, kernel_init=normal_init(initializer_range),
                 name="score")(pooled)
