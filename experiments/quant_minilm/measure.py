"""MiniLM: last-hidden-state error of a quantized base vs fp32, and LoRA step time per base."""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
from flax import traverse_util
from configs import train as train_cfg
from peftjax import methods
from peftjax.models import hooks as hooks_lib
from peftjax.train import compose, init_state, make_train_step, quantize

cfg = train_cfg.get_config("model=all-MiniLM-L6-v2,method=lora,task=tweet_sentiment")
task, model, tok, _, base = compose.build(cfg, with_tokenizer=False)
rng = np.random.default_rng(0)
B, S = 32, 64
ids = rng.integers(1000, 20000, size=(B, S)).astype(np.int32)
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
         "labels": (ids[:, 1] % 3).astype(np.int32), "mask": np.ones((B,), bool)}
batch = {k: v for k, v in batch.items() if k in model.input_names or k in ("labels", "mask")}

class Last(hooks_lib.Hooks):
    def __init__(self): self.out = []
    def block_output(self, module, kind, h, residual, norm):
        y = hooks_lib.residual_output(h, residual, norm); self.out.append(y); return y

def hidden(params):
    rec = Last()
    with hooks_lib.use(rec):
        model.apply(traverse_util.unflatten_dict(params, sep="."), batch)
    return rec.out[-1]

res = {}
lora = methods.create("lora", model, {k: v for k, v in cfg.method.to_dict().items() if k != "name"})
ref = np.asarray(jax.jit(hidden)(base))
for kind in ("nf4", "int8"):
    peft = quantize.setup(lora, jax.random.PRNGKey(1), base, None, quantize.QuantConfig(kind, True))
    full = {**peft.frozen, **peft.trainable["base"], **peft.trainable["head"]}
    h = np.asarray(jax.jit(hidden)(full))
    d = np.abs(h - ref)
    res[f"hidden_err_{kind}"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                                 "ref_mean_abs": float(np.abs(ref).mean()),
                                 "quantized_matrices": quantize.summary(peft.frozen)["quantized_matrices"]}
    print(kind, res[f"hidden_err_{kind}"], flush=True)

for kind in ("none", "nf4", "int8"):
    peft = quantize.setup(lora, jax.random.PRNGKey(1), base, None, quantize.QuantConfig(kind, True))
    tx = optax.adamw(1e-4)
    state = init_state(peft.trainable, peft.state, tx)
    step = jax.jit(make_train_step(lora, tx, seed=0), donate_argnums=(0,))
    state, m = step(state, peft.frozen, batch); jax.block_until_ready(m)
    for _ in range(2): state, m = step(state, peft.frozen, batch)
    jax.block_until_ready(m)
    ts = []
    for _ in range(10):
        t = time.perf_counter(); state, m = step(state, peft.frozen, batch); jax.block_until_ready(m); ts.append(time.perf_counter() - t)
    res[f"step_s_{kind}"] = {"median": float(np.median(ts)), "all": [round(x, 4) for x in ts]}
    print(kind, res[f"step_s_{kind}"], flush=True)
res.update(batch=B, seq=S, method="lora", lora=cfg.method.to_dict(), jax=jax.__version__, backend=jax.default_backend())
json.dump(res, open(sys.argv[1], "w"), indent=1)
