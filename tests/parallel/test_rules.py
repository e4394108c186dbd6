"""Sharding rules, mesh axis sizes, per-device bytes and the distributed settings, on one device
(abstract meshes: no devices needed)."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from peftjax import methods as methods_lib
from peftjax.parallel import distributed, mesh as mesh_lib, rules as rules_lib, shard
from peftjax.parallel.rules import ShardingRules, fallback_spec, fit_spec
from peftjax.train.memory import abstract_plan
from tests.helpers import METHOD_CONFIGS, TINY, TINY_OVERRIDES, fisher_context

MESH = {"data": 2, "fsdp": 4, "tensor": 2}


@functools.lru_cache(maxsize=None)
def abstract_tiny(family: str):
    """(model, flat abstract params) of the family's tiny model: shapes only, nothing allocated."""
    from flax import traverse_util

    from configs import models as model_configs
    from peftjax.models import build_model

    name, head, labels = TINY[family]
    hf = {**model_configs.get(name).hf_config.to_dict(), **TINY_OVERRIDES.get(family, {})}
    model = build_model(hf, head=head, num_labels=labels)
    return model, traverse_util.flatten_dict(model.abstract_params(), sep=".")


def test_axis_sizes_resolve_the_rest_and_check_the_product():
    assert mesh_lib.resolve_axis_sizes({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert mesh_lib.resolve_axis_sizes("2,-1,2", 8) == (2, 2, 2)
    assert mesh_lib.is_trivial({"data": 1, "fsdp": 1, "tensor": 1, "min_shard_elements": 5})
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_lib.resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="needs 4 devices but 8"):
        mesh_lib.resolve_axis_sizes((2, 2, 1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.resolve_axis_sizes((3, -1, 1), 8)
    with pytest.raises(ValueError, match="mesh.fsdp=0 is invalid"):
        mesh_lib.axis_sizes_from({"fsdp": 0})
    with pytest.raises(ValueError, match="three comma-separated ints"):
        mesh_lib.axis_sizes_from("a,b,c")


def test_divisibility_falls_back_to_replication_of_that_dim_only():
    spec, dropped = fit_spec(P("fsdp", "tensor"), (30, 32), MESH)
    assert spec == P(None, "tensor") and dropped == ((0, ("fsdp",)),)
    spec, dropped = fit_spec(P(("data", "fsdp")), (16, 3), MESH)   # 16 % 8 == 0
    assert spec == P(("data", "fsdp")) and dropped == ()
    spec, dropped = fit_spec(P(("data", "fsdp")), (12,), MESH)     # 12 % 8 != 0
    assert spec == P() and dropped == ((0, ("data", "fsdp")),)
    # axes of size 1 are dropped (nothing to split)
    assert fit_spec(P("fsdp", "tensor"), (8, 8), {"data": 1, "fsdp": 8, "tensor": 1})[0] == P("fsdp")


def test_bad_specs_are_errors():
    with pytest.raises(ValueError, match="spec .* has 2 entries but the array has shape"):
        fit_spec(P("fsdp", "tensor"), (32,), MESH)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        fit_spec(P("model"), (32,), MESH)
    with pytest.raises(ValueError, match="used twice"):
        fit_spec(P("fsdp", "fsdp"), (32, 32), MESH)
    with pytest.raises(ValueError, match="not a valid regex"):
        rules_lib.register_rules("broken", [("(", P())])


def test_fallback_shards_the_largest_divisible_dim_of_big_arrays():
    assert fallback_spec((64, 4096), MESH) == P(None, "fsdp")
    assert fallback_spec((4096, 30), MESH) == P("fsdp")
    assert fallback_spec((30, 4094, 4), MESH) == P(None, None, "fsdp")   # only dim 2 divides by 4
    assert fallback_spec((4096,), MESH) == P()                           # 1-D: replicated
    assert fallback_spec((16, 16), MESH, min_elements=1024) == P()       # small: replicated
    assert fallback_spec((30, 31), MESH, min_elements=0) == P()          # nothing divides
    assert fallback_spec((64, 64), {"data": 8, "fsdp": 1, "tensor": 1}) == P()


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "bloom", "t5", "qwen2", "qwen3", "mistral", "gemma2", "gemma3",
                                    "qwen3_moe"])
def test_family_rules_name_every_weight_matrix_and_place_every_param(family):
    model, base = abstract_tiny(family)
    rules = ShardingRules.for_family(family)
    head = lambda path: any(path == h or path.startswith(h + ".") for h in model.head_prefixes)
    for path, v in base.items():
        if len(v.shape) >= 2 and not head(path):
            assert rules.match(path) is not None, f"no explicit {family} rule for {path} {v.shape}"
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]:
        sizes = dict(zip(mesh_lib.AXES, shape))
        for path, v in base.items():
            pl = rules.place(path, v.shape, sizes)
            for dim, entry in enumerate(pl.spec):   # what is sharded divides evenly
                axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
                assert v.shape[dim] % math.prod(sizes[a] for a in axes) == 0


def test_a_family_without_rules_uses_the_fallback():
    rules = ShardingRules.for_family("no_such_family")
    assert rules.rules == ()
    pl = rules.place("transformer.h.0.attn.c_attn.kernel", (768, 2304), MESH)
    assert pl.rule == "fallback" and pl.spec == P(None, "fsdp")


def _lora_plan(mesh_shape, min_elements=rules_lib.DEFAULT_MIN_ELEMENTS):
    model, abstract = abstract_tiny("llama")
    method = methods_lib.create("lora", model, METHOD_CONFIGS["lora"])
    tx = optax.adamw(1e-3)
    return abstract_plan(method, dict(zip(mesh_lib.AXES, mesh_shape)), abstract, tx,
                               min_elements=min_elements)


def test_per_device_bytes_divide_by_the_shards():
    state, frozen, sh = _lora_plan((1, 8, 1), min_elements=0)
    expected = 0
    for path, v in frozen.items():   # independent count: size / ways of every sharded dim
        spec = sh.placements["frozen"][path].spec
        ways = math.prod(8 if e == "fsdp" else 1 for e in spec if e is not None)
        expected += int(np.prod(v.shape)) * 4 // ways
    assert shard.per_device_bytes(frozen, sh.frozen) == expected
    report = shard.memory_report(state, frozen, sh)
    assert report["frozen_bytes_per_device"] < report["frozen_bytes"] / 4
    # the optimizer moments follow their params: LoRA A (32 x 4) over fsdp
    mu = [s for s in jax.tree.leaves(sh.state.opt_state) if s.spec != P()]
    assert mu, "no optimizer moment is sharded"
    assert report["optimizer_bytes_per_device"] < report["optimizer_bytes"]


def test_single_device_mesh_changes_nothing():
    state, frozen, sh = _lora_plan((1, 1, 1), min_elements=0)
    report = shard.memory_report(state, frozen, sh)
    for k in ("frozen", "trainable", "optimizer"):
        assert report[f"{k}_bytes_per_device"] == report[f"{k}_bytes"]


def test_distributed_settings_from_config_and_environment(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", distributed.ENV_ENABLE):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.wants_initialize({"initialize": False})
    assert distributed.initialize_args({}) == {}            # JAX's cluster auto-detection
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.initialize_args({"local_device_ids": "0,1"}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
        "local_device_ids": [0, 1]}
    cfg = {"coordinator_address": "host:1", "num_processes": 2, "process_id": 1}
    assert distributed.initialize_args(cfg)["coordinator_address"] == "host:1"
    with pytest.raises(ValueError, match="process_id=5 is invalid"):
        distributed.initialize_args({"num_processes": 2, "process_id": 5})
    monkeypatch.setenv(distributed.ENV_ENABLE, "yes")
    with pytest.raises(ValueError, match="PEFTJAX_DISTRIBUTED"):
        distributed.wants_initialize({})
    monkeypatch.setenv(distributed.ENV_ENABLE, "1")
    assert distributed.wants_initialize({})


def test_process_rows_cover_the_batch_on_one_process():
    mesh = mesh_lib.make_mesh({"data": -1})
    sharding = jax.sharding.NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
    assert distributed.process_rows(16, sharding) == (0, 16)


def test_every_registered_method_gets_a_plan_on_a_full_mesh():
    """Every method's trainable tree, optimizer and method state are placed (no rule error) on
    a mesh using all three axes; shardings only split what divides."""
    model, abstract = abstract_tiny("llama")
    tx = optax.adamw(1e-3)
    # FishMask and Child-tuning_D size their selection from Fisher scores of real weights: they
    # are placed (and trained) for real in sharded_train.py (FishMask; Child-tuning_D keeps the
    # same values + .indices representation).
    # linear_probe is refused on a causal LM (its head has no params of its own).
    # A data-driven init whose shapes do not depend on the data (LoRA-GA's gradient) traces its
    # data pass on the abstract params: it gets the contract's training rows.
    ctx = fisher_context(model)
    for name in sorted(set(methods_lib.registered()) - {"fishmask", "child_tuning_d", "linear_probe"}):
        config = METHOD_CONFIGS.get(name, {})   # a method without a contract config: its defaults
        method = methods_lib.create(name, model, config)
        state, frozen, sh = abstract_plan(method, "2,2,2", abstract, tx, min_elements=0, ctx=ctx)
        for tree, shardings in ((state, sh.state), (frozen, sh.frozen)):
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
                shape = s.shard_shape(x.shape)   # raises if a split does not divide
                assert len(shape) == len(x.shape), name


def test_sharded_memory_of_a_config_divides_the_params_over_fsdp():
    """scripts/memory.py --mesh's figures: on 8-way FSDP each device holds 1/8 of every sharded
    array plus the replicated ones whole (counted independently from the placements)."""
    from configs.train import get_config
    from peftjax.train.memory import sharded_memory

    config = get_config("model=tiny-llama,method=lora")
    config.mesh.min_shard_elements = 0
    r = sharded_memory(config, "1,8,1", head="causal_lm", batch=8, seq=16)
    whole, per = r["bytes_single_device"], r["bytes_per_device"]
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["devices"] == 8
    assert whole["gradients"] == whole["trainable_params"] > 0
    assert whole["params"] / 8 <= per["params"] < whole["params"] / 4
    assert per["batch"] * 8 == whole["batch"]   # every field's rows split 8 ways
    with pytest.raises(ValueError, match="not divisible by the mesh's batch split"):
        sharded_memory(config, "1,8,1", head="causal_lm", batch=4, seq=16)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bloom", "tiny-t5"])
def test_gpt2_bloom_t5_rules_shard_their_kernels_over_fsdp_and_tensor(name):
    """GPT-2, BLOOM and T5 place every weight matrix by an explicit rule: each kernel and
    embedding is split over fsdp x tensor (4 ways on (2,2,2))."""
    from flax import traverse_util

    from configs import models as model_configs
    from peftjax.models import build_model
    from peftjax.models.registry import family_for

    hf = model_configs.get(name).hf_config.to_dict()
    family = family_for(hf["model_type"])
    model = build_model(hf, head="seq2seq_lm" if "seq2seq_lm" in family.heads else "causal_lm")
    abstract = traverse_util.flatten_dict(model.abstract_params(), sep=".")
    method = methods_lib.create("lora", model, {"rank": 4})
    state, frozen, sh = abstract_plan(method, "2,2,2", abstract, optax.adamw(1e-3), min_elements=0)
    matrices = {p: pl for p, pl in sh.placements["frozen"].items() if len(frozen[p].shape) >= 2}
    assert matrices and "fallback" not in {pl.rule for pl in matrices.values()}
    report = shard.memory_report(state, frozen, sh)
    assert report["frozen_bytes_per_device"] / report["frozen_bytes"] < 0.3
