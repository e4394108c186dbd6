"""Full fine-tuning: every parameter trainable (the baseline every PEFT method is compared to)."""

from __future__ import annotations

import dataclasses

from peftjax.methods import core


@core.register("full")
class Full(core.Method):
    """All base params are trainable; no hooks, nothing added."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    family = "baseline"

    def trains_base(self, path: str) -> bool:
        return True
