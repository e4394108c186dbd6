"""Sweep definitions → cells: expansion, validation against the registries, stable cell ids.

A sweep definition is an ml-collections file (``experiments/<name>/grid.py``) whose
``get_config()`` returns::

    name      str                      the experiment's name
    models    [model names]            configs/models/<model>.py
    tasks     [task names]             registered tasks (peftjax.data) with configs/tasks/<task>.py
    seeds     [ints]
    base      {section: {key: value}}  overrides of the composed train config for every cell
    task_overrides {task: {section: {key: value}}}   (optional) per task, for every variant
    variants  {name: variant}          the named methods of the comparison
    report    {"order": [variant names]}  (optional) row order of the report's tables;
              "min_over_majority": {task: points} (optional) the accuracy margin over the
              majority class each chosen row should reach (the report flags rows below it)

and each variant is::

    method    a registered method (peftjax.methods.registered())
    overrides {section: {key: value}}            (optional) fixed settings of this variant
    task_overrides {task: {section: {...}}}      (optional) per task, for this variant only
    grid      {section: {key: [values, ...]}}    (optional) the variant's hyperparameter grid
    tasks     [names]                            (optional) run this variant on these tasks only
    rank_sweep [ints]                            (optional) evaluate the finished run at these
                                                 ranks without retraining (a method with an
                                                 ``eval_rank_field``: DyLoRA)

The cells are the product models × tasks × variants × (the variant's grid) × seeds. Each cell's
config is ``configs/train.py``'s composed config with, in this order, ``base``,
``task_overrides[task]``, the variant's ``overrides``, its ``task_overrides[task]`` and its grid
values applied; then ``seed``. Sections are those of the train config (``train``, ``method``,
``task``, ``model``; ``seed``/``data_dir`` are top-level keys given as ``{"seed": ...}``).

Two-stage tuning (``selection_seeds``, a subset of ``seeds``): a variant with a grid runs every
grid value on the selection seeds only; once those cells have finished, the value with the best
mean validation score (``peftjax.grid.report.select``) runs on the other seeds. Before that, the
other seeds' cells are *deferred* (``expand_with_selection`` reports them; the sweep script
re-expands after every finished cell, so they start as soon as the choice is made, ahead of
later variants: ``runner.run(more=...)``). Test is read for the chosen value only, as always.

Everything is validated at expansion, before any cell runs: an unknown model, task, method or
config key, or a value of the wrong type, raises :class:`GridError` naming the cell and the
field. A cell's id is the sha256 of its resolved config as sorted JSON (display-only keys such as
``progress`` left out), so ids are stable across runs and machines, and any change of a setting
or of a default makes a new cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

# Keys that change what is displayed, not what is computed: left out of the cell id.
DISPLAY_ONLY_KEYS = frozenset({"progress"})
VARIANT_KEYS = frozenset({"method", "overrides", "task_overrides", "grid", "rank_sweep", "tasks"})
SWEEP_KEYS = frozenset({"name", "description", "models", "tasks", "seeds", "selection_seeds", "base",
                        "task_overrides", "variants", "report"})


class GridError(ValueError):
    """A sweep definition that cannot be expanded; the message names the cell and the field."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: a fully resolved train config and where it came from."""

    id: str                 # 12 hex digits of sha256(resolved config)
    variant: str
    method: str
    model: str
    task: str
    seed: int
    hp: dict                # the variant's grid values of this cell, {"section.key": value}
    config: dict            # the resolved train config (configs/train.py's structure)
    rank_sweep: tuple = ()  # dylora: ranks to evaluate after training

    @property
    def label(self) -> str:
        hp = ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in self.hp.items())
        return f"{self.model}/{self.task}/{self.variant}" + (f"[{hp}]" if hp else "") + f"/seed={self.seed}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rank_sweep"] = list(self.rank_sweep)
        d["label"] = self.label
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Cell":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in fields}
        values["rank_sweep"] = tuple(values.get("rank_sweep", ()))
        return cls(**values)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _plain(x: Any) -> Any:
    """ConfigDicts, tuples and FieldReferences as plain JSON-able Python."""
    if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _strip_display(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_display(v) for k, v in x.items() if k not in DISPLAY_ONLY_KEYS}
    return x


# Fields added after grids had run, left out of the id while they hold the value that computes
# what configs without them computed, so the cells of an existing sweep keep their ids. Each
# entry is one bundle of fields added together, stripped when all of them are neutral (a
# quantized base's double_quant means something only beside its quant): (section, {field: value}).
# A bundle per addition, never a field added to an existing one, or the cells where that
# bundle is not neutral (polarity's select_metric) change ids. Stores written before a bundle
# existed are re-keyed by ``runner.rekey`` (the ids of their rows and cell folders recomputed).
NEUTRAL_DEFAULTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("model", {"quant": "none", "double_quant": True}),   # quantized bases (issue 20)
    ("train", {"select_metric": ""}),                      # the selection metric (issue 18)
    ("train", {"scan_layers": False}),                     # the layer scan (issue 22)
    ("method", {"target_parameters": ""}),                 # LoRA on expert params (issue 21)
    ("model", {"quant_matmul": "auto"}),                   # the fused quantized matmul (issue 20)
)


def _strip_neutral(config: Any) -> Any:
    if not isinstance(config, dict):
        return config
    out = dict(config)
    for group, defaults in NEUTRAL_DEFAULTS:
        sub = out.get(group)
        if isinstance(sub, dict) and all(sub.get(k, v) == v for k, v in defaults.items()):
            out[group] = {k: v for k, v in sub.items() if k not in defaults}
    return out


def cell_id(config: Mapping[str, Any], rank_sweep: Iterable[int] = ()) -> str:
    """sha256 (first 12 hex digits) of the resolved config as sorted, compact JSON.

    A DyLoRA rank sweep changes what the cell records, so its ranks are part of the id.
    """
    payload: dict[str, Any] = {"config": _strip_neutral(_strip_display(_plain(config)))}
    if rank_sweep:
        payload["rank_sweep"] = [int(r) for r in rank_sweep]
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def recorded_id(row: Mapping[str, Any], rank_sweep: Iterable[int] | None = None) -> str | None:
    """The id a results row's recorded config hashes to now, or None when it cannot be told: a
    baseline row, a row without a config, or a DyLoRA row whose rank sweep (part of the id,
    kept in its cell folder) is not given."""
    if str(row.get("cell")).startswith("baseline:") or not isinstance(row.get("config"), dict):
        return None
    if rank_sweep is None and row.get("method") == "dylora":
        return None
    return cell_id(row["config"], rank_sweep or ())


def flatten(tree: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 1e-3}} → {"train.learning_rate": 1e-3} (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in _plain(tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(config: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
    """Sets a dotted ``key`` of the locked train config; unknown keys and wrong types are errors."""
    parts = key.split(".")
    if key == "method.name":
        raise GridError(f"{where}: field 'method.name' cannot be overridden; set the variant's "
                        "'method' instead")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise GridError(f"{where}: unknown config key {key!r} ({'.'.join(parts[:i + 1])!r} "
                            f"does not exist; valid keys there: {', '.join(valid)})")
        if i < len(parts) - 1:
            node = node[part]
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise GridError(f"{where}: config key {key!r} cannot take {value!r}: {e}") from None


def _registries():
    from configs import models as model_configs
    from peftjax import data as data_lib
    from peftjax import methods as methods_lib

    return model_configs, data_lib, methods_lib


def load_definition(path: str) -> ml_collections.ConfigDict:
    """The sweep definition in ``path`` (a python file with ``get_config()``)."""
    import importlib.util
    import os

    if not os.path.exists(path):
        raise GridError(f"sweep definition {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("peftjax_sweep_definition", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def expand(definition: Mapping[str, Any] | ml_collections.ConfigDict) -> list[Cell]:
    """Every cell of the sweep, validated, in a fixed order (model, task, variant, grid, seed).

    Raises :class:`GridError` on the first invalid cell, before anything runs.
    """
    from configs.train import get_config

    d = _plain(definition)
    unknown = sorted(set(d) - SWEEP_KEYS)
    if unknown:
        raise GridError(f"sweep definition: unknown field(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(SWEEP_KEYS))}")
    for field in ("models", "tasks", "seeds", "variants"):
        if not d.get(field):
            raise GridError(f"sweep definition: field {field!r} is missing or empty")
    if len(set(d["seeds"])) != len(d["seeds"]) or not all(isinstance(s, int) for s in d["seeds"]):
        raise GridError(f"sweep definition: seeds must be distinct integers, got {d['seeds']!r}")
    if not set(d.get("selection_seeds") or []) <= set(d["seeds"]):
        raise GridError(f"sweep definition: selection_seeds {d['selection_seeds']!r} must be a "
                        f"subset of seeds {d['seeds']!r}")
    rep = d.get("report") or {}
    order = rep.get("order", [])
    bad_order = [v for v in order if v not in d["variants"]]
    unknown = sorted(set(rep) - {"order", "min_over_majority"})
    if bad_order or unknown:
        raise GridError(f"sweep definition: field 'report' may only hold 'order', a list of variant "
                        "names, and 'min_over_majority', {task: accuracy points}; unknown variants "
                        f"in 'order': {bad_order}, unknown fields: {unknown}")
    margins = rep.get("min_over_majority") or {}
    bad_margin = {t: m for t, m in dict(margins).items()
                  if t not in d["tasks"] or isinstance(m, bool) or not isinstance(m, (int, float))}
    if bad_margin:
        raise GridError(f"sweep definition: report.min_over_majority must map tasks of the sweep "
                        f"({d['tasks']}) to accuracy points; got {bad_margin}")
    model_configs, data_lib, methods_lib = _registries()
    registered = methods_lib.registered()
    models = set(model_configs.available())
    tasks = set(data_lib.list_tasks())

    for model in d["models"]:
        if model not in models and not os.path.isdir(os.path.expanduser(model)):
            raise GridError(f"cell {model}/*: unknown model {model!r} (field 'models'); "
                            f"available: {', '.join(sorted(models))}")
    for task in d["tasks"]:
        if task not in tasks:
            raise GridError(f"cell */{task}: unknown task {task!r} (field 'tasks'); "
                            f"registered: {', '.join(sorted(tasks))}")
    for task in d.get("task_overrides", {}):
        if task not in d["tasks"]:
            raise GridError(f"field 'task_overrides.{task}': task {task!r} is not in 'tasks'")

    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for model, task, (vname, variant) in itertools.product(d["models"], d["tasks"],
                                                           d["variants"].items()):
        where = f"cell {model}/{task}/{vname}"
        if not isinstance(variant, dict):
            raise GridError(f"{where}: field 'variants.{vname}' must be a dict with a 'method'")
        bad = sorted(set(variant) - VARIANT_KEYS)
        if bad:
            raise GridError(f"{where}: unknown field(s) {', '.join(f'variants.{vname}.{b}' for b in bad)}; "
                            f"valid: {', '.join(sorted(VARIANT_KEYS))}")
        only = variant.get("tasks")
        if only is not None:
            if not isinstance(only, list) or not set(only) <= set(d["tasks"]):
                raise GridError(f"{where}: field 'variants.{vname}.tasks' must be a list of tasks "
                                f"from 'tasks' ({d['tasks']}), got {only!r}")
            if task not in only:
                continue
        method = variant.get("method")
        if method not in registered:
            raise GridError(f"{where}: unknown method {method!r} (field 'variants.{vname}.method'); "
                            f"registered: {', '.join(registered)}")
        for t in variant.get("task_overrides", {}):
            if t not in d["tasks"]:
                raise GridError(f"{where}: field 'variants.{vname}.task_overrides.{t}': task {t!r} "
                                "is not in 'tasks'")
        grid = flatten(variant.get("grid"))
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise GridError(f"{where}: field 'variants.{vname}.grid.{key}' must be a non-empty "
                                f"list of values, got {values!r}")
        rank_sweep = tuple(int(r) for r in variant.get("rank_sweep", ()))
        if rank_sweep and methods_lib.method_class(method).eval_rank_field is None:
            able = [m for m in methods_lib.registered() if methods_lib.method_class(m).eval_rank_field]
            raise GridError(f"{where}: field 'variants.{vname}.rank_sweep' needs a method that "
                            f"can be evaluated at other ranks ({', '.join(able)}), not {method!r}")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            hp = dict(zip(keys, combo))
            for seed in d["seeds"]:
                label = where + ("[" + ",".join(f"{k}={_fmt(v)}" for k, v in hp.items()) + "]"
                                 if hp else "") + f"/seed={seed}"
                try:
                    config = get_config(f"model={model},method={method},task={task}")
                except ValueError as e:
                    raise GridError(f"{label}: {e}") from None
                layers = [("base", flatten(d.get("base"))),
                          (f"task_overrides.{task}", flatten(d.get("task_overrides", {}).get(task))),
                          (f"variants.{vname}.overrides", flatten(variant.get("overrides"))),
                          (f"variants.{vname}.task_overrides.{task}",
                           flatten(variant.get("task_overrides", {}).get(task))),
                          (f"variants.{vname}.grid", hp),
                          ("seeds", {"seed": seed})]
                for field, values in layers:
                    for key, value in values.items():
                        _set(config, key, value, f"{label} (field {field!r})")
                _check_method_config(methods_lib, config, label, vname)
                _check_values(config, label, vname)
                if rank_sweep:
                    r_max = config.method.rank
                    if not all(1 <= r <= r_max for r in rank_sweep):
                        raise GridError(f"{label}: field 'variants.{vname}.rank_sweep' = "
                                        f"{list(rank_sweep)} must lie in 1..method.rank={r_max}")
                resolved = config.to_dict()
                cid = cell_id(resolved, rank_sweep)
                if cid in seen:
                    raise GridError(f"{label}: resolves to the same config as {seen[cid]} "
                                    f"(cell {cid}); a grid value or variant has no effect")
                seen[cid] = label
                cells.append(Cell(id=cid, variant=vname, method=method, model=model, task=task,
                                  seed=seed, hp=hp, config=resolved, rank_sweep=rank_sweep))
    return cells


def diverged_ids(results: Sequence[dict]) -> set[str]:
    """The ids of cells whose latest run diverged (NaN/inf): a grid value that lost, which the
    runner counts as failed (not rerun) and the selection as settled."""
    from peftjax.grid import report

    return {recorded_id(r) or r["cell"] for r in report.diverged_rows(results)}


def expand_with_selection(definition: Mapping[str, Any] | ml_collections.ConfigDict,
                          results: Sequence[dict] = ()) -> tuple[list[Cell], list[Cell]]:
    """``(cells to run, deferred cells)`` under two-stage tuning (``selection_seeds``).

    Without ``selection_seeds`` every cell runs (nothing deferred). With it, a variant whose grid
    has several values runs them all on the selection seeds; its other seeds run only the value
    chosen on validation from ``results`` (the sweep's results rows), once every selection cell
    of that (model, task, variant) has finished ok or diverged — until then they are deferred.
    A value whose run diverged (NaN/inf) lost; if every value diverged, nothing more runs.
    """
    from peftjax.grid import report

    cells = expand(definition)
    d = _plain(definition)
    sel_seeds = set(d.get("selection_seeds") or d["seeds"])
    done = {recorded_id(r) or r["cell"]: r for r in report.finished_rows(results)}
    diverged = diverged_ids(results)
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.model, c.task, c.variant), []).append(c)
    run, deferred = [], []
    for group in groups.values():
        hps = {json.dumps(c.hp, sort_keys=True) for c in group}
        if len(hps) <= 1 or sel_seeds == set(d["seeds"]):
            run.extend(group)
            continue
        selection = [c for c in group if c.seed in sel_seeds]
        run.extend(selection)
        rows = [done[c.id] for c in selection if c.id in done]
        others = [c for c in group if c.seed not in sel_seeds]
        if len(rows) + sum(c.id in diverged for c in selection) < len(selection):
            deferred.extend(others)
            continue
        if not rows:   # every value diverged: no choice, and its other seeds would too
            continue
        (chosen,) = report.select(rows)
        run.extend(c for c in others if c.hp == chosen.hp)
    order = {c.id: i for i, c in enumerate(cells)}
    return sorted(run, key=lambda c: order[c.id]), sorted(deferred, key=lambda c: order[c.id])


# Abstract models (no weights) for the value checks, by ``compose.model_key``: kept for the
# process, so a second expansion of a definition (the report, a sweep's restart logic, tests)
# does not build and trace them again. A few at most, each a config and its abstract params.
_ABSTRACT_MODELS: dict[str, object] = {}
_ABSTRACT_MODELS_MAX = 16


def _abstract_model(config) -> object:
    from peftjax.train import compose

    key = compose.model_key(config)
    if key not in _ABSTRACT_MODELS:
        if len(_ABSTRACT_MODELS) >= _ABSTRACT_MODELS_MAX:
            del _ABSTRACT_MODELS[next(iter(_ABSTRACT_MODELS))]   # the oldest
        _ABSTRACT_MODELS[key] = compose.build(config, with_weights=False, with_tokenizer=False)[1]
    return _ABSTRACT_MODELS[key]


def _check_values(config, label: str, variant: str) -> None:
    """The cell's values as a run would check them, before any cell runs: the train settings
    (``compose.validate_config``) and the method built on the (abstract) model, so ``rank=0`` or
    a target that matches nothing fails at ``--dry_run``, not hours later when the cell starts.
    Models are built once per distinct model (``compose.model_key``) and reused: building and
    tracing roberta-base takes ~1.5 s, and GLUE's eight tasks need three."""
    from peftjax import methods as methods_lib
    from peftjax.train import compose

    try:
        compose.validate_config(config)
        methods_lib.create(config.method.name, _abstract_model(config),
                           {k: v for k, v in config.method.to_dict().items() if k != "name"})
    except ValueError as e:
        raise GridError(f"{label} (variant {variant!r}): {e}") from None


def _check_method_config(methods_lib, config, label: str, variant: str) -> None:
    """The method section against the method's own Config dataclass (keys and constructor checks)."""
    from peftjax.methods.core import config_from, method_class

    cls = method_class(config.method.name)
    values = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    try:
        config_from(cls.Config, values, config.method.name)
    except (TypeError, ValueError) as e:
        raise GridError(f"{label} (variant {variant!r}, section 'method'): {e}") from None


def select(only: str | None, *groups: list[Cell]) -> tuple[list[Cell], ...]:
    """Each group's cells whose label matches the regular expression ``only`` (``--only``; all
    of them without it). A pattern that is invalid or matches no cell of any group is an error
    (a ``ValueError`` naming the pattern and, for no match, what labels look like): a typo
    would otherwise run, or list, nothing."""
    try:
        pattern = re.compile(only or "")
    except re.error as e:
        raise ValueError(f"--only={only!r} is not a regular expression: {e}") from None
    kept = tuple([c for c in group if pattern.search(c.label)] for group in groups)
    everything = [c for group in groups for c in group]
    if everything and not any(kept):
        raise ValueError(f"--only={only!r} matches no cell; labels look like {everything[0].label}")
    return kept


def find_cell(cells: Sequence[Cell], text: str, flag: str = "--cell") -> Cell:
    """The one cell whose label contains ``text`` (a plain substring: labels hold ``[``, so a
    regular expression would need escaping). None or several is a ``ValueError`` listing the
    matches, or the first labels, so the next try can be exact."""
    matches = [c for c in cells if text in c.label]
    if len(matches) == 1:
        return matches[0]
    shown = "\n  ".join(c.label for c in (matches or cells)[:12])
    which = "they are" if matches else "labels look like"
    raise ValueError(f"{flag}={text!r} matches {len(matches)} cells (one needed); {which}:\n  {shown}")


def describe(cells: list[Cell]) -> str:
    """A plain-text listing of the cells (for ``--dry_run``) ending with their count."""
    lines = [f"{c.id}  {c.label}" for c in cells]
    variants = sorted({c.variant for c in cells})
    lines.append(f"{len(cells)} cells ({len(variants)} variants, "
                 f"{len({c.task for c in cells})} tasks, {len({c.model for c in cells})} models, "
                 f"{len({c.seed for c in cells})} seeds)")
    return "\n".join(lines)
