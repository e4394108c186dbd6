"""PiSSA init (a LoRA option): principal components in the adapter, the residual in the base."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from peftjax import methods
from tests.helpers import learnable_batch, tiny_model


@pytest.fixture(scope="module", params=["bert", "llama"])
def setup(request):
    model, base = tiny_model(request.param)
    m = methods.create("lora", model, {"rank": 4, "alpha": 16.0, "init": "pissa"})
    return model, base, m, m.setup(jax.random.PRNGKey(0), base)


def test_residual_plus_adapter_is_w0(setup):
    model, base, m, peft = setup
    assert m.targets
    for site in m.targets:
        k = site + ".kernel"
        a, b = peft.trainable["added"][site + ".lora_A"], peft.trainable["added"][site + ".lora_B"]
        w0 = np.asarray(base[k])
        np.testing.assert_allclose(np.asarray(peft.frozen[k]) + m.scaling * np.asarray(a @ b), w0, atol=1e-5)
        # the adapter holds the top-r singular triplets of W0 (flax (in, out) kernel)
        u, s, vt = np.linalg.svd(w0, full_matrices=False)
        np.testing.assert_allclose(m.scaling * np.asarray(a @ b), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
        # A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T: A^T A = B B^T = diag(S_r) / s
        np.testing.assert_allclose(np.asarray(a.T @ a), np.diag(s[:4] / m.scaling), atol=1e-5)
        np.testing.assert_allclose(np.asarray(b @ b.T), np.diag(s[:4] / m.scaling), atol=1e-5)


def test_starts_equal_to_base_and_merges_back(setup):
    model, base, m, peft = setup
    batch = learnable_batch(model)
    plain = model.apply(traverse_util.unflatten_dict(base, sep="."), batch)
    adapted = m.apply(peft.trainable, peft.frozen, peft.state, batch)
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(plain), atol=1e-4)
    merged = m.merged_params(peft.trainable, peft.frozen, peft.state)
    for site in m.targets:
        np.testing.assert_allclose(np.asarray(merged[site + ".kernel"]),
                                   np.asarray(base[site + ".kernel"]), atol=1e-5)


def test_dora_accepts_pissa_and_keeps_w0_magnitude(setup):
    model, base, _, _ = setup
    m = methods.create("dora", model, {"rank": 4, "init": "pissa"})
    peft = m.setup(jax.random.PRNGKey(0), base)
    site = m.targets[0]
    np.testing.assert_allclose(np.asarray(peft.trainable["added"][site + ".lora_magnitude"]),
                               np.linalg.norm(np.asarray(base[site + ".kernel"]), axis=0), rtol=1e-5)
    batch = learnable_batch(model)
    plain = model.apply(traverse_util.unflatten_dict(base, sep="."), batch)
    np.testing.assert_allclose(np.asarray(m.apply(peft.trainable, peft.frozen, peft.state, batch)),
                               np.asarray(plain), atol=1e-4)
