"""Run a stack of identical transformer layers as one ``jax.lax.scan``: compiled once, not N times.

Why: an unrolled stack hands XLA N copies of the same layer (forward and backward), and compile
time grows with depth; every sweep cell and every test pays it. A scan over the layers' params
(what levanter and MaxText do) compiles one layer body. The param tree keeps its per-layer layout
(``model.layers.3.self_attn.q_proj.kernel``), which checkpoints, PEFT targets and every method
key on: the stack reads its layers' params ``"0" … "N-1"``, stacks them along a new leading axis
inside the traced call, and scans a functional copy of the layer over them (the stack's
gradient is the per-layer slices, so the trainable tree is unchanged too).

Methods need no change either. A method's hooks key its params by the module's site
(``hooks.site``: ``model.layers.3.self_attn.q_proj``); ``split_hooks`` finds every array the
bound hooks hold under a key of layer ``i`` (a dict key starting ``<stack>.<i>.``), stacks them
per layer like the params, and rebuilds, inside the scan body, hooks whose layer-0 entries hold
layer ``i``'s slice; the body runs the layer under ``hooks.site_prefix("<stack>.0")`` so the
method looks up exactly those entries. Layers adapted differently (``layers_to_transform``, a
per-layer rank pattern) cannot share one body: ``split_hooks`` refuses them with the layer that
differs. Anything a method holds outside site-keyed dicts (VeRA's shared projections, scalar
settings) is the same for every layer and is closed over unchanged.

Costs: the stacked copy of the layers' params is made inside each step (one extra read and write
of the layer weights; on a frozen base, a transient second copy of them), and dropout draws
differ from the unrolled stack's (layer ``i`` uses ``fold_in(key, i)``; same distribution, other
masks). The KV-cache path (decoding) stays unrolled: each layer's cache is its own buffer.

Families: the Llama architecture (Llama, Qwen2/3, Mistral, Gemma 2/3: per-layer windows and RoPE
tables picked by index), BERT/RoBERTa/MiniLM, GPT-2 (unless its attention is scaled per layer),
BLOOM and T5 (block 0 holds the relative position bias table and runs first; blocks 1 … N-1 are
scanned with the bias it computed: ``start``). Qwen3-MoE refuses (dense and MoE layers differ).

Measured on XLA:CPU (quiet cores of experiments/speed's unrecorded host, ``scripts/bench.py
--scan_layers --num_layers=N``; the same tables on its Zen 5 host agree: 8-layer LoRA 2.80 s
scanned against 1.60 s unrolled, the one-layer program alone 1.08 s), the scan never wins a
training run. The small Llama's LoRA
train step compiles in 3.50 s scanned against 1.80 s unrolled at 8 layers and 6.36 s against
3.97 s at 32; unrolled, ~1.2 s of that compile does not depend on depth and each layer adds
~0.09 s, so no scan could halve the 8-layer figure, and this one still grows 0.12 s a layer: the
stacking of every layer's param leaves, the slicing of their gradients and the per-leaf
optimizer update stay outside the loop (a stacked param layout would remove them; not built).
Steps are slower too (LoRA 0.385 / 0.330 s at 8 layers: the stacked copy and the loop's dynamic
slices) and XLA's peak is higher (740 / 549 MiB). T5-small compiles 1.2-1.5x faster scanned at 6
+ 6 blocks and 3.6x at 24 + 24 (LoRA 7.59 / 27.60 s) but every method steps 2-25% slower (LoRA
0.787 / 0.741 s at 6 + 6), so a LoRA run past ~35 steps is faster unrolled; GPT-2 and a 24-layer
MiniLM-shaped LoRA stack likewise compile faster and step no faster. So ``scan_layers`` is off
by default; it is there for short runs and for accelerators, whose compilers are where MaxText
and levanter report the gain (not measured here: no device). Those keep the layers' params
stacked in the param tree itself; here the stack is built in every step, so on a large model the
transient copy of the layer weights it needs would have to go first (a stacked layout for the
frozen base, not built). """

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models import hooks as hooks_lib
from peftjax.models.layers import REMAT_POLICIES, remat_name


def _layer_of(path, prefixes: Sequence[str]) -> tuple[int, int] | None:
    """``(layer, position in the path)`` of the first dict key under a layer prefix, or None."""
    for pos, k in enumerate(path):
        if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str):
            for i, prefix in enumerate(prefixes):
                if k.key.startswith(prefix):
                    return i, pos
    return None


def _relative(path, pos: int, prefix: str) -> str:
    """The leaf's path with the layer's prefix cut from its key at ``pos``, as a string: the
    same for every layer (and a sortable pytree key)."""
    keystr = jax.tree_util.keystr
    return f"{keystr(tuple(path[:pos]))}[<layer>.{path[pos].key[len(prefix):]}]{keystr(tuple(path[pos + 1:]))}"


def split_hooks(hooks: hooks_lib.Hooks, prefixes: Sequence[str]) -> tuple[Any, Callable[[Any], hooks_lib.Hooks]]:
    """``(stacked, rebuild)``: the arrays ``hooks`` holds per layer, stacked over layers, and a
    function of one layer's slice returning hooks whose layer-0 entries hold that slice.

    ``prefixes[i]`` is layer ``i``'s site with a trailing dot (``"model.layers.3."``). Raises
    ``ValueError`` when the layers do not hold the same entries (keys, shapes, dtypes, static
    values).
    """
    state = dict(vars(hooks))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    per_layer: list[dict[str, tuple[int, Any]]] = [{} for _ in prefixes]
    for index, (path, leaf) in enumerate(leaves):
        found = _layer_of(path, prefixes)
        if found is not None:
            layer, pos = found
            per_layer[layer][_relative(path, pos, prefixes[layer])] = (index, leaf)
    if not any(per_layer):
        return (), lambda _: hooks

    def describe(entries: dict) -> dict:
        return {k: ((tuple(v.shape), str(v.dtype)) if isinstance(v, (jax.Array, np.ndarray)) else v)
                for k, (_, v) in entries.items()}

    first = describe(per_layer[0])
    # Layers named as the stack numbers them (T5 scans blocks 1 ... N-1: prefixes start there).
    number = lambda i: prefixes[i][:-1].rsplit(".", 1)[-1]
    for i, entries in enumerate(per_layer[1:], start=1):
        other = describe(entries)
        if other != first:
            changed = sorted(set(first) ^ set(other)) or \
                [k for k in first if first[k] != other.get(k)]
            raise ValueError(
                f"scan_layers: layer {number(i)} is adapted unlike layer {number(0)} (the method's "
                f"hooks hold other keys, shapes or settings at {', '.join(changed[:3])}); a scanned stack "
                "runs one layer body for every layer, so the method must adapt all layers alike "
                "(no per-layer targets, ranks or windows), or set scan_layers=False")
    array_keys = [k for k, (_, v) in per_layer[0].items() if isinstance(v, (jax.Array, np.ndarray))]
    stacked = {k: jnp.stack([jnp.asarray(entries[k][1]) for entries in per_layer]) for k in array_keys}
    slots = {k: per_layer[0][k][0] for k in array_keys}
    flat = [leaf for _, leaf in leaves]

    def rebuild(layer_slice: dict) -> hooks_lib.Hooks:
        new_leaves = list(flat)
        for k, value in layer_slice.items():
            new_leaves[slots[k]] = value
        out = copy.copy(hooks)
        vars(out).update(jax.tree_util.tree_unflatten(treedef, new_leaves))
        return out

    return stacked, rebuild


def scanning(stack: nn.Module, caches: Any = None) -> bool:
    """Whether ``stack`` (a module with a ``scan`` field) runs this call as a scan: asked for, no
    KV cache (decoding stays unrolled: each layer's cache is its own buffer), not initialising
    (the layers' params must exist), and no hooks that record every layer (site discovery)."""
    return bool(stack.scan) and caches is None and not stack.is_initializing() \
        and not hooks_lib.active().traces_every_layer


def scan_stack(stack: nn.Module, make_layer: Callable[[], nn.Module],
               h: jax.Array, per_layer_args: Callable[[jax.Array], tuple], num_layers: int,
               remat: bool | str, train: bool, returns_state: bool = True, start: int = 0) -> jax.Array:
    """``h`` through the stack's ``num_layers`` layers as one scan (see the module doc).

    ``stack`` is the bound module holding the layers as children ``"0" … "N-1"`` (their params
    exist: the stack is not initialising); ``make_layer()`` builds an unbound layer module;
    ``per_layer_args(i)`` (``i`` traced) gives the layer call's arguments after ``h`` (mask, RoPE,
    ...: select per-layer variants with ``i``). The layer returns ``(h, anything)``, or ``h``
    alone when ``returns_state`` is False (an encoder layer without a KV cache). ``start``: the
    layers before it ran already (T5's block 0, which alone holds the relative position bias
    table); layers ``start … N-1`` are scanned.
    """
    params = stack.variables["params"]
    names = [str(i) for i in range(start, num_layers)]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"scan_layers: the stack has no params for layers {missing}")
    layers = [params[n] for n in names]
    shape = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    for n, tree in zip(names[1:], layers[1:]):
        if jax.tree.structure(tree) != jax.tree.structure(layers[0]) or shape(tree) != shape(layers[0]):
            raise ValueError(f"scan_layers: layer {n}'s params differ from layer 0's in structure or "
                             "shape; only a stack of identical layers can be scanned")
    stacked_params = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    site = hooks_lib.site(stack)
    prefixes = [f"{site}.{n}." if site else f"{n}." for n in names]
    hooks = hooks_lib.active()
    hook_xs, rebuild = split_hooks(hooks, prefixes)
    dropout_key = stack.make_rng("dropout") if (train and stack.has_rng("dropout")) else None
    layer = make_layer()
    template = prefixes[0][:-1]

    def body(carry, xs):
        layer_params, layer_hooks, i = xs
        rngs = None if dropout_key is None else {"dropout": jax.random.fold_in(dropout_key, i)}
        with hooks_lib.use(rebuild(layer_hooks)), hooks_lib.site_prefix(template):
            out = layer.apply({"params": layer_params}, carry, *per_layer_args(i), rngs=rngs)
        return (out[0] if returns_state else out), None

    policy_name = remat_name(remat)
    if policy_name != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy_name], prevent_cse=False)
    out, _ = jax.lax.scan(body, h, (stacked_params, hook_xs, jnp.arange(start, num_layers, dtype=jnp.int32)))
    return out
