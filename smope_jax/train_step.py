"""Jitted steps: training, evaluation, expert counting and feature extraction.

The backbone weights are an ordinary, non-differentiated argument of every
step: gradients and optimizer state exist only for the trainable tree
`{'prompts': ..., 'head': ...}`. Steps are pure functions; `make_steps`
binds the model and hyper-parameters and jits them once per run.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from smope_jax import experts, losses


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


def train_step(trainable, opt_state, frozen, expert_state, old_keys, batch,
               class_range, *, model, tx: optax.GradientTransformation,
               mode: str, weights: LossWeights, use_prototype: bool):
  """One optimizer step on a global batch; returns new state and metrics.

  Args:
    trainable: {'prompts', 'head'} parameters (differentiated).
    opt_state: optimizer state of `trainable`.
    frozen: backbone parameters (not differentiated).
    expert_state: counts and marks (L, H, E).
    old_keys: expert keys at the start of the task (L, H, E, d).
    batch: {'image', 'label', 'mask'}.
    class_range: int32 (2,) = [first class of the task, end of seen classes).
    model, tx, mode, weights, use_prototype: static, bound by `make_steps`.
  """

  def loss_fn(params):
    out = model.apply({"params": merge_params(params, frozen)},
                      batch["image"], expert_state, mode=mode)
    ce = losses.task_cross_entropy(out["logits"], batch["label"],
                                   batch["mask"], class_range[0],
                                   class_range[1])
    terms = {"ce": ce}
    if mode == "train" and weights.router > 0:
      terms["router"] = losses.router_loss(out["scores"], out["selected"],
                                           weights.epsilon, batch["mask"])
    if use_prototype and weights.prototype > 0:
      terms["prototype"] = losses.prototype_loss(
          params["prompts"]["keys"], old_keys, expert_state["frequent"],
          weights.top_k)
    total = (ce + weights.router * terms.get("router", 0.0) +
             weights.prototype * terms.get("prototype", 0.0))
    return total, (terms, out["logits"])

  (total, (terms, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  seen = losses.class_range_mask(logits.shape[-1], class_range[0],
                                 class_range[1])
  predictions = jnp.argmax(jnp.where(seen[None], logits, -jnp.inf), -1)
  metrics = {"loss": total, **terms,
             "correct": jnp.sum((predictions == batch["label"]) *
                                batch["mask"]),
             "count": jnp.sum(batch["mask"])}
  return trainable, opt_state, metrics


def predict_seen(logits: jax.Array, num_seen: jax.Array) -> jax.Array:
  """Class-incremental prediction over all classes seen so far."""
  seen = jnp.arange(logits.shape[-1]) < num_seen
  return jnp.argmax(jnp.where(seen[None], logits, -jnp.inf), axis=-1)


def _infer(trainable, frozen, expert_state, images, model):
  """Forward with the inference routing (never-used experts excluded)."""
  return model.apply({"params": merge_params(trainable, frozen)}, images,
                     expert_state, mode="eval")


def eval_step(trainable, frozen, expert_state, batch, num_seen, *, model):
  """Number of correctly classified real images in the batch."""
  out = _infer(trainable, frozen, expert_state, batch["image"], model)
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


def make_steps(model, tx_factory, weights: LossWeights, replicated) -> Steps:
  """Jits the steps. `tx_factory(tx_key)` gives a phase's optimizer.

  `tx_key` is the phase's (schedule steps per epoch, epochs); one train step
  is compiled per (mode, prototype loss on/off, tx_key).


  Parameters and states come back replicated over the mesh; the batch
  arrives sharded over its 'data' axis, so XLA inserts the gradient
  all-reduce of data parallelism.
  """

  @functools.lru_cache(maxsize=None)
  def train_for(mode: str, use_prototype: bool, tx_key):
    fn = functools.partial(train_step, model=model, tx=tx_factory(tx_key),
                           mode=mode, weights=weights,
                           use_prototype=use_prototype)
    return jax.jit(fn, out_shardings=(replicated, replicated, replicated),
                   donate_argnums=(0, 1))

  def train(mode, use_prototype, tx_key, *args):
    return train_for(mode, use_prototype, tx_key)(*args)

  return Steps(
      train=train,
      eval=jax.jit(functools.partial(eval_step, model=model),
                   out_shardings=replicated),
      count=jax.jit(functools.partial(count_step, model=model,
                                      top_k=weights.top_k),
                    out_shardings=replicated, donate_argnums=(2,)),
      features=jax.jit(functools.partial(feature_step, model=model)))
