"""peftjax: parameter-efficient fine-tuning of transformer language models in JAX.

Subpackages: ``models`` (Flax model zoo + HF checkpoints), ``methods`` (PEFT methods as
transformations of parameter trees), ``data`` (TFDS tasks, batching, metrics), ``train``
(losses, optimizer, steps, checkpoints, the training loop).

Importing peftjax sets glibc's allocator to keep freed memory for reuse (``peftjax.runtime``:
no page faults on each step's activations; ``PEFTJAX_MALLOC=system`` opts out).
"""

from peftjax import runtime as _runtime

_runtime.keep_freed_host_memory()

__version__ = "0.1.0"
