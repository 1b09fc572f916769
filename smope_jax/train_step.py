"""Jitted steps: training, evaluation, expert counting and feature extraction.

The backbone weights are an ordinary, non-differentiated argument of every
step: gradients and optimizer state exist only for the trainable tree
`{'prompts': ..., 'head': ...}`. Steps are pure functions; `make_steps`
binds the model and hyper-parameters and jits them once per run.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from smope_jax import experts, losses, schedules


# The parameters that learn; everything else is the frozen backbone.
TRAINABLE_GROUPS = ("prompts", "head")


def split_params(params: dict) -> tuple[dict, dict]:
  """(trainable {'prompts', 'head'}, frozen backbone) from a full tree."""
  trainable = {k: v for k, v in params.items() if k in TRAINABLE_GROUPS}
  frozen = {k: v for k, v in params.items() if k not in TRAINABLE_GROUPS}
  return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
  return {**frozen, **trainable}


@dataclasses.dataclass(frozen=True)
class LossWeights:
  router: float
  prototype: float
  epsilon: float
  top_k: int


@flax.struct.dataclass
class TaskInputs:
  """What a training step needs besides parameters, optimizer and batch.

  Attributes:
    class_range: int32 (2,), [first class of the task, end of seen classes).
    rates: float32 learning rate of this step per trainable group
      ({'prompts', 'head'}).
    expert_state: counts and marks (L, H, E).
    old_keys: expert keys when the task started (L, H, E, d).
  """
  class_range: jax.Array
  rates: dict
  expert_state: dict
  old_keys: jax.Array


def train_step(trainable, opt_state, frozen, batch, inputs: TaskInputs, *,
               model, tx: optax.GradientTransformation, mode: str,
               weights: LossWeights, use_prototype: bool):
  """One optimizer step on a global batch; returns new state and metrics.

  Args:
    trainable: {'prompts', 'head'} parameters (differentiated).
    opt_state: optimizer state of `trainable`.
    frozen: backbone parameters (not differentiated).
    batch: {'image', 'label', 'mask'}.
    inputs: the task's class range, this step's rates and the expert state.
    model, tx, mode, weights, use_prototype: static, bound by `make_steps`.
  """
  class_range = inputs.class_range

  def loss_fn(params):
    out = model.apply({"params": merge_params(params, frozen)},
                      batch["image"], inputs.expert_state, mode=mode)
    ce = losses.task_cross_entropy(out["logits"], batch["label"],
                                   batch["mask"], class_range[0],
                                   class_range[1])
    terms = {"ce": ce}
    if mode == "train" and weights.router > 0:
      terms["router"] = losses.router_loss(out["scores"], out["selected"],
                                           weights.epsilon, batch["mask"])
    if use_prototype and weights.prototype > 0:
      terms["prototype"] = losses.prototype_loss(
          params["prompts"]["keys"], inputs.old_keys,
          inputs.expert_state["frequent"], weights.top_k)
    total = (ce + weights.router * terms.get("router", 0.0) +
             weights.prototype * terms.get("prototype", 0.0))
    return total, (terms, out["logits"])

  (total, (terms, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(trainable)
  direction, opt_state = tx.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(
      trainable, schedules.apply_rates(direction, inputs.rates))
  predictions = predict_seen(logits, class_range[1], class_range[0])
  metrics = {"loss": total, **terms,
             "correct": jnp.sum((predictions == batch["label"]) *
                                batch["mask"]),
             "count": jnp.sum(batch["mask"])}
  return trainable, opt_state, metrics


def predict_seen(logits: jax.Array, end_class, first_class=0) -> jax.Array:
  """Argmax over the classes in [first_class, end_class).

  Evaluation predicts over every class seen so far (first_class 0, no task
  id); training accuracy over the current task's classes, as its loss.
  """
  allowed = losses.class_range_mask(logits.shape[-1], first_class, end_class)
  return jnp.argmax(jnp.where(allowed[None], logits, -jnp.inf), axis=-1)


def _infer(trainable, frozen, expert_state, images, model,
           exclude_unused: bool = True):
  """Forward with the inference routing."""
  return model.apply({"params": merge_params(trainable, frozen)}, images,
                     expert_state, mode="eval", exclude_unused=exclude_unused)


def eval_step(trainable, frozen, expert_state, batch, num_seen, *, model,
              exclude_unused: bool):
  """Number of correctly classified real images in the batch.

  With `exclude_unused` False the experts are routed as the reference's
  published evaluation did (see `prompt_attention.selection_penalty`).
  """
  out = _infer(trainable, frozen, expert_state, batch["image"], model,
               exclude_unused)
  correct = predict_seen(out["logits"], num_seen) == batch["label"]
  return jnp.sum(correct * batch["mask"]).astype(jnp.int32)


def count_step(trainable, frozen, expert_state, batch, *, model, top_k: int):
  """Inference-mode pass that adds this batch to the activation counts."""
  out = _infer(trainable, frozen, expert_state, batch["image"], model)
  return experts.update_counts(expert_state, out["scores"], top_k,
                               batch["mask"])


def feature_step(trainable, frozen, expert_state, batch, *, model):
  """Pre-logits with test-time routing, for the class statistics."""
  return _infer(trainable, frozen, expert_state, batch["image"],
                model)["pre_logits"]


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps of one run."""
  train: Callable[..., Any]
  eval: Callable[..., Any]
  count: Callable[..., Any]
  features: Callable[..., Any]


def make_steps(model, tx: optax.GradientTransformation, weights: LossWeights,
               replicated, exclude_unused_at_eval: bool) -> Steps:
  """Jits the steps of a run.

  One train step is compiled per (mode, prototype loss on/off), whatever the
  number and size of the tasks: class ranges, rates and expert state are
  arguments. Parameters and states come back replicated over the mesh; the
  batch arrives sharded over its 'data' axis, so XLA inserts the gradient
  all-reduce of data parallelism.
  """

  @functools.lru_cache(maxsize=None)
  def train_for(mode: str, use_prototype: bool):
    fn = functools.partial(train_step, model=model, tx=tx, mode=mode,
                           weights=weights, use_prototype=use_prototype)
    return jax.jit(fn, out_shardings=(replicated, replicated, replicated),
                   donate_argnums=(0, 1))

  def train(mode, use_prototype, *args):
    return train_for(mode, use_prototype)(*args)

  return Steps(
      train=train,
      eval=jax.jit(functools.partial(eval_step, model=model,
                                     exclude_unused=exclude_unused_at_eval),
                   out_shardings=replicated),
      count=jax.jit(functools.partial(count_step, model=model,
                                      top_k=weights.top_k),
                    out_shardings=replicated, donate_argnums=(2,)),
      features=jax.jit(functools.partial(feature_step, model=model)))
