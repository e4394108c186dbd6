"""The released decoders' named configs (configs/models/): our abstract parameter count (as
``scripts/count_params.py`` computes it) equals transformers' count of the same config
instantiated on the meta device (no weights, no download), and both equal the published figure."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import models as model_configs

# The count transformers gives for each config.json (tied embeddings counted once).
EXPECTED = {
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen3-0.6B": 596_049_920,
    "Qwen3-8B": 8_190_735_360,
    "Mistral-7B-v0.3": 7_248_023_552,
    "Gemma-2-2B": 2_614_341_888,
    "Gemma-2-9B": 9_241_705_984,
    "Gemma-3-1B": 999_885_952,
    "Gemma-3-4B": 3_880_263_168,   # the text decoder of gemma-3-4b-pt
    "Qwen3-30B-A3B": 30_532_122_624,   # 128 experts; 3.3 B active per token
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_abstract_count_equals_transformers_meta_count(name):
    from configs.train import get_config
    from peftjax import methods
    from peftjax.train.compose import build

    # count_params.py's path: the run config, abstract shapes, the method's accounting.
    _, ours, _, method, _ = build(get_config(f"model={name},method=full,task=tweet_instructions"),
                                  with_weights=False, with_tokenizer=False)
    hf = model_configs.get(name).hf_config.to_dict()
    assert hf["model_type"] in ours.family.model_types and ours.head == "causal_lm"
    count = methods.count_params(method)["total_params"]
    assert count == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours.abstract_params()))
    spec = dict(hf)
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(config)
    assert count == sum(p.numel() for p in ref.parameters()) == EXPECTED[name]
    # The weights are the same tensors under the same names.
    from peftjax.models import hf_io

    # (A stacked expert param is transformers v5's fused module param, (E, out, in) there.)
    ours_names = {}
    for p, v in hf_io.flatten(ours.abstract_params()).items():
        if hf_io.stacked_names(p, v.shape, ours.family) is not None:
            ours_names[p] = (v.shape[0], v.shape[2], v.shape[1])
        else:
            ours_names[hf_io.hf_name(p)[0]] = tuple(v.shape)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if config.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert {k: s[::-1] if len(s) == 2 and not k.endswith("embed_tokens.weight") else s
            for k, s in theirs.items()} == ours_names


# The speed benchmarks' models (issue 22): random weights, counts equal transformers' meta count.
BENCH = {"bench-llama-small": (transformers.LlamaForCausalLM, "causal_lm", 57_942_528),
         "bench-t5-small": (transformers.T5ForConditionalGeneration, "seq2seq_lm", 60_506_624)}


@pytest.mark.parametrize("name", sorted(BENCH))
def test_benchmark_configs_count_as_transformers(name):
    from peftjax.models import build_model

    cls, head, expected = BENCH[name]
    hf = model_configs.get(name).hf_config.to_dict()
    ours = build_model(hf, head=head)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours.abstract_params()))
    with torch.device("meta"):
        ref = cls(transformers.AutoConfig.for_model(**hf))
    assert count == sum(p.numel() for p in ref.parameters()) == expected
