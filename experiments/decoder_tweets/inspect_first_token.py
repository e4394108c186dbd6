"""Why greedy proxy generation misses the label words here: the first-token logits of each model.

    python experiments/decoder_tweets/inspect_first_token.py --workdir=runs/decoder_tweets \
        --out=experiments/decoder_tweets/first_token.json

For the first ``--n`` test prompts of the run's generation check, lists the top-5 next tokens
after ``Sentiment:`` under the large base, the tuned and untuned small models, their difference
``tuned − untuned`` and the proxy combination (α = 1), with the logits of the verbalisers' first
tokens. Needs a finished ``run.py`` workdir.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "scripts"))

from absl import app, flags, logging  # noqa: E402

from peftjax.files import write_text_atomic  # noqa: E402

flags.DEFINE_string("workdir", "runs/decoder_tweets", "a finished run.py workdir")
flags.DEFINE_string("out", "", "write the JSON here")
flags.DEFINE_integer("n", 3, "test prompts")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import numpy as np

    import proxy_tune
    from peftjax import data
    from peftjax.data.lm import prompt_ids, verbalizers
    from peftjax.methods.proxy_tuning import combine_logits

    base, tok = proxy_tune.load_causal_lm(os.path.join(FLAGS.workdir, "pretrained_large"))
    tuned, folder, template = proxy_tune.restore_tuned(os.path.join(FLAGS.workdir, "tune_small_lora"))
    untuned, _ = proxy_tune.load_causal_lm(folder)
    task = data.get_task("tweet_sentiment")
    firsts = {w: tok(w, add_special_tokens=False)["input_ids"][0] for w in verbalizers(task)}

    def last_logits(lm, ids):
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if lm.method is None:
            out = lm.model.apply(lm.weights, batch)
        else:
            out = lm.method.apply(*lm.weights, batch)
        return np.asarray(out)[0, -1]

    top = lambda v: [(tok.decode([int(i)]), round(float(v[i]), 2)) for i in np.argsort(-v)[:5]]
    rows = []
    for e in data.load_examples(task.name, "test", limit=FLAGS.n):
        ids = np.asarray([[tok.bos_token_id] + prompt_ids(tok, e, template, 48)], np.int32)
        b, t, u = (last_logits(m, ids) for m in (base, tuned, untuned))
        c = np.asarray(combine_logits(b, t, u, 1.0))
        rows.append({"tweet": e["text_a"], "gold": task.label_names[e["label"]],
                     "top5": {"base": top(b), "tuned": top(t), "untuned": top(u), "tuned-untuned": top(t - u),
                              "proxy": top(c)},
                     "verbaliser_first_tokens": {w: {"token": tok.decode([i]), "base": round(float(b[i]), 2),
                                                     "tuned": round(float(t[i]), 2),
                                                     "untuned": round(float(u[i]), 2),
                                                     "proxy": round(float(c[i]), 2)}
                                                 for w, i in firsts.items()}})
    text = json.dumps(rows, indent=2, ensure_ascii=False)
    if FLAGS.out:
        write_text_atomic(FLAGS.out, text)
    print(text)


if __name__ == "__main__":
    app.run(main)
