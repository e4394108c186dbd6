"""Training: optimizer, jitted steps, checkpoints, the train/evaluate loop, and finished runs."""

from peftjax.train.compose import FinishedRun, build, load_run
from peftjax.train.loop import NonFiniteLossError, train_and_evaluate
from peftjax.train.optim import make_optimizer
from peftjax.train.steps import TrainState, init_state, make_eval_step, make_train_step

__all__ = ["FinishedRun", "NonFiniteLossError", "TrainState", "build", "init_state", "load_run",
           "make_eval_step", "make_optimizer", "make_train_step", "train_and_evaluate"]
