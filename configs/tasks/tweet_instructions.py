"""Task config: tweet sentiment as instruction tuning, offline (``peftjax.data.instructions``).

    python scripts/train.py \
      --config=configs/train.py:model=tiny-llama,method=lora,task=tweet_instructions \
      --workdir=runs/tweet_instructions

Records are {instruction, input: the tweet, output: negative|neutral|positive} built from the
tweet_sentiment splits (TFDS builder ``tweet_instructions``), in Stanford Alpaca's prompt
template; the loss is on the response tokens only. Evaluation reports response-token loss and
perplexity, and after training the exact match of greedy generation on 64 test records. With
MiniLM's tokenizer (tiny-llama) the longest prompt + response is ~110 tokens.
"""

import ml_collections

from peftjax.data.instructions import task_config


def get_config() -> ml_collections.ConfigDict:
    return task_config("tweet_instructions", "tfds:tweet_instructions", max_length=128,
                       batch_size=16, eval_batch_size=64, eval_generate=64)
