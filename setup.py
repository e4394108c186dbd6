"""peftjax: parameter-efficient fine-tuning of transformer language models in JAX."""
from setuptools import find_packages, setup

setup(
    name="peftjax",
    version="0.1.0",
    description="Parameter-efficient fine-tuning (LoRA, adapters, prompts, BitFit, ...) in JAX/Flax",
    packages=find_packages(include=["peftjax", "peftjax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.10",
        # configs and tokenizers only: transformers 5 ships no Flax models.
        "transformers>=4.45",
        # read through array_record data sources: TensorFlow is not needed.
        "tensorflow-datasets>=4.9.6",
        "array_record>=0.5",
        "importlib_resources",
        "ml-collections>=0.1.1",
        "absl-py",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "peft>=0.13"],
    },
)
