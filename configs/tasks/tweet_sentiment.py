"""Task config: Offline 3-way tweet sentiment; 99% of tweets fit 60 MiniLM tokens.

Data-side defaults only; the learning rate is method-specific and lives in configs/methods.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the tweet_sentiment defaults (name must match peftjax.data.get_task)."""
    config = ml_collections.ConfigDict()
    config.name = "tweet_sentiment"
    config.max_length = 64
    config.batch_size = 32
    config.eval_batch_size = 128
    config.lm_template = "Tweet: {text_a}\nSentiment:"  # decoders: prompt + verbaliser
    return config
