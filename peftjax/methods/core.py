"""The PEFT method protocol: a method is a pure transformation of parameter trees.

Given a model and its pretrained params, a method returns

1. a **partition** of the base params into a frozen tree and a trainable tree
   (``Method.trains_base(path)``; the task head is always trainable and kept apart),
2. **added params** of its own (``Method.init``), keyed by ``"<site>.<name>"`` where the site is
   the dotted module path of a hook point (``bert.encoder.layer.0.attention.self.query``),
3. **hooks** that say what it does at the model's hook points (``Method.hooks``), and
   optionally a merge of its added params into the base weights (``Method.merge``).

Training differentiates only ``trainable``, so gradients and optimizer state exist only for it,
and a fine-tuned checkpoint is ``trainable`` alone::

    peft = method.setup(rng, base_params)            # PeftParams(trainable, frozen, state)
    def loss(trainable, frozen, batch):
        logits = method.apply(model, trainable, frozen, state, batch, train=True, rng=rng)
        ...
    grads = jax.grad(loss)(peft.trainable, peft.frozen, batch)

All trees are flat dicts ``{dotted path: array}`` (pytrees as optax, orbax and safetensors like
them). A new method is one module that subclasses ``Method``, declares its ``Config`` dataclass
and calls ``@register("name")``; every script, the grid and the accounting then know it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.models import hooks as hooks_lib
from peftjax.models.registry import Model

Array = jax.Array
Flat = dict[str, Any]
STATE_STREAM = 0x73746174  # fold_in tag of init_state's key ("stat"), far above any site index


# --------------------------------------------------------------------------------------------
# Hook sites of a model, discovered by tracing it abstractly.


@dataclasses.dataclass(frozen=True)
class Sites:
    """Where a model calls each hook point, with the shapes a method needs to size its params."""

    linear: dict[str, dict]       # site -> {in_features, out_features, has_bias}
    attention: dict[str, dict]    # site -> {kv_heads, head_dim}
    embeddings: dict[str, dict]   # site -> {hidden}
    blocks: dict[str, dict]       # site -> {kind: 'attention'|'ffn', hidden}
    head_prefixes: tuple[str, ...]
    # stacked expert params (MoE): site "<module>.<param>" -> {experts, in_features, out_features}
    grouped: dict[str, dict] = dataclasses.field(default_factory=dict)

    @classmethod
    def discover(cls, model: Model) -> "Sites":
        """Traces the model under ``jax.eval_shape`` with a recording hook (no allocation).

        Cached on the model, which is immutable.
        """
        cached = model.__dict__.get("_sites")
        if cached is None:
            cached = cls._discover(model)
            object.__setattr__(model, "_sites", cached)
        return cached

    @classmethod
    def _discover(cls, model: Model) -> "Sites":
        recorder = hooks_lib.Recorder()
        batch = model.dummy_batch(1, 4)

        def run(params):
            with hooks_lib.use(recorder):
                return model.apply(params, batch)

        # The model's cached abstract params: tracing init again would double the cost (seconds
        # for a 24+24-layer T5).
        jax.eval_shape(run, model.abstract_params())
        groups: dict[str, dict[str, dict]] = {"linear": {}, "attention_kv": {}, "embeddings": {},
                                              "block_output": {}, "grouped_linear": {}}
        for call in recorder.calls:
            info = {k: v for k, v in call.items() if k not in ("point", "site")}
            groups[call["point"]].setdefault(call["site"], info)
        return cls(linear=groups["linear"], attention=groups["attention_kv"],
                   embeddings=groups["embeddings"], blocks=groups["block_output"],
                   head_prefixes=model.head_prefixes, grouped=groups["grouped_linear"])

    def is_head(self, path: str) -> bool:
        return any(path == h or path.startswith(h + ".") for h in self.head_prefixes)

    @property
    def backbone_linear(self) -> dict[str, dict]:
        """Linear sites outside the task head (the head is trained whole, never adapted)."""
        return {s: v for s, v in self.linear.items() if not self.is_head(s)}


def summarize_paths(paths: Iterable[str]) -> str:
    """Paths with layer indices folded (``encoder.layer.*.attention.self.query (x12)``)."""
    counts: dict[str, int] = {}
    for p in paths:
        key = re.sub(r"\.\d+(?=\.|$)", ".*", p)
        counts[key] = counts.get(key, 0) + 1
    return "\n  ".join(f"{k} (x{n})" if n > 1 else k for k, n in counts.items())


def exact_paths_regex(paths: Iterable[str]) -> str:
    """A target regex matching exactly these module paths and nothing else."""
    return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"


def module_names_regex(names: Iterable[str]) -> str:
    """PEFT's list rule for ``target_modules`` as a target regex: a path that equals a name or
    ends with ``.name`` (``check_target_module_exists``)."""
    return r"(?:^|\.)(?:" + "|".join(re.escape(n) for n in names) + r")$"


def match_targets(targets: str | Iterable[str], available: Iterable[str], what: str = "target") -> list[str]:
    """Sites whose path contains a match of the regex ``targets`` (or of any item of a list).

    A pattern (or any item of a list) that matches nothing is an error that lists the available
    paths: HF PEFT silently ignores list items that match nothing when others do, a recurring
    source of adapters that train less than their authors think.
    """
    available = list(available)
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or any(not p for p in patterns):
        raise ValueError(f"{what}s must be a non-empty regex or list of regexes, got {targets!r}; "
                         f"available module paths:\n  {summarize_paths(available)}")
    chosen: list[str] = []
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{what} pattern {pattern!r} is not a valid regex: {e}") from None
        hits = [s for s in available if rx.search(s)]
        if not hits:
            raise ValueError(f"{what} pattern {pattern!r} matches no module; available module "
                             f"paths:\n  {summarize_paths(available)}")
        chosen.extend(h for h in hits if h not in chosen)
    return [s for s in available if s in chosen]


def input_dropout(module, x: Array, rate: float, train: bool) -> Array:
    """Dropout on a layer's input before the adapter (LoRA §4.2; PEFT's ``lora_dropout``)."""
    if not train or rate <= 0:
        return x
    from peftjax.models.layers import dropout

    return dropout(x, rate, module.make_rng("dropout"))


# --------------------------------------------------------------------------------------------
# Configs.


def config_from(cls: type, values: Mapping[str, Any] | None, method: str) -> Any:
    """Builds a method's config dataclass; unknown keys are an error naming the valid ones."""
    values = dict(values or {})
    values.pop("name", None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) for method {method!r}: {', '.join(unknown)}; "
                         f"valid keys: {', '.join(sorted(fields))}")
    for k, v in list(values.items()):
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)


def check_range(method: str, field: str, value: Any, valid: str, ok: bool) -> None:
    """Raises ``ValueError`` naming the field, the bad value and the valid range."""
    if not ok:
        raise ValueError(f"{method}.{field}={value!r} is invalid; valid: {valid}")


# --------------------------------------------------------------------------------------------
# The method protocol.


class PeftTensor(NamedTuple):
    """One per-module tensor of a Hugging Face PEFT adapter file, as a method maps it.

    PEFT saves ``base_model.model.<module>.<peft>`` in torch layout; peftjax holds the added
    param ``"<site>.<ours>"`` (the site *is* the module path). ``shape`` is PEFT's shape; with
    ``transpose`` ours is its transpose (torch (out, in) vs flax (in, out)), otherwise the same
    values reshaped ((IA)³'s ``(out, 1)`` vector is our ``(out,)``).
    """

    peft: str
    ours: str
    shape: tuple[int, ...]
    transpose: bool = False


class PeftParams(NamedTuple):
    """The partition a method makes of one model's params.

    trainable: ``{"base": {path: array}, "added": {name: array}, "head": {path: array}}`` — the
      only tree that is differentiated, optimised and checkpointed.
    frozen: ``{path: array}``, the rest of the base params, never updated.
    state: ``{name: array}``, a method's non-trainable state (masks, importance EMAs); updated by
      ``Method.update_state`` and checkpointed with ``trainable``.
    """

    trainable: dict
    frozen: Flat
    state: Flat


@dataclasses.dataclass(frozen=True)
class InitContext:
    """What a run tells a method before it initialises (``Method.prepare``, ``init``,
    ``init_state``). Every field is optional: a method that needs one it did not get says so.

    The training loop fills all of them for every method, without knowing which method reads
    which: a data-driven method (Fisher masks, gradient-based inits) finds the training set and a
    loss of the base params here, a scheduled one (AdaLoRA) the run's length.
    """

    tokenizer: Any = None
    # The training rows in order (full length, a few at a time, ``mask`` False on padding rows)
    # and ``loss_fn(flat base params, batch) -> scalar`` (eval mode, ``peftjax.losses``).
    train_batches: Callable[[], Iterable[dict]] | None = None
    loss_fn: Callable[[Flat, dict], Array] | None = None
    num_train_examples: int | None = None   # size of the training set, to refuse N > it early
    total_steps: int | None = None          # train steps of the run (micro-steps), for schedules
    # The run's global-norm gradient clipping (train.clip_norm; None or 0: none), for a method
    # that reads gradients in ``update_state`` as the optimizer used them (AdaLoRA's importance).
    clip_norm: float | None = None
    # Where a data pass (a Fisher estimate) may keep its result for runs that would compute the
    # same thing (``pass_cache``; a sweep passes ``<workdir>/cache``; None: no cache), and what,
    # besides the base params, fixes ``loss_fn`` (``pass_cache.fingerprint(model)``).
    cache_dir: str | None = None
    fingerprint: str = ""


class Method:
    """Base class: full fine-tuning semantics with no hooks. Subclasses override what they change.

    Every hook a method may implement is declared here with its default, so generic code (the
    loop, saving, accounting, the adapter set, interop) calls it without probing: a new method
    overrides only what it changes and nothing outside its module needs to know its name.

    Subclass attributes: ``name`` (set by ``register``), ``Config`` (a frozen dataclass).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    family: ClassVar[str] = ""        # 'low_rank' | 'additional' | 'selection' | 'baseline'
    mergeable: ClassVar[bool] = False
    # The config field that selects the rank used at evaluation and merge, when a trained run can
    # be evaluated at other ranks without retraining (DyLoRA: "eval_rank"); the grid's
    # ``rank_sweep`` and scripts/dylora_sweep.py need it. None: no such field.
    eval_rank_field: ClassVar[str | None] = None

    def __init__(self, config: Any, model: Model, sites: Sites | None = None) -> None:
        self.config = config
        self.model = model
        self.sites = sites if sites is not None else Sites.discover(model)
        self.validate()

    # -- configuration --------------------------------------------------------------------
    def validate(self) -> None:
        """Checks the config against the model before any compute; raises ``ValueError``."""

    def prepare(self, ctx: InitContext) -> None:
        """Takes the run-level facts a method needs before it initialises (called first by
        ``setup``). AdaLoRA reads the run's length here; default: nothing."""

    def match_low_rank_targets(self, targets, field: str, rank: int) -> list[str]:
        """Linear sites matching ``targets``, checking ``rank`` fits each (1..min(in, out))."""
        matched = match_targets(targets, self.sites.backbone_linear)
        for site in matched:
            info = self.sites.linear[site]
            limit = min(info["in_features"], info["out_features"])
            check_range(self.name, field, rank,
                        f"1..{limit} (target {site} is {info['in_features']}x{info['out_features']})",
                        rank <= limit)
        return matched

    # -- partition ------------------------------------------------------------------------
    def trains_base(self, path: str) -> bool:
        """Whether the base param at ``path`` (outside the head) is trainable."""
        return False

    def init(self, rng: Array, base: Flat, ctx: InitContext) -> Flat:
        """The method's added params, keyed ``"<site>.<name>"``."""
        return {}

    def init_state(self, rng: Array, base: Flat, added: Flat, ctx: InitContext) -> Flat:
        """The method's non-trainable state (masks, fixed random projections, EMAs). ``rng`` is
        the run's (independent of ``init``'s): frozen random matrices vary with the run's seed
        unless the method's config pins a seed of its own."""
        return {}

    def transform_base(self, base: Flat, added: Flat) -> Flat:
        """Base params as the method starts from them (PiSSA replaces W0 by its residual)."""
        return base

    @property
    def rewrites_base(self) -> bool:
        """Whether ``transform_base`` changes the pretrained params: the trainable tree alone
        then does not restore the model on the pretrained base (saving, adapter sets and PEFT
        export refuse or convert it)."""
        return False

    # -- forward --------------------------------------------------------------------------
    def hooks(self, added: Flat, state: Flat, *, train: bool, rng: Array | None) -> hooks_lib.Hooks | None:
        """Hooks bound to this call's params; ``None`` when the method adds no computation."""
        return None

    def effective_base(self, trainable: dict, frozen: Flat, state: Flat) -> Flat:
        """The base params the model runs with (selection methods scatter sparse deltas here)."""
        return {**frozen, **trainable["base"], **trainable["head"]}

    # -- training -------------------------------------------------------------------------
    def regularizer(self, trainable: dict, state: Flat) -> Array:
        """An extra loss term (AdaLoRA's orthogonality penalty); 0 by default."""
        return jnp.zeros((), jnp.float32)

    def gradient_transform(self, rng: Array) -> optax.GradientTransformation | None:
        """An optax transformation of the clipped gradients, before the optimizer (Child-tuning_F's
        Bernoulli mask), or None. ``rng`` derives from the run's seed. The train step passes the
        method state as the extra argument ``method_state`` (an ``optax.
        GradientTransformationExtraArgs`` receives it in ``update(updates, state, params, *,
        method_state, **extra)``): a transform that needs the state (LoRA-FA's projection of B's
        gradient by its frozen A) reads it there; others ignore it."""
        return None

    def lr_multipliers(self) -> tuple[tuple[str, float], ...]:
        """``((regex, multiplier), ...)`` scaling the optimizer's *updates* of the trainable params
        whose key (``"added.<name>"``, ``"base.<path>"``, ``"head.<path>"``) matches the regex
        (first match wins), applied after the optimizer so that Adam's normalisation does not
        cancel it (LoRA+: B's rate = ratio × A's). Added to ``train.lr_mults``; default none."""
        return ()

    def update_state(self, state: Flat, trainable: dict, grads: dict, step: Array) -> tuple[Flat, dict]:
        """After each optimizer step: new state and possibly modified trainable (AdaLoRA masking).

        ``trainable`` is the updated tree; ``grads`` the step's raw gradients of the whole
        trainable tree (before clipping: a method that wants them as the optimizer used them
        applies ``InitContext.clip_norm``)."""
        return state, trainable

    # -- merge ----------------------------------------------------------------------------
    def merge(self, base: Flat, added: Flat, state: Flat) -> Flat:
        """Base params with the method's update folded in (inference at the base model's cost)."""
        raise NotImplementedError(f"method {self.name!r} cannot be merged into the base weights")

    def unmerge(self, merged: Flat, added: Flat, state: Flat) -> Flat:
        raise NotImplementedError(f"method {self.name!r} cannot be unmerged")

    def low_rank_factors(self, added: Flat, state: Flat) -> dict[str, tuple[Array, Array]] | None:
        """The update as ``{site: (A, B)}`` with ΔW = A B (flax (in, out) layout, every scaling
        folded into B) when it is a plain sum on the pretrained kernels, else None (DoRA
        re-normalises, PiSSA rewrites the base). Adapter sets stack and combine methods
        through it."""
        return None

    # -- saving ---------------------------------------------------------------------------
    def for_saving(self, trainable: dict) -> tuple["Method", dict]:
        """The (method, trainable tree) written to an adapter file; prefix tuning folds its
        training-time MLP into the plain prefixes here. Default: as trained."""
        return self, trainable

    # -- Hugging Face PEFT format (peftjax.interop) -------------------------------------------
    # PEFT's ``peft_type`` for a method that describes its own adapter files through the three
    # hooks below, so that ``peftjax.interop`` exports and imports it without naming it (IA3,
    # HIRA). None: no such description (LoRA, DoRA, AdaLoRA, VeRA and prompt tuning have
    # interop's built-in formats; other methods have no PEFT equivalent).
    peft_format: ClassVar[str | None] = None

    def peft_config(self, *, conv1d: bool) -> dict[str, Any]:
        """The ``adapter_config.json`` fields of this method's PEFT adapter, besides those
        interop writes for every adapter (``peft_type``, ``target_modules``, ``task_type``,
        ``modules_to_save``, ...). ``conv1d``: the adapted modules are GPT-2 Conv1D layers
        (PEFT's ``fan_in_fan_out``)."""
        raise NotImplementedError(f"method {self.name!r} has no Hugging Face PEFT format")

    def peft_tensors(self) -> dict[str, tuple[PeftTensor, ...]]:
        """``{module path: its tensors}`` of the PEFT file: the modules PEFT adapts (its
        ``target_modules``, written as the explicit list of these paths) and how each of this
        method's added params is stored there."""
        raise NotImplementedError(f"method {self.name!r} has no Hugging Face PEFT format")

    def peft_added(self, added: Flat, state: Flat) -> Flat:
        """The added params as the method's Hugging Face PEFT tensors hold them, from the
        trainable ``added`` and the method state. A method that keeps some of PEFT's trainable
        tensors in its state returns them here (LoRA-FA's frozen A: PEFT's file is a plain
        LoRA with A and B); default: ``added``."""
        return added

    @classmethod
    def config_from_peft(cls, peft_config: Mapping[str, Any],
                         targets: Callable[[Any], str]) -> dict[str, Any]:
        """This method's config (a mapping for ``create``) from a PEFT ``adapter_config.json``.
        ``targets(value)`` translates a PEFT ``target_modules`` value (list: equal or
        ``.``-suffix; string: full match; ``"all-linear"``) into a peftjax target regex. Raises
        ``ValueError`` naming each field peftjax does not implement."""
        raise NotImplementedError(f"method {cls.name!r} has no Hugging Face PEFT format")

    # -- accounting -----------------------------------------------------------------------
    def count_added(self, abstract_base: Flat) -> int:
        """Number of added trainable params, from shapes alone (override for data-driven sizes)."""
        added = jax.eval_shape(lambda b: self.init(jax.random.PRNGKey(0), b, InitContext()),
                               abstract_base)
        return int(sum(np.prod(v.shape, dtype=np.int64) for v in added.values()))

    def count_selected(self, abstract_base: Flat) -> int:
        """Trainable base entries kept outside whole params (sparse selections), from shapes."""
        return 0

    def accounting(self) -> dict[str, Any]:
        """Extra facts stated beside the counts (how the head is counted, params updated in
        training when they differ from the saved ones); default none."""
        return {}

    def report(self, trainable: dict, state: Flat) -> dict[str, Any]:
        """Method-specific results merged into a run's result.json. ``rank_allocation``
        ({site: rank}, AdaLoRA's final ranks) and ``rank_budget`` are plotted by the grid."""
        return {}

    # -- conveniences built on the protocol ----------------------------------------------
    def partition(self, base: Flat) -> tuple[Flat, Flat, Flat]:
        """Splits flat base params into (trainable base, head, frozen)."""
        train, head, frozen = {}, {}, {}
        for path, value in base.items():
            if self.sites.is_head(path):
                head[path] = value
            elif self.trains_base(path):
                train[path] = value
            else:
                frozen[path] = value
        return train, head, frozen

    def setup(self, rng: Array, base: Flat, ctx: InitContext | None = None) -> PeftParams:
        """Initialises the method on (flat) pretrained base params.

        ``init`` gets ``rng`` itself (methods derive per-site keys with ``fold_in(rng, i)``);
        ``init_state`` gets ``fold_in(rng, STATE_STREAM)``, a stream no site index reaches, so a
        state drawn at random (VeRA's projections) never repeats the params' draws.
        """
        ctx = ctx or InitContext()
        self.prepare(ctx)
        added = self.init(rng, base, ctx)
        state_rng = jax.random.fold_in(rng, STATE_STREAM)
        base = self.transform_base(base, added)
        train, head, frozen = self.partition(base)
        state = self.init_state(state_rng, base, added, ctx)
        return PeftParams({"base": train, "added": added, "head": head}, frozen, state)

    def apply(self, trainable: dict, frozen: Flat, state: Flat, batch: Mapping[str, Any], *,
              train: bool = False, rng: Array | None = None, **kwargs) -> Any:
        """Runs the adapted model (to be called inside jit)."""
        from flax import traverse_util

        base = self.effective_base(trainable, frozen, state)
        hook_rng, drop_rng = (jax.random.split(rng) if rng is not None else (None, None))
        bound = self.hooks(trainable["added"], state, train=train, rng=hook_rng)
        with hooks_lib.use(bound):
            return self.model.apply(traverse_util.unflatten_dict(base, sep="."), batch,
                                    train=train, rng=drop_rng, **kwargs)

    def merged_params(self, trainable: dict, frozen: Flat, state: Flat) -> Flat:
        """Flat base params with the update merged in: run the plain model on them."""
        return self.merge(self.effective_base(trainable, frozen, state), trainable["added"], state)


# --------------------------------------------------------------------------------------------
# Registry.

_METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a method under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__module__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def registered() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(registered())}") from None


def default_config(name: str) -> dict[str, Any]:
    """The method's config defaults (its ``Config`` dataclass) as a plain dict with ``name``.

    ``configs/methods/<name>.py`` is built from this, so the dataclass is the one source of a
    method's defaults: a config file cannot silently disagree with the code it configures.
    Tuples become lists (ml_collections and the command line handle those).
    """
    cls = method_class(name)
    values = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}


def create(name: str, model: Model, config: Mapping[str, Any] | None = None,
           sites: Sites | None = None) -> Method:
    """The method ``name`` configured by ``config`` (a mapping; unknown keys are errors)."""
    cls = method_class(name)
    return cls(config_from(cls.Config, config, name), model, sites)


def count_params(method: Method, abstract_base: Flat | None = None) -> dict[str, int]:
    """Trainable (excluding head), head and total param counts, on shapes alone.

    total = base params (head included) + added params, the denominator HF PEFT's
    ``print_trainable_parameters`` and the DoRA paper use.
    """
    from flax import traverse_util

    if abstract_base is None:
        abstract_base = traverse_util.flatten_dict(method.model.abstract_params(), sep=".")
    size = lambda v: int(np.prod(v.shape, dtype=np.int64))
    train = head = base_total = 0
    for path, v in abstract_base.items():
        base_total += size(v)
        if method.sites.is_head(path):
            head += size(v)
        elif method.trains_base(path):
            train += size(v)
    added = method.count_added(abstract_base)
    train += method.count_selected(abstract_base)  # sparse selections (FishMask): entries
    return {"trainable_params": train + added, "head_params": head,
            "total_params": base_total + added}
