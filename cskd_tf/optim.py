"""The paper's optimiser: SGD as PyTorch computes it, and the step schedule."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="cskd_tf")
class CoupledWeightDecaySGD(keras.optimizers.Optimizer):
    """SGD with momentum and L2 weight decay folded into the gradient.

    Each step computes, for every trainable variable `w` (kernels, biases and
    batch-norm scales and offsets alike):

        g   = grad + weight_decay * w
        buf = momentum * buf + g
        w   = w - lr * buf

    This is `torch.optim.SGD(momentum=m, weight_decay=wd)`, which the paper and
    the authors' code use. It differs from Keras' `SGD(weight_decay=...)`
    (decoupled, and its velocity carries the learning rate, so a schedule step
    acts with a delay) and from an `l2` kernel regulariser (half the strength,
    and no decay of biases and batch-norm parameters).

    Args:
      learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
      momentum: float. Momentum factor (no dampening, no Nesterov).
      coupled_weight_decay: float. The L2 coefficient added to the gradient.
      **kwargs: forwarded to `keras.optimizers.Optimizer` (`name`, clipping,
        `loss_scale_factor`, ...). Its own `weight_decay` is decoupled and is
        rejected here to avoid applying decay twice.

    Reference: Yun et al., CVPR 2020, section 3.1 (SGD, momentum 0.9,
    weight decay 1e-4).
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        coupled_weight_decay=1e-4,
        name="coupled_weight_decay_sgd",
        **kwargs,
    ):
        if kwargs.get("weight_decay"):
            raise ValueError(
                "CoupledWeightDecaySGD takes coupled_weight_decay=, not the "
                "decoupled weight_decay=."
            )
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if coupled_weight_decay < 0:
            raise ValueError(f"coupled_weight_decay must be >= 0, got {coupled_weight_decay}.")
        self.momentum = momentum
        self.coupled_weight_decay = coupled_weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        decay = ops.cast(self.coupled_weight_decay, variable.dtype)
        momentum = ops.cast(self.momentum, variable.dtype)
        buf = self.momentums[self._get_variable_index(variable)]
        gradient = ops.add(gradient, ops.multiply(decay, variable))
        self.assign(buf, ops.add(ops.multiply(momentum, buf), gradient))
        self.assign_sub(variable, ops.multiply(learning_rate, buf))

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay", None)
        config.update(momentum=self.momentum, coupled_weight_decay=self.coupled_weight_decay)
        return config


def milestone_epochs(epochs, milestones=(0.5, 0.75)):
    """Epochs (0-based) from which each learning-rate drop applies, as in the authors' code.

    Their train.py calls `adjust_learning_rate(optimizer, epoch)` after training epoch
    `epoch`, and it lowers the rate when `epoch >= fraction * epochs`: the rate so set is
    the next epoch's. Epoch `k` therefore trains at the lower rate when
    `k - 1 >= fraction * epochs`, and the first such epoch is `ceil(fraction * epochs) + 1`:
    101 and 151 of 200 (the paper's "epochs 100 and 150", counted the authors' way).
    """
    return [math.ceil(f * epochs) + 1 for f in milestones]


def step_schedule(learning_rate, epochs, steps_per_epoch, milestones=(0.5, 0.75), factor=0.1):
    """The paper's schedule: `learning_rate` divided by 10 at 50% and 75% of training.

    Args:
      learning_rate: float. Initial rate (0.1 in the paper).
      epochs: int. Total epochs.
      steps_per_epoch: int. Optimizer steps in one epoch.
      milestones: sequence of floats. Fractions of `epochs` at which to drop.
      factor: float. Multiplier applied at each milestone.

    Returns:
      A `keras.optimizers.schedules.PiecewiseConstantDecay` over optimizer steps.
    """
    # The schedule sees the number of finished steps; epoch e starts at step
    # e * steps_per_epoch and PiecewiseConstantDecay switches after a boundary.
    boundaries = [e * steps_per_epoch - 1 for e in milestone_epochs(epochs, milestones)]
    values = [learning_rate * factor**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
