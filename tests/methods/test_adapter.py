"""Bottleneck adapters at their two positions, against hand-written references of the equations.

With ``h`` a block's projected output (after its dropout), ``x`` the residual the model adds it
to, ``LN`` the block's post-sum LayerNorm (the identity in pre-LN models) and
``f(z) = act(z W_down + b_down) W_up + b_up``:

* Houlsby (Houlsby et al. 2019, Fig. 2; AdapterHub ``DoubleSeqBnConfig``): attention and FFN
  blocks, ``out = LN(h + f(h) + x)``.
* Pfeiffer (AdapterHub ``SeqBnConfig``: original_ln_before, original_ln_after,
  residual_before_ln; ``Adapter.pre_forward/forward/post_forward``): FFN blocks only,
  ``z = LN(h + x); a = f(z) + h; out = LN(a + x)``.

The BERT reference is a from-scratch numpy forward of the encoder (float64), so it checks the
whole wiring: that the model hands over the right ``h``, ``x`` and LayerNorm, and continues with
what the hook returns. The Llama check records every ``block_output`` call and checks each
output against the equation and each residual against the previous block's output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.methods.adapter import AdapterHooks
from peftjax.models import build_model, hooks

TOL = dict(rtol=1e-4, atol=1e-5)


def _tiny(name: str, perturb_norms: bool = True):
    """Head-less tiny model with random LayerNorm params (so that re-applying the block's own
    LayerNorm, params included, is what a test can see)."""
    model = build_model(model_configs.get(name).hf_config.to_dict(), head="none")
    flat = traverse_util.flatten_dict(model.init(jax.random.PRNGKey(0)), sep=".")
    rng = np.random.default_rng(0)
    out = {}
    for k, v in flat.items():
        v = np.asarray(v)
        if perturb_norms and "norm" in k.lower():
            v = v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype)
        out[k] = jnp.asarray(v)
    return model, out


def _setup(model, base, seed: int = 1, **config):
    """The method, its params, with non-zero random biases too (init leaves them zero)."""
    method = methods.create("adapter", model, config)
    p = method.setup(jax.random.PRNGKey(seed), base)
    rng = np.random.default_rng(seed)
    added = {k: (jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype) if k.endswith(".bias") else v)
             for k, v in p.trainable["added"].items()}
    return method, {**p.trainable, "added": added}, p.frozen, p.state


def _batch(model, b: int = 2, seq: int = 7):
    ids = np.random.default_rng(3).integers(5, 500, size=(b, seq)).astype(np.int32)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in model.input_names:
        out["token_type_ids"] = np.zeros_like(ids)
    return out


def _run(method, trainable, frozen, state, batch):
    return np.asarray(method.apply(trainable, frozen, state, batch))


# ----------------------------------------------------------------------------- numpy reference

_erf = np.vectorize(math.erf)
ACT = {"relu": lambda x: np.maximum(x, 0.0), "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))}


def _np(flat):
    return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def _f(added, site, z, act):
    """The bottleneck f(z) = act(z W_down + b_down) W_up + b_up."""
    a = lambda n: added[f"{site}.adapter.{n}"]
    return ACT[act](z @ a("down.kernel") + a("down.bias")) @ a("up.kernel") + a("up.bias")


def _layer_norm(x, p, prefix, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p[f"{prefix}.scale"] + p[f"{prefix}.bias"]


def bert_reference(model, base, added, ids, placement: str | None, act: str = ""):
    """BERT's encoder (modeling_bert: post-LN blocks, exact GELU), written out, with an adapter
    at every block site that ``added`` has, placed as ``placement`` says."""
    c = model.hf_config
    p, added = _np(base), _np(added)
    eps, heads = c.layer_norm_eps, c.num_attention_heads
    b, l = ids.shape
    d = c.hidden_size
    dense = lambda x, name: x @ p[f"{name}.kernel"] + p[f"{name}.bias"]

    def block(site, h, x):
        norm = lambda s: _layer_norm(s, p, f"{site}.LayerNorm", eps)
        if f"{site}.adapter.up.kernel" not in added or placement is None:
            return norm(h + x)
        if placement == "houlsby":                         # LN(h + f(h) + x)
            return norm(h + _f(added, site, h, act) + x)
        r = h                                              # residual_before_ln
        z = norm(h + x)                                    # original_ln_before
        a = _f(added, site, z, act) + r                    # adapter with its residual
        return norm(a + x)                                 # original_ln_after (same LN)

    h = (p["embeddings.word_embeddings.embedding"][ids] + p["embeddings.position_embeddings.embedding"][:l]
         + p["embeddings.token_type_embeddings.embedding"][0])
    h = _layer_norm(h, p, "embeddings.LayerNorm", eps)
    for i in range(c.num_hidden_layers):
        pre = f"encoder.layer.{i}"
        q, k, v = (dense(h, f"{pre}.attention.self.{n}").reshape(b, l, heads, d // heads)
                   for n in ("query", "key", "value"))
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        ctx = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, l, d)
        h = block(f"{pre}.attention.output", dense(ctx, f"{pre}.attention.output.dense"), h)
        ffn = ACT["gelu"](dense(h, f"{pre}.intermediate.dense"))
        h = block(f"{pre}.output", dense(ffn, f"{pre}.output.dense"), h)
    return h


@pytest.fixture(scope="module")
def bert():
    return _tiny("tiny-bert")


@pytest.fixture(scope="module")
def llama():
    return _tiny("tiny-llama")


# ---------------------------------------------------------------------------------------- (a)


def test_pfeiffer_on_bert_is_adapterhub_seqbn(bert):
    """(a) LN(f(LN(h + x)) + h + x) at every FFN block, nothing at attention: equal to the
    numpy forward; the earlier placement (LN(h + f(h) + x), which this code computed for
    ``pfeiffer`` before) is far from it."""
    model, base = bert
    method, trainable, frozen, state = _setup(model, base, placement="pfeiffer", bottleneck=0,
                                              init_scale=0.3)
    assert sorted(method.targets) == ["encoder.layer.0.output", "encoder.layer.1.output"]
    batch = _batch(model)
    got = _run(method, trainable, frozen, state, batch)
    added = trainable["added"]
    want = bert_reference(model, base, added, batch["input_ids"], "pfeiffer", "relu")
    np.testing.assert_allclose(got, want, **TOL)
    earlier = bert_reference(model, base, added, batch["input_ids"], "houlsby", "relu")
    plain = bert_reference(model, base, added, batch["input_ids"], None)
    assert np.abs(got - earlier).max() > 1e-2 and np.abs(got - plain).max() > 1e-2


# ---------------------------------------------------------------------------------------- (b)


class Capture(hooks.Hooks):
    """Passes ``block_output`` to the method's hooks and records what went in and out."""

    def __init__(self, inner: hooks.Hooks):
        self.inner, self.calls = inner, []

    def block_output(self, module, kind, h, residual, norm):
        out = self.inner.block_output(module, kind, h, residual, norm)
        self.calls.append(dict(site=hooks.site(module), kind=kind, h=np.asarray(h, np.float64),
                               x=np.asarray(residual, np.float64), out=np.asarray(out, np.float64),
                               norm=norm))
        return out


def test_pfeiffer_on_llama_is_the_pre_ln_equation(llama):
    """(b) Pre-LN (AdapterHub passes layer_norm=None): out = f(h + x) + h + x at each MLP, h + x
    at attention; each block's residual is the previous block's output (the embeddings first) and
    the model's output is the final RMSNorm of the last one."""
    model, base = llama
    method, trainable, frozen, state = _setup(model, base, placement="pfeiffer", bottleneck=0,
                                              init_scale=0.3)
    batch = _batch(model)
    cap = Capture(method.hooks(trainable["added"], state, train=False, rng=None))
    with hooks.use(cap):
        got = np.asarray(model.apply(traverse_util.unflatten_dict(frozen, sep="."), batch))
    added = _np(trainable["added"])
    n = model.hf_config.num_hidden_layers
    assert [(c["site"], c["kind"]) for c in cap.calls] == [
        (f"layers.{i}.{s}", k) for i in range(n) for s, k in (("self_attn", "attention"), ("mlp", "ffn"))]
    prev = np.asarray(base["embed_tokens.embedding"], np.float64)[batch["input_ids"]]
    for c in cap.calls:
        assert c["norm"] is None
        np.testing.assert_allclose(c["x"], prev, **TOL)   # the residual is what the model adds back
        if c["kind"] == "ffn":
            s = c["h"] + c["x"]
            delta = _f(added, c["site"], s, "relu")
            assert np.abs(delta).max() > 1e-2
            np.testing.assert_allclose(c["out"], delta + c["h"] + c["x"], **TOL)
        else:
            np.testing.assert_array_equal(c["out"], np.asarray(jnp.asarray(c["h"], jnp.float32)
                                                               + jnp.asarray(c["x"], jnp.float32)))
        prev = c["out"]
    scale = np.asarray(base["norm.scale"], np.float64)
    eps = model.hf_config.rms_norm_eps
    want = prev / np.sqrt((prev ** 2).mean(-1, keepdims=True) + eps) * scale
    np.testing.assert_allclose(got, want, **TOL)


# ---------------------------------------------------------------------------------------- (c)


class PreviousHoulsby(hooks.Hooks):
    """The adapter hook as it was before ``block_output`` took the residual step (it returned
    ``h + f(h)`` and the model then added the residual and applied its LayerNorm), composed with
    that residual step."""

    def __init__(self, method, added):
        self.method, self.added = method, added

    def block_output(self, module, kind, h, residual, norm):
        site = hooks.site(module)
        if site in self.method.targets:
            p = lambda n: self.added[f"{site}.adapter.{n}"].astype(h.dtype)
            z = self.method.act(h @ p("down.kernel") + p("down.bias"))
            h = h + z @ p("up.kernel") + p("up.bias")
        return h + residual if norm is None else norm(h + residual)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_houlsby_is_unchanged(family, bert, llama):
    """(c) Houlsby: bit-identical to the previous formula; on BERT also LN(h + f(h) + x) at both
    blocks of every layer, from the numpy forward."""
    model, base = bert if family == "bert" else llama
    method, trainable, frozen, state = _setup(model, base, bottleneck=8, init_scale=0.3)
    assert isinstance(method.hooks(trainable["added"], state, train=False, rng=None), AdapterHooks)
    assert len(method.targets) == 2 * model.hf_config.num_hidden_layers
    batch = _batch(model)
    got = _run(method, trainable, frozen, state, batch)
    with hooks.use(PreviousHoulsby(method, trainable["added"])):
        previous = np.asarray(model.apply(traverse_util.unflatten_dict(frozen, sep="."), batch))
    np.testing.assert_array_equal(got, previous)
    if family == "bert":
        want = bert_reference(model, base, trainable["added"], batch["input_ids"], "houlsby", "gelu")
        np.testing.assert_allclose(got, want, **TOL)
        plain = bert_reference(model, base, trainable["added"], batch["input_ids"], None)
        assert np.abs(got - plain).max() > 1e-2


# ---------------------------------------------------------------------------------------- (d)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_zero_up_projection_is_the_base_model(placement, family, bert, llama):
    """(d) W_up = 0, b_up = 0: f = 0, and both placements reduce to the block's own residual
    step (Pfeiffer: a = h, out = LN(h + x)), exactly."""
    model, base = bert if family == "bert" else llama
    method, trainable, frozen, state = _setup(model, base, placement=placement, bottleneck=4,
                                              init_scale=0.3)
    added = {k: (jnp.zeros_like(v) if ".adapter.up." in k else v) for k, v in trainable["added"].items()}
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in added.items() if ".down." in k)
    batch = _batch(model)
    got = _run(method, {**trainable, "added": added}, frozen, state, batch)
    np.testing.assert_array_equal(got, np.asarray(model.apply(traverse_util.unflatten_dict(base, sep="."), batch)))


# ---------------------------------------------------------------------------------------- (e)


def test_pfeiffer_counts_and_init(bert):
    """(e) Pfeiffer: one adapter per layer, m = d/16, 2md + d + m each; RoBERTa-base gives
    12 (2·48·768 + 768 + 48) = 894,528 (Houlsby at m = 64: the published 2,379,264). Inits:
    adapter-bert's truncated normal σ = 1e-3 for Houlsby, AdapterHub's N(0, 0.02²) for Pfeiffer,
    ``init_scale`` overriding σ."""
    model, base = bert
    method = methods.create("adapter", model, {"placement": "pfeiffer", "bottleneck": 0})
    n, d = model.hf_config.num_hidden_layers, model.hf_config.hidden_size
    assert method.targets == [f"encoder.layer.{i}.output" for i in range(n)]
    m = d // 16
    assert methods.count_params(method, base)["trainable_params"] == n * (2 * m * d + d + m)
    added = method.setup(jax.random.PRNGKey(0), base).trainable["added"]
    assert added["encoder.layer.0.output.adapter.down.kernel"].shape == (d, m)

    roberta = build_model(model_configs.get("roberta-base").hf_config.to_dict(), head="none")
    pf = methods.create("adapter", roberta, {"placement": "pfeiffer", "bottleneck": 0})
    assert methods.count_params(pf)["trainable_params"] == 894_528
    hb = methods.create("adapter", roberta, {})
    assert methods.count_params(hb)["trainable_params"] == 2_379_264

    # Draws on RoBERTa-base's shapes (init reads only the sites, not the base values).
    assert (pf.init_kind, pf.init_std) == ("bert", 0.02)
    assert (hb.init_kind, hb.init_std) == ("adapter_bert", 1e-3)
    k = pf.init(jax.random.PRNGKey(0), {}, None)[f"{pf.targets[0]}.adapter.down.kernel"]
    assert k.shape == (768, 48)
    assert abs(float(jnp.std(k)) - 0.02) < 1e-3 and float(jnp.abs(k).max()) > 2 * 0.02  # not truncated
    k = hb.init(jax.random.PRNGKey(0), {}, None)[f"{hb.targets[0]}.adapter.down.kernel"]
    assert k.shape == (768, 64) and float(jnp.abs(k).max()) <= 2e-3
    over = methods.create("adapter", model, {"placement": "pfeiffer", "bottleneck": 0, "init_scale": 0.5})
    assert over.init_std == 0.5
    with pytest.raises(ValueError, match="adapter.init="):
        methods.create("adapter", model, {"bottleneck": 8, "init": "xavier"})
    with pytest.raises(ValueError, match="adapter.init_scale="):
        methods.create("adapter", model, {"bottleneck": 8, "init_scale": -1.0})


def test_train_layernorm_is_the_papers_setting(bert):
    """``train_layernorm=True`` trains every LayerNorm with the adapters (Houlsby §2.1); off by
    default."""
    model, base = bert
    off = methods.create("adapter", model, {"bottleneck": 8})
    on = methods.create("adapter", model, {"bottleneck": 8, "train_layernorm": True})
    norms = sorted(k for k in base if ".LayerNorm." in k)
    assert norms and sorted(on.setup(jax.random.PRNGKey(0), base).trainable["base"]) == norms
    assert not off.setup(jax.random.PRNGKey(0), base).trainable["base"]
