"""OLoRA: orthonormal low-rank adaptation (Büyükakyüz 2024, arXiv:2406.01775, §3), a LoRA init.

The adapter starts on the leading part of the QR decomposition of the pretrained weight and the
frozen kernel becomes the residual, so the model starts equal to the base while A's rows span
W's leading row space (orthonormal B columns: the paper's argument for faster convergence).
Hugging Face PEFT (``init_lora_weights="olora"``, ``olora_init`` in ``tuners/lora/layer.py``), on
the torch weight W (out, in) in float32:

    Q, R = qr(W)                 Q (out, k), R (k, in), k = min(out, in)  (reduced)
    B = Q[:, :r]   (out, r)      A = R[:r]   (r, in)                     (not rescaled)
    W_res = W − s · B A          s = alpha / r  (alpha / √r with rsLoRA)

In flax layout (kernel K = Wᵀ, (in, out)) that is A = R[:r]ᵀ (in, r), B = Q[:, :r]ᵀ (r, out) and
K_res = K − s · A B: the transposes of PEFT's, from the same QR of Kᵀ (so sign conventions match
LAPACK's Householder QR, which both libraries call). Everything else — forward, merge, scaling,
dropout, targets — is LoRA's; only ``init_site`` and ``base_kernel`` differ (the variant surface,
``docs/adding_a_low_rank_variant.md``), and ``rewrites_base`` is true: adapter files carry the
initial A₀, B₀ to rebuild the residual, and PEFT export writes PEFT's conversion to a rank-2r
LoRA of the original base (``export_adapter(..., initial_added=)``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from peftjax.methods import core, lora


@dataclasses.dataclass(frozen=True)
class OLoRAConfig(lora.LoRAConfig):
    init: str = "olora"   # the one init (PEFT's init_lora_weights="olora")


@core.register("olora")
class OLoRA(lora.LoRA):
    """LoRA initialised from the QR decomposition of W0, trained against the residual."""

    Config = OLoRAConfig
    inits = ("olora",)

    def init_site(self, rng, site, kernel):
        """A = R[:r]ᵀ, B = Q[:, :r]ᵀ from ``qr(W)``, W = Kᵀ the torch-layout weight."""
        r = self.config.rank
        q, rr = jnp.linalg.qr(kernel.astype(jnp.float32).T, mode="reduced")
        return {"lora_A": rr[:r].T.astype(kernel.dtype), "lora_B": q[:, :r].T.astype(kernel.dtype)}

    def base_kernel(self, site, kernel, params):
        """The residual K − s·A₀B₀ (float32, cast back to the kernel's dtype, as PEFT)."""
        delta = self.delta_weight(site, params, {})
        return (kernel.astype(jnp.float32) - delta).astype(kernel.dtype)

    @property
    def rewrites_base(self) -> bool:
        return True
