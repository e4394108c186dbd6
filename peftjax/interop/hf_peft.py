"""Hugging Face PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``) ↔ peftjax.

``export_adapter`` writes a folder that ``peft.PeftModel.from_pretrained(torch_model, folder)``
loads onto the transformers model of the same checkpoint; ``import_adapter`` reads a folder
that PEFT saved and returns the peftjax method and its trainable tree. Supported: LoRA, rsLoRA
(``use_rslora``), DoRA (``use_dora``, when ``peftjax.methods.dora`` is present), AdaLoRA, VeRA and
prompt tuning, with the task head carried as PEFT's ``modules_to_save``; and every method that
describes its own format through the protocol (``Method.peft_format``, ``peft_config``,
``peft_tensors``, ``config_from_peft``): nothing here names it.

LoRA variants are read from their class attributes (``LoRA.peft_lora_flags``,
``peft_lora_extra``, ``inits``), not their names. A base-rewriting init (PiSSA, OLoRA: the frozen
kernel becomes W0 − s·A₀B₀) follows PEFT's conventions both ways: export writes the trained
adapter converted to a rank-2r LoRA of the *original* base (PEFT's
``path_initial_model_for_weight_conversion``; needs ``initial_added``), and a file PEFT saved
with ``init_lora_weights="pissa"`` / ``"olora"`` imports as that init, its residual rebuilt from
the base by ``peft_params`` (PEFT's ``from_pretrained`` re-runs the init the same way).

Name mapping (verified against files PEFT itself writes, ``tests/interop``): a peftjax site
*is* the transformers module path (``bert.encoder.layer.0.attention.self.query``), so

    peftjax ``<site>.lora_A`` (in, r)   ↔  ``base_model.model.<site>.lora_A.weight`` (r, in)
    peftjax ``<site>.lora_B`` (r, out)  ↔  ``base_model.model.<site>.lora_B.weight`` (out, r)
    DoRA magnitude (out,)               ↔  ``base_model.model.<site>.lora_magnitude_vector``
    AdaLoRA ``<site>.lora_A`` (in, r) / ``lora_E`` (r,) / ``lora_B`` (r, out)
                                        ↔  ``base_model.model.<site>.lora_A`` (r, in) / ``lora_E``
                                           (r, 1) / ``lora_B`` (out, r)  (no ``.weight``)
    VeRA ``<site>.vera_lambda_b`` (out,), ``vera_lambda_d`` (r,)  ↔  the same names, bare
    VeRA state ``vera_A`` (in_max, r), ``vera_B`` (r, out_max)
                                        ↔  ``base_model.vera_A`` (r, in_max), ``base_model.vera_B``
                                           (out_max, r)  (PEFT's ``save_projection=True``)
    prompt ``<emb site>.prompt_embeddings`` (n, d)  ↔  ``prompt_embeddings`` (n, d)
    head ``classifier.kernel`` (in, out) ↔  ``base_model.model.classifier.weight`` (out, in)
                                           (``base_model.classifier.weight`` for prompt tuning:
                                           a prompt-learning PeftModel has no tuner wrapper)

``target_modules`` is exported as the explicit list of adapted module paths: PEFT matches a
list item by equality or ``.``-suffix, so a full path targets exactly that module and nothing
else. On import, PEFT's matching rule (list: equal or suffix; string: ``re.fullmatch``;
``"all-linear"``) is translated into a peftjax target regex, and the set of modules it selects
must equal the set of modules the file holds weights for.

Methods with state: VeRA's shared projections and AdaLoRA's rank mask live in peftjax's method
``state``, so ``export_adapter`` takes ``state=`` and ``import_adapter(..., with_state=True)``
returns it. AdaLoRA follows PEFT's format for a pruned adapter: ``rank_pattern``
(``{"<module>.lora_E": [kept?] * init_r}``) in the config and each module's tensors cut to its
kept triplets; on import the triplets are put back at their indices (the pruned ones zero, E = 0
there, so the update is unchanged) and the mask becomes the state's ``rank_mask``.

Anything that does not fit is refused with a message that lists each missing, unexpected or
mis-shaped key, or the config field that peftjax does not implement — never a silent partial
load. Weights are read with safetensors only; pickled ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable

import jax
import numpy as np

from peftjax.files import atomic_write, write_json_atomic
from peftjax.methods import core
from peftjax.methods.lora import LoRA
from peftjax.models import hf_io
from peftjax.models.registry import Model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# The peft types with a format built in here; a method adds its own through the protocol
# (``Method.peft_format``, ``supported_peft_types()``). A LoRA variant is read from its class
# attributes (``LoRA.peft_lora_flags`` / ``peft_lora_extra``), never from its name.
SUPPORTED_PEFT_TYPES = ("LORA", "ADALORA", "VERA", "PROMPT_TUNING")
_BUILT_IN_EXPORTS = ("adalora", "vera", "prompt_tuning")


class AdapterError(ValueError):
    """An adapter that cannot be exported or imported; the message says exactly why."""


# --------------------------------------------------------------------------------------------
# Helpers shared by both directions.


def task_type(model: Model) -> str:
    """PEFT's task type for the model's head."""
    return {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "causal_lm": "CAUSAL_LM",
            "seq2seq_lm": "SEQ_2_SEQ_LM", "none": "FEATURE_EXTRACTION"}[model.head]


def _head_params(model: Model) -> dict[str, Any]:
    """Flat abstract params of the task head (trained by every method)."""
    sites = core.Sites.discover(model)
    return {p: v for p, v in hf_io.flatten(model.abstract_params()).items() if sites.is_head(p)}


def modules_to_save(model: Model) -> list[str]:
    """Top-level head modules as PEFT names them (``classifier`` for BERT and RoBERTa, ``score``)."""
    return sorted({p.split(".")[0] for p in core.Sites.discover(model).head_prefixes})


def _as_lora_config(cls: type[core.Method]) -> bool:
    """A LoRA variant class that PEFT expresses as a LoraConfig: its variant surface declares
    the flags (``LoRA.peft_lora_flags`` not None) and it describes no format of its own."""
    return issubclass(cls, LoRA) and cls.peft_lora_flags is not None and cls.peft_format is None


def _lora_like(method: core.Method) -> bool:
    """``method`` is written as a PEFT LoraConfig (``_as_lora_config``)."""
    return _as_lora_config(type(method))


def _declared_formats() -> dict[str, type[core.Method]]:
    """``{peft_type: method class}`` of the registered methods that describe their own format."""
    out: dict[str, type[core.Method]] = {}
    for name in core.registered():
        cls = core.method_class(name)
        if cls.peft_format and cls.peft_format not in out:
            out[cls.peft_format] = cls
    return out


def supported_peft_types() -> tuple[str, ...]:
    """Every peft type ``import_adapter`` reads: the built-in ones and those methods declare."""
    return SUPPORTED_PEFT_TYPES + tuple(sorted(set(_declared_formats()) - set(SUPPORTED_PEFT_TYPES)))


def exportable_methods() -> list[str]:
    """Registered methods ``export_adapter`` writes."""
    return sorted(n for n in core.registered()
                  if n in _BUILT_IN_EXPORTS or core.method_class(n).peft_format
                  or _as_lora_config(core.method_class(n)))


def _to_numpy(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def _listing(title: str, items: list[str], limit: int = 40) -> str:
    more = f" ... (+{len(items) - limit})" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"


# --------------------------------------------------------------------------------------------
# Export.


def export_adapter(method: core.Method, trainable: dict, folder: str, *,
                   base_model_name_or_path: str = "", state: dict | None = None,
                   initial_added: dict | None = None) -> dict:
    """Writes ``trainable`` (``{"base","added","head"}``) as a PEFT adapter folder.

    ``state``: the method state, required by VeRA (its projections) and by a method whose PEFT
    tensors are partly state (``Method.peft_added``: LoRA-FA's frozen A), and used by AdaLoRA
    (its rank mask; without it every triplet is kept). ``initial_added``: the added params at setup,
    required by a base-rewriting LoRA init (PiSSA, OLoRA), which is written converted to a plain
    LoRA of the *original* base (``_export_lora``). Returns the adapter config written. Both
    files are written to a temporary name and renamed, the weights first, so an interrupted
    export never leaves a config whose weights are missing or stale.
    """
    from safetensors.numpy import save_file

    model = method.model
    _check_head_representable(model, "exported as")
    if trainable.get("base"):
        raise AdapterError(f"method {method.name!r} trains base params ({len(trainable['base'])}, "
                           f"e.g. {next(iter(trainable['base']))}); a PEFT LoRA/prompt adapter cannot "
                           "carry them")
    # The added params as PEFT holds them (LoRA-FA: its frozen A comes from the state).
    added = method.peft_added(trainable.get("added", {}), dict(state or {}))
    if method.peft_format:
        config, tensors, prefix = _export_declared(method, added)
    elif _lora_like(method):
        config, tensors, prefix = _export_lora(method, added, initial_added)
    elif method.name == "adalora":
        config, tensors, prefix = _export_adalora(method, added, state)
    elif method.name == "vera":
        config, tensors, prefix = _export_vera(method, added, state)
    elif method.name == "prompt_tuning":
        config, tensors, prefix = _export_prompt(method, added)
    else:
        raise AdapterError(f"method {method.name!r} has no Hugging Face PEFT equivalent here; "
                           f"exportable methods: {', '.join(exportable_methods())}")
    head = trainable.get("head", {})
    expected = _head_params(model)
    if set(head) != set(expected):
        raise AdapterError(_listing("head params do not match the model's head; missing",
                                    sorted(set(expected) - set(head)))
                           + "; " + _listing("unexpected", sorted(set(head) - set(expected))))
    for path, value in head.items():
        name, transpose = hf_io.hf_name(path)
        array = _to_numpy(value)
        tensors[prefix + name] = np.ascontiguousarray(array.T) if transpose else array
    config.update(task_type=task_type(model), base_model_name_or_path=base_model_name_or_path or None,
                  inference_mode=True, revision=None,
                  modules_to_save=modules_to_save(model) or None)
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, WEIGHTS_NAME),
                  lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json_atomic(os.path.join(folder, CONFIG_NAME), config, indent=2, sort_keys=True)
    return config


def _check_head_representable(model: Model, verb: str) -> None:
    """Refuses a task head that PEFT's models cannot represent (a mean-pooling head).

    transformers' BertForSequenceClassification always classifies tanh(pooler(h[CLS])),
    RobertaForSequenceClassification the <s> state: PEFT has no way to say "mean of the tokens",
    so a PEFT adapter and a peftjax mean-pooling model would classify different vectors.
    """
    if model.pooling == "mean" and model.head in ("classification", "regression"):
        raise AdapterError(
            f"a pooling='mean' head cannot be {verb} a PEFT adapter: transformers' "
            f"{model.config.model_type} sequence classifiers always read the first token "
            "([CLS] through the pooler, or <s>). Keep the adapter in peftjax's own format "
            "(peftjax.methods.saving.save_adapter; training writes it to <workdir>/adapter/), "
            "or use pooling='cls' (--config.model.pooling=cls) to move adapters to and from PEFT")


def _conv1d_targets(model: Model, targets) -> bool:
    """Whether every target is a Conv1D layer (a kernel the checkpoint stores untransposed)."""
    pattern = getattr(model.family, "untransposed_kernels", "")
    return bool(pattern) and bool(targets) and all(re.search(pattern, t + ".kernel") for t in targets)


def _export_lora(method, added, initial_added=None) -> tuple[dict, dict, str]:
    """PEFT's LoRA file. A base-rewriting init (PiSSA, OLoRA: the frozen kernel is W0 − s·A₀B₀)
    is written as PEFT writes it with ``save_pretrained(path_initial_model_for_weight_conversion=
    ...)`` (``LoraModel.subtract_mutated_init``): the trained adapter as a plain LoRA of the
    *original* W0, ΔW = s·(A B − A₀ B₀) = s·[A, A₀][B; −B₀], i.e. rank 2r with A' = [A, A₀],
    B' = [B; −B₀] (flax layout) and α doubled (α·√2 with rsLoRA) so the scaling is unchanged."""
    c = method.config
    extra = method.peft_lora_extra
    convert = method.rewrites_base
    if convert:
        if extra or not method.additive:
            raise AdapterError(f"{method.name} with init={c.init!r} trains against a rewritten base "
                               "and is not a plain W0 + ΔW update, so PEFT's conversion to a LoRA of "
                               "the original base does not apply; merge it instead")
        if initial_added is None:
            raise AdapterError(f"{method.name} with init={c.init!r} trains against a rewritten base "
                               "(W0 - s·A0 B0); its PEFT export is the equivalent LoRA of the original "
                               "base, which needs the initial factors: export_adapter(..., "
                               "initial_added=<the added params at setup>) (a peftjax adapter file "
                               "stores them; the init is a function of W0: method.init(rng, base, ctx))")
        _check_added(method, initial_added, ("lora_A", "lora_B"))
    prefix = "base_model.model."
    tensors: dict[str, np.ndarray] = {}
    grouped = grouped_layout(method)
    expected = {f"{s}.{n}" for s in method.targets for n in ("lora_A", "lora_B", *extra.values())}
    expected |= {f"{s}.{n}" for s in grouped for n in ("lora_A", "lora_B")}
    if set(added) != expected:
        raise AdapterError(_listing(f"{method.name} added params do not match its targets; missing",
                                    sorted(expected - set(added)))
                           + "; " + _listing("unexpected", sorted(set(added) - expected)))
    for site in method.targets:
        a, b = _to_numpy(added[site + ".lora_A"]), _to_numpy(added[site + ".lora_B"])
        if convert:
            a0, b0 = _to_numpy(initial_added[site + ".lora_A"]), _to_numpy(initial_added[site + ".lora_B"])
            a, b = np.concatenate([a, a0.astype(a.dtype)], 1), np.concatenate([b, -b0.astype(b.dtype)], 0)
        tensors[f"{prefix}{site}.lora_A.weight"] = a.T.copy()
        tensors[f"{prefix}{site}.lora_B.weight"] = b.T.copy()
        for peft_key, ours in extra.items():
            tensors[f"{prefix}{site}.{peft_key}"] = _to_numpy(added[f"{site}.{ours}"])
    for site, module in grouped.items():
        # PEFT's ParamWrapper on a stacked (E, out, in) param: lora_A (r·E, in) with row e·r + k,
        # lora_B (out, r·E) with column k·E + e (``get_delta_weight``'s reshapes).
        a, b = _to_numpy(added[site + ".lora_A"]), _to_numpy(added[site + ".lora_B"])
        experts, fan_in, r = a.shape
        tensors[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(
            a.transpose(0, 2, 1).reshape(experts * r, fan_in))
        tensors[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(
            b.transpose(2, 1, 0).reshape(b.shape[2], r * experts))
    rank, alpha = int(c.rank), float(c.alpha)
    if convert:
        rank, alpha = 2 * rank, alpha * (2 ** 0.5 if c.use_rslora else 2.0)
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha,
        "lora_dropout": float(c.dropout), "use_rslora": bool(c.use_rslora),
        "target_modules": [t for t in method.targets if t not in method.parameter_targets],
        "bias": "none",
        # PEFT's flag for Conv1D (GPT-2) layers, whose weight is stored (in, out); lora_A/B have
        # the nn.Linear shapes either way. PEFT's own save writes True for such targets.
        "fan_in_fan_out": _conv1d_targets(method.model, method.targets),
        "init_lora_weights": "gaussian" if c.init == "gaussian" else True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "use_dora": False, "lora_bias": False,
    }
    if grouped or method.parameter_targets:
        config["target_parameters"] = ([f"{t}.weight" for t in method.parameter_targets]
                                       + list(grouped))
    config.update(method.peft_lora_flags)
    return config, tensors, prefix


def grouped_layout(method) -> dict[str, str]:
    """Stacked expert sites of a LoRA (``target_parameters``) → the module path PEFT stores each
    one's factors under. PEFT wraps every targeted param of a module in its own ``ParamWrapper``,
    nested in the order the module registers its params (the first innermost), so with both
    ``gate_up_proj`` and ``down_proj`` targeted the first is ``experts.base_layer`` and the
    second ``experts``; our params are created in the registration order of transformers', which
    is the order the sites are discovered."""
    sites = list(getattr(method, "grouped_targets", ()) or ())
    if not sites:
        return {}
    order = list(method.sites.grouped)
    by_module: dict[str, list[str]] = {}
    for site in sorted(sites, key=order.index):
        by_module.setdefault(site.rpartition(".")[0], []).append(site)
    out = {}
    for module, members in by_module.items():
        for j, site in enumerate(members):
            out[site] = module + ".base_layer" * (len(members) - 1 - j)
    return out


def _export_declared(method, added) -> tuple[dict, dict, str]:
    """A method that describes its own PEFT format (``Method.peft_format``: (IA)³, HiRA)."""
    layout = method.peft_tensors()
    expected = {f"{site}.{t.ours}" for site, ts in layout.items() for t in ts}
    if set(added) != expected:
        raise AdapterError(_listing(f"{method.name} added params do not match its PEFT layout; missing",
                                    sorted(expected - set(added)))
                           + "; " + _listing("unexpected", sorted(set(added) - expected)))
    prefix = "base_model.model."
    tensors: dict[str, np.ndarray] = {}
    for site, ts in layout.items():
        for t in ts:
            array = _to_numpy(added[f"{site}.{t.ours}"])
            tensors[f"{prefix}{site}.{t.peft}"] = np.ascontiguousarray(
                (array.T if t.transpose else array).reshape(t.shape))
    config = {"peft_type": method.peft_format, "target_modules": list(layout),
              **method.peft_config(conv1d=_conv1d_targets(method.model, list(layout)))}
    return config, tensors, prefix


def _check_added(method, added, names) -> None:
    expected = {f"{s}.{n}" for s in method.targets for n in names}
    if set(added) != expected:
        raise AdapterError(_listing(f"{method.name} added params do not match its targets; missing",
                                    sorted(expected - set(added)))
                           + "; " + _listing("unexpected", sorted(set(added) - expected)))


def _export_adalora(method, added, state) -> tuple[dict, dict, str]:
    """PEFT's AdaLoRA file: (r, in) A, (r, 1) E, (out, r) B per module, and when the state's rank
    mask has pruned triplets, ``rank_pattern`` with each module cut to its kept triplets (as
    PEFT's ``resize_state_dict_by_rank_pattern`` writes it)."""
    c = method.config
    total = method.total_step or c.total_step
    if not total:
        raise AdapterError("adalora's budget schedule length (total_step) is unknown and PEFT's "
                           "AdaLoraConfig requires it: set the method up with the run's "
                           "InitContext(total_steps=...) or pass total_step")
    _check_added(method, added, ("lora_A", "lora_E", "lora_B"))
    prefix = "base_model.model."
    keep = {site: np.ones(c.init_r, bool) for site in method.targets}
    if state is not None:
        keep = {site: _to_numpy(state[site + ".rank_mask"]) > 0 for site in method.targets}
    pruned = any(not k.all() for k in keep.values())
    tensors: dict[str, np.ndarray] = {}
    for site in method.targets:
        idx = np.flatnonzero(keep[site])
        a, e, b = (_to_numpy(added[f"{site}.{n}"]) for n in ("lora_A", "lora_E", "lora_B"))
        tensors[f"{prefix}{site}.lora_A"] = np.ascontiguousarray(a.T[idx])
        tensors[f"{prefix}{site}.lora_E"] = np.ascontiguousarray(e[idx, None])
        tensors[f"{prefix}{site}.lora_B"] = np.ascontiguousarray(b[idx].T)
    config = {
        "peft_type": "ADALORA", "init_r": int(c.init_r), "target_r": int(c.target_r),
        "lora_alpha": float(c.alpha), "lora_dropout": float(c.dropout), "tinit": int(c.tinit),
        "tfinal": int(c.tfinal), "deltaT": int(c.deltaT), "beta1": float(c.beta1),
        "beta2": float(c.beta2), "orth_reg_weight": float(c.orth_reg_weight), "total_step": int(total),
        "rank_pattern": ({f"{s}.lora_E": [bool(v) for v in keep[s]] for s in method.targets}
                         if pruned else None),
        "target_modules": list(method.targets), "bias": "none", "init_lora_weights": True,
        "fan_in_fan_out": _conv1d_targets(method.model, method.targets), "use_rslora": False,
        "use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
    }
    return config, tensors, prefix


def _export_vera(method, added, state) -> tuple[dict, dict, str]:
    """PEFT's VeRA file with ``save_projection=True``: per module the two scaling vectors, and
    the shared projections once (torch layout, transposed from ours)."""
    c = method.config
    if not state or "vera_A" not in state or "vera_B" not in state:
        raise AdapterError("vera's export needs the method state, which holds its shared random "
                           "projections (vera_A, vera_B): export_adapter(method, trainable, folder, "
                           "state=state)")
    _check_added(method, added, ("vera_lambda_b", "vera_lambda_d"))
    prefix = "base_model.model."
    tensors = {f"{prefix}{site}.{n}": _to_numpy(added[f"{site}.{n}"])
               for site in method.targets for n in ("vera_lambda_b", "vera_lambda_d")}
    tensors["base_model.vera_A"] = np.ascontiguousarray(_to_numpy(state["vera_A"]).T)
    tensors["base_model.vera_B"] = np.ascontiguousarray(_to_numpy(state["vera_B"]).T)
    config = {
        "peft_type": "VERA", "r": int(c.rank), "target_modules": list(method.targets),
        # The projections travel in the file (save_projection), so PEFT's key only seeds a draw
        # that the loaded buffers replace; a pinned key is kept, the run-seeded one (-1) written as 0.
        "projection_prng_key": int(max(c.projection_prng_key, 0)), "save_projection": True,
        "vera_dropout": float(c.dropout), "d_initial": float(c.d_initial), "bias": "none",
        "fan_in_fan_out": _conv1d_targets(method.model, method.targets), "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
    }
    return config, tensors, prefix


def _export_prompt(method, added) -> tuple[dict, dict, str]:
    hf = method.model.hf_config
    prompt = _to_numpy(added[f"{method.site}.prompt_embeddings"])
    config = {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]), "num_transformer_submodules": 1,
        "num_attention_heads": int(hf.num_attention_heads), "num_layers": int(hf.num_hidden_layers),
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
    }
    return config, {"prompt_embeddings": prompt}, "base_model."


# --------------------------------------------------------------------------------------------
# Import.


def read_adapter(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter config, tensors) of a PEFT adapter folder; safetensors only, never unpickled."""
    from safetensors.numpy import load_file

    if not os.path.isdir(folder):
        raise AdapterError(f"adapter folder {folder!r} does not exist")
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder")
    with open(cfg_path) as f:
        config = json.load(f)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(weights):
        pickled = [n for n in PICKLED_NAMES if os.path.exists(os.path.join(folder, n))]
        if pickled:
            raise AdapterError(
                f"{folder} holds only pickled adapter weights ({', '.join(pickled)}); peftjax never "
                "unpickles files (loading a pickle can run arbitrary code). Re-save the adapter with "
                "safetensors in a trusted environment: PeftModel.from_pretrained(model, folder)"
                ".save_pretrained(out, safe_serialization=True)")
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    return config, load_file(weights)


def import_adapter(folder: str, model: Model, *, require_head: bool = True,
                   with_state: bool = False) -> tuple:
    """Loads a PEFT-saved adapter for ``model``: ``(method, trainable)``, or with
    ``with_state=True`` ``(method, trainable, state)``.

    ``trainable`` is ``{"base": {}, "added": {...}, "head": {...}}``; combine it with the base
    params with ``peft_params`` (or ``method.partition``). When the model has a task head the
    adapter must carry it (``modules_to_save``) unless ``require_head=False``, in which case
    ``trainable["head"]`` is empty and the caller supplies the head. ``state`` is the method
    state the file determines (VeRA: its projections, which the forward needs, so a VeRA
    adapter requires ``with_state=True``; AdaLoRA: the rank mask of ``rank_pattern`` and zero
    importance averages; others: empty).
    """
    config, tensors = read_adapter(folder)
    peft_type = config.get("peft_type")
    declared = _declared_formats()
    if peft_type not in SUPPORTED_PEFT_TYPES and peft_type not in declared:
        raise AdapterError(f"{folder}: peft_type {peft_type!r} is not supported; supported peft "
                           f"types: {', '.join(supported_peft_types())}")
    _check_task_type(config, model, folder)
    _check_head_representable(model, "loaded from")
    state: dict = {}
    if peft_type == "LORA":
        method, added, prefix = _import_lora(config, tensors, model, folder)
    elif peft_type == "ADALORA":
        method, added, state, prefix = _import_adalora(config, tensors, model, folder)
    elif peft_type == "VERA":
        if not with_state:
            raise AdapterError(f"{folder}: a VeRA adapter's shared projections are method state "
                               "(the forward needs them): call import_adapter(..., with_state=True) "
                               "and pass the state on (peft_params(..., state=state))")
        method, added, state, prefix = _import_vera(config, tensors, model, folder)
    elif peft_type == "PROMPT_TUNING":
        method, added, prefix = _import_prompt(config, tensors, model, folder)
    else:
        method, added, prefix = _import_declared(declared[peft_type], config, tensors, model, folder)
    head, unexpected = _import_head(tensors, model, prefix, folder, require_head)
    if unexpected:
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  "
                           + _listing("unexpected keys", sorted(unexpected)))
    trainable = {"base": {}, "added": added, "head": head}
    return (method, trainable, state) if with_state else (method, trainable)


def peft_params(method: core.Method, trainable: dict, base: dict,
                state: dict | None = None) -> core.PeftParams:
    """``PeftParams`` from imported ``trainable`` (and ``state``, from
    ``import_adapter(..., with_state=True)``) and the model's (flat or nested) base params.

    The imported head replaces the base params' head; when the import carried none the base
    params' head is kept. A base-rewriting LoRA init (PiSSA, OLoRA) trains against W0 − s·A₀B₀,
    with A₀B₀ a deterministic function of W0 (SVD, QR): as PEFT's ``from_pretrained`` re-runs
    that init on the base before loading the trained A, B, the residual is rebuilt here from
    ``method.init`` on ``base`` (which must be the original pretrained params).
    """
    flat = base if all(isinstance(k, str) and not isinstance(v, dict) for k, v in base.items()) \
        else hf_io.flatten(base)
    if method.rewrites_base:
        flat = method.transform_base(flat, method.init(jax.random.PRNGKey(0), flat, core.InitContext()))
    train, head, frozen = method.partition(flat)
    head = {**head, **trainable["head"]}
    return core.PeftParams({"base": train, "added": dict(trainable["added"]), "head": head},
                           frozen, dict(state or {}))


def _check_task_type(config: dict, model: Model, folder: str) -> None:
    tt = config.get("task_type")
    ok = {"SEQ_CLS": ("classification", "regression"), "CAUSAL_LM": ("causal_lm",),
          "SEQ_2_SEQ_LM": ("seq2seq_lm",)}
    if tt in ok and model.head not in ok[tt]:
        raise AdapterError(f"{folder}: task_type {tt!r} does not fit a model with head "
                           f"{model.head!r} (expected head: {' or '.join(ok[tt])})")


def _strip_prefix(keys: Iterable[str], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def _module_map(model: Model, modules: Iterable[str]) -> dict[str, str]:
    """File module path -> our site path. A bare model (no backbone prefix) accepts an adapter
    saved on a headed model of its family (``model.layers.0...`` → ``layers.0...``)."""
    modules = list(modules)
    if model.backbone_prefix == "" and modules:
        for head in model.family.heads:
            p = model.family.backbone_prefix(model.config, head)
            if p and all(m.startswith(p + ".") for m in modules):
                return {m: m[len(p) + 1:] for m in modules}
    return {m: m for m in modules}


def _peft_targets_regex(target_modules: Any, sites: core.Sites) -> str:
    """PEFT's module matching as a peftjax target regex (``re.search`` over site paths)."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            # PEFT: every linear layer except the output layer (lm_head / the head).
            names = [s for s in sites.backbone_linear if s.split(".")[-1] != "lm_head"]
            return core.exact_paths_regex(names)
        return f"^(?:{target_modules})$"
    if not target_modules:
        raise AdapterError("target_modules is empty")
    return core.module_names_regex(target_modules)


_REFUSED_LORA_FIELDS = {
    # field: (value that is fine, why peftjax refuses other values)
    "lora_bias": (False, "lora_bias=True (a trainable bias on lora_B) is not implemented"),
    "layers_to_transform": (None, "layers_to_transform (adapting a subset of layers) is not "
                                  "implemented; export the adapter with explicit target_modules"),
    "layer_replication": (None, "layer_replication is not implemented"),
    "exclude_modules": (None, "exclude_modules is not implemented; use explicit target_modules"),
    "trainable_token_indices": (None, "trainable_token_indices is not implemented"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not implemented"),
    "use_qalora": (False, "QA-LoRA is not implemented"),
    "use_bdlora": (None, "BD-LoRA is not implemented"),
    "arrow_config": (None, "Arrow routing is not implemented"),
    "megatron_config": (None, "Megatron parallel layers are not supported"),
}


def _refused_lora_fields(config) -> list[str]:
    """What a LoRA-style config (LoRA, AdaLoRA) sets that peftjax does not implement."""
    problems = []
    for field, (fine, why) in _REFUSED_LORA_FIELDS.items():
        value = config.get(field, fine)
        default = value in (None, False, [], {}, "") if fine in (None, False) else value == fine
        if not default:
            problems.append(f"{field}={value!r}: {why}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: trained biases (bias != 'none') are not "
                        "implemented")
    return problems


def _import_lora(config, tensors, model, folder) -> tuple[core.Method, dict, str]:
    problems = _refused_lora_fields(config)
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            problems.append(f"{field}={config[field]!r}: per-module ranks/alphas are not implemented "
                            "(peftjax LoRA has one rank and alpha for all targets)")
    init = config.get("init_lora_weights", True)
    method_name, our_init = _lora_variant(config, init, problems)
    if problems:
        raise AdapterError(f"{folder}: cannot import this LoRA adapter:\n  " + "\n  ".join(problems))

    prefix = "base_model.model."
    extra = core.method_class(method_name).peft_lora_extra
    suffixes = ("lora_A.weight", "lora_B.weight", *extra)
    in_file = _strip_prefix(tensors, prefix)
    lora_keys = {k: full for k, full in in_file.items() if k.endswith(tuple("." + s for s in suffixes))}
    file_modules = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                           for k in lora_keys})
    to_site = _module_map(model, file_modules)

    sites = core.Sites.discover(model)
    r = config.get("r", 8)
    parameters = list(config.get("target_parameters") or [])
    if parameters and method_name != "lora":
        raise AdapterError(f"{folder}: target_parameters is plain LoRA's in PEFT (ParamWrapper); "
                           f"this config describes {method_name}")
    kwargs = dict(rank=int(r), alpha=float(config.get("lora_alpha", 8)),
                  dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                  use_rslora=bool(config.get("use_rslora", False)),
                  targets=(() if parameters and not config.get("target_modules")
                           else _peft_targets_regex(config.get("target_modules"), sites)),
                  init=our_init)
    if parameters:
        kwargs["target_parameters"] = tuple(parameters)
    try:
        method = core.create(method_name, model, kwargs, sites=sites)
    except ValueError as e:
        raise AdapterError(f"{folder}: target_modules={config.get('target_modules')!r} does not fit "
                           f"the {model.family.name} model: {e}") from None

    # fan_in_fan_out only tells PEFT a target is a Conv1D (weight (in, out)); PEFT corrects it per
    # layer type, and lora_A / lora_B are stored with the nn.Linear shapes either way. A value
    # that contradicts the targets is refused rather than silently reinterpreted.
    fifo = bool(config.get("fan_in_fan_out", False))
    if fifo and not _conv1d_targets(model, method.targets):
        raise AdapterError(f"{folder}: fan_in_fan_out=True is for Conv1D (GPT-2) layers, but the "
                           f"targets of the {model.family.name} model are nn.Linear layers")
    added, missing, misshaped = {}, [], []
    site_to_file = {s: m for m, s in to_site.items()}
    for site in method.targets:
        info = sites.linear[site]
        module = site_to_file.get(site, site)
        want = {"lora_A.weight": ((r, info["in_features"]), "lora_A", True),
                "lora_B.weight": ((info["out_features"], r), "lora_B", True)}
        want.update({k: ((info["out_features"],), v, False) for k, v in extra.items()})
        for suffix, (shape, ours, transpose) in want.items():
            # consumed: the head import sees the rest
            array = _pop_checked(tensors, lora_keys, f"{module}.{suffix}", shape, prefix, missing, misshaped)
            if array is not None:
                added[f"{site}.{ours}"] = jax.numpy.asarray(array.T if transpose else array)
    for site, module in grouped_layout(method).items():
        info = sites.grouped[site]
        e, fan_in, fan_out = info["experts"], info["in_features"], info["out_features"]
        want = {"lora_A": (r * e, fan_in), "lora_B": (fan_out, r * e)}
        arrays = {ours: _pop_checked(tensors, lora_keys, f"{module}.{ours}.weight", shape, prefix,
                                     missing, misshaped) for ours, shape in want.items()}
        if all(a is not None for a in arrays.values()):   # the inverse of _export_lora's layout
            added[f"{site}.lora_A"] = jax.numpy.asarray(arrays["lora_A"].reshape(e, r, fan_in).transpose(0, 2, 1))
            added[f"{site}.lora_B"] = jax.numpy.asarray(arrays["lora_B"].reshape(fan_out, r, e).transpose(2, 1, 0))
    unexpected = sorted(prefix + k for k in lora_keys)
    if missing or misshaped or unexpected:
        lines = []
        if missing:
            lines.append(_listing("missing keys (modules that target_modules selects)", missing))
        if unexpected:
            lines.append(_listing("unexpected keys (modules not selected or not adaptable)", unexpected))
        if misshaped:
            lines.append(_listing("mis-shaped keys", misshaped))
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  "
                           + "\n  ".join(lines))
    return method, added, prefix


def _pop_checked(tensors: dict, index: dict, key: str, shape, prefix: str, missing: list,
                 misshaped: list):
    """Pops the file's tensor for ``key`` (``index``: key without the prefix → file key; both
    are consumed, so what remains is unexpected) and checks its shape (``None``: any); returns
    None after recording it as missing or mis-shaped."""
    if key not in index:
        missing.append(prefix + key)
        return None
    array = tensors.pop(index.pop(key))
    if shape is not None and tuple(array.shape) != tuple(shape):
        misshaped.append(f"{prefix}{key}: adapter {tuple(array.shape)}, model expects {tuple(shape)}")
        return None
    return array


def _lora_variant(config, init, problems: list[str]) -> tuple[str, str]:
    """(registered LoRA variant, its init) that a PEFT LoraConfig describes, chosen by the
    variants' ``peft_lora_flags`` and ``inits`` (PEFT's ``init_lora_weights``: True/False →
    default, else the init's name: gaussian, pissa, olora); among several, the most general
    class (a subclass that adds nothing PEFT records is read as its base)."""
    flags = {"use_dora": True} if config.get("use_dora") else {}
    our_init = "default" if isinstance(init, bool) else str(init)
    found = []
    for name in core.registered():
        cls = core.method_class(name)
        if _as_lora_config(cls) and cls.peft_lora_flags == flags and our_init in cls.inits:
            found.append(cls)
    if not found:
        known = sorted({i for n in core.registered() if _as_lora_config(core.method_class(n))
                        for i in core.method_class(n).inits})
        what = "use_dora=True with " if flags else ""
        problems.append(f"{what}init_lora_weights={init!r}: no registered LoRA variant implements it "
                        f"(inits peftjax reads: {', '.join(known)}; a randomized or data-driven "
                        "init that rewrites the base cannot be rebuilt from the adapter)")
        return "lora", "default"
    cls = min(found, key=lambda c: (len(c.__mro__), c.name))
    return cls.name, our_init


def _import_declared(cls, config, tensors, model, folder) -> tuple[core.Method, dict, str]:
    """A method that describes its own PEFT format (``Method.peft_format``: (IA)³, HiRA)."""
    problems = []
    for field in ("layers_to_transform", "layers_pattern", "exclude_modules", "rank_pattern",
                  "alpha_pattern", "target_parameters"):
        if config.get(field):
            problems.append(f"{field}={config[field]!r}: not implemented; export the adapter with "
                            "explicit target_modules and one setting for all of them")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: trained biases are not implemented")
    sites = core.Sites.discover(model)
    try:
        kwargs = cls.config_from_peft(config, lambda t: _peft_targets_regex(t, sites))
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise AdapterError(f"{folder}: cannot import this {config.get('peft_type')} adapter:\n  "
                           + "\n  ".join(problems))
    method = _create_for(cls.name, model, kwargs, config, folder)
    layout = method.peft_tensors()
    ours = jax.eval_shape(lambda b: method.init(jax.random.PRNGKey(0), b, core.InitContext()),
                          hf_io.flatten(model.abstract_params()))
    prefix = "base_model.model."
    suffixes = {t.peft for ts in layout.values() for t in ts}
    in_file = {k: full for k, full in _strip_prefix(tensors, prefix).items()
               if k.rsplit(".", 1)[-1] in suffixes}
    modules = sorted({k.rsplit(".", 1)[0] for k in in_file})
    site_to_file = {s: m for m, s in _module_map(model, modules).items()}
    added, missing, misshaped = {}, [], []
    for site, ts in layout.items():
        module = site_to_file.get(site, site)
        for t in ts:
            array = _pop_checked(tensors, in_file, f"{module}.{t.peft}", t.shape, prefix, missing, misshaped)
            if array is None:
                continue
            name = f"{site}.{t.ours}"
            added[name] = jax.numpy.asarray((array.T if t.transpose else array).reshape(ours[name].shape))
    if in_file:
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  "
                           + _listing("unexpected keys (modules not selected or not adaptable)",
                                      sorted(prefix + k for k in in_file)))
    _raise_misfit(folder, model, missing, misshaped)
    return method, added, prefix


def _take_module_tensors(tensors, model, method, prefix, folder, want) -> tuple[dict, list, list]:
    """Pops ``<prefix><module>.<suffix>`` for every target and suffix of ``want`` (``{suffix:
    shape(site) or None}``); returns (``{(site, suffix): array}``, missing, mis-shaped) and refuses
    leftover tensors of the same kinds (modules the config does not select)."""
    in_file = _strip_prefix(tensors, prefix)
    ours = {k: full for k, full in in_file.items() if k.rsplit(".", 1)[-1] in want}
    to_site = _module_map(model, sorted({k.rsplit(".", 1)[0] for k in ours}))
    site_to_file = {s: m for m, s in to_site.items()}
    found, missing, misshaped = {}, [], []
    for site in method.targets:
        module = site_to_file.get(site, site)
        for suffix, shape in want.items():
            array = _pop_checked(tensors, ours, f"{module}.{suffix}", shape(site) if shape else None,
                                 prefix, missing, misshaped)
            if array is not None:
                found[(site, suffix)] = array
    unexpected = sorted(prefix + k for k in ours)
    if unexpected:
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  "
                           + _listing("unexpected keys (modules not selected or not adaptable)", unexpected))
    return found, missing, misshaped


def _raise_misfit(folder, model, missing, misshaped) -> None:
    if missing or misshaped:
        lines = []
        if missing:
            lines.append(_listing("missing keys (modules that target_modules selects)", missing))
        if misshaped:
            lines.append(_listing("mis-shaped keys", misshaped))
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  " + "\n  ".join(lines))


def _create_for(name, model, kwargs, config, folder) -> core.Method:
    try:
        return core.create(name, model, kwargs)
    except ValueError as e:
        raise AdapterError(f"{folder}: {config.get('peft_type')} adapter (target_modules="
                           f"{config.get('target_modules')!r}) does not fit the "
                           f"{model.family.name} model: {e}") from None


def _import_adalora(config, tensors, model, folder) -> tuple[core.Method, dict, dict, str]:
    """AdaLoRA: full init_r tensors, or PEFT's pruned ones put back at their ``rank_pattern``
    indices (zeros elsewhere, so E = 0 there and the update is unchanged)."""
    problems = _refused_lora_fields(config)
    if config.get("use_dora") or config.get("use_rslora"):
        problems.append("use_dora / use_rslora: not part of AdaLoRA")
    if problems:
        raise AdapterError(f"{folder}: cannot import this AdaLoRA adapter:\n  " + "\n  ".join(problems))
    sites = core.Sites.discover(model)
    init_r = int(config.get("init_r", 12))
    kwargs = dict(init_r=init_r, target_r=int(config.get("target_r", 8)),
                  alpha=float(config.get("lora_alpha", 8)),
                  dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                  targets=_peft_targets_regex(config.get("target_modules"), sites),
                  tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)),
                  deltaT=int(config.get("deltaT", 1)), beta1=float(config.get("beta1", 0.85)),
                  beta2=float(config.get("beta2", 0.85)),
                  orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
                  total_step=int(config.get("total_step") or 0))
    method = _create_for("adalora", model, kwargs, config, folder)
    prefix = "base_model.model."
    pattern_in = {k.removesuffix(".default"): v for k, v in (config.get("rank_pattern") or {}).items()}
    to_site = _module_map(model, [k.rsplit(".", 1)[0] for k in pattern_in])
    keep = {site: np.ones(init_r, bool) for site in method.targets}
    for key, value in pattern_in.items():
        site = to_site[key.rsplit(".", 1)[0]]
        if site not in keep or len(value) != init_r:
            raise AdapterError(f"{folder}: rank_pattern entry {key!r} does not fit the targets "
                               f"(init_r={init_r}, {len(value)} values)")
        keep[site] = np.asarray(value, bool)
    k = lambda site: int(keep[site].sum())   # noqa: E731
    info = sites.linear
    want = {"lora_A": lambda s: (k(s), info[s]["in_features"]), "lora_E": lambda s: (k(s), 1),
            "lora_B": lambda s: (info[s]["out_features"], k(s))}
    found, missing, misshaped = _take_module_tensors(tensors, model, method, prefix, folder, want)
    _raise_misfit(folder, model, missing, misshaped)
    added = {}
    for site in method.targets:
        idx = np.flatnonzero(keep[site])
        a = np.zeros((info[site]["in_features"], init_r), np.float32)
        e = np.zeros((init_r,), np.float32)
        b = np.zeros((init_r, info[site]["out_features"]), np.float32)
        a[:, idx] = found[(site, "lora_A")].T
        e[idx] = found[(site, "lora_E")][:, 0]
        b[idx] = found[(site, "lora_B")].T
        added.update({f"{site}.lora_A": jax.numpy.asarray(a), f"{site}.lora_E": jax.numpy.asarray(e),
                      f"{site}.lora_B": jax.numpy.asarray(b)})
    state = {}
    for site in method.targets:
        for part in ("lora_A", "lora_E", "lora_B"):
            shape = added[f"{site}.{part}"].shape
            state[f"{site}.{part}.ipt"] = jax.numpy.zeros(shape, jax.numpy.float32)
            state[f"{site}.{part}.unc"] = jax.numpy.zeros(shape, jax.numpy.float32)
        state[site + ".rank_mask"] = jax.numpy.asarray(keep[site], jax.numpy.float32)
    return method, added, state, prefix


def _import_vera(config, tensors, model, folder) -> tuple[core.Method, dict, dict, str]:
    """VeRA saved with its projections (``save_projection=True``)."""
    problems = []
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: trained biases are not implemented")
    for field in ("layers_to_transform", "layers_pattern"):
        if config.get(field):
            problems.append(f"{field}={config[field]!r}: adapting a subset of layers is not implemented")
    if "base_model.vera_A" not in tensors or "base_model.vera_B" not in tensors:
        problems.append("the file holds no projections (base_model.vera_A / vera_B): it was saved "
                        "with save_projection=False, and PEFT would redraw them with torch's "
                        "generator, which peftjax does not reproduce; re-save it with "
                        "save_projection=True")
    if problems:
        raise AdapterError(f"{folder}: cannot import this VeRA adapter:\n  " + "\n  ".join(problems))
    sites = core.Sites.discover(model)
    r = int(config.get("r", 256))
    kwargs = dict(rank=r, d_initial=float(config.get("d_initial", 0.1)),
                  dropout=float(config.get("vera_dropout", 0.0) or 0.0),
                  targets=_peft_targets_regex(config.get("target_modules"), sites),
                  projection_prng_key=int(config.get("projection_prng_key", 0)))
    method = _create_for("vera", model, kwargs, config, folder)
    prefix = "base_model.model."
    a, b = tensors.pop("base_model.vera_A"), tensors.pop("base_model.vera_B")
    if a.shape != (r, method.in_max) or b.shape != (method.out_max, r):
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  mis-shaped "
                           f"projections: vera_A {a.shape}, vera_B {b.shape}; the targets need "
                           f"({r}, {method.in_max}) and ({method.out_max}, {r})")
    want = {"vera_lambda_b": lambda s: (sites.linear[s]["out_features"],), "vera_lambda_d": lambda s: (r,)}
    found, missing, misshaped = _take_module_tensors(tensors, model, method, prefix, folder, want)
    _raise_misfit(folder, model, missing, misshaped)
    added = {f"{site}.{n}": jax.numpy.asarray(found[(site, n)]) for site in method.targets for n in want}
    state = {"vera_A": jax.numpy.asarray(np.ascontiguousarray(a.T)),
             "vera_B": jax.numpy.asarray(np.ascontiguousarray(b.T))}
    return method, added, state, prefix


def _import_prompt(config, tensors, model, folder) -> tuple[core.Method, dict, str]:
    problems = []
    if config.get("num_transformer_submodules", 1) not in (1, None):
        problems.append(f"num_transformer_submodules={config['num_transformer_submodules']}: "
                        "encoder-decoder prompts are not supported")
    if "prompt_embeddings" not in tensors:
        problems.append("missing key: prompt_embeddings")
    if problems:
        raise AdapterError(f"{folder}: cannot import this prompt-tuning adapter:\n  " + "\n  ".join(problems))
    prompt = tensors.pop("prompt_embeddings")
    n = int(config.get("num_virtual_tokens", prompt.shape[0]))
    method = core.create("prompt_tuning", model, {"num_virtual_tokens": n})
    want = (n, method.hidden)
    if tuple(prompt.shape) != want:
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  "
                           f"mis-shaped keys (1): prompt_embeddings: adapter {tuple(prompt.shape)}, "
                           f"model expects {want} (num_virtual_tokens, hidden size)")
    return method, {f"{method.site}.prompt_embeddings": jax.numpy.asarray(prompt)}, "base_model."


def _import_head(tensors, model, prefix, folder, require_head) -> tuple[dict, list[str]]:
    """Head params from the remaining tensors; returns (head, unexpected keys)."""
    head, missing, misshaped = {}, [], []
    remaining = dict(tensors)
    for path, spec in _head_params(model).items():
        name, transpose = hf_io.hf_name(path)
        key = prefix + name
        if key not in remaining:
            missing.append(key)
            continue
        array = remaining.pop(key)
        array = array.T if transpose else array
        if tuple(array.shape) != tuple(spec.shape):
            misshaped.append(f"{key}: adapter {tuple(array.T.shape if transpose else array.shape)}, "
                             f"model expects {tuple(spec.shape[::-1]) if transpose else tuple(spec.shape)}")
            continue
        head[path] = jax.numpy.asarray(array)
    if missing and not require_head and len(missing) == len(_head_params(model)):
        head, missing = {}, []
    if missing or misshaped:
        lines = []
        if missing:
            lines.append(_listing("missing head keys (modules_to_save)", missing)
                         + " — pass require_head=False to supply the head yourself")
        if misshaped:
            lines.append(_listing("mis-shaped head keys", misshaped))
        raise AdapterError(f"{folder} does not fit the {model.family.name} model "
                           f"(head {model.head!r}, num_labels={model.num_labels}):\n  " + "\n  ".join(lines))
    return head, sorted(remaining)
