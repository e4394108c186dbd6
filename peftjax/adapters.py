"""Several named LoRA adapters on one frozen base: switch, disable, combine.

Design (why stacked arrays and an index, not a dict of methods): every adapter is padded into
one stack per adapted site — ``A: (N, in, R)`` and ``B: (N, R, out)`` with R the largest rank and
each adapter's scaling folded into its B; an adapter that does not target a site, or has a
smaller rank, contributes zero rows/columns, which adds exactly zero. The active adapter is then
a traced int32 *index* into the stack, so one compiled program serves every adapter and the
disabled state (``DISABLED = -1``: the plain base model): switching adapters per call never
recompiles, and the frozen base is passed as an argument, never baked into the program as a
constant. Only adding an adapter (which changes the stack's shapes) compiles again. Task heads
are stacked the same way (``N + 1`` slots, the last one the base head, used when disabled), so
several classifiers can share one backbone. The cost is memory for padding (N·R instead of Σrᵢ)
— small next to the base for research-sized adapter sets.

Any method whose update is an additive low-rank term on the pretrained kernels fits: it says so
through ``Method.low_rank_factors`` (LoRA and rsLoRA, AdaLoRA as (A ⊙ E, s·B), DyLoRA at its
evaluation rank, VeRA as (A ⊙ d, B ⊙ b)). DoRA re-normalises the weight (not a sum of deltas) and
PiSSA replaces the base kernels: their ``low_rank_factors`` is None and they are refused.

Combination, as PEFT's ``add_weighted_adapter``: ΔW = Σ wᵢ sᵢ Aᵢ Bᵢ.
``combination="cat"`` concatenates along the rank: A = [A₁ … A_k] (in, Σrᵢ),
B = [w₁s₁B₁; …; w_k s_k B_k] (Σrᵢ, out), scaling 1 — exact. ``rank=k`` then truncates each
site's ΔW to its best rank-k approximation (Eckart–Young), computed from thin QRs of A and Bᵀ so
that the (in, out) matrix is never formed: A = Q_a R_a, Bᵀ = Q_b R_b, R_a R_bᵀ = U S Vᵀ,
A' = Q_a U_k √S_k, B' = √S_k V_kᵀ Q_bᵀ.

Usage::

    aset = AdapterSet(model, base_params)                # flat or nested base params
    aset.add("sst2", lora_method, trainable)              # or aset.load("sst2", peft_folder)
    aset.add("mnli", other_method, other_trainable)
    logits = aset.apply(batch, "sst2")                    # jitted; the name → an index
    base = aset.apply(batch, None)                        # adapters disabled
    method, trainable = aset.combine("mix", ["sst2", "mnli"], [0.5, 0.5])
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.merging import COMBINED
from peftjax.methods import core
from peftjax.models import hf_io
from peftjax.models import hooks as hooks_lib
from peftjax.models.registry import Model

DISABLED = -1


class _StackHooks(hooks_lib.Hooks):
    """Adds ``x A[i] B[i]`` (scaling folded into B, zero when disabled) at the stacked sites."""

    def __init__(self, a: Mapping[str, jax.Array], b: Mapping[str, jax.Array], index, on):
        self.a, self.b, self.index, self.on = a, b, index, on

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        if site not in self.a:
            return y
        a = self.a[site][self.index].astype(x.dtype)
        b = (self.b[site][self.index] * self.on).astype(x.dtype)
        return y + (x @ a) @ b


class _RowHooks(hooks_lib.Hooks):
    """Mixed batches: row i adds ``x_i A[k_i] B[k_i]`` with its own adapter k_i (zero for the
    base model), and a task head's linear layers use row i's head."""

    def __init__(self, a, b, index, on, heads: Mapping[str, tuple], head_index):
        self.a, self.b, self.index, self.on = a, b, index, on
        self.heads, self.head_index = heads, head_index

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        if site in self.heads:
            k, bb = self.heads[site]
            k = k[self.head_index].astype(x.dtype)                       # (B, in, out)
            y = jnp.einsum("b...i,bio->b...o", x, k)
            if bb is not None:
                y = y + bb[self.head_index].astype(y.dtype).reshape(
                    (y.shape[0],) + (1,) * (y.ndim - 2) + (y.shape[-1],))
            return y
        if site not in self.a:
            return y
        a = self.a[site][self.index].astype(x.dtype)                     # (B, in, R)
        b = (self.b[site][self.index] * self.on[:, None, None]).astype(x.dtype)   # (B, R, out)
        return y + jnp.einsum("b...r,bro->b...o", jnp.einsum("b...i,bir->b...r", x, a), b)


def _flat(params: Mapping) -> dict:
    nested = any(isinstance(v, Mapping) for v in params.values())
    return hf_io.flatten(dict(params)) if nested else dict(params)


class AdapterSet:
    """Named additive LoRA adapters sharing one frozen base model (see the module docstring)."""

    def __init__(self, model: Model, base: Mapping):
        self.model = model
        self.sites = core.Sites.discover(model)
        flat = _flat(base)
        self.frozen = {k: v for k, v in flat.items() if not self.sites.is_head(k)}
        self.base_head = {k: v for k, v in flat.items() if self.sites.is_head(k)}
        self._adapters: dict[str, tuple[core.Method, dict, dict]] = {}
        self._stack: dict | None = None
        self.traces = 0  # how many times the forward was traced (compiled); for tests
        self._jitted = jax.jit(self._forward)
        self._jitted_rows = jax.jit(self._forward_rows)

    # -- registry -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def index(self, name: str | int | None) -> int:
        """The stack index of ``name``; ``None`` (or ``DISABLED``) is the base model."""
        if name is None or name == DISABLED:
            return DISABLED
        if isinstance(name, (int, np.integer)):
            if not 0 <= name < len(self._adapters):
                raise ValueError(f"adapter index {name} out of range 0..{len(self._adapters) - 1}")
            return int(name)
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no adapter named {name!r}; adapters: {', '.join(self.names) or '(none)'}") from None

    def get(self, name: str) -> tuple[core.Method, dict]:
        """``(method, trainable)`` of a named adapter."""
        method, added, head, _ = self._adapters[self.names[self.index(name)]]
        return method, {"base": {}, "added": added, "head": head}

    def add(self, name: str, method: core.Method, trainable: Mapping,
            state: Mapping | None = None) -> None:
        """Adds an adapter: ``trainable`` is ``{"base","added","head"}`` or just the added params;
        ``state`` is the method's state when its update depends on it (VeRA's projections)."""
        if not name or name in self._adapters:
            raise ValueError(f"adapter name {name!r} is empty or already used; adapters: {self.names}")
        if method.model is not self.model and method.model.hf_config.to_dict() != self.model.hf_config.to_dict():
            raise ValueError(f"adapter {name!r} was built for another model")
        if "added" in trainable:
            if trainable.get("base"):
                raise ValueError(f"adapter {name!r} trains base params; an AdapterSet shares one frozen base")
            added, head = dict(trainable["added"]), dict(trainable.get("head") or {})
        else:
            added, head = dict(trainable), {}
        if head and set(head) != set(self.base_head):
            raise ValueError(f"adapter {name!r}: head params {sorted(head)} do not match the "
                             f"model's head {sorted(self.base_head)}")
        factors = method.low_rank_factors(added, dict(state or {}))
        if factors is None:
            raise ValueError(f"adapter {name!r}: method {method.name!r} is not an additive low-rank "
                             "update of the pretrained kernels (DoRA re-normalises the weight, a "
                             "PiSSA init rewrites the base); an AdapterSet holds methods whose "
                             "low_rank_factors are defined (LoRA, rsLoRA, AdaLoRA, DyLoRA, VeRA)")
        factors = {site: (np.asarray(a, np.float32), np.asarray(b, np.float32))
                   for site, (a, b) in factors.items()}
        self._adapters[name] = (method, added, head, factors)
        self._stack = None

    def load(self, name: str, folder: str, *, require_head: bool = False) -> None:
        """Adds an adapter from a Hugging Face PEFT folder (``peftjax.interop``)."""
        from peftjax.interop import import_adapter

        method, trainable, state = import_adapter(folder, self.model, require_head=require_head,
                                                  with_state=True)   # VeRA's projections
        self.add(name, method, trainable, state)

    def remove(self, name: str) -> None:
        del self._adapters[self.names[self.index(name)]]
        self._stack = None

    # -- stacking -------------------------------------------------------------------------
    def stack(self) -> dict:
        """``{"A": {site: (N, in, R)}, "B": {site: (N, R, out)}, "head": {path: (N+1, ...)}}``."""
        if self._stack is not None:
            return self._stack
        if not self._adapters:
            raise ValueError("the AdapterSet is empty: add an adapter first")
        entries = list(self._adapters.values())
        sites = [s for s in self.sites.linear if any(s in f for *_, f in entries)]
        rmax = max(a.shape[1] for *_, f in entries for a, _ in f.values())
        a_stack, b_stack = {}, {}
        for site in sites:
            info = self.sites.linear[site]
            a_rows, b_rows = [], []
            for *_, factors in entries:
                a = np.zeros((info["in_features"], rmax), np.float32)
                b = np.zeros((rmax, info["out_features"]), np.float32)
                if site in factors:
                    fa, fb = factors[site]
                    a[:, :fa.shape[1]], b[:fb.shape[0]] = fa, fb
                a_rows.append(a)
                b_rows.append(b)
            a_stack[site], b_stack[site] = jnp.asarray(np.stack(a_rows)), jnp.asarray(np.stack(b_rows))
        heads = {k: jnp.stack([jnp.asarray(head.get(k, v)) for _, _, head, _ in entries] + [jnp.asarray(v)])
                 for k, v in self.base_head.items()}
        self._stack = {"A": a_stack, "B": b_stack, "head": heads}
        return self._stack

    # -- forward --------------------------------------------------------------------------
    def _forward(self, stack, frozen, batch, index):
        from flax import traverse_util

        self.traces += 1
        n = next(iter(stack["A"].values())).shape[0] if stack["A"] else len(self._adapters)
        on = index >= 0
        i = jnp.clip(index, 0, n - 1)
        head = {k: v[jnp.where(on, index, n)] for k, v in stack["head"].items()}
        hooks = _StackHooks(stack["A"], stack["B"], i, on.astype(jnp.float32))
        with hooks_lib.use(hooks):
            return self.model.apply(traverse_util.unflatten_dict({**frozen, **head}, sep="."), batch)

    def _forward_rows(self, stack, frozen, batch, index):
        from flax import traverse_util

        self.traces += 1
        n = next(iter(stack["A"].values())).shape[0] if stack["A"] else len(self._adapters)
        on = index >= 0
        heads = {}
        for path, values in stack["head"].items():
            site, _, leaf = path.rpartition(".")
            if site not in self.sites.linear or leaf not in ("kernel", "bias"):
                raise ValueError(f"mixed-adapter batches need a task head of linear layers; "
                                 f"{path} is not one")
            k, bias = heads.get(site, (None, None))
            heads[site] = (values, bias) if leaf == "kernel" else (k, values)
        hooks = _RowHooks(stack["A"], stack["B"], jnp.clip(index, 0, n - 1),
                          on.astype(jnp.float32), heads, jnp.where(on, index, n))
        with hooks_lib.use(hooks):
            head = {k: v[n] for k, v in stack["head"].items()}   # replaced row by row by the hooks
            return self.model.apply(traverse_util.unflatten_dict({**frozen, **head}, sep="."), batch)

    def apply(self, batch: Mapping[str, Any], adapter: str | int | None | Sequence) -> jax.Array:
        """The model's output with ``adapter`` active (``None``: disabled, the base model).

        ``adapter`` may also be a sequence with one entry per row of the batch (names, indices or
        ``None``/``"base"`` for the base model; PEFT's ``adapter_names``): a mixed batch, one
        compiled forward for any assignment, each row equal to running its adapter alone.
        Jitted; adapters are traced indices, so switching never recompiles.
        """
        if isinstance(adapter, (list, tuple, np.ndarray)):
            rows = len(next(iter(batch.values())))
            if len(adapter) != rows:
                raise ValueError(f"{len(adapter)} adapter names for a batch of {rows} rows; give one per row")
            index = jnp.asarray([self.index(None if a == "base" else a) for a in adapter], jnp.int32)
            return self._jitted_rows(self.stack(), self.frozen, batch, index)
        index = jnp.asarray(self.index(adapter), jnp.int32)
        return self._jitted(self.stack(), self.frozen, batch, index)

    # -- combination ----------------------------------------------------------------------
    def delta_weights(self, name: str) -> dict[str, jax.Array]:
        """ΔW = A B' (scaling folded into B') per adapted site, flax (in, out) layout."""
        factors = self._adapters[self.names[self.index(name)]][3]
        return {site: jnp.asarray(a @ b) for site, (a, b) in factors.items()}

    def combine(self, name: str, adapters: Sequence[str], weights: Sequence[float], *,
                rank: int | None = None, head: str | None = None, combination: str = "linear",
                density: float = 1.0, seed: int = 0) -> tuple[core.Method, dict]:
        """Adds (and returns) the merge of ``adapters`` as one LoRA.

        ``combination="linear"``: ΔW = Σ wᵢ sᵢ Aᵢ Bᵢ, without ``rank`` exact, of rank Σrᵢ
        (PEFT's ``"cat"``), with ``rank`` each site's ΔW truncated to its best
        rank-``rank`` approximation. ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
        ``"magnitude_prune"``: task-arithmetic merges of the dense ΔWᵢ with ``density``
        (``peftjax.merging``; DARE seeded by ``seed``), re-factorised by SVD to ``rank`` (or
        each site's exact rank). ``head`` names the adapter whose head the result keeps
        (default: the base head).
        """
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"combine needs one weight per adapter, got {len(adapters)} adapters "
                             f"and {len(weights)} weights")
        head_params = dict(self._adapters[self.names[self.index(head)]][2]) if head else {}
        if combination != "linear" or density != 1.0:
            from peftjax import merging

            vectors = [{s: np.asarray(a, np.float64) @ np.asarray(b, np.float64) for s, (a, b) in
                        self._adapters[self.names[self.index(n)]][3].items()} for n in adapters]
            merged = merging.merge_task_vectors(vectors, weights, combination, density=density, seed=seed)
            method, trainable = merging.as_lora(self.model, merged, rank, self.sites)
            trainable["head"] = head_params
            self.add(name, method, trainable)
            return method, trainable
        entries = [self._adapters[self.names[self.index(a)]][3] for a in adapters]
        sites = [s for s in self.sites.linear if any(s in f for f in entries)]
        widths = [max(a.shape[1] for a, _ in f.values()) for f in entries]
        total = sum(widths)
        target_rank = total if rank is None else int(rank)
        added = {}
        for site in sites:
            info = self.sites.linear[site]
            a_parts, b_parts = [], []
            for factors, w, r in zip(entries, weights, widths):
                a = np.zeros((info["in_features"], r), np.float32)
                b = np.zeros((r, info["out_features"]), np.float32)
                if site in factors:
                    fa, fb = factors[site]
                    a[:, :fa.shape[1]], b[:fb.shape[0]] = fa, w * fb
                a_parts.append(a)
                b_parts.append(b)
            a, b = jnp.asarray(np.concatenate(a_parts, axis=1)), jnp.asarray(np.concatenate(b_parts, axis=0))
            if rank is not None:
                a, b = truncate(a, b, target_rank)
            added[site + ".lora_A"], added[site + ".lora_B"] = a, b
        try:  # alpha = rank: scaling 1, the factors carry every scale
            method = core.create(COMBINED, self.model, {"rank": target_rank, "alpha": float(target_rank),
                                                        "targets": core.exact_paths_regex(sites)}, sites=self.sites)
        except ValueError as e:
            raise ValueError(f"combine {name!r}: {e}; pass rank= to truncate") from None
        trainable = {"base": {}, "added": added, "head": head_params}
        self.add(name, method, trainable)
        return method, trainable


def truncate(a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Best rank-``rank`` factors (A', B') of A B (Eckart–Young), without forming A B.

    ``rank`` larger than A's width is padded with zero columns (the product is unchanged).
    """
    qa, ra = jnp.linalg.qr(a)            # (in, R), (R, R)
    qb, rb = jnp.linalg.qr(b.T)          # (out, R), (R, R)
    u, s, vt = jnp.linalg.svd(ra @ rb.T)
    k = min(rank, s.shape[0])
    root = jnp.sqrt(s[:k])
    a2 = (qa @ u[:, :k]) * root[None, :]
    b2 = root[:, None] * (vt[:k] @ qb.T)
    if k < rank:
        a2 = jnp.pad(a2, ((0, 0), (0, rank - k)))
        b2 = jnp.pad(b2, ((0, rank - k), (0, 0)))
    return a2, b2
