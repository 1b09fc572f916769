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
from absl import logging

from smope_jax import alignment, losses, schedules

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
  size = lambda tree: int(
      sum(  # noqa: E731
          x.size for x in jax.tree_util.tree_leaves(tree)))
  trainable, frozen = split_params(params)
  counts = {
      "prompts": size(trainable.get("prompts", {})),
      "head": size(trainable.get("head", {})),
      "frozen": size(frozen)
  }
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
  context = method.context(inputs.method_state, inputs.task, mask=batch["mask"])

  def loss_fn(params):
    out = model.apply({"params": merge_params(params, frozen)}, batch["image"],
                      context, mode=mode)
    ce = losses.task_cross_entropy(out["logits"], batch["label"], batch["mask"],
                                   class_range[0], class_range[1])
    extra = method.loss_terms(out, params, inputs.method_state, inputs.task,
                              batch["mask"], mode)
    total = ce + sum(weight * value for value, weight in extra.values())
    terms = {"ce": ce, **{name: value for name, (value, _) in extra.items()}}
    return total, (terms, out["logits"])

  (total, (terms, logits)), grads = jax.value_and_grad(loss_fn,
                                                       has_aux=True)(trainable)
  direction, opt_state = tx.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(
      trainable, schedules.apply_rates(direction, inputs.rates))
  predictions = predict_seen(logits, class_range[1], class_range[0])
  metrics = {
      "loss":
          total,
      **terms, "correct":
          jnp.sum((predictions == batch["label"]) * batch["mask"]),
      "count":
          jnp.sum(batch["mask"])
  }
  return trainable, opt_state, metrics


def predict_seen(logits: jax.Array, end_class, first_class=0) -> jax.Array:
  """Argmax over the classes in [first_class, end_class).

  Evaluation predicts over every class seen so far (first_class 0, no task
  id); training accuracy over the current task's classes, as its loss.
  """
  allowed = losses.class_range_mask(logits.shape[-1], first_class, end_class)
  return jnp.argmax(jnp.where(allowed[None], logits, -jnp.inf), axis=-1)


def infer(trainable, frozen, method_state, batch, task, model, method,
          evaluating: bool = False):
  """Forward of a batch with the method's inference rules (its
  evaluation's rules when `evaluating`)."""
  context = method.context(method_state, task, evaluating=evaluating,
                           mask=batch["mask"])
  return model.apply({"params": merge_params(trainable, frozen)},
                     batch["image"], context, mode="eval")


def eval_step(trainable, frozen, method_state, batch, num_seen, task, *, model,
              method):
  """Number of correctly classified real images in the batch."""
  out = infer(trainable, frozen, method_state, batch, task, model, method,
              evaluating=True)
  correct = predict_seen(out["logits"], num_seen) == batch["label"]
  return jnp.sum(correct * batch["mask"]).astype(jnp.int32)


def bookkeeping_step(trainable, frozen, method_state, batch, task, *, model,
                     method):
  """Inference-mode pass whose outputs update the method's state."""
  out = infer(trainable, frozen, method_state, batch, task, model, method)
  return method.bookkeep(method_state, out, batch["mask"])


def feature_step(trainable, frozen, method_state, batch, task, *, model,
                 method):
  """Pre-logits with test-time routing, for the class statistics."""
  return infer(trainable, frozen, method_state, batch, task, model,
               method)["pre_logits"]


# Every phase a task may have, in order (`task_phases` picks a run's); the
# trainer saves the name of the next one to run. HiDe-Prompt's own: its
# task-identity classifier's training, statistics and alignment, and the
# merge of its task prompt.
PHASES = ("start", "tii_train", "tii_stats", "tii_align", "warmup", "train",
          "merge", "bookkeeping", "stats", "align", "eval")
# The train-step mode of each training phase.
TRAINING_MODES = {"warmup": "dense", "train": "train"}


def task_phases(method, classifier_alignment: bool, task: int) -> list[str]:
  """The phases of one task for a method and protocol, in order."""
  return method.phases(task, classifier_alignment)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps of one run, and the update rules they use.

  The trainer calls them and the preflight compiles them for a target chip:
  one builder (`make_steps`) serves both, so what is compiled ahead of time
  is what runs.
  """
  train_for: Callable[[str], Any]  # mode -> jitted `train_step`
  eval: Callable[..., Any]
  bookkeeping: Callable[..., Any]
  features: Callable[..., Any]
  start: Callable[..., Any]  # the method's task boundary
  align: Callable[..., Any]  # classifier alignment of the head
  init_optimizer: Callable[..., Any]
  tx: optax.GradientTransformation
  align_tx: optax.GradientTransformation

  def train(self, mode, *args):
    return self.train_for(mode)(*args)


# XLA's GPU compiler can fail to find a Triton tile configuration for some
# matrix products (seen for a ViT-B/16 value projection's backward, f32 and
# bf16, when it cannot autotune). Such a step is compiled again with those
# products left to cuBLAS, as XLA's maintainers advise; nothing else changes.
TRITON_GEMM_FAILURE = "Couldn't find output tile sizes"
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


class CompileFallback:
  """A jitted step that recompiles without Triton GEMMs when XLA cannot
  emit one; `lower` gives the first form, for ahead-of-time compilation."""

  def __init__(self, jit_with_options: Callable[[Any], Any]):
    self._jit = jit_with_options
    self._fn = jit_with_options(None)
    self.options = None

  def __call__(self, *args):
    try:
      return self._fn(*args)
    except jax.errors.JaxRuntimeError as e:
      # Compilation fails before any argument is donated, so a retry sees
      # the same arguments.
      if self.options is not None or TRITON_GEMM_FAILURE not in str(e):
        raise
      logging.warning("XLA found no Triton tiling for a matrix product; "
                      "compiling this step with --xla_gpu_enable_triton_gemm"
                      "=false")
      self.options = NO_TRITON_GEMM
      self._fn = self._jit(NO_TRITON_GEMM)
      return self._fn(*args)

  def lower(self, *args):
    return self._fn.lower(*args)


def make_steps(config, model, method, replicated) -> Steps:
  """Jits the steps of a run.

  One train step is compiled per mode (SMoPE's dense warm-up and top-K
  training), whatever the number and size of the tasks: the class ranges,
  task index, rates and method state are arguments. Parameters and states
  come back replicated over the mesh (every step's, so that multi-process
  checkpoints can hold them); the batch arrives sharded over its 'data'
  axis, so XLA inserts the gradient all-reduce of data parallelism.
  """
  tx = method.optimizer() or schedules.adam(
      config.weight_decay, decoupled=config.optimizer == "adamw")
  align_tx = schedules.adam(config.align_weight_decay)

  def jitted(fn, **kwargs):
    return CompileFallback(
        lambda options: jax.jit(fn, compiler_options=options, **kwargs))

  @functools.lru_cache(maxsize=None)
  def train_for(mode: str):
    return jitted(
        functools.partial(train_step, model=model, method=method, tx=tx,
                          mode=mode),
        out_shardings=(replicated, replicated, replicated),
        donate_argnums=(0, 1))

  bound = dict(model=model, method=method)
  align = functools.partial(alignment.align_head, tx=align_tx,
                            per_class=config.batch_size * config.align_ratio,
                            num_epochs=config.align_epochs)
  return Steps(
      train_for=train_for, eval=jitted(functools.partial(eval_step, **bound),
                                       out_shardings=replicated),
      bookkeeping=jitted(functools.partial(bookkeeping_step, **bound),
                         out_shardings=replicated, donate_argnums=(2,)),
      features=jitted(functools.partial(feature_step, **bound)),
      start=jitted(method.start_task, out_shardings=replicated),
      align=jitted(align, out_shardings=replicated),
      init_optimizer=jitted(tx.init,
                            out_shardings=replicated), tx=tx, align_tx=align_tx)
