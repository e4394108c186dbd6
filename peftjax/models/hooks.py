"""The hook points a model exposes to PEFT methods, and nothing more.

Why hooks and a context, not wrapped modules: the model zoo stays ignorant of every method.
Each model calls four functions at fixed places in its forward pass; by default they return
their input unchanged, so a model without a method is exactly the pretrained model. A method
becomes active for one traced call with ``with hooks.use(bound_method): model.apply(...)``
(the same mechanism flax uses for ``nn.intercept_methods``). Because the context is entered
inside the jitted function, the method's parameters are ordinary traced values.

The hook points (``design.md``):

* ``linear``        every dense layer (q/k/v/o, FFN in/out, heads): LoRA family, IA3-style scaling.
* ``grouped_linear`` the stacked expert matrices of a mixture-of-experts layer (``(E, in, out)``,
                    rows sorted by expert, ``group_sizes`` rows per expert): LoRA on experts
                    (PEFT's ``target_parameters``). Methods that do not implement it leave the
                    experts alone, as PEFT's module-level methods do.
* ``attention_kv``  keys/values and the mask of every attention layer: prefix tuning.
* ``embeddings``    the input-embedding sequence before positions are added: prompt tuning.
* ``block_output``  the end of each attention block and FFN block: the block's projected
                    output, the residual it is added to and, in post-LN models, the LayerNorm
                    applied to the sum; the hook returns the block's final output. Adapters
                    (Houlsby, Pfeiffer).

Each hook receives the flax module it belongs to; ``site(module)`` gives its dotted Hugging Face
path (``bert.encoder.layer.0.attention.self.query``) which methods use as the key of their
own parameters.

Why ``block_output`` takes the whole residual step, not only the block's output: adapter
placements differ exactly in where they sit relative to the residual add and the LayerNorm.
Houlsby et al. (2019, Fig. 2) adapt the projected output before both; Pfeiffer et al. (EACL 2021,
§2; AdapterHub's ``SeqBnConfig``) read ``LN(h + x)`` and re-apply the block's own LayerNorm after
their residual. A hook that only saw ``h`` could express the first and not the second. The models
therefore hand over ``h`` (after the block's output dropout), the residual ``x`` (exactly what the
model adds back: the sublayer input, or BLOOM's LayerNorm output under
``apply_residual_connection_post_layernorm``) and ``norm`` (post-LN blocks, BERT/RoBERTa: the
block's LayerNorm module; flax shares its params if a hook calls it twice; pre-LN blocks, Llama,
GPT-2, BLOOM, T5: ``None``), and the default returns ``norm(h + x)`` or ``h + x``, which is what
the model computed before hooks existed.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import jax

Array = jax.Array


class Hooks:
    """No-op hooks. PEFT methods override the points they need."""

    # True for hooks that must see every layer's modules traced one by one (the Recorder
    # discovering sites): a scanned layer stack (layer_scan.py) then runs unrolled.
    traces_every_layer = False

    def linear(self, module, x: Array, y: Array, kernel: Array, bias: Array | None) -> Array:
        """``y = x @ kernel + bias`` was computed by ``module``; return the adapted output."""
        return y

    def grouped_linear(self, module, name: str, x: Array, y: Array, kernel: Array,
                       group_sizes: Array) -> Array:
        """``y = ragged_dot(x, kernel, group_sizes)`` was computed by ``module``'s stacked param
        ``name`` (``kernel``: ``(experts, in, out)``; ``x``'s rows sorted by expert, the first
        ``group_sizes[0]`` rows expert 0's, ...); return the adapted output. The site of the
        param is ``site(module) + "." + name`` (PEFT's ``target_parameters`` name)."""
        return y

    def attention_kv(self, module, key: Array, value: Array, mask: Array) -> tuple[Array, Array, Array]:
        """key/value ``(batch, kv_len, kv_heads, head_dim)``, mask ``(batch, 1, q_len, kv_len)`` bool."""
        return key, value, mask

    def embeddings(self, module, embeds: Array, attention_mask: Array,
                   token_type_ids: Array | None) -> tuple[Array, Array, Array | None]:
        """Token embeddings ``(batch, seq, hidden)`` before positions are added."""
        return embeds, attention_mask, token_type_ids

    def block_output(self, module, kind: str, h: Array, residual: Array,
                     norm: Callable[[Array], Array] | None) -> Array:
        """The block's final output from its parts; by default ``norm(h + residual)``.

        ``kind`` is ``'attention'``, ``'ffn'`` or (T5's decoder) ``'cross_attention'``; ``module``
        is the attention or FFN module (its site keys a method's params); ``h`` the block's
        projected output after its dropout; ``residual`` what the model adds to it; ``norm`` the
        post-sum LayerNorm of a post-LN block, ``None`` in pre-LN blocks (then the sum is the
        output).
        """
        return residual_output(h, residual, norm)


def residual_output(h: Array, residual: Array, norm: Callable[[Array], Array] | None) -> Array:
    """``norm(h + residual)`` for a post-LN block, ``h + residual`` for a pre-LN one (``norm``
    None): the residual step every model performed itself before ``block_output`` took it over."""
    s = h + residual
    return s if norm is None else norm(s)


_NOOP = Hooks()
_state = threading.local()


def active() -> Hooks:
    """The hooks in force for the model call being traced (no-op hooks when none)."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _NOOP


@contextlib.contextmanager
def use(hooks: Hooks | None) -> Iterator[Hooks]:
    """Activates ``hooks`` for every model call traced inside the ``with`` block."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(hooks if hooks is not None else _NOOP)
    try:
        yield stack[-1]
    finally:
        stack.pop()


def site(module) -> str:
    """The dotted module path of a flax module, in Hugging Face naming.

    Inside ``site_prefix(p)`` (a scanned layer stack runs a detached copy of layer 0, whose own
    path starts at the layer) the path is read below ``p``.
    """
    prefix = getattr(_state, "prefix", None)
    path = ".".join(module.path)
    return path if not prefix else (prefix[-1] + "." + path if path else prefix[-1])


@contextlib.contextmanager
def site_prefix(prefix: str) -> Iterator[str]:
    """Sites of the modules traced inside the block are read as ``prefix.<module path>``."""
    stack = getattr(_state, "prefix", None)
    if stack is None:
        stack = _state.prefix = []
    stack.append(prefix)
    try:
        yield prefix
    finally:
        stack.pop()


class Recorder(Hooks):
    """Records every hook call with its site and shapes (used to discover a model's sites).

    Run under ``jax.eval_shape`` so no array is allocated: this is how a method learns, without
    knowing the model, which linear layers exist, their in/out features, and where the
    attention and FFN blocks are.
    """

    traces_every_layer = True

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def linear(self, module, x, y, kernel, bias):
        self.calls.append(dict(point="linear", site=site(module), in_features=kernel.shape[0],
                               out_features=kernel.shape[1], has_bias=bias is not None))
        return y

    def grouped_linear(self, module, name, x, y, kernel, group_sizes):
        self.calls.append(dict(point="grouped_linear", site=f"{site(module)}.{name}",
                               experts=kernel.shape[0], in_features=kernel.shape[1],
                               out_features=kernel.shape[2], has_bias=False))
        return y

    def attention_kv(self, module, key, value, mask):
        self.calls.append(dict(point="attention_kv", site=site(module), kv_heads=key.shape[2],
                               head_dim=key.shape[3]))
        return key, value, mask

    def embeddings(self, module, embeds, attention_mask, token_type_ids):
        self.calls.append(dict(point="embeddings", site=site(module), hidden=embeds.shape[-1]))
        return embeds, attention_mask, token_type_ids

    def block_output(self, module, kind, h, residual, norm):
        self.calls.append(dict(point="block_output", site=site(module), kind=kind,
                               hidden=h.shape[-1]))
        return residual_output(h, residual, norm)
