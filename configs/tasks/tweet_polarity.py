"""Task config: Offline positive/negative tweets (tweet_sentiment minus neutral).

Data-side defaults only; the learning rate is method-specific and lives in configs/methods.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the tweet_polarity defaults (name must match peftjax.data.get_task)."""
    config = ml_collections.ConfigDict()
    config.name = "tweet_polarity"
    config.max_length = 64
    config.batch_size = 32
    config.eval_batch_size = 128
    config.lm_template = "Tweet: {text_a}\nSentiment:"  # decoders: prompt + verbaliser
    return config
