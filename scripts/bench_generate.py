"""Greedy decoding with the KV cache against transformers' ``generate``: tokens per second.

    python scripts/bench_generate.py --model=bench-llama-small --batch=8 --prompt=64 --new=128

Both sides decode the same random prompts (``--batch`` rows of ``--prompt`` tokens, no padding)
greedily for ``--new`` tokens with a KV cache, never stopping at an end-of-sequence token, from
the same weights: the model's checkpoint, or for a config without one (the benchmark models)
random weights that peftjax writes once and transformers loads. Three settings per side:

* ``base``: the model alone;
* ``lora_unmerged``: LoRA r=``--rank`` on every linear layer, its factors random (a trained
  adapter's cost, not a zero update), applied at every step (peftjax's hooks; PEFT's LoRA layers);
* ``lora_merged``: the same adapter folded into the weights (``Method.merged_params``;
  PEFT's ``merge_and_unload``), which costs what the base does.

Each setting is timed ``--repeats`` times after one untimed call (peftjax's compilation happens
there and is reported apart, ``compile_s``); the medians give tokens/s = batch × new / seconds
and the ratio peftjax / transformers (above 1: peftjax decodes faster). ``agreement`` is the
fraction of generated tokens on which the two sides' greedy choices agree (fp32; a near-tie can
flip one token and everything after it in its row). Timings mean something only on quiet cores.
"""

import json
import os
import statistics
import tempfile
import time

import _bootstrap
from absl import flags, logging

flags.DEFINE_string("model", "bench-llama-small", "a decoder's model config name")
flags.DEFINE_integer("batch", 8, "rows decoded together")
flags.DEFINE_integer("prompt", 64, "prompt tokens per row")
flags.DEFINE_integer("new", 128, "tokens generated per row")
flags.DEFINE_integer("rank", 16, "LoRA rank of the adapted settings")
flags.DEFINE_integer("repeats", 3, "timed calls per setting")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: the CPUs this process may use)")
flags.DEFINE_list("settings", ["base", "lora_unmerged", "lora_merged"], "which settings to time")
FLAGS = flags.FLAGS

SETTINGS = ("base", "lora_unmerged", "lora_merged")


def _timed(fn, repeats: int) -> tuple[float, list[float], float]:
    """(median seconds, all timings, first (untimed) call's seconds)."""
    t0 = time.perf_counter()
    first = fn()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, first_s


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    bad = [s for s in FLAGS.settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"--settings {bad} are unknown; valid: {', '.join(SETTINGS)}")
    # The exported checkpoint and adapter PyTorch reads back: removed when the run ends.
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as workdir:
        _bench(workdir)


def _bench(workdir: str) -> None:
    import jax
    import numpy as np
    import peft
    import torch
    import transformers
    from flax import traverse_util

    from configs import models
    from peftjax import methods
    from peftjax.interop import export_adapter
    from peftjax import host
    from peftjax.models import generation, hf_io, hooks

    torch.set_num_threads(FLAGS.threads or host.cpus())
    machine = host.describe()   # before the model is in memory: the CPU and its matmul rate
    model_cfg = models.get(FLAGS.model)
    model, params, _ = hf_io.load_from_config(model_cfg, head="causal_lm", with_tokenizer=False)
    if "causal_lm" not in model.family.heads:
        raise ValueError(f"{FLAGS.model} is not a decoder (heads: {model.family.heads})")
    hf_io.save_pretrained(model, params, os.path.join(workdir, "model"))

    def fresh_net():   # PEFT injects its layers into the model it wraps: one model per setting
        return transformers.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "model")).eval()

    base = traverse_util.flatten_dict(params, sep=".")
    lora = methods.create("lora", model, {"rank": FLAGS.rank, "alpha": 2.0 * FLAGS.rank, "targets": ".*"})
    setup = lora.setup(jax.random.PRNGKey(0), base)
    rs = np.random.default_rng(1)
    added = {k: (v + 0.02 * rs.standard_normal(v.shape).astype(np.float32)) for k, v in setup.trainable["added"].items()}
    trainable = {**setup.trainable, "added": added}
    export_adapter(lora, trainable, os.path.join(workdir, "adapter"))

    vocab = model.config.vocab_size
    ids = rs.integers(min(1000, vocab // 2), vocab, size=(FLAGS.batch, FLAGS.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    tokens = FLAGS.batch * FLAGS.new

    @jax.jit
    def unmerged(trainable, frozen, ids, mask):
        # The adapter's hooks are built inside the compiled function, so the factors are its
        # inputs (one compilation), not constants of a program traced again at every call.
        run_params = traverse_util.unflatten_dict(lora.effective_base(trainable, frozen, setup.state), sep=".")
        with hooks.use(lora.hooks(trainable["added"], setup.state, train=False, rng=None)):
            return generation.generate(model, run_params, ids, mask, FLAGS.new, eos_token_id=())

    def ours(setting):
        if setting == "lora_unmerged":
            return lambda: np.asarray(unmerged(trainable, setup.frozen, ids, mask))
        run_params = params if setting == "base" else traverse_util.unflatten_dict(
            lora.merged_params(trainable, setup.frozen, setup.state), sep=".")
        return lambda: np.asarray(generation.generate(model, run_params, ids, mask, FLAGS.new, eos_token_id=()))

    def theirs(setting):
        m = fresh_net()
        if setting != "base":
            m = peft.PeftModel.from_pretrained(m, os.path.join(workdir, "adapter")).eval()
            if setting == "lora_merged":
                m = m.merge_and_unload()

        def call():
            with torch.no_grad():
                out = m.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=FLAGS.new,
                                 min_new_tokens=FLAGS.new, do_sample=False, use_cache=True,
                                 pad_token_id=0)
            return out.numpy()
        return call

    rows = []
    for setting in FLAGS.settings:
        ours_call = ours(setting)
        ours_s, ours_all, first_s = _timed(ours_call, FLAGS.repeats)
        theirs_call = theirs(setting)
        theirs_s, theirs_all, _ = _timed(theirs_call, FLAGS.repeats)
        a, b = ours_call()[:, FLAGS.prompt:], theirs_call()[:, FLAGS.prompt:]
        rows.append({"setting": setting, "peftjax_tokens_per_s": tokens / ours_s,
                     "transformers_tokens_per_s": tokens / theirs_s,
                     "ratio": theirs_s / ours_s, "peftjax_s": ours_s, "transformers_s": theirs_s,
                     "peftjax_s_all": [round(t, 4) for t in ours_all],
                     "transformers_s_all": [round(t, 4) for t in theirs_all],
                     "compile_s": round(first_s - ours_s, 2),
                     "agreement": float(np.mean(a == b))})
    print(json.dumps({"model": FLAGS.model, "batch": FLAGS.batch, "prompt": FLAGS.prompt, "new": FLAGS.new,
                      "rank": FLAGS.rank, "repeats": FLAGS.repeats, "backend": jax.default_backend(),
                      "torch_threads": torch.get_num_threads(), "host": machine,
                      "loadavg": list(os.getloadavg()),
                      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                                   "transformers": transformers.__version__, "peft": peft.__version__},
                      "settings": rows}, indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)
