"""LoRA-GA specifics: the gradient estimate equals PEFT's ``preprocess_loraga`` over the same
batches; A, B and the residual base equal PEFT's ``lora_ga_init`` (its randomised SVD replaced by
the exact one it approximates; singular vectors up to sign); the paper's form is Algorithm 1
written out; the model starts equal to the base; counts equal PEFT's; PEFT files both ways
(export: PEFT's rank-2r conversion; import: PEFT's converted file, and its unconverted
``lora_ga`` file refused)."""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.interop import AdapterError, export_adapter, import_adapter, peft_params
from peftjax.losses import params_loss_fn
from peftjax.methods import InitContext
from peftjax.models import build_model
from tests.helpers import fisher_context, learnable_batch, tiny_model
from tests.peft_peer import TOL, checkpoint, max_delta, ours, perturb, task_type, theirs

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
RANK, ALPHA = 4, 8.0
# Enough rows that each target's gradient has 2·RANK well-separated singular values (a BERT
# last-layer query's gradient has rank <= rows: only the [CLS] position reaches the head).
ROWS, BATCH = 12, 4


def ours_config(family: str, **kw) -> dict:
    return {"rank": RANK, "alpha": ALPHA, "targets": r"\.(" + "|".join(TARGETS[family]) + ")$",
            "num_examples": ROWS, "batch_size": BATCH, "progress": False, **kw}


def _data(model, family: str) -> dict:
    """ROWS labelled rows (every other one right-padded)."""
    rs = np.random.RandomState(7)
    ids = rs.randint(3, model.config.vocab_size, (ROWS, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "mask": np.ones(ROWS, bool)}
    if "token_type_ids" in model.input_names:
        batch["token_type_ids"] = np.zeros_like(ids)
    if family == "bert":
        batch["labels"] = rs.randint(0, 3, ROWS).astype(np.int32)
    else:
        batch["labels"] = np.where(mask > 0, ids, -100).astype(np.int32)
    return batch


def _context(model, data: dict) -> InitContext:
    return InitContext(train_batches=lambda: iter([data]), loss_fn=params_loss_fn(model),
                       num_train_examples=len(data["mask"]))


def _exact_svd_lowrank(a, q=6, niter=2, M=None):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :q], s[:q], vh[:q].T


def _peft_lora_ga(family: str, net, data: dict, **ga):
    """PEFT's LoRA-GA on ``net``: preprocess_loraga over ``data`` in batches of BATCH, then
    get_peft_model (eval mode, dropout off for the gradient pass)."""
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = peft.LoraConfig(task_type=task_type(family), r=RANK, lora_alpha=ALPHA,
                             target_modules=TARGETS[family], init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig(**ga))
    keys = [k for k in data if k != "mask"]

    def train_step():
        for start in range(0, ROWS, BATCH):
            rows = {k: torch.from_numpy(data[k][start:start + BATCH].astype(np.int64)) for k in keys}
            net(**rows).loss.backward()

    preprocess_loraga(net, config, train_step)
    grads = {name: m._peft_loraga_grad.clone().numpy() for name, m in net.named_modules()
             if hasattr(m, "_peft_loraga_grad")}
    return peft.get_peft_model(net, config).eval(), grads


def _align(ours_rows: np.ndarray, theirs_rows: np.ndarray) -> np.ndarray:
    """``ours_rows`` with each row's sign flipped to agree with ``theirs_rows``."""
    return ours_rows * np.sign(np.sum(ours_rows * theirs_rows, axis=1, keepdims=True))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_init_residual_and_count_equal_peft(family, monkeypatch):
    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd_lowrank)
    net, model, params, _ = checkpoint(family)
    data = _data(model, family)
    pm, peft_grads = _peft_lora_ga(family, net, data)
    m = methods.create("lora_ga", model, ours_config(family))
    p = m.setup(jax.random.PRNGKey(0), params, _context(model, data))

    from peftjax.methods import fisher
    ours_grads, batches, used = fisher.mean_gradient(
        params_loss_fn(model), params, [s + ".kernel" for s in m.targets],
        fisher.rechunk(iter([data]), BATCH), ROWS, progress=False)
    assert (batches, used) == (ROWS // BATCH, ROWS) and set(peft_grads) == set(m.targets)
    for site in m.targets:
        np.testing.assert_allclose(np.asarray(ours_grads[site + ".kernel"]).T, peft_grads[site],
                                   rtol=1e-4, atol=1e-6 * np.abs(peft_grads[site]).max())

    layers = dict(pm.base_model.model.named_modules())
    s = m.scaling
    for site in m.targets:
        a_p = layers[site].lora_A["default"].weight.detach().numpy()       # (r, in)
        b_p = layers[site].lora_B["default"].weight.detach().numpy()       # (out, r)
        a = _align(np.asarray(p.trainable["added"][site + ".lora_A"]).T, a_p)
        b = _align(np.asarray(p.trainable["added"][site + ".lora_B"]), b_p.T).T
        tol = 1e-4 * np.abs(b_p).max()
        np.testing.assert_allclose(a, a_p, atol=1e-4)
        np.testing.assert_allclose(b, b_p, atol=tol)
        w0 = np.asarray(params[site + ".kernel"]).T
        np.testing.assert_allclose(w0 - s * b_p @ a_p, layers[site].base_layer.weight.detach().numpy(),
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(p.frozen[site + ".kernel"]).T,
                                   w0 - s * np.asarray(p.trainable["added"][site + ".lora_B"]).T
                                   @ np.asarray(p.trainable["added"][site + ".lora_A"]).T, atol=1e-6)
    counts = methods.count_params(m)
    assert counts["trainable_params"] + counts["head_params"] == pm.get_nb_trainable_parameters()[0]


CASES = [("paper", "ArB2r", "stable"), ("paper", "A2rBr", "gd_scale"), ("paper", "ArBr", "weight_svd"),
         ("paper", "ArB2r", "unit"), ("peft", "ArBr", "weight_svd"), ("peft", "A2rBr", "gd_scale")]


@pytest.mark.parametrize("form,direction,scale", CASES)
def test_factors_are_the_written_formulas(form, direction, scale):
    """From one gradient G = U S Vᵀ (torch layout) and kernel: the paper's Algorithm 1 / the
    authors' code (A = Vᵀ[idx_A]·f, B = U[:, idx_B]·f; f = out^¼/√γ (stable), 1/s (gd),
    mean √(σ_{1..r}(W)/s) (weightS), 1 (unit)) and PEFT's form (B also × S[idx_B]; stable and
    weight_svd scale B alone, by out^¼/√γ or σ₁(W)/S[idx_B][0]), up to the singular vectors' signs."""
    model, _ = tiny_model("llama")
    m = methods.create("lora_ga", model, {"rank": RANK, "alpha": ALPHA, "form": form,
                                          "direction": direction, "scale": scale})
    rs = np.random.RandomState(0)
    grad, kernel = rs.standard_normal((2, 64, 48)).astype(np.float32)      # flax (in, out)
    a, b = m.gradient_pair(jax.random.PRNGKey(0), grad, kernel)
    r, s = RANK, m.scaling
    u, sv, vh = np.linalg.svd(grad.T.astype(np.float64))                   # torch layout (out, in)
    w_sv = np.linalg.svd(kernel.astype(np.float64), compute_uv=False)
    idx_a, idx_b = {"ArB2r": (np.arange(r), np.arange(r, 2 * r)),
                    "A2rBr": (np.arange(r, 2 * r), np.arange(r)),
                    "ArBr": (np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2))}[direction]
    a_hand, b_hand = vh[idx_a], u[:, idx_b]
    if form == "paper":
        f = {"stable": 48 ** 0.25 / 16 ** 0.5, "gd_scale": 1 / s, "unit": 1.0,
             "weight_svd": np.mean(np.sqrt(w_sv[:r] / s))}[scale]
        a_hand, b_hand = a_hand * f, b_hand * f
    else:
        b_hand = b_hand * sv[idx_b]
        if scale == "weight_svd":
            b_hand = b_hand * w_sv[0] / sv[idx_b][0]
        elif scale == "gd_scale":
            a_hand, b_hand = a_hand / s, b_hand / s
    np.testing.assert_allclose(_align(np.asarray(a).T, a_hand), a_hand, atol=1e-4)
    np.testing.assert_allclose(_align(np.asarray(b), b_hand.T).T, b_hand, atol=1e-4 * np.abs(b_hand).max())


def test_peft_files_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd_lowrank)
    net, model, params, batch = checkpoint("bert")
    data = _data(model, "bert")
    # peftjax → PEFT: the trained adapter as PEFT's rank-2r LoRA of the unmodified base
    m = methods.create("lora_ga", model, ours_config("bert"))
    p = m.setup(jax.random.PRNGKey(0), params, _context(model, data))
    initial = p.trainable["added"]
    trained = {"base": {}, "added": perturb(initial, 3, 0.05), "head": perturb(p.trainable["head"], 2)}
    p = p._replace(trainable=trained)
    config = export_adapter(m, trained, str(tmp_path / "ours"), initial_added=initial)
    assert config["r"] == 2 * RANK and config["lora_alpha"] == 2 * ALPHA and config["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(checkpoint("bert")[0], str(tmp_path / "ours")).eval()
    delta = max_delta(ours(m, p, batch), theirs(loaded, batch), batch)
    print(f"\nbert lora_ga peftjax→PEFT (converted): max|Δ| {delta:.2e}")
    assert delta <= TOL

    # PEFT → peftjax: PEFT's converted save imports as a plain LoRA of the original base. PEFT's
    # conversion (subtract_mutated_init) keeps only the lora tensors, not modules_to_save: the
    # head stays the base's here and is supplied from it (require_head=False).
    pm, _ = _peft_lora_ga("bert", net, data)
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "lora_ga"
    torch.manual_seed(3)
    with torch.no_grad():
        for k, v in pm.named_parameters():
            if v.requires_grad and ".lora_" in k:
                v.add_(0.05 * torch.randn_like(v))
    pm.save_pretrained(str(tmp_path / "converted"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    method, trainable = import_adapter(str(tmp_path / "converted"), model, require_head=False)
    assert method.name == "lora" and method.config.rank == 2 * RANK
    delta = max_delta(ours(method, peft_params(method, trainable, params), batch), theirs(pm, batch), batch)
    print(f"bert lora_ga PEFT→peftjax (converted): max|Δ| {delta:.2e}")
    assert delta <= TOL
    # PEFT's unconverted save: the residual depends on the data; refused, not silently wrong
    pm.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(AdapterError, match="lora_ga"):
        import_adapter(str(tmp_path / "plain"), model)


def test_refusals_and_abstract_setup():
    model, base = tiny_model("bert")
    m = methods.create("lora_ga", model, {"rank": 4, "num_examples": 8, "batch_size": 4, "progress": False})
    with pytest.raises(ValueError, match="needs training data"):
        m.setup(jax.random.PRNGKey(0), base)
    big = methods.create("lora_ga", model, {"rank": 4, "num_examples": 9, "progress": False})
    with pytest.raises(ValueError, match="training set has 8"):
        big.setup(jax.random.PRNGKey(0), base, fisher_context(model))
    with pytest.raises(ValueError, match="2·rank singular vectors"):
        methods.create("lora_ga", model, {"rank": 17})
    with pytest.raises(ValueError, match="lora_ga.scale"):
        methods.create("lora_ga", model, {"scale": "weightS"})
    # memory accounting sets methods up on abstract shapes: the data pass traces
    abstract = jax.eval_shape(lambda b: m.setup(jax.random.PRNGKey(0), b, fisher_context(model)), base)
    p = m.setup(jax.random.PRNGKey(0), base, fisher_context(model))
    assert {k: v.shape for k, v in abstract.trainable["added"].items()} == {
        k: v.shape for k, v in p.trainable["added"].items()}
    # the rewritten base: the model starts equal to the pretrained one
    batch = learnable_batch(model)
    plain = jax.jit(model.apply)(traverse_util.unflatten_dict(base, sep="."), batch)
    start = jax.jit(lambda t, f: m.apply(t, f, p.state, batch))(p.trainable, p.frozen)
    np.testing.assert_allclose(np.asarray(start), np.asarray(plain), atol=1e-5)


def test_counts_on_roberta_base():
    model = build_model(model_configs.get("roberta-base").hf_config, head="classification", num_labels=2)
    counts = methods.count_params(methods.create("lora_ga", model, {"rank": 8, "targets": r"\.(query|value)$"}))
    assert counts["trainable_params"] == 12 * 2 * 8 * (768 + 768) == 294_912
