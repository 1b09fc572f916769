"""Learning-rate schedules and optimizers of the reference (spec section 4).

Every schedule is a pure function of the optimizer step, so the optimizer
state alone (its step count) says where a resumed run is in the schedule.
"""

import math

import jax
import jax.numpy as jnp
import optax

FINAL_LR = 1e-6


def frozen_then_cosine(base_lr: float, total_steps: int, freeze_steps: int,
                       final_lr: float = FINAL_LR) -> optax.Schedule:
  """`freeze_steps` at 1e-6, then cosine from `base_lr` to `final_lr`.

  Step i of the cosine part (i = 0 .. n-1, n = total - freeze) has
  final + (base - final) * (1 + cos(pi * i / n)) / 2; past the end the rate
  stays at `final_lr`. This is the reference's per-iteration scheduler.
  """
  cosine_steps = max(total_steps - freeze_steps, 1)

  def schedule(step):
    i = jnp.asarray(step, jnp.float32) - freeze_steps
    cosine = final_lr + 0.5 * (base_lr - final_lr) * (
        1.0 + jnp.cos(jnp.pi * i / cosine_steps))
    lr = jnp.where(i < 0, FINAL_LR, cosine)
    return jnp.where(step >= total_steps, final_lr, lr)

  return schedule


def per_epoch_cosine(base_lr: float, steps_per_epoch: int,
                     num_epochs: int) -> optax.Schedule:
  """The reference's epoch-wise schedule (CUB-200).

  During epoch e the rate is base * cos(99 * pi * e / (200 * (K - 1))) for K
  epochs, which ends just above zero.
  """
  denominator = 200.0 * max(num_epochs - 1, 1)

  def schedule(step):
    epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
    return base_lr * jnp.cos(99.0 * math.pi * epoch / denominator)

  return schedule


def task_schedule(kind: str, base_lr: float, steps_per_epoch: int,
                  num_epochs: int, freeze_steps: int) -> optax.Schedule:
  if kind == "cosine":
    return frozen_then_cosine(base_lr, steps_per_epoch * num_epochs,
                              freeze_steps)
  if kind == "epoch_cosine":
    return per_epoch_cosine(base_lr, steps_per_epoch, num_epochs)
  raise ValueError(f"unknown schedule {kind!r}")


def task_optimizer(config, steps_per_epoch: int,
                   num_epochs: int) -> optax.GradientTransformation:
  """AdamW (weight decay 0) with 5x the base rate for the prompt experts.

  The transformation acts on the trainable tree {'prompts', 'head'} only;
  the backbone never reaches the optimizer.
  """
  def adamw(base_lr):
    schedule = task_schedule(config.schedule, base_lr, steps_per_epoch,
                             num_epochs, config.freeze_steps)
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=config.weight_decay)

  prompt_lr = config.lr * config.prompt_lr_multiplier
  return optax.multi_transform(
      {"prompts": adamw(prompt_lr), "head": adamw(config.lr)},
      group_labels)


def group_labels(trainable: dict) -> dict:
  """Labels every leaf of the trainable tree with its top-level group."""
  return {group: jax.tree_util.tree_map(lambda _, g=group: g, subtree)
          for group, subtree in trainable.items()}


def alignment_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """AdamW for the classifier alignment: cosine 1e-5 -> 1e-6 per iteration."""
  schedule = frozen_then_cosine(config.align_lr, total_steps, 0,
                                final_lr=config.align_final_lr)
  return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=config.align_weight_decay)
