"""Mixture-of-experts feed-forward blocks: a top-k router and stacked SwiGLU experts.

A sparse MoE layer (Shazeer et al. 2017, "Outrageously large neural networks"; Fedus et al. 2022,
"Switch Transformers"; Jiang et al. 2024, "Mixtral of experts"; Qwen3 report §2) replaces the
dense FFN by ``E`` expert FFNs and a linear router. For a token ``x``::

    p = softmax(x W_router)                     (E probabilities, fp32)
    S = top-k indices of p,  w_e = p_e  (or p_e / Σ_{e'∈S} p_e' when the family renormalises)
    y = Σ_{e ∈ S} w_e · down_e(act(gate_e(x)) ⊙ up_e(x))

as transformers' ``Qwen3MoeSparseMoeBlock`` computes it (softmax in float32, ``torch.topk``,
``norm_topk_prob``, weights cast back to the compute dtype, applied after ``down_proj``).

Why stacked params and grouped matmuls: the experts' weights are single ``(E, in, out)`` arrays
(transformers v5 stores them as ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``;
here in the flax kernel layout, ``(E, H, 2I)`` and ``(E, I, H)``). The ``T·k`` (token, expert)
pairs are sorted by expert and each expert's rows multiplied by its matrix in one
``jax.lax.ragged_dot`` (a grouped GEMM): no Python loop over experts, no compute for experts a
token is not routed to, static shapes under jit, and expert-parallel sharding of the stacked
axis (on the CPU backend a scan over expert-owned row tiles instead: ``grouped_matmul``). Each product passes through the ``grouped_linear`` hook, so LoRA can adapt an expert
matrix with per-expert factors (PEFT's ``target_parameters``); the router is an ordinary
``Dense`` (``mlp.gate``) and takes every ``linear`` method.

The auxiliary load-balancing loss (Switch Transformers eqs. 4-6, as transformers'
``load_balancing_loss_func``) is available to training: each sparse layer sows its router logits
(collection ``ROUTER_LOGITS``) and ``load_balancing_loss`` turns them into
``E · Σ_e f_e P_e``, ``f_e`` the fraction of top-k assignments and ``P_e`` the mean router
probability of expert ``e`` over all layers' real tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.gpu_target import compile_platform
from peftjax.models import hooks, quant, quant_matmul
from peftjax.models.layers import Dense, activation, normal_init

ROUTER_LOGITS = "router_logits"   # the flax collection the sparse layers sow their logits into
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """``(weights, experts)``, both ``(T, top_k)``: the top-k experts of each token by softmax
    probability (fp32) and their weights (renormalised to sum to 1 when ``normalize``), cast to
    the logits' dtype."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(logits.dtype), experts


# How a grouped matmul is computed: "auto" = ``ragged_dot`` on accelerators, ``tiled`` on the CPU
# (whose ragged_dot is a masked product over every expert); tests set the others explicitly.
GROUPED_MATMUL = "auto"


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows of ``x`` (sorted by expert; ``group_sizes[e]`` rows of expert ``e``) times their
    expert's ``w[e]``: ``jax.lax.ragged_dot``, or ``tiled_grouped_matmul`` when the program is
    compiled for the CPU (``gpu_target.compile_platform``: a deviceless GPU compile on a CPU host
    traces the grouped GEMM).

    Why two: XLA's GPU/TPU backends lower ``ragged_dot`` to a grouped GEMM, while the CPU
    lowers it to a masked product over all experts (measured, 4,096 rows × 128 experts,
    2048 → 1536: 128× the FLOPs and 5.9 GB of temporaries, 12.3 GB with the gradient). The
    tiled form costs at most ~2× the grouped FLOPs and 0.12 GB there; both agree to float
    rounding (tests)."""
    mode = GROUPED_MATMUL
    if mode == "auto":
        mode = "tiled" if compile_platform() == "cpu" else "ragged_dot"
    if mode == "tiled":
        return tiled_grouped_matmul(x, w, group_sizes)
    if mode != "ragged_dot":
        raise ValueError(f"GROUPED_MATMUL={GROUPED_MATMUL!r}; valid: auto, ragged_dot, tiled")
    return jax.lax.ragged_dot(x, w, group_sizes)


def tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                         tile: int | None = None) -> jax.Array:
    """The grouped matmul as a scan over row tiles that each belong to one expert.

    Each expert's rows are padded to whole tiles of ``tile`` rows (static: at most
    ``ceil(R / tile) + E`` tiles, so shapes stay static); each tile is multiplied by its
    expert's matrix, read with a dynamic index inside the scan (no per-tile copy of the
    weights), and the rows are gathered back. ``tile`` defaults to the power of two nearest the
    mean group size, clipped to 8..128, which bounds the padding by ~one tile per expert.

    A custom VJP: autodiff through the scan would keep every tile's weight slice for the
    backward (for Qwen3-30B-A3B, ~3 GB per expert matmul); here the backward reads ``w`` again,
    ``dx`` in one scan and ``dw`` (accumulated per expert) in another, which XLA drops when the
    experts are frozen.
    """
    if tile is None:
        tile = int(min(128, max(8, 2 ** math.ceil(math.log2(max(1.0, x.shape[0] / w.shape[0]))))))
    return _tiled(x, w, group_sizes, tile)


def _tile_layout(group_sizes: jax.Array, rows: int, experts: int, tile: int):
    """(gather index and validity of each padded slot, each tile's expert, each row's slot)."""
    n_tiles = -(-rows // tile) + experts
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    padded = -(-sizes // tile) * tile
    padded_starts = jnp.cumsum(padded) - padded
    slot = jnp.arange(n_tiles * tile, dtype=jnp.int32)
    owner = jnp.clip(jnp.searchsorted(padded_starts, slot, side="right") - 1, 0, experts - 1)
    local = slot - padded_starts[owner]
    valid = local < sizes[owner]
    source = jnp.where(valid, starts[owner] + local, 0)
    row = jnp.arange(rows, dtype=jnp.int32)
    expert_of = jnp.clip(jnp.searchsorted(starts + sizes, row, side="right"), 0, experts - 1)
    back = padded_starts[expert_of] + row - starts[expert_of]
    return n_tiles, source, valid, owner.reshape(n_tiles, tile)[:, 0], back


def _to_tiles(a: jax.Array, source, valid, n_tiles: int, tile: int) -> jax.Array:
    return jnp.where(valid[:, None], a[source], 0).reshape(n_tiles, tile, a.shape[-1])


def _tile_products(tiles: jax.Array, w: jax.Array, tile_expert: jax.Array, transpose: bool) -> jax.Array:
    def one(_, inputs):
        t, e = inputs
        we = jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)
        return None, (t @ we.T if transpose else t @ we)

    return jax.lax.scan(one, None, (tiles, tile_expert))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(x, w, group_sizes, tile):
    return _tiled_fwd(x, w, group_sizes, tile)[0]


def _tiled_fwd(x, w, group_sizes, tile):
    n_tiles, source, valid, tile_expert, back = _tile_layout(group_sizes, x.shape[0], w.shape[0], tile)
    out = _tile_products(_to_tiles(x, source, valid, n_tiles, tile), w, tile_expert, False)
    return out.reshape(n_tiles * tile, w.shape[2])[back], (x, w, group_sizes)


def _tiled_bwd(tile, res, dy):
    x, w, group_sizes = res
    n_tiles, source, valid, tile_expert, back = _tile_layout(group_sizes, x.shape[0], w.shape[0], tile)
    dy_tiles = _to_tiles(dy, source, valid, n_tiles, tile)
    dx = _tile_products(dy_tiles, w, tile_expert, True).reshape(n_tiles * tile, w.shape[1])[back]
    x_tiles = _to_tiles(x, source, valid, n_tiles, tile)

    def accumulate(dw, inputs):
        xt, dyt, e = inputs
        current = jax.lax.dynamic_index_in_dim(dw, e, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(dw, current + xt.T @ dyt, e, 0), None

    dw = jax.lax.scan(accumulate, jnp.zeros_like(w), (x_tiles, dy_tiles, tile_expert))[0]
    return dx.astype(x.dtype), dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def grouped_linear(module: nn.Module, name: str, x: jax.Array, kernel: Any,
                   group_sizes: jax.Array) -> jax.Array:
    """``x``'s rows (sorted by expert) times their expert's ``kernel`` slice, through the hook.
    A quantized frozen stack (``quant.QuantizedTensor``, QLoRA on a MoE) is dequantized in the
    compute dtype right at its matmul (``quantized_grouped_matmul``); the hook sees floats."""
    if quant.is_quantized(kernel):
        y = quantized_grouped_matmul(x, kernel, group_sizes)
        kernel = quant.dequantize(kernel, x.dtype, trigger=x)   # for a hook that reads it
    else:
        kernel = kernel.astype(x.dtype)
        y = grouped_matmul(x, kernel, group_sizes)
    return hooks.active().grouped_linear(module, name, x, y, kernel, group_sizes)


def quantized_grouped_matmul(x: jax.Array, q: Any, group_sizes: jax.Array) -> jax.Array:
    """``ragged_dot(x, dequantize(q))`` for a quantized expert stack: compiled for a GPU, the
    fused kernel (``quant_matmul``) on the rows in tiles of one expert each, reading each
    expert's packed codes; elsewhere XLA's path, whose backward dequantizes again instead of
    keeping the float expert stack from the forward (``layers.quantized_matmul``'s reasoning:
    otherwise every layer's dequantized experts would live until the backward)."""
    mode = quant_matmul.mode_for(q)
    if mode != "xla":
        return _fused_grouped(x, q, group_sizes, mode == "interpret")
    return _xla_quantized_grouped(x, q, group_sizes)


def _fused_tile(rows: int, experts: int) -> int:
    """Rows per tile of the fused grouped kernel: the power of two nearest the mean group size,
    16..64 (16: Triton's smallest dot; 64: the 2-D kernel's row tile)."""
    return int(min(64, max(16, 2 ** math.ceil(math.log2(max(1.0, rows / experts))))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_grouped(x, q, group_sizes, interpret):
    return _fused_grouped_fwd(x, q, group_sizes, interpret)[0]


def _fused_grouped_products(a, q, group_sizes, interpret, transpose):
    tile = _fused_tile(a.shape[0], q.shape[0])
    n_tiles, source, valid, tile_expert, back = _tile_layout(group_sizes, a.shape[0], q.shape[0], tile)
    tiles = _to_tiles(a, source, valid, n_tiles, tile).reshape(n_tiles * tile, a.shape[1])
    run = quant_matmul.backward if transpose else quant_matmul.forward
    out = run(tiles, q, quant_matmul.scales_of(q, a), experts=tile_expert, tile=tile,
              interpret=interpret)
    return out[back]


def _fused_grouped_fwd(x, q, group_sizes, interpret):
    return _fused_grouped_products(x, q, group_sizes, interpret, False), (q, group_sizes)


def _fused_grouped_bwd(interpret, res, dy):
    q, group_sizes = res
    dx = _fused_grouped_products(dy, q, group_sizes, interpret, True)
    return dx, quant.zero_cotangents(q), np.zeros(group_sizes.shape, jax.dtypes.float0)


_fused_grouped.defvjp(_fused_grouped_fwd, _fused_grouped_bwd)


@jax.custom_vjp
def _xla_quantized_grouped(x: jax.Array, q: Any, group_sizes: jax.Array) -> jax.Array:
    return _qgm_fwd(x, q, group_sizes)[0]


def _qgm_fwd(x, q, group_sizes):
    y = grouped_matmul(x, quant.dequantize(q, x.dtype, trigger=x), group_sizes)
    return y, (q, group_sizes)


def _qgm_bwd(res, dy):
    q, group_sizes = res
    w = quant.dequantize(q, dy.dtype, trigger=dy)
    dx = grouped_matmul(dy, jnp.swapaxes(w, 1, 2), group_sizes)
    return (dx, quant.zero_cotangents(q),
            np.zeros(group_sizes.shape, jax.dtypes.float0))


_xla_quantized_grouped.defvjp(_qgm_fwd, _qgm_bwd)


class StackedExperts(nn.Module):
    """``E`` SwiGLU experts as two stacked params (Hugging Face's names, flax's layout):
    ``gate_up_proj`` ``(E, hidden, 2·intermediate)`` (gate columns first, then up) and
    ``down_proj`` ``(E, intermediate, hidden)``."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    hidden_act: str = "silu"
    dtype: Any = jnp.float32
    initializer_range: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        init = normal_init(self.initializer_range)

        def stacked(name: str, shape: tuple[int, ...]):
            if self.has_variable("params", name) and quant.is_quantized(
                    stored := self.get_variable("params", name)):
                if tuple(stored.shape) != shape:
                    raise ValueError(f"quantized {'.'.join(self.path)}.{name} has shape "
                                     f"{stored.shape}, the layer expects {shape}")
                return stored
            return self.param(name, init, shape, jnp.float32)

        gate_up = stacked("gate_up_proj", (e, h, 2 * i))
        down = stacked("down_proj", (e, i, h))
        x = x.astype(self.dtype)
        gu = grouped_linear(self, "gate_up_proj", x, gate_up, group_sizes)
        z = activation(self.hidden_act)(gu[:, :i]) * gu[:, i:]
        return grouped_linear(self, "down_proj", z, down, group_sizes)


def sparse_moe(module: nn.Module, x: jax.Array, *, num_experts: int, top_k: int,
               intermediate_size: int, normalize: bool, hidden_act: str, dtype: Any,
               initializer_range: float) -> jax.Array:
    """The sparse MoE FFN, ``(B, L, H) -> (B, L, H)``, built in ``module``'s compact scope (its
    children are the router ``gate``, a bias-free Dense to ``E`` logits, and ``experts``).

    Every token is routed, padding included (as transformers does; padded positions never reach
    a real token's output). Sows the router logits ``(B·L, E)`` into ``ROUTER_LOGITS``.
    """
    b, l, h = x.shape
    flat = x.reshape(b * l, h)
    logits = Dense(num_experts, use_bias=False, dtype=dtype, kernel_init=normal_init(initializer_range),
                   name="gate")(flat)
    module.sow(ROUTER_LOGITS, "logits", logits)
    weights, experts = route(logits, top_k, normalize)
    flat_experts = experts.reshape(-1)                         # pair p = token·k + slot
    order = jnp.argsort(flat_experts, stable=True)             # pairs grouped by expert
    tokens = order // top_k
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    y = StackedExperts(num_experts, h, intermediate_size, hidden_act, dtype, initializer_range,
                       name="experts")(flat[tokens], group_sizes)
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    out = jnp.zeros((b * l, h), y.dtype).at[tokens].add(y)
    return out.reshape(b, l, h)


def load_balancing_loss(router_logits: Sequence[jax.Array], num_experts: int, top_k: int,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """Switch Transformers' auxiliary loss over all sparse layers (transformers'
    ``load_balancing_loss_func``): ``E · Σ_e f_e · P_e`` with ``f_e`` the share of top-k
    assignments to expert ``e`` (summing to ``top_k``) and ``P_e`` its mean router probability,
    both pooled over every layer's real tokens (``attention_mask``, ``(B, L)``, flattened as the
    logits' rows; None: every row)."""
    counts = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.zeros((), jnp.float32)
    for logits in router_logits:
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        _, chosen = jax.lax.top_k(probs, top_k)
        weight = (jnp.ones((logits.shape[0],), jnp.float32) if attention_mask is None
                  else attention_mask.reshape(-1).astype(jnp.float32))
        counts = counts + jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32)
                                  * weight[:, None, None], axis=(0, 1))
        prob_sum = prob_sum + jnp.sum(probs * weight[:, None], axis=0)
        rows = rows + jnp.sum(weight)
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))


def collected_router_logits(variables: dict) -> list[jax.Array]:
    """The router logits a model call sowed (``mutable=[ROUTER_LOGITS]``), one per sparse layer,
    in no particular order: ``load_balancing_loss`` pools over layers, so order does not matter."""
    return jax.tree.leaves(variables.get(ROUTER_LOGITS, {}))


def stacked_hf_names(path: str, shape: tuple[int, ...], parts: dict[str, tuple[str, ...]],
                     experts_infix: str = "experts") -> tuple[tuple[str, ...], ...] | None:
    """The Hugging Face tensors a stacked expert param is assembled from, per expert (``None``
    for any other param). Checkpoints on the Hub keep one ``nn.Linear`` per expert
    (``mlp.experts.3.gate_proj.weight``, ``(I, H)``); transformers v5 fuses them on load, and
    so does ``hf_io``: ``parts`` maps a stacked param's leaf to the per-expert module names
    concatenated along its output axis (Qwen: ``gate_up_proj`` = gate_proj, up_proj)."""
    module, _, leaf = path.rpartition(".")
    if leaf not in parts or not module.endswith("." + experts_infix) or len(shape) != 3:
        return None
    return tuple(tuple(f"{module}.{e}.{part}.weight" for part in parts[leaf]) for e in range(shape[0]))
