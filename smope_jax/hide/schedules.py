"""HiDe-Prompt's learning rates and optimizers.

The two Adam phases (task-identity training and prompt training) use
timm's per-epoch schedulers, stepped AFTER each epoch with the finished
epoch's index: the optimizer starts every task at its base rate, so epoch 0
runs at the base and epoch e >= 1 at the schedule's value for e - 1 (one
epoch late). The alignments use PyTorch's CosineAnnealingLR, also stepped
after each epoch but counting from its own creation, so epoch e runs at the
curve's value for e, without a lag.

Rates are host-side float64 Python values, handed to jitted steps as
arrays (as `smope_jax.schedules` does); the optimizers below give update
directions without their rate, to be scaled by `schedules.apply_rates`.
"""

import dataclasses
import math

import numpy as np
import optax

from smope_jax.hide import losses
from smope_jax.methods import hideprompt_spec

KINDS = hideprompt_spec.SCHEDULES
DECAY_EPOCHS = 30
DECAY_RATE = 0.1
MIN_LR = 1e-5
# The weight decay the reference's configs name; argparse lets an earlier
# default of 0 win, so the runs had none.
NAMED_WEIGHT_DECAY = 5e-4
CLIP_NORM = 1.0
HEAD_RATE_FACTOR = 0.1


@dataclasses.dataclass(frozen=True)
class EpochSchedule:
  """One parameter group's rate over the epochs of one phase.

  Attributes:
    kind: "epoch_step" (base * 0.1 ** (e // 30)), "epoch_cosine_min"
      (1e-5 + (base - 1e-5) (1 + cos(pi e / num_epochs)) / 2, one cycle,
      1e-5 after it) or "constant".
    base_lr: the group's rate, at which its new optimizer starts.
    num_epochs: epochs of the phase (the cosine's length).
  """
  kind: str
  base_lr: float
  num_epochs: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown schedule {self.kind!r}; use one of {KINDS}")

  def value(self, e: int) -> float:
    """The scheduler's value after epoch e (timm's `step(e)`)."""
    if self.kind == "epoch_step":
      return self.base_lr * DECAY_RATE**(e // DECAY_EPOCHS)
    if self.kind == "epoch_cosine_min":
      if e >= self.num_epochs:
        return MIN_LR
      return MIN_LR + 0.5 * (self.base_lr - MIN_LR) * (
          1.0 + math.cos(math.pi * e / self.num_epochs))
    return self.base_lr

  def __call__(self, epoch: int) -> float:
    """The rate epoch `epoch` runs at: the value of the epoch before."""
    return self.base_lr if epoch == 0 else self.value(epoch - 1)

  def rates(self, steps_per_epoch: int) -> np.ndarray:
    """float32 (num_epochs * steps_per_epoch,): the rate of every step."""
    per_epoch = [self(e) for e in range(self.num_epochs)]
    return np.repeat(np.array(per_epoch, np.float32), steps_per_epoch)


def cosine_annealing(base_lr: float, num_epochs: int) -> np.ndarray:
  """float32 (num_epochs,): PyTorch's CosineAnnealingLR(T_max=num_epochs),
  minimum 0, per epoch; epoch e runs at base (1 + cos(pi e / T)) / 2."""
  return np.array([
      0.5 * base_lr * (1.0 + math.cos(math.pi * e / num_epochs))
      for e in range(num_epochs)
  ], np.float32)


def prompt_phase_rates(lr: float, larger_prompt_lr: bool) -> dict:
  """Base rates of the prompt-training groups.

  With `larger_prompt_lr` the prompts train at lr and the head at a tenth
  of it; otherwise both at lr.
  """
  return {
      "prompt": lr,
      "head": lr * HEAD_RATE_FACTOR if larger_prompt_lr else lr
  }


def adam(weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam's direction after clipping the gradient's global norm to 1.

  The order is the reference's: the whole gradient is clipped first, then
  an L2 decay term is added to it (PyTorch Adam, not AdamW), then Adam's
  moments (betas 0.9, 0.999, eps 1e-8) give the direction; the rate is
  applied later. The runs had no decay (0.0); the 5e-4 their configs name
  is NAMED_WEIGHT_DECAY. The clip is PyTorch's (by 1 / (norm + 1e-6)).
  """
  return optax.chain(losses.clip_global_norm(CLIP_NORM),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
