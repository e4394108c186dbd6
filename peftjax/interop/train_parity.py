"""Training parity with Hugging Face PEFT: the same run, step by step, in peftjax and in
transformers + peft (PyTorch, CPU).

Forward parity (equal logits) and adapter-file parity say nothing about *training*: the init,
the scaling, what is trainable, weight-decay exclusions, the schedule, AdaLoRA's budget and
masking, prefix reparameterisation and the optimizer all act only once steps are taken. This
module trains one method both ways from one starting point and compares the loss at every step
and the trained tensors at the end (``run_method``); ``scripts/train_vs_peft.py`` runs it over
every shared method and ``tests/interop/test_train_parity.py`` on tiny random BERT and Llama.

What is made identical, and how
-------------------------------
* **Starting point.** One checkpoint folder (config.json + safetensors) is read by both sides;
  our side is built from its config.json with every dropout probability set to 0 and loaded with
  ``hf_io.params_from_tensors``, the torch side is ``AutoModelForSequenceClassification
  .from_pretrained`` of the same folder and the same dropout-free config, then given our task
  head (randomly initialised on our side) and checked equal to our params tensor by tensor.
  The method's initial tensors are drawn once, by peftjax, and carried to PEFT: as a PEFT
  adapter folder (``export_adapter`` → ``PeftModel.from_pretrained(..., is_trainable=True)``:
  LoRA, rsLoRA, DoRA, LoRA+, LoRA-FA, AdaLoRA, VeRA with its projections, HiRA, (IA)³) or copied
  by name into the PEFT model's parameters (prompt and prefix tuning — PEFT will not load a
  prompt-learning folder as trainable, and its file folds the prefix MLP away; PiSSA's and
  OLoRA's factors and residual base, which PEFT computes itself first and we compare before
  overwriting; LoRA-GA's factors and residual into a plain PEFT LoRA, since PEFT's LoRA-GA init
  needs its own gradient pass — compared with ours in tests/methods/test_lora_ga.py; LN tuning's
  norm copies, equal to the base's). Random inits are never redrawn: every trainable tensor and every frozen
  base tensor is checked equal at step 0 (``initial_param_max_abs_diff``).
* **Batches.** ``peftjax.data.train_batches`` of the encoded training split (length-bucketed);
  the torch side consumes the very same numpy arrays. Dropout is off on both sides.
* **Optimizer.** Ours: ``peftjax.train.optim.make_optimizer`` from a composed train config
  (``configs/train.py``: global-norm clipping → the method's gradient transform → AdamW with
  decay masked off names ending ``.bias``/``.scale`` → the peak rate → per-parameter learning-rate
  multipliers). Theirs: ``torch.optim.AdamW`` with transformers' Trainer parameter groups
  (``Trainer.get_decay_parameter_names``: no decay for biases and norm weights),
  ``torch.nn.utils.clip_grad_norm_`` before ``optimizer.step()`` and
  ``transformers.get_{linear,cosine,constant}_schedule_with_warmup`` stepped after it; LoRA+ uses
  PEFT's ``create_loraplus_optimizer``. Before training, every trainable tensor's learning-rate
  multiplier and decay flag are compared between the two optimizers (``OptimizerMismatch``
  otherwise). Facts checked in code and tests: AdamW's update is the same (decoupled decay
  lr·λ·θ; ε added to √v̂ after bias correction); the first update uses the schedule's value at
  count 0 on both sides (``LambdaLR`` is stepped after ``optimizer.step()``, optax reads its count
  before incrementing it), so with warm-up the first update has rate 0 on both; torch's clipping
  divides by ``‖g‖ + 1e-6`` where optax divides by ``‖g‖`` — a relative difference of 1e-6/‖g‖ on
  clipped steps only, far below the tolerances.
* **Loss.** Mean cross-entropy over the batch on both sides; AdaLoRA trains both sides with
  PEFT's orthogonality regulariser added (PEFT adds it to ``outputs.loss``), and the curves
  compare the task loss (cross-entropy from the logits) of each step.
* **AdaLoRA.** ``update_and_allocate(global_step)`` after ``optimizer.step()`` with
  ``global_step`` = the step's 0-based index, as peftjax's ``update_state(..., step)``; the final
  per-matrix rank patterns are compared.

Documented choices where peftjax deviates from PEFT by design, set to PEFT's behaviour here
------------------------------------------------------------------------------------------------
* The task head: all-MiniLM-L6-v2's config defaults to ``pooling="mean"``, which transformers'
  BertForSequenceClassification cannot represent; the parity run uses ``pooling="cls"``.
* Prefix tuning positions: PEFT hands the prefixes to transformers as a p-long cache, which
  numbers the real tokens from p; peftjax keeps positions 0.. (``peftjax.methods.prefix_tuning``).
  peftjax's models take no position offset, so the PyTorch side is given ``position_ids =
  0..L-1`` explicitly; ``prefix_default_positions_loss_rel_diff`` measures what PEFT's own
  numbering changes at step 0.
* Prefix tuning through PEFT's ``PeftModelForSequenceClassification.forward`` fails with
  transformers 5 (PEFT looks for a ``past_key_values`` parameter, which transformers renamed
  ``cache``), so the torch side runs PEFT's own prefix path by hand: ``get_prompt`` (PEFT's
  PrefixEncoder and cache layout), the attention mask extended by p ones, and the base model
  called with ``past_key_values`` — exactly the branch PEFT takes when the check passes.
* LoRA-FA: PEFT's method is its optimizer (``create_lorafa_optimizer``: lora_A frozen, B's
  gradient projected by (A Aᵀ + δI)⁺ / s²); peftjax's ``lora_fa`` runs with
  ``gradient_projection=True`` and PEFT's weight decay 0. PEFT's optimizer fixes β and ε (1e-6) in
  its param group: they are set to the run's. It projects under bf16 autocast wherever
  accelerate reports bf16, CPUs included: the comparison is fp32 on both sides
  (``fp32_lora_fa_projection``). It remains transformers' legacy AdamW, adding ε to √v before
  the bias correction (optax: to √v̂): a documented difference, measured in the report.
* LoRA+: PEFT's (and the LoRA+ reference code's) ``create_loraplus_optimizer`` puts every 1-D
  trainable tensor — the head's bias — into B's group, at ratio × lr; the parity run's
  ``train.lr_mults`` say the same (``lora_B$`` and ``\\.bias$`` × ratio).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import math
import os
import re
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.methods import core
from peftjax.models import hf_io
from peftjax.models.registry import Model, build_model

# Parity names, in report order. Each is a peftjax method (plus settings) that PEFT also has.
METHODS = ("lora", "rslora", "dora", "pissa", "olora", "lora_ga", "loraplus", "lora_fa", "adalora",
           "vera", "hira", "ia3", "prompt_tuning", "prefix_tuning", "ln_tuning", "bitfit", "full")
LORAPLUS_RATIO = 16.0


class ParityError(RuntimeError):
    """The two sides are not running the same training (different trainable tensors, optimizer
    settings or starting values); the message lists what differs."""


class OptimizerMismatch(ParityError):
    """A trainable tensor gets another learning-rate multiplier or weight-decay flag on one side."""


# --------------------------------------------------------------------------------------------
# What each parity method runs.


@dataclasses.dataclass(frozen=True)
class Spec:
    """One parity method: the peftjax method and settings, and how PEFT gets the same start."""

    name: str                   # parity name (``METHODS``)
    method: str                 # peftjax registry name
    config: dict                # peftjax method config overrides (beside the method's defaults)
    train: dict                 # train config overrides (LoRA+'s multipliers)
    carry: str                  # "file": PEFT adapter folder | "copy": by name | "plain": no peft


def spec(name: str, steps: int) -> Spec:
    """The settings of parity method ``name`` for a run of ``steps`` steps.

    Method settings are the peftjax defaults (``configs/methods``) except where a comparison
    needs more: PiSSA is LoRA with ``init="pissa"``; LoRA+ is LoRA with B's (and 1-D tensors')
    rate × 16; AdaLoRA spans the run with all three phases of its budget (warm-up ``steps/10``,
    final ``steps/5`` at the target budget, masking every ``steps/20`` steps in between).
    """
    if name not in METHODS:
        raise ValueError(f"unknown parity method {name!r}; valid: {', '.join(METHODS)}")
    if name == "rslora":
        return Spec(name, "lora", {"use_rslora": True}, {}, "file")
    if name == "pissa":
        return Spec(name, "lora", {"init": "pissa"}, {}, "copy")
    if name == "olora":   # PEFT computes its QR init first; compared, then ours is copied over
        return Spec(name, "olora", {}, {}, "copy")
    if name == "lora_ga":
        # PEFT's LoRA-GA init needs its own gradient pass (preprocess_loraga); the factors and the
        # residual are compared with it in tests/methods/test_lora_ga.py, and here carried into a
        # plain PEFT LoRA: after init, LoRA-GA trains as LoRA against the rewritten base.
        return Spec(name, "lora_ga", {"progress": False}, {}, "copy")
    if name == "lora_fa":
        # PEFT's LoRA-FA is its optimizer (create_lorafa_optimizer): A frozen, B's gradient
        # projected; its weight decay defaults to 0 (and would reach biases after the step).
        return Spec(name, "lora_fa", {"gradient_projection": True}, {"weight_decay": 0.0}, "file")
    if name == "ln_tuning":   # PEFT trains a copy of each targeted norm; equal to the base at start
        return Spec(name, "ln_tuning", {}, {}, "copy")
    if name == "loraplus":
        r = LORAPLUS_RATIO
        return Spec(name, "lora", {}, {"lr_mults": f"lora_B$={r:g},\\.bias$={r:g}"}, "file")
    if name == "adalora":
        cfg = {"total_step": steps, "tinit": max(1, steps // 10), "tfinal": max(1, steps // 5),
               "deltaT": max(1, steps // 20)}
        return Spec(name, "adalora", cfg, {}, "file")
    if name in ("prefix_tuning", "prompt_tuning"):
        # PEFT refuses to load a prompt-learning adapter folder as trainable
        # (``from_pretrained(..., is_trainable=True)``): the tensors are copied by name.
        return Spec(name, name, {}, {}, "copy")
    if name in ("bitfit", "full"):
        return Spec(name, name, {}, {}, "plain")
    return Spec(name, name, {}, {}, "file")


def method_config(s: Spec, overrides: Mapping[str, Any] | None = None) -> dict:
    """The peftjax method config: the method's defaults, the spec's settings, then ``overrides``."""
    cfg = {k: v for k, v in core.default_config(s.method).items() if k != "name"}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    cfg.update(s.config)
    cfg.update(overrides or {})
    return cfg


def train_config(s: Spec, *, steps: int, batch_size: int, overrides: Mapping[str, Any] | None = None):
    """The composed train config (``configs/train.py``: train defaults + the method's, e.g. its
    learning rate) with the run's steps and batch, the spec's settings, then ``overrides``."""
    from configs.train import get_config

    tc = get_config(f"method={s.method}").train
    with tc.unlocked():
        tc.steps, tc.batch_size = int(steps), int(batch_size)
        tc.update(dict(s.train))
        tc.update(dict(overrides or {}))
    return tc


def warmup_steps(tc, total: int) -> int:
    """Warm-up updates as ``make_optimizer`` counts them (``warmup_steps``, else the rounded
    ``warmup_ratio × total``; transformers' Trainer rounds the ratio up instead — the same
    whenever the product is an integer)."""
    return int(tc.warmup_steps or int(round(tc.get("warmup_ratio", 0.0) * total)))


# --------------------------------------------------------------------------------------------
# The base model on both sides.


def without_dropout(hf_config: Mapping[str, Any]) -> dict:
    """A config.json dict with every dropout probability 0 (BERT's hidden / attention / classifier
    dropout, Llama's attention dropout, GPT-2's ``*_pdrop``, T5's ``dropout_rate``)."""
    out = dict(hf_config)
    for key, value in hf_config.items():
        if ("dropout" in key or key.endswith("_pdrop")) and (value is None or isinstance(value, (int, float))) \
                and not isinstance(value, bool):
            out[key] = 0.0
    if out.get("model_type") in ("bert", "roberta"):
        out["classifier_dropout"] = 0.0
    return out


@dataclasses.dataclass
class Base:
    """One checkpoint on our side (dropout off), ready to run methods on."""

    folder: str
    hf_config: dict           # config.json without dropout
    model: Model              # classification head
    params: dict              # flat params (head randomly initialised when the folder has none)
    fresh: list[str]          # params not in the checkpoint (the head, a missing pooler)


def load_base(folder: str, *, num_labels: int, pooling: str = "cls", seed: int = 0) -> Base:
    """Our classifier of a checkpoint folder, every dropout probability 0 (see ``Base``)."""
    hf = without_dropout(hf_io.read_config(folder))
    model = build_model(hf, head="classification", num_labels=num_labels, pooling=pooling)
    params, fresh = hf_io.params_from_tensors(model, hf_io.read_safetensors(folder),
                                              rng=jax.random.PRNGKey(seed), source=folder)
    return Base(folder, hf, model, hf_io.flatten(params), list(fresh))


def torch_base(base: Base):
    """transformers' classifier of the same folder and config, holding exactly our params.

    The checkpoint's tensors are loaded by transformers itself and checked equal to ours (both
    loaders read the same file); the params our side initialised (the head, a pooler the
    checkpoint lacks) are copied over. Eager attention: the composition peftjax compiles.
    """
    import torch
    import transformers

    hf = dict(base.hf_config)
    model_type = hf.pop("model_type")
    hf["num_labels"] = base.model.num_labels
    hf.pop("architectures", None)
    config = transformers.AutoConfig.for_model(model_type, **hf)
    config._attn_implementation = "eager"
    net = transformers.AutoModelForSequenceClassification.from_pretrained(
        base.folder, config=config, dtype=torch.float32)
    ours = hf_io.tensors_from_params(hf_io.unflatten(base.params), base.model.family)
    theirs = net.state_dict()
    fresh_names = {hf_io.hf_name(p, base.model.family)[0] for p in base.fresh}
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise ParityError(f"transformers' model has no tensors named {missing[:10]}")
    differ = [n for n in ours if n not in fresh_names
              and not np.array_equal(theirs[n].numpy(), ours[n])]
    if differ:
        raise ParityError(f"transformers and peftjax read different values from {base.folder}: "
                          f"{differ[:10]}")
    with torch.no_grad():
        for name in fresh_names:
            theirs[name].copy_(torch.tensor(ours[name]))
    return net


# --------------------------------------------------------------------------------------------
# Tensor names: our trainable tree ↔ the PEFT model's parameters.

# peftjax added-param local name -> (PEFT suffix after "<module>.", layout); AdaLoRA's and VeRA's
# PEFT params are bare ParameterDict entries (no ".weight").
_LOW_RANK_NAMES = {"lora_A": ("lora_A.weight", "T"), "lora_B": ("lora_B.weight", "T"),
                   "lora_magnitude": ("lora_magnitude_vector.weight", "same")}
_ADALORA_NAMES = {"lora_A": ("lora_A", "T"), "lora_B": ("lora_B", "T"), "lora_E": ("lora_E", "col")}
_VERA_NAMES = {"vera_lambda_b": ("vera_lambda_b", "same"), "vera_lambda_d": ("vera_lambda_d", "same")}


def canonical(torch_name: str) -> str:
    """A parameter name of ``named_parameters`` without PEFT's wrappers: the adapter name
    ``default``, ``modules_to_save.default`` and ``base_layer``
    (``bert...query.lora_A.default.weight`` → ``bert...query.lora_A.weight``)."""
    n = torch_name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
    return re.sub(r"\.default(?=\.|$)", "", n)


def named_parameters(net) -> Iterable[tuple[str, Any]]:
    """``(name, param)`` of a plain transformers model or a PEFT model, named as in the
    transformers model (PEFT's ``base_model.model.`` dropped) plus ``prompt_encoder.*`` for
    prompt-learning methods."""
    import peft

    if not isinstance(net, peft.PeftModel):
        yield from net.named_parameters()
        return
    yield from net.get_base_model().named_parameters()
    if getattr(net, "prompt_encoder", None) is not None:
        for name, param in net.prompt_encoder.named_parameters():
            yield "prompt_encoder." + name, param


def torch_name(method: core.Method, model: Model, tree: str, key: str) -> tuple[str, str]:
    """``(canonical PEFT name, layout)`` of our trainable tensor ``key`` in tree ``tree``.

    Layouts: ``same``; ``T`` (flax (in, out) ↔ torch (out, in), or PEFT's (r, in) A); ``col``
    (AdaLoRA's E: ours (r,), PEFT's (r, 1)); ``reshape:AxB`` (the same values in PEFT's shape,
    from the method's ``peft_tensors``). LN tuning's trained norms are PEFT's copies
    (``<norm>.ln_tuning_layers.weight``).
    """
    if tree in ("base", "head", "frozen"):
        name, transpose = hf_io.hf_name(key, model.family)
        if tree == "base" and method.name == "ln_tuning":   # PEFT's trained copy of the norm
            module, _, leaf = name.rpartition(".")
            name = f"{module}.ln_tuning_layers.{leaf}"
        return name, "T" if transpose else "same"
    site, _, local = key.rpartition(".")
    if method.peft_format is not None:   # the method describes its PEFT tensors (IA3, HiRA)
        for t in method.peft_tensors().get(site, ()):
            if t.ours == local:
                return f"{site}.{t.peft}", "T" if t.transpose else "reshape:" + "x".join(map(str, t.shape))
        raise ParityError(f"{method.name}'s PEFT tensors name nothing for {key!r}")
    if method.name == "prompt_tuning":
        return "prompt_encoder.embedding.weight", "same"
    if method.name == "prefix_tuning":
        rest = key.split(".", 1)[1]   # "embedding" | "transform.0.kernel" | ...
        if rest == "embedding":
            return "prompt_encoder.embedding.weight", "same"
        if rest.endswith(".kernel"):
            return f"prompt_encoder.{rest[:-len('.kernel')]}.weight", "T"
        return f"prompt_encoder.{rest}", "same"
    table = {"adalora": _ADALORA_NAMES, "vera": _VERA_NAMES}.get(method.name, _LOW_RANK_NAMES)
    if local not in table:
        raise ParityError(f"no PEFT name is known for {method.name}'s tensor {key!r}")
    suffix, layout = table[local]
    return f"{site}.{suffix}", layout


def to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if layout.startswith("reshape:"):   # (IA)³'s (out,) vector is PEFT's (out, 1)
        return x.reshape(tuple(int(n) for n in layout.split(":")[1].split("x")))
    if layout == "T":
        return np.ascontiguousarray(x.T)
    if layout == "col":
        return x[:, None]
    return x


@dataclasses.dataclass
class Pair:
    """One trainable tensor on both sides."""

    tree: str            # our tree: base | added | head
    key: str             # our key in it
    torch_name: str      # the PEFT model's parameter name
    layout: str
    param: Any           # the torch parameter


def pair_trainables(method: core.Method, model: Model, trainable: dict, net) -> list[Pair]:
    """Every trainable tensor of ours matched to the torch parameter that trains it.

    Raises ``ParityError`` listing any tensor trained on one side only: the two sides would not
    be training the same parameters.
    """
    theirs = {canonical(n): (n, p) for n, p in named_parameters(net) if p.requires_grad}
    pairs, only_ours = [], []
    for tree in ("base", "added", "head"):
        for key in trainable[tree]:
            name, layout = torch_name(method, model, tree, key)
            if name not in theirs:
                only_ours.append(f"{tree}.{key} (as {name})")
                continue
            full, param = theirs.pop(name)
            pairs.append(Pair(tree, key, full, layout, param))
    if only_ours or theirs:
        raise ParityError(
            f"{method.name}: the two sides train different tensors; peftjax only: "
            f"{only_ours[:20] or 'none'}; PEFT only: {sorted(v[0] for v in theirs.values())[:20] or 'none'}")
    for p in pairs:
        want = to_torch_layout(np.zeros(np.shape(trainable[p.tree][p.key]), np.float32), p.layout).shape
        if tuple(p.param.shape) != tuple(want):
            raise ParityError(f"{p.tree}.{p.key}: shape {want} in torch layout, PEFT's "
                              f"{p.torch_name} is {tuple(p.param.shape)}")
    return pairs


def max_abs_diff(pairs: Iterable[Pair], trainable: dict) -> float:
    """max |ours - theirs| over the paired tensors (ours in torch layout)."""
    out = 0.0
    for p in pairs:
        ours = to_torch_layout(np.asarray(jax.device_get(trainable[p.tree][p.key])), p.layout)
        out = max(out, float(np.max(np.abs(ours - p.param.detach().numpy()), initial=0.0)))
    return out


def frozen_max_abs_diff(method: core.Method, model: Model, frozen: dict, net) -> float:
    """max |ours - theirs| over the frozen base tensors the PEFT model holds (PiSSA: residuals)."""
    theirs = {canonical(n): p for n, p in named_parameters(net) if not p.requires_grad}
    out = 0.0
    for key, value in frozen.items():
        name, layout = torch_name(method, model, "frozen", key)
        if name not in theirs:
            raise ParityError(f"frozen {key} (as {name}) is not in the PEFT model")
        d = to_torch_layout(np.asarray(value), layout) - theirs[name].detach().numpy()
        out = max(out, float(np.max(np.abs(d), initial=0.0)))
    return out


# --------------------------------------------------------------------------------------------
# Building the PEFT side.


def _peft_task_kwargs(model: Model) -> dict:
    from peftjax.interop.hf_peft import modules_to_save, task_type

    return {"task_type": task_type(model), "modules_to_save": modules_to_save(model) or None}


def peft_side(s: Spec, method: core.Method, model: Model, peft: core.PeftParams, template,
              workdir: str, *, check_init: bool = True):
    """The PEFT model on a copy of ``template`` (the base), starting from ``peft``'s tensors.

    Returns ``(torch module, facts)``. Facts hold the comparisons made while building it:
    ``init_vs_peft`` (``init_distributions``: PEFT's own draw of the method, made first, against
    ours) and for PiSSA ``pissa_init_vs_peft`` (our SVD init against PEFT's).
    """
    import peft as peft_lib

    from peftjax.interop.hf_peft import export_adapter

    facts: dict[str, Any] = {}
    if s.carry == "plain":
        # BitFit and full fine-tuning: plain transformers, only the trained tensors require grad.
        net = copy.deepcopy(template)
        trained = {torch_name(method, model, t, k)[0]
                   for t in ("base", "head") for k in peft.trainable[t]}
        for name, p in net.named_parameters():
            p.requires_grad_(name in trained)
        return net, facts
    if s.carry == "file":
        folder = os.path.join(workdir, f"{s.name}_adapter")
        export_adapter(method, peft.trainable, folder, state=peft.state)
        if check_init:   # the exported config, PEFT's own init
            config = peft_lib.PeftConfig.from_pretrained(folder)
            config.inference_mode = False
            own = peft_lib.get_peft_model(copy.deepcopy(template), config)
            facts["init_vs_peft"] = init_distributions(method, model, peft, own)
            del own
        net = peft_lib.PeftModel.from_pretrained(copy.deepcopy(template), folder, is_trainable=True)
        return _freeze_lora_fa_a(s, net), facts
    net = copy.deepcopy(template)
    if s.method == "prompt_tuning":
        init = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM"}.get(method.config.init)
        # An encoder-decoder: PEFT sizes the prompt table for two submodules (2p rows) but its
        # prompt-tuning forward prepends only the first p, to the encoder input, as ours does;
        # one submodule is the same computation without the p rows that never train.
        extra = {"num_transformer_submodules": 1} if model.head == "seq2seq_lm" else {}
        config = peft_lib.PromptTuningConfig(num_virtual_tokens=method.config.num_virtual_tokens,
                                             token_dim=method.hidden, prompt_tuning_init=init or "RANDOM",
                                             **extra, **_peft_task_kwargs(model))
        pm = peft_lib.get_peft_model(net, config)
        if check_init and init:
            facts["init_vs_peft"] = init_distributions(method, model, peft, pm)
    elif s.method == "prefix_tuning":
        c = method.config
        config = peft_lib.PrefixTuningConfig(
            num_virtual_tokens=c.num_virtual_tokens, prefix_projection=c.prefix_projection,
            encoder_hidden_size=method.hidden, token_dim=method.token_dim,
            num_attention_heads=method.kv_heads, num_layers=len(method.layers), **_peft_task_kwargs(model))
        pm = peft_lib.get_peft_model(net, config)
        if check_init:
            facts["init_vs_peft"] = init_distributions(method, model, peft, pm)
    elif s.method in ("lora", "olora", "lora_ga"):
        # PiSSA, OLoRA: PEFT computes its own init first (compared); LoRA-GA: a plain LoRA. Then
        # our factors and residual base are copied over.
        c = method.config
        init = {"pissa": "pissa", "olora": "olora"}.get(s.name, True)
        config = peft_lib.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                     target_modules=list(method.targets), use_rslora=c.use_rslora,
                                     init_lora_weights=init, **_peft_task_kwargs(model))
        pm = peft_lib.get_peft_model(net, config)
        if init is not True and check_init:
            facts[f"{s.name}_init_vs_peft"] = pissa_compare(method, model, peft, pm)
        _copy_frozen(method, model, peft.frozen, pm, only=[t + ".kernel" for t in method.targets])
    elif s.method == "ln_tuning":
        modules = sorted({torch_name(method, model, "frozen", k)[0].rpartition(".")[0]
                          for k in peft.trainable["base"]})
        config = peft_lib.LNTuningConfig(target_modules=modules, **_peft_task_kwargs(model))
        pm = peft_lib.get_peft_model(net, config)
    else:
        raise ParityError(f"no way to carry {s.name}'s initial tensors to PEFT")
    _copy_trainables(pair_trainables(method, model, peft.trainable, pm), peft.trainable)
    return pm, facts


def _freeze_lora_fa_a(s: Spec, net):
    """LoRA-FA: PEFT's lora_A frozen, as ``create_lorafa_optimizer`` does (ours is state)."""
    if s.method == "lora_fa":
        for name, param in net.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return net


def init_distributions(method: core.Method, model: Model, peft: core.PeftParams, own) -> dict:
    """Our initial tensors against PEFT's own init of the same method (``own``: a PEFT model
    freshly made from the same config, its random tensors drawn by torch).

    The training runs start from one draw (ours, carried over), so they cannot see a wrong init
    *distribution* — a VeRA bound √6/√fan_in vs 1/√fan_in, a Linear init of the prefix MLP —
    which this checks: per kind of tensor (``lora_A``, ``vera_lambda_d``, VeRA's projections,
    ``prefix_encoder.transform.0.kernel``, ...; all targets pooled), tensors PEFT initialises
    deterministically (zeros, d_initial, DoRA's ‖W0‖_c) must be equal entry by entry; random ones
    must have the same standard deviation and largest magnitude up to sampling error. Returns
    ``{kind: {"n", "kind": "equal"|"random", "max_abs_diff" | "std_ratio", "max_abs_ratio"}}``
    and ``ok``: every equal kind within 1e-5 and every random kind's std ratio within
    ``1 ± (0.02 + 4/√n)`` (n values; several standard errors of the estimate).
    """
    if method.name == "lora_fa":
        _freeze_lora_fa_a(spec("lora_fa", 1), own)
    pairs = pair_trainables(method, model, peft.trainable, own)
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    if method.name == "lora_fa":   # the frozen A: state here, a frozen lora_A in PEFT
        theirs = {canonical(n): p for n, p in named_parameters(own)}
        groups["lora_A"] = [(to_torch_layout(np.asarray(peft.state[f"{site}.lora_A"]), "T"),
                             theirs[f"{site}.lora_A.weight"].detach().numpy()) for site in method.targets]
    for p in pairs:
        if p.tree != "added":
            continue   # the head (and BitFit/full's base) is the checkpoint's / ours on both sides
        site, _, local = p.key.rpartition(".")
        kind = local if site in method.sites.linear else p.key
        ours = to_torch_layout(np.asarray(peft.trainable["added"][p.key]), p.layout)
        groups.setdefault(kind, []).append((ours, p.param.detach().numpy()))
    if method.name == "prompt_tuning" and method.config.init == "vocab":
        # Rows sampled from the vocabulary (PEFT's SAMPLE_VOCAB): 20 rows are 20 draws, not
        # 20·d independent values, so the check is exact instead — every row on both sides is a
        # row of the word-embedding table.
        table = own.get_input_embeddings().weight.detach().numpy()
        ours_rows = to_torch_layout(np.asarray(peft.trainable["added"][f"{method.site}.prompt_embeddings"]), "same")
        theirs_rows = own.prompt_encoder["default"].embedding.weight.detach().numpy()
        inside = lambda rows: int(sum(np.any(np.all(np.abs(table - r) <= 1e-7 * max(1.0, np.abs(r).max()),  # noqa: E731
                                                    axis=1)) for r in rows))
        a, b = inside(ours_rows), inside(theirs_rows)
        return {"ok": a == len(ours_rows) and b == len(theirs_rows),
                "kinds": {"prompt_embeddings": {"n": len(ours_rows), "kind": "vocabulary rows",
                                                "ours_rows_in_table": a, "peft_rows_in_table": b}}}
    if method.name == "vera":   # the shared projections (state here, buffers in PEFT)
        for name in ("vera_A", "vera_B"):
            groups[name] = [(to_torch_layout(np.asarray(peft.state[name]), "T"),
                             getattr(own.base_model, name)["default"].numpy())]
    out, ok = {}, True
    for kind, items in sorted(groups.items()):
        ours = np.concatenate([a.ravel() for a, _ in items]).astype(np.float64)
        theirs = np.concatenate([b.ravel() for _, b in items]).astype(np.float64)
        n = int(theirs.size)
        scale = max(float(np.abs(theirs).max()), 1e-12)
        deterministic = float(theirs.std()) <= 1e-7 * scale or np.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
        if deterministic:
            diff = float(np.abs(ours - theirs).max()) / scale
            out[kind] = {"n": n, "kind": "equal", "max_abs_diff_rel": diff}
            ok &= diff <= 1e-5
        else:
            std_ratio = float(ours.std() / max(theirs.std(), 1e-30))
            out[kind] = {"n": n, "kind": "random", "std_ratio": std_ratio,
                         "max_abs_ratio": float(np.abs(ours).max() / scale),
                         "mean_ours": float(ours.mean()), "mean_peft": float(theirs.mean())}
            ok &= abs(std_ratio - 1) <= 0.02 + 4 / math.sqrt(n)
    return {"ok": bool(ok), "kinds": out}


def _copy_trainables(pairs: list[Pair], trainable: dict) -> None:
    import torch

    with torch.no_grad():
        for p in pairs:
            value = to_torch_layout(np.asarray(trainable[p.tree][p.key]), p.layout)
            p.param.copy_(torch.tensor(value))


def _copy_frozen(method, model, frozen: dict, net, only: list[str]) -> None:
    import torch

    theirs = {canonical(n): p for n, p in named_parameters(net)}
    with torch.no_grad():
        for key in only:
            name, layout = torch_name(method, model, "frozen", key)
            theirs[name].copy_(torch.tensor(to_torch_layout(np.asarray(frozen[key]), layout)))


def pissa_compare(method, model, peft: core.PeftParams, pm) -> dict:
    """Our PiSSA init against PEFT's, per target: the update s·B A and the residual base.

    The SVD fixes each singular vector only up to sign, so the factors are compared through the
    sign-free products (PEFT layout (out, in)); relative to the largest entry of W0.
    """
    theirs = {canonical(n): p.detach().numpy() for n, p in named_parameters(pm)}
    s = method.scaling
    delta = residual = 0.0
    for site in method.targets:
        a, b = (np.asarray(peft.trainable["added"][f"{site}.{n}"]) for n in ("lora_A", "lora_B"))
        ours_delta = (s * a @ b).T
        theirs_delta = s * theirs[f"{site}.lora_B.weight"] @ theirs[f"{site}.lora_A.weight"]
        w0 = np.abs(ours_delta + np.asarray(peft.frozen[site + ".kernel"]).T).max()
        delta = max(delta, float(np.abs(ours_delta - theirs_delta).max() / w0))
        ours_res = np.asarray(peft.frozen[site + ".kernel"]).T
        residual = max(residual, float(np.abs(ours_res - theirs[f"{site}.weight"]).max() / w0))
    return {"update_max_rel_diff": delta, "residual_max_rel_diff": residual}


def torch_optimizer(s: Spec, tc, net, model: Model):
    """AdamW as transformers' Trainer builds it (LoRA+: PEFT's ``create_loraplus_optimizer``)."""
    import torch
    import transformers

    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    betas, eps, wd, lr = (tc.b1, tc.b2), tc.eps, tc.weight_decay, tc.learning_rate
    if s.name == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(net, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=LORAPLUS_RATIO,
                                         loraplus_weight_decay=wd, betas=betas, eps=eps)
    if s.name == "lora_fa":
        from peft.optimizers import create_lorafa_optimizer

        c = method_config(s)
        opt = create_lorafa_optimizer(net, r=c["rank"], lora_alpha=c["alpha"], lr=lr, weight_decay=wd)
        for g in opt.param_groups:   # PEFT fixes β at (0.9, 0.999) and ε at 1e-6: the run's here
            g["betas"], g["eps"] = betas, eps
        return opt
    decay = set(transformers.Trainer.get_decay_parameter_names(None, net))
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": wd},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def torch_schedule(opt, tc, total: int):
    import transformers

    warm = warmup_steps(tc, total)
    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup}.get(tc.schedule)
    if tc.schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(opt, warm)
    return make(opt, warm, total)


def check_optimizers(tc, method: core.Method, trainable: dict, pairs: list[Pair], opt) -> dict:
    """Each trainable tensor's (learning-rate multiplier, decayed?) on both sides must agree.

    Ours: ``optim._decay_mask`` and the rules ``make_optimizer`` applies (``train.lr_mults``,
    then the method's ``lr_multipliers``; first match wins, on ``"<tree>.<key>"``). Theirs: each
    param group's lr / the base lr and whether its weight decay is > 0. Returns a summary.
    """
    from peftjax.train import optim

    decays = {optim._leaf_key(path): bool(v) for path, v in
              jax.tree_util.tree_leaves_with_path(optim._decay_mask(trainable))}
    rules = [(re.compile(p), m) for p, m in optim.parse_lr_mults(tc.get("lr_mults", ""))
             + optim.parse_lr_mults(method.lr_multipliers())]
    base_lr = float(tc.learning_rate)
    group_of = {}
    for g in opt.param_groups:
        for param in g["params"]:
            group_of[id(param)] = (float(g["lr"]) / base_lr, float(g["weight_decay"]) > 0)
    bad, mults = [], {}
    for p in pairs:
        key = f"{p.tree}.{p.key}"
        ours = (next((m for rx, m in rules if rx.search(key)), 1.0),
                decays[key] and float(tc.weight_decay) > 0)
        if id(p.param) not in group_of:
            bad.append(f"{key}: not in the torch optimizer")
            continue
        theirs = group_of[id(p.param)]
        if not (math.isclose(ours[0], theirs[0], rel_tol=1e-12) and ours[1] == theirs[1]):
            bad.append(f"{key}: peftjax (lr×{ours[0]:g}, decay {ours[1]}), "
                       f"{p.torch_name}: (lr×{theirs[0]:g}, decay {theirs[1]})")
        mults[key] = ours
    if bad:
        raise OptimizerMismatch(f"{method.name}: the optimizers differ on {len(bad)} tensor(s):\n  "
                                + "\n  ".join(bad[:30]))
    return {"tensors": len(pairs), "decayed": sum(d for _, d in mults.values()),
            "lr_multipliers": sorted({m for m, _ in mults.values()})}


# --------------------------------------------------------------------------------------------
# Training loops.


def _torch_inputs(batch: Mapping[str, np.ndarray], names: Iterable[str]) -> dict:
    import torch

    return {k: torch.from_numpy(np.asarray(batch[k]).astype(np.int64)) for k in names if k in batch}


def peft_prefix_forward(pm, inputs: dict, labels, *, shift_positions: bool = False):
    """PEFT's sequence-classification prefix-tuning forward (``_prefix_tuning_forward``, the
    branch for models whose forward takes ``past_key_values``), written out because PEFT 0.21's
    signature check fails on transformers 5, which renamed the argument ``cache``: PEFT's
    ``get_prompt`` (PrefixEncoder → per-layer key/value cache), the attention mask extended by
    ``num_virtual_tokens`` ones, and the base model called with the cache.

    ``shift_positions=False`` passes ``position_ids = 0..L-1`` (peftjax's prefix positions); True
    leaves them to transformers, which numbers the tokens from p (PEFT's default).
    """
    import torch

    ids = inputs["input_ids"]
    b, length = ids.shape
    p = pm.active_peft_config.num_virtual_tokens
    kwargs = dict(inputs)
    kwargs["attention_mask"] = torch.cat([torch.ones(b, p, dtype=inputs["attention_mask"].dtype),
                                          inputs["attention_mask"]], dim=1)
    if not shift_positions:
        kwargs["position_ids"] = torch.arange(length)[None].expand(b, length)
    return pm.base_model(**kwargs, labels=labels, past_key_values=pm.get_prompt(b))


@contextlib.contextmanager
def fp32_lora_fa_projection(s: Spec):
    """PEFT's LoraFAOptimizer projects B's gradient under bf16 autocast wherever accelerate
    reports bf16 (on CPU too); the comparison runs both sides in fp32, so the check is off here
    (peftjax's projection is fp32)."""
    if s.name != "lora_fa":
        yield
        return
    from peft.optimizers import lorafa

    before = lorafa.is_bf16_available
    lorafa.is_bf16_available = lambda *a, **k: False
    try:
        yield
    finally:
        lorafa.is_bf16_available = before


def train_torch(s: Spec, net, batches: list[dict], opt, sched, clip_norm: float,
                input_names: Iterable[str], snapshot_at: int | None = None) -> dict:
    with fp32_lora_fa_projection(s):
        return _train_torch(s, net, batches, opt, sched, clip_norm, input_names, snapshot_at)


def _train_torch(s: Spec, net, batches: list[dict], opt, sched, clip_norm: float,
                 input_names: Iterable[str], snapshot_at: int | None = None) -> dict:
    """Trains ``net`` on ``batches``; per step the task loss (mean cross-entropy of the logits),
    the loss trained on (``outputs.loss``: AdaLoRA's includes its regulariser) and wall times.
    ``snapshot_at``: AdaLoRA's importance averages are copied after that step."""
    import torch
    import torch.nn.functional as F

    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    adalora = getattr(getattr(net, "base_model", None), "update_and_allocate", None) \
        if s.method == "adalora" else None
    losses, objective, times, norms = [], [], [], []
    snapshot = None
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        inputs = _torch_inputs(batch, input_names)
        labels = torch.from_numpy(np.asarray(batch["labels"]).astype(np.int64))
        opt.zero_grad(set_to_none=True)
        if s.method == "prefix_tuning":
            out = peft_prefix_forward(net, inputs, labels)
        else:
            out = net(**inputs, labels=labels)
        task = F.cross_entropy(out.logits.float(), labels)
        out.loss.backward()
        if clip_norm and clip_norm > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip_norm)))
        opt.step()
        sched.step()
        if adalora is not None:
            adalora(step)   # after optimizer.step(), as PEFT documents; step = peftjax's index
        losses.append(float(task.detach()))
        objective.append(float(out.loss.detach()))
        times.append(time.perf_counter() - t0)
        if adalora is not None and step == snapshot_at:
            alloc = net.base_model.rankallocator
            snapshot = ({k: v.detach().clone() for k, v in alloc.exp_avg_ipt.items()},
                        {k: v.detach().clone() for k, v in alloc.exp_avg_unc.items()})
    return {"loss": losses, "objective": objective, "step_s": times, "grad_norm": norms,
            "importance": snapshot}


def train_ours(method: core.Method, tc, peft: core.PeftParams, batches: list[dict], seed: int,
               snapshot_at: int | None = None) -> dict:
    """Trains with peftjax's own optimizer and jitted train step (state donated);
    ``snapshot_at``: the method state is copied after that step."""
    from peftjax.train.optim import make_optimizer
    from peftjax.train.steps import init_state, make_train_step

    tx, _ = make_optimizer(tc, tc.steps, method, seed)
    state = init_state(peft.trainable, peft.state, tx, seed=seed)
    step = jax.jit(make_train_step(method, tx), donate_argnums=(0,))
    losses, times, norms, snapshot = [], [], [], None
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        state, m = step(state, peft.frozen, batch)
        losses.append(float(m["loss"]))
        times.append(time.perf_counter() - t0)
        norms.append(float(m["grad_norm"]))
        if i == snapshot_at:
            snapshot = jax.tree.map(np.asarray, state.method_state)
    return {"loss": losses, "step_s": times, "grad_norm": norms, "state": state,
            "snapshot": snapshot}


# --------------------------------------------------------------------------------------------
# One method, both sides.


def batches_for(encoded: Mapping[str, np.ndarray], *, steps: int, batch_size: int, seed: int) -> list[dict]:
    """The run's ``steps`` training batches (``peftjax.data.train_batches``), held in memory so
    both sides consume the same arrays."""
    from peftjax import data

    return list(itertools.islice(data.train_batches(encoded, batch_size, seed), steps))


def batches_digest(batches: list[dict]) -> str:
    """sha256 of the token ids, masks and labels of ``batches`` in order."""
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()


def adalora_patterns(method, state: dict, pm) -> dict:
    """Final AdaLoRA rank patterns: ``{site: {"ours": [..], "peft": [..]}}`` (kept triplets)."""
    ours = {site: [bool(v) for v in np.asarray(state[site + ".rank_mask"]) > 0] for site in method.targets}
    pattern = pm.peft_config["default"].rank_pattern or {}
    theirs = {}
    for name, keep in pattern.items():
        site = canonical(name).removesuffix(".lora_E")
        theirs[site] = [bool(v) for v in (keep.view(-1).tolist() if hasattr(keep, "view") else keep)]
    full = [True] * method.config.init_r
    return {site: {"ours": ours[site], "peft": theirs.get(site, full)} for site in method.targets}


def adalora_importance_diff(method, ours: Mapping[str, np.ndarray], theirs: tuple[dict, dict]) -> float:
    """max |ours - PEFT's| / max |PEFT's| of each tensor's importance and uncertainty averages
    (Ī, Ū of every A, E, B entry), taken on both sides after the same step."""
    ipt, unc = theirs
    worst = 0.0
    for site in method.targets:
        for part in ("lora_A", "lora_E", "lora_B"):
            name = f"{site}.{part}.default"
            layout = _ADALORA_NAMES[part][1]
            for suffix, table in ((".ipt", ipt), (".unc", unc)):
                mine = to_torch_layout(np.asarray(ours[f"{site}.{part}{suffix}"]), layout)
                ref = table[name].numpy()
                scale = max(float(np.abs(ref).max()), 1e-30)
                worst = max(worst, float(np.abs(mine - ref).max()) / scale)
    return worst


def importance_snapshot_step(method) -> int | None:
    """The last step whose importance averages both sides keep (PEFT resets them at
    ``total_step - tfinal``): compared there."""
    boundary = method.total_step - method.config.tfinal
    return min(boundary, method.total_step) - 1 if method.total_step else None


def run_method(name: str, base: Base, encoded: Mapping[str, np.ndarray], *, steps: int,
               batch_size: int, seed: int = 0, method_overrides: Mapping[str, Any] | None = None,
               train_overrides: Mapping[str, Any] | None = None, torch_net=None,
               noise_floor: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Trains parity method ``name`` on ``base`` for ``steps`` steps both ways; the comparison.

    ``encoded``: the tokenised training split (``peftjax.data.encode``); ``torch_net``: a
    template ``torch_base(base)`` to copy (loaded once per checkpoint). Returns the JSON-able
    record (``method``, ``steps``, ``loss_ours``, ``loss_peft``, ``max_rel_loss_diff``,
    ``final_param_max_abs_diff``, timings, the checks made; AdaLoRA: ``ranks_ours``,
    ``ranks_peft``, ``rank_patterns_equal``).

    ``noise_floor``: also trains each side again from the same start moved by one ulp
    (``one_ulp``), and records how far each framework's losses move from its own run
    (``noise_floor``): the difference float rounding alone makes on this run. A cross-framework
    difference at that level is the run's sensitivity to rounding, not a difference of method;
    one far above it is a bug.
    """
    from peftjax.train.compose import init_context

    log = log or (lambda msg: None)
    s = spec(name, steps)
    model = base.model
    method = core.create(s.method, model, method_config(s, method_overrides))
    tc = train_config(s, steps=steps, batch_size=batch_size, overrides=train_overrides)
    batches = batches_for(encoded, steps=steps, batch_size=batch_size, seed=seed)
    ctx = init_context(model, None, dict(encoded), total_steps=steps, clip_norm=tc.clip_norm)
    peft = method.setup(jax.random.PRNGKey(seed + 1), base.params, ctx)

    template = torch_net if torch_net is not None else torch_base(base)
    with tempfile.TemporaryDirectory() as workdir:
        pm, facts = peft_side(s, method, model, peft, template, workdir)
    pairs = pair_trainables(method, model, peft.trainable, pm)
    initial = max_abs_diff(pairs, peft.trainable)
    initial_frozen = frozen_max_abs_diff(method, model, peft.frozen, pm)
    if initial > 0 or initial_frozen > 0:
        raise ParityError(f"{name}: the two sides start from different tensors (trainable "
                          f"max|Δ| {initial:.3g}, frozen {initial_frozen:.3g})")
    opt = torch_optimizer(s, tc, pm, model)
    optimizer_check = check_optimizers(tc, method, peft.trainable, pairs, opt)
    sched = torch_schedule(opt, tc, steps)

    snap = importance_snapshot_step(method) if s.method == "adalora" else None
    log(f"{name}: peftjax")
    t0 = time.perf_counter()
    ours = train_ours(method, tc, peft, batches, seed, snapshot_at=snap)
    wall_ours = time.perf_counter() - t0
    log(f"{name}: peft")
    t0 = time.perf_counter()
    theirs = train_torch(s, pm, batches, opt, sched, tc.clip_norm, model.input_names, snapshot_at=snap)
    wall_peft = time.perf_counter() - t0

    moved = max(float(np.max(np.abs(np.asarray(jax.device_get(ours["state"].trainable[p.tree][p.key]))
                                    - np.asarray(peft.trainable[p.tree][p.key])), initial=0.0))
                for p in pairs)
    lo, lp = np.asarray(ours["loss"]), np.asarray(theirs["loss"])
    rel = np.abs(lo - lp) / np.maximum(np.abs(lp), 1e-12)
    state = ours["state"]
    record = {
        "method": name, "peftjax_method": s.method, "method_config": _jsonable(method_config(s, method_overrides)),
        "steps": steps, "batch_size": batch_size, "seed": seed,
        "learning_rate": float(tc.learning_rate), "warmup_steps": warmup_steps(tc, steps),
        "warmup_steps_transformers_trainer": int(math.ceil(tc.get("warmup_ratio", 0.0) * steps))
        if not tc.warmup_steps else int(tc.warmup_steps),
        "schedule": tc.schedule, "weight_decay": float(tc.weight_decay), "clip_norm": float(tc.clip_norm),
        "lr_mults": str(tc.get("lr_mults", "")),
        "loss_ours": lo.tolist(), "loss_peft": lp.tolist(), "rel_loss_diff": rel.tolist(),
        "max_rel_loss_diff": float(rel.max()),
        "objective_peft": theirs["objective"],
        "grad_norm_ours": ours["grad_norm"], "grad_norm_peft": theirs["grad_norm"],
        "clipped_steps_peft": int(sum(n > tc.clip_norm for n in theirs["grad_norm"])) if tc.clip_norm else 0,
        "initial_param_max_abs_diff": initial, "initial_frozen_max_abs_diff": initial_frozen,
        "final_param_max_abs_diff": max_abs_diff(pairs, state.trainable),
        "final_param_max_abs": float(max(np.abs(p.param.detach().numpy()).max() for p in pairs)),
        "param_max_abs_update": moved,   # how far training moved any tensor (ours)
        "trainable_tensors": len(pairs),
        "trainable_values": int(sum(p.param.numel() for p in pairs)),
        "optimizer": optimizer_check,
        "batches_sha256": batches_digest(batches),
        "wall_s_ours": wall_ours, "wall_s_peft": wall_peft,
        "step_s_ours_median": float(np.median(ours["step_s"][1:] or ours["step_s"])),
        "step_s_peft_median": float(np.median(theirs["step_s"][1:] or theirs["step_s"])),
        **facts,
    }
    if s.method == "adalora":
        patterns = adalora_patterns(method, state.method_state, pm)
        record["ranks_ours"] = {k: sum(v["ours"]) for k, v in patterns.items()}
        record["ranks_peft"] = {k: sum(v["peft"]) for k, v in patterns.items()}
        record["rank_patterns_equal"] = all(v["ours"] == v["peft"] for v in patterns.values())
        record["rank_patterns"] = patterns
        record["importance_compared_after_step"] = snap
        record["importance_max_rel_diff"] = adalora_importance_diff(method, ours["snapshot"],
                                                                    theirs["importance"])
    if s.method == "prefix_tuning":
        record["prefix_default_positions_loss_rel_diff"] = _prefix_default_positions(
            method, model, peft, template, batches[0])
    if noise_floor:
        log(f"{name}: noise floor (both sides from a start one ulp away)")
        moved = one_ulp(peft, seed)
        ours2 = train_ours(method, tc, moved, batches, seed)
        with tempfile.TemporaryDirectory() as workdir:
            pm2, _ = peft_side(s, method, model, moved, template, workdir, check_init=False)
        opt2 = torch_optimizer(s, tc, pm2, model)
        theirs2 = train_torch(s, pm2, batches, opt2, torch_schedule(opt2, tc, steps), tc.clip_norm,
                              model.input_names)
        self_ours = np.abs(np.asarray(ours2["loss"]) - lo) / np.abs(lo)
        self_peft = np.abs(np.asarray(theirs2["loss"]) - lp) / np.abs(lp)
        record["noise_floor"] = {"rel_loss_diff_ours": self_ours.tolist(),
                                 "rel_loss_diff_peft": self_peft.tolist(),
                                 "max_ours": float(self_ours.max()), "max_peft": float(self_peft.max())}
    return record


def one_ulp(peft: core.PeftParams, seed: int) -> core.PeftParams:
    """``peft`` with every trainable value moved one ulp up or down (random signs, seeded): a
    start that differs from the original by float rounding alone, as the two frameworks'
    first steps do."""
    rng = np.random.default_rng([seed, 0x756C70])

    def move(x):
        x = np.asarray(jax.device_get(x))
        toward = np.where(rng.random(x.shape) < 0.5, -np.inf, np.inf).astype(x.dtype)
        return jnp.asarray(np.nextafter(x, toward))   # in x's own precision

    trainable = {tree: {k: move(v) for k, v in sorted(peft.trainable[tree].items())}
                 for tree in ("base", "added", "head")}
    return peft._replace(trainable=trainable)


def _prefix_default_positions(method, model, peft, template, batch) -> float:
    """Step 0's loss with PEFT's own positions (tokens from p) relative to peftjax's (from 0)."""
    import torch

    with tempfile.TemporaryDirectory() as workdir:
        pm, _ = peft_side(spec("prefix_tuning", 1), method, model, peft, template, workdir,
                          check_init=False)
    inputs = _torch_inputs(batch, model.input_names)
    labels = torch.from_numpy(np.asarray(batch["labels"]).astype(np.int64))
    with torch.no_grad():
        ours = float(peft_prefix_forward(pm, inputs, labels).loss)
        shifted = float(peft_prefix_forward(pm, inputs, labels, shift_positions=True).loss)
    return abs(shifted - ours) / abs(ours)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# The report's plot.


def plot(record: Mapping[str, Any], path: str) -> str:
    """Both loss curves and their relative difference (log axis) of one method, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftjax.files import atomic_write

    steps = np.arange(len(record["loss_ours"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    top.plot(steps, record["loss_peft"], label="transformers + peft", lw=2.2, color="tab:orange")
    top.plot(steps, record["loss_ours"], label="peftjax", lw=1.0, ls="--", color="tab:blue")
    top.set_ylabel("training loss (cross-entropy)")
    top.set_title(f"{record['method']}: {record['steps']} steps, batch {record['batch_size']}")
    top.legend()
    rel = np.maximum(np.asarray(record["rel_loss_diff"]), 1e-10)
    floor = record.get("noise_floor")
    if floor:   # each side against itself from a start one ulp away
        bottom.semilogy(steps, np.maximum(floor["rel_loss_diff_ours"], 1e-10), color="tab:blue",
                        lw=0.8, alpha=0.5, label="peftjax vs itself (1 ulp)")
        bottom.semilogy(steps, np.maximum(floor["rel_loss_diff_peft"], 1e-10), color="tab:orange",
                        lw=0.8, alpha=0.5, label="PEFT vs itself (1 ulp)")
    bottom.semilogy(steps, rel, color="tab:red", lw=1.2, label="peftjax vs PEFT")
    bottom.axhline(1e-3, color="gray", ls=":", lw=1.0, label="1e-3")
    bottom.set_ylabel("|Δloss| / loss")
    bottom.set_xlabel("step")
    bottom.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# A whole comparison: a named model and task, every method, the JSON and the plots.


def checkpoint_and_data(model_name: str, task_name: str, *, workdir: str, train_limit: int = 0,
                        seed: int = 0) -> tuple[str, dict, int, dict]:
    """``(checkpoint folder, encoded training split, num_labels, facts)`` of a named model and
    task (``configs/``): the model's checkpoint folder, or its config with random weights (seeded)
    saved to ``workdir`` when it ships none; the task's training split tokenised as a run
    encodes it (``train_limit`` rows, 0: all)."""
    from configs.train import get_config
    from peftjax.data import formats
    from peftjax.train import compose

    config = get_config(f"model={model_name},method=full,task={task_name}")
    task, model, tokenizer, _, _ = compose.build(config, with_weights=False)
    if tokenizer is None:
        raise ValueError(f"model {model_name!r} has no tokenizer; set model.tokenizer")
    if model.head != "classification":
        raise ValueError(f"task {task_name!r} is not classified by a head on {model_name!r} "
                         f"(head {model.head!r}); the comparison trains sequence classifiers")
    checkpoint = config.model.get("checkpoint") or ""
    if checkpoint:
        folder = hf_io.resolve_checkpoint(checkpoint)
    else:
        folder = os.path.join(workdir, "random_checkpoint")
        params = model.init(jax.random.PRNGKey(seed))
        hf_io.save_pretrained(model, params, folder)
    encoded = formats.encode_split(config.task, task, tokenizer, task.splits[0], train_limit or None,
                                   family_heads=compose.family_heads(config),
                                   hf_config=compose.model_hf_config(config), for_eval=False)
    facts = {"model": model_name, "task": task_name, "checkpoint": os.path.abspath(folder),
             "random_weights": not checkpoint, "weights_sha256": hf_io.weights_digest(folder),
             "train_rows": int(len(encoded["labels"])), "max_length": int(config.task.max_length),
             "num_labels": int(task.num_labels)}
    return folder, encoded, int(task.num_labels), facts


def versions() -> dict:
    """Package versions both sides ran with."""
    from peftjax.grid.stamp import package_versions

    return package_versions(("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft"))


def run_all(methods: Iterable[str], base: Base, encoded: Mapping[str, np.ndarray], *, steps: int,
            batch_size: int, seed: int, out_dir: str, facts: Mapping[str, Any] | None = None,
            noise_floor: bool = False, resume: bool = True,
            log: Callable[[str], None] | None = None) -> dict:
    """Runs ``run_method`` for each method and writes ``out_dir/train_vs_peft.json`` (rewritten
    after every method, so a long run's finished methods are kept) and
    ``out_dir/plots/<method>.png``. Returns the report.

    ``resume``: methods already in ``out_dir``'s JSON from a run with the same settings (model,
    weights, task rows, steps, batch, seed, pooling, noise floor) are kept, not rerun; each
    record names the commit it ran on (``git``)."""
    import platform

    import torch

    from peftjax.files import write_json_atomic
    from peftjax.grid.stamp import git_state

    os.makedirs(out_dir, exist_ok=True)
    report = {"steps": steps, "batch_size": batch_size, "seed": seed, "pooling": base.model.pooling,
              **dict(facts or {}), "versions": versions(), "git": git_state(),
              "torch_threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0))
              if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "platform": platform.platform(), "jax_backend": jax.default_backend(), "methods": []}
    template = torch_base(base)
    path = os.path.join(out_dir, "train_vs_peft.json")
    done = finished_records(path, report, noise_floor) if resume else {}
    for name in methods:
        if name in done:   # a run that was stopped keeps what it finished
            report["methods"].append(done[name])
            if log:
                log(f"{name}: kept from {path} (same run settings)")
            continue
        record = run_method(name, base, encoded, steps=steps, batch_size=batch_size, seed=seed,
                            torch_net=template, noise_floor=noise_floor, log=log)
        record["git"] = report["git"]
        record["plot"] = os.path.relpath(plot(record, os.path.join(out_dir, "plots", f"{name}.png")), out_dir)
        report["methods"].append(record)
        write_json_atomic(path, report, indent=1)
        if log:
            log(summary_row(record))
    return report


RESUME_KEYS = ("steps", "batch_size", "seed", "pooling", "model", "task", "weights_sha256",
               "train_rows", "max_length", "num_labels")


def finished_records(path: str, report: Mapping[str, Any], noise_floor: bool) -> dict[str, dict]:
    """``{method: record}`` of an earlier report at ``path`` made with ``report``'s settings
    (``RESUME_KEYS``, the noise floor); {} when there is none or it was made otherwise."""
    import json

    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    if any(old.get(k) != report.get(k) for k in RESUME_KEYS):
        return {}
    return {r["method"]: r for r in old.get("methods", [])
            if bool(r.get("noise_floor")) == bool(noise_floor)}


def summary_row(r: Mapping[str, Any]) -> str:
    """One markdown table row: method, max rel loss diff, final max |Δθ|, AdaLoRA ranks, times."""
    ranks = ""
    if "ranks_ours" in r:
        ranks = (f"{sum(r['ranks_ours'].values())} / {sum(r['ranks_peft'].values())}, "
                 f"{'identical' if r['rank_patterns_equal'] else 'DIFFERENT'}")
    floor = r.get("noise_floor")
    floor = f"{floor['max_ours']:.1e} / {floor['max_peft']:.1e}" if floor else "—"
    return (f"| {r['method']} | {r['max_rel_loss_diff']:.2e} | {floor} | "
            f"{r['final_param_max_abs_diff']:.2e} | {r['trainable_values']:,} | {ranks} | "
            f"{r['wall_s_ours']:.1f} | {r['wall_s_peft']:.1f} |")


def _init_check(r: Mapping[str, Any]) -> str:
    """The init comparison a record holds, in a few words."""
    for key in ("pissa_init_vs_peft", "olora_init_vs_peft"):
        if key in r:
            c = r[key]
            return f"SVD/QR init vs PEFT's: ΔW {c['update_max_rel_diff']:.1e}, residual {c['residual_max_rel_diff']:.1e}"
    c = r.get("init_vs_peft")
    if not c:
        return {"bitfit": "checkpoint's", "full": "checkpoint's", "ln_tuning": "checkpoint's norms",
                "lora_ga": "tests/methods/test_lora_ga.py"}.get(r["method"], "—")
    return ("distribution " + ("ok" if c["ok"] else "DIFFERS") + " ("
            + ", ".join(sorted(c["kinds"])) + ")")


def report_markdown(report: Mapping[str, Any], *, command: str) -> str:
    """The committed report's table and settings, from ``train_vs_peft.json``."""
    rows = report["methods"]
    tol = report.get("tolerance", 1e-3)
    lines = [f"Command: `{command}`", "",
             f"{report['model']} × {report['task']} ({report['train_rows']:,} training rows, max length "
             f"{report['max_length']}), {report['steps']} steps of batch {report['batch_size']}, seed "
             f"{report['seed']}, head pooling `{report['pooling']}`, fp32, dropout off on both sides; "
             f"weights sha256 `{report['weights_sha256'][:16]}…`.", "",
             "| method | max rel loss diff | noise floor (ours / PEFT) | final max abs param diff | "
             "trainable values | init check | AdaLoRA ranks (ours / PEFT) | lr | wall s peftjax | "
             "wall s PEFT | within " + f"{tol:g} |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = r.get("noise_floor")
        floor = f"{floor['max_ours']:.1e} / {floor['max_peft']:.1e}" if floor else "—"
        ranks = ""
        if "ranks_ours" in r:
            ranks = (f"{sum(r['ranks_ours'].values())} / {sum(r['ranks_peft'].values())}, "
                     + ("identical" if r["rank_patterns_equal"] else "DIFFERENT"))
        ok = r["max_rel_loss_diff"] <= tol and r.get("rank_patterns_equal", True)
        lines.append(f"| [{r['method']}]({r['plot']}) | {r['max_rel_loss_diff']:.2e} | {floor} | "
                     f"{r['final_param_max_abs_diff']:.2e} | {r['trainable_values']:,} | {_init_check(r)} | "
                     f"{ranks} | {r['learning_rate']:g} | {r['wall_s_ours']:.0f} | {r['wall_s_peft']:.0f} | "
                     f"{'yes' if ok else 'NO'} |")
    commits = sorted({(r.get("git") or report["git"])["commit"][:7] for r in rows})
    v = report["versions"]
    lines += ["", f"Versions: {', '.join(f'{k} {v[k]}' for k in sorted(v))}; {report['platform']}, "
              f"{report['cpus']} CPUs, torch threads {report['torch_threads']}, jax backend "
              f"{report['jax_backend']}. Commit(s): {', '.join(commits)}."]
    return "\n".join(lines) + "\n"


SUMMARY_HEADER = ("| method | max rel loss diff | noise floor (ours / PEFT) | final max abs param diff | "
                  "trainable values | AdaLoRA ranks (ours / PEFT, pattern) | wall s peftjax | "
                  "wall s PEFT |\n|---|---|---|---|---|---|---|---|")
