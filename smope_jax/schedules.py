"""Learning rates of every optimizer step, and the optimizers they drive.

The rates are computed on the host, in float64 Python arithmetic as the
reference's schedulers do, and enter the jitted steps as arguments: one
compiled step then serves every task of a run whatever its length, and a
resumed run needs only its position (phase and step) to know its rate.

The reference's schedulers lag one step behind the optimizer. Creating an
optimizer sets every parameter group to its own base rate, and the
scheduler is stepped AFTER each optimizer step, so in every phase that
creates an optimizer:
  - step 0 runs at the group's base rate;
  - step n >= 1 runs at the schedule's value n - 1.
A per-epoch schedule lags the same way by one epoch. `Schedule.delayed`
switches this off for the baselines' own protocol, whose per-epoch
scheduler is stepped at the start of each epoch instead.
"""

import dataclasses
import math

import jax
import numpy as np
import optax

from smope_jax import configuration

FINAL_LR = 1e-6
FREEZE_LR = 1e-6


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The rate of one parameter group over one phase.

  Attributes:
    kind: "cosine" (per optimizer step: `freeze_steps` at 1e-6, then a
      cosine from `start_lr` to `final_lr` over the rest of `total_steps`,
      then `final_lr`) or "epoch_cosine" (per epoch e of `num_epochs`:
      start_lr * cos(99 pi e / (200 (num_epochs - 1)))).
    base_lr: the group's rate when its optimizer is created: step 0 of a
      delayed schedule runs at it.
    total_steps: steps the per-step curve is laid out for. It may differ
      from the steps the phase takes (the reference sizes it with its
      `iter_step`, not with the loader's length).
    freeze_steps: steps at 1e-6 before the cosine.
    start_lr: where the cosine starts; `base_lr` if None. The classifier
      alignment starts its cosine at a tenth of its group's rate.
    final_lr: where the cosine ends.
    steps_per_epoch: optimizer steps per epoch (epoch_cosine only).
    num_epochs: epochs of the phase (epoch_cosine only).
    delayed: the reference's one-step lag (see the module docstring).
  """
  kind: str
  base_lr: float
  total_steps: int = 1
  freeze_steps: int = 0
  start_lr: float | None = None
  final_lr: float = FINAL_LR
  steps_per_epoch: int = 1
  num_epochs: int = 1
  delayed: bool = True

  def __post_init__(self):
    if self.kind not in configuration.SCHEDULES:
      raise ValueError(f"unknown schedule {self.kind!r}; use one of "
                       f"{configuration.SCHEDULES}")

  def _per_step(self, i: int) -> float:
    """Value i of the per-step curve (the reference's `schedule[i]`)."""
    if i >= self.total_steps:
      return self.final_lr
    if i < self.freeze_steps:
      return FREEZE_LR
    start = self.base_lr if self.start_lr is None else self.start_lr
    n = self.total_steps - self.freeze_steps
    return self.final_lr + 0.5 * (start - self.final_lr) * (
        1.0 + math.cos(math.pi * (i - self.freeze_steps) / n))

  def _per_epoch(self, epoch: int) -> float:
    start = self.base_lr if self.start_lr is None else self.start_lr
    return start * math.cos(99.0 * math.pi * epoch /
                            (200.0 * max(self.num_epochs - 1, 1)))

  def __call__(self, step: int) -> float:
    """The rate optimizer step `step` (0-based, within the phase) runs at."""
    if self.kind == "cosine":
      if self.delayed:
        return self.base_lr if step == 0 else self._per_step(step - 1)
      return self._per_step(step)
    epoch = step // max(self.steps_per_epoch, 1)
    if self.delayed:
      return self.base_lr if epoch == 0 else self._per_epoch(epoch - 1)
    return self._per_epoch(epoch)

  def rates(self, num_steps: int) -> np.ndarray:
    """float32 (num_steps,): the rate of each of the first steps."""
    return np.array([self(s) for s in range(num_steps)], np.float32)


def adam(weight_decay: float = 0.0, *,
         decoupled: bool = True) -> optax.GradientTransformation:
  """The update direction of Adam(W) without its rate; see `apply_rates`.

  `decoupled` (AdamW) adds weight_decay * param to the Adam direction, so
  the step is -lr * (adam + wd * param), PyTorch's AdamW; otherwise the
  decay is added to the gradient first, PyTorch's Adam.
  """
  scale = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
  decay = optax.add_decayed_weights(weight_decay)
  return optax.chain(scale, decay) if decoupled else optax.chain(decay, scale)


def apply_rates(direction: dict, rates: dict) -> dict:
  """Scales each top-level group of an update direction by -its rate."""
  return {
      group: jax.tree_util.tree_map(lambda u, r=rates[group]: -r * u, subtree)
      for group, subtree in direction.items()
  }


def phase_schedules(config, epochs: int,
                    loader_steps: int) -> dict[str, Schedule]:
  """The learning rate of each trainable group over one training phase.

  Prompts run at `prompt_lr_multiplier` times the base rate, the head at
  it. The per-step cosine is laid out for `iters_per_epoch * epochs` steps
  (the loader's steps per epoch when `iters_per_epoch` is 0), whatever the
  phase really takes.
  """
  common = dict(kind=config.schedule,
                total_steps=(config.iters_per_epoch or loader_steps) * epochs,
                freeze_steps=config.freeze_steps, steps_per_epoch=loader_steps,
                num_epochs=epochs, delayed=config.schedule_delay)
  return {
      "prompts":
          Schedule(base_lr=config.lr * config.prompt_lr_multiplier, **common),
      "head":
          Schedule(base_lr=config.lr, **common)
  }


def phase_epochs(config, phase: str) -> int:
  """Epochs of a training phase: the warm-up runs half of them."""
  if phase == "warmup":  # Half the epochs, as the reference's int(E / 2).
    return max(int(config.epochs * 0.5), 1)
  return config.epochs


def align_rates(config, iterations: int) -> np.ndarray:
  """The alignment's per-iteration rates, padded to a length of any task's.

  One length for every task keeps one compiled alignment step.
  """
  schedule = Schedule("cosine", base_lr=config.align_lr,
                      start_lr=config.align_lr / 10,
                      final_lr=config.align_final_lr,
                      total_steps=iterations * config.align_epochs)
  rates = np.zeros(config.align_epochs * config.num_classes, np.float32)
  rates[:schedule.total_steps] = schedule.rates(schedule.total_steps)
  return rates
