"""Hugging Face PEFT as a test peer: one tiny transformers checkpoint per family, loaded by both
libraries, so that only the method under test can make their outputs differ.

Used by the method tests that compare parameter counts (``trainable``: PEFT's
``get_nb_trainable_parameters``, the figure ``print_trainable_parameters`` prints) and adapter
files both ways (``export_adapter`` → ``PeftModel.from_pretrained``, ``save_pretrained`` →
``import_adapter``) to ``TOL``.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import jax
import numpy as np

TOL = 1e-4


def torch_model(family: str):
    """A tiny random transformers model (eval mode, eager attention) of ``family``."""
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=37, num_labels=3,
                                         max_position_embeddings=64)
        config._attn_implementation = "eager"
        return transformers.BertForSequenceClassification(config).eval()
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.1)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


@functools.lru_cache(maxsize=None)
def _checkpoint(family: str):
    from peftjax.models import hf_io

    net = torch_model(family)
    with tempfile.TemporaryDirectory(prefix=f"peft_peer_{family}_") as folder:  # read into memory
        net.save_pretrained(folder, safe_serialization=True)
        model, params = hf_io.load_pretrained(folder, head="classification" if family == "bert" else "causal_lm")
    rs = np.random.RandomState(1)
    ids = rs.randint(3, model.config.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding: positions agree with transformers' defaults
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in model.input_names:
        batch["token_type_ids"] = np.zeros_like(ids)
    return net, model, hf_io.flatten(params), batch


def checkpoint(family: str):
    """``(torch model (a fresh copy), our model, flat params, batch)`` of one checkpoint."""
    net, model, params, batch = _checkpoint(family)
    return copy.deepcopy(net), model, dict(params), batch


def task_type(family: str) -> str:
    return "SEQ_CLS" if family == "bert" else "CAUSAL_LM"


def ours(method, peft, batch) -> np.ndarray:
    """peftjax's logits (eval mode)."""
    return np.asarray(jax.jit(lambda t, f, s, b: method.apply(t, f, s, b))(
        peft.trainable, peft.frozen, peft.state, batch))


def theirs(peft_model, batch) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = peft_model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()})
    return out.logits.numpy()


def max_delta(a, b, batch) -> float:
    d = np.abs(a - b)
    if d.ndim == 3:  # causal LM: valid positions only
        d = d[batch["attention_mask"].astype(bool)]
    return float(d.max())


def perturb(tree: dict, seed: int, scale: float = 0.3) -> dict:
    """Each array plus scale · N(0, 1) noise: stands in for training."""
    rs = np.random.RandomState(seed)
    return {k: np.asarray(v) + scale * rs.standard_normal(np.shape(v)).astype(np.float32)
            for k, v in tree.items()}


def trainable_count(family: str, peft_config) -> int:
    """PEFT's trainable-parameter count (``print_trainable_parameters``) of ``peft_config`` on
    the family's tiny model, the task head (``modules_to_save``) included."""
    import peft

    return peft.get_peft_model(torch_model(family), peft_config).get_nb_trainable_parameters()[0]
