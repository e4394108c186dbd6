"""Training: losses, optimizer, jitted steps, checkpoints, and the train/evaluate loop."""

from peftjax.train.loop import NonFiniteLossError, build, train_and_evaluate
from peftjax.train.optim import make_optimizer
from peftjax.train.steps import TrainState, init_state, make_eval_step, make_train_step

__all__ = ["NonFiniteLossError", "TrainState", "build", "init_state", "make_eval_step",
           "make_optimizer", "make_train_step", "train_and_evaluate"]
