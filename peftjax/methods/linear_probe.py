"""Linear probe: train the task head alone on the frozen pretrained model (Alain & Bengio 2016;
the "head-only" baseline of PEFT comparisons).

Nothing of the backbone trains and nothing is added: the trainable tree is the task head (a
classifier on the pooled representation: with ``pooling="mean"`` a linear map of the frozen
encoder's mean token embedding, with ``pooling="cls"`` the classifier on the frozen BERT pooler).
Any PEFT method that does not beat it has learned nothing the frozen features did not already
give; its count of trainable params (outside the head) is 0.
"""

from __future__ import annotations

import dataclasses

from peftjax.methods import core


@core.register("linear_probe")
class LinearProbe(core.Method):
    """The task head only; every base param frozen, no hooks."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    family = "baseline"

    def validate(self) -> None:
        if not any(self.sites.is_head(p) for p in _param_paths(self.model)):
            raise ValueError(
                f"linear_probe trains the task head alone, and this model's {self.model.head!r} "
                "head has no params of its own (a language-model head is part of the base model); "
                "use a classification/regression head (task.format=head) or another method")


def _param_paths(model) -> list[str]:
    from flax import traverse_util

    return list(traverse_util.flatten_dict(model.abstract_params(), sep="."))
