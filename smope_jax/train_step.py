"""Jitted steps: training, evaluation, bookkeeping and feature extraction.

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

from smope_jax import losses, schedules


# The parameters that learn; everything else is the frozen backbone.
TRAINABLE_GROUPS = ("prompts", "head")


def split_params(params: dict) -> tuple[dict, dict]:
  """(trainable {'prompts', 'head'}, frozen backbone) from a full tree."""
  trainable = {k: v for k, v in params.items() if k in TRAINABLE_GROUPS}
  frozen = {k: v for k, v in params.items() if k not in TRAINABLE_GROUPS}
  return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
  return {**frozen, **trainable}


def parameter_counts(params: dict) -> dict:
  """Learnable (prompts + head) and frozen (backbone) parameter counts.

  Works on arrays and on shapes (`jax.ShapeDtypeStruct`).
  """
  size = lambda tree: int(sum(  # noqa: E731
      x.size for x in jax.tree_util.tree_leaves(tree)))
  trainable, frozen = split_params(params)
  counts = {"prompts": size(trainable.get("prompts", {})),
            "head": size(trainable.get("head", {})), "frozen": size(frozen)}
  counts["learnable"] = counts["prompts"] + counts["head"]
  return counts


@flax.struct.dataclass
class TaskInputs:
  """What a training step needs besides parameters, optimizer and batch.

  Attributes:
    class_range: int32 (2,), [first class of the task, end of seen classes).
    task: int32, the task's index.
    rates: float32 learning rate of this step per trainable group
      ({'prompts', 'head'}).
    method_state: the method's state (e.g. SMoPE's counts and snapshot).
  """
  class_range: jax.Array
  task: jax.Array
  rates: dict
  method_state: dict


def train_step(trainable, opt_state, frozen, batch, inputs: TaskInputs, *,
               model, method, tx: optax.GradientTransformation, mode: str):
  """One optimizer step on a global batch; returns new state and metrics.

  The loss is the cross-entropy over the current task's classes plus the
  method's weighted terms.

  Args:
    trainable: {'prompts', 'head'} parameters (differentiated).
    opt_state: optimizer state of `trainable`.
    frozen: backbone parameters (not differentiated).
    batch: {'image', 'label', 'mask'}.
    inputs: the task's class range and index, the rates, the method state.
    model, method, tx, mode: static, bound by `make_steps`.
  """
  class_range = inputs.class_range
  context = method.context(inputs.method_state, inputs.task)

  def loss_fn(params):
    out = model.apply({"params": merge_params(params, frozen)},
                      batch["image"], context, mode=mode)
    ce = losses.task_cross_entropy(out["logits"], batch["label"],
                                   batch["mask"], class_range[0],
                                   class_range[1])
    extra = method.loss_terms(out, params, inputs.method_state, inputs.task,
                              batch["mask"], mode)
    total = ce + sum(weight * value for value, weight in extra.values())
    terms = {"ce": ce, **{name: value for name, (value, _) in extra.items()}}
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


def infer(trainable, frozen, method_state, images, task, model, method,
           exclude_unused: bool = True):
  """Forward with the method's inference rules."""
  context = method.context(method_state, task, exclude_unused=exclude_unused)
  return model.apply({"params": merge_params(trainable, frozen)}, images,
                     context, mode="eval")


def eval_step(trainable, frozen, method_state, batch, num_seen, task, *,
              model, method, exclude_unused: bool):
  """Number of correctly classified real images in the batch.

  With `exclude_unused` False, SMoPE routes as the reference's published
  evaluation did (see `prompt_attention.selection_penalty`).
  """
  out = infer(trainable, frozen, method_state, batch["image"], task, model,
               method, exclude_unused)
  correct = predict_seen(out["logits"], num_seen) == batch["label"]
  return jnp.sum(correct * batch["mask"]).astype(jnp.int32)


def bookkeeping_step(trainable, frozen, method_state, batch, task, *, model,
                     method):
  """Inference-mode pass whose outputs update the method's state."""
  out = infer(trainable, frozen, method_state, batch["image"], task, model,
               method)
  return method.bookkeep(method_state, out, batch["mask"])


def feature_step(trainable, frozen, method_state, batch, task, *, model,
                 method):
  """Pre-logits with test-time routing, for the class statistics."""
  return infer(trainable, frozen, method_state, batch["image"], task, model,
                method)["pre_logits"]


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps of one run."""
  train: Callable[..., Any]
  eval: Callable[..., Any]
  bookkeeping: Callable[..., Any]
  features: Callable[..., Any]


def make_steps(model, method, tx: optax.GradientTransformation, replicated,
               exclude_unused_at_eval: bool) -> Steps:
  """Jits the steps of a run.

  One train step is compiled per mode (SMoPE's dense warm-up and top-K
  training), whatever the number and size of the tasks: the class ranges,
  task index, rates and method state are arguments. Parameters and states
  come back replicated over the mesh; the batch arrives sharded over its
  'data' axis, so XLA inserts the gradient all-reduce of data parallelism.
  """

  @functools.lru_cache(maxsize=None)
  def train_for(mode: str):
    fn = functools.partial(train_step, model=model, method=method, tx=tx,
                           mode=mode)
    return jax.jit(fn, out_shardings=(replicated, replicated, replicated),
                   donate_argnums=(0, 1))

  def train(mode, *args):
    return train_for(mode)(*args)

  bound = dict(model=model, method=method)
  return Steps(
      train=train,
      eval=jax.jit(functools.partial(eval_step, **bound,
                                     exclude_unused=exclude_unused_at_eval),
                   out_shardings=replicated),
      bookkeeping=jax.jit(functools.partial(bookkeeping_step, **bound),
                          out_shardings=replicated, donate_argnums=(2,)),
      features=jax.jit(functools.partial(feature_step, **bound)))
