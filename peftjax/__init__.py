"""peftjax: parameter-efficient fine-tuning of transformer language models in JAX.

Subpackages: ``models`` (Flax model zoo + HF checkpoints), ``methods`` (PEFT methods as
transformations of parameter trees), ``data`` (TFDS tasks, batching, metrics), ``train``
(losses, optimizer, steps, checkpoints, the training loop).
"""

__version__ = "0.1.0"
