"""The functions the benchmark compares, all built from our own modules.

Every row runs the configured model on the same random images with the
same random weights: the benchmark measures cost, not accuracy, so the
backbone is never loaded (`config.pretrained` is ignored).
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from smope_jax import experts, schedules
from smope_jax import train_step as steps_lib
from smope_jax.models.factory import build_model

DESCRIPTIONS = {
    "smope_train": "SMoPE train step: top-K forward, gradients for prompts "
                   "and head only, router + prototype losses, AdamW update",
    "smope_inference": "SMoPE inference: one prompted forward (eval routing)",
    "plain_vit": "plain ViT forward (mode 'plain', no prompts)",
    "dense_prompts": "dense prefix attention with all E experts "
                     "(mode 'dense')",
    "l2p_two_pass": "L2P-style inference: frozen plain forward for the "
                    "query, query-key match, then the prompted forward",
}


@dataclasses.dataclass
class Row:
  """A function, its arguments, and how a call feeds the next one."""
  fn: Callable[..., Any]
  args: tuple
  donate: tuple = ()
  carry: Any = None


def parameter_counts(params: dict) -> dict:
  """Learnable (prompts + head) and frozen (backbone) parameter counts."""
  trainable, frozen = steps_lib.split_params(params)
  counts = {"prompts": _size(trainable.get("prompts", {})),
            "head": _size(trainable.get("head", {})),
            "frozen": _size(frozen)}
  counts["learnable"] = counts["prompts"] + counts["head"]
  return counts


def _size(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


class Setup:
  """Model, random weights, batch and expert state of one benchmark run."""

  def __init__(self, config, batch: int):
    self.config = config
    self.model = build_model(config)
    keys = jax.random.split(jax.random.PRNGKey(config.seed), 5)
    size = config.image_size
    self.images = jax.random.uniform(keys[0], (batch, size, size, 3))
    lhe = (config.num_prompted_layers, self.model.num_heads,
           config.num_experts)
    state = experts.init_expert_state(*lhe)
    # A mid-run state: some experts marked frequent, some never used.
    self.expert_state = {
        "counts": jax.random.randint(keys[1], lhe, 0, 10, jnp.int32),
        "frequent": jax.random.bernoulli(keys[2], 0.3, lhe)}
    self.params = jax.jit(functools.partial(self.model.init, mode="train"))(
        keys[3], self.images[:1], state)["params"]
    # Task 1 (the second task): the prototype loss takes part.
    per_task = config.num_classes // config.num_tasks
    task = 1 if config.num_tasks > 1 else 0
    self.class_range = jnp.array([task * per_task, (task + 1) * per_task],
                                 jnp.int32)
    self.batch = {
        "image": self.images,
        "label": jax.random.randint(keys[4], (batch,), task * per_task,
                                    (task + 1) * per_task, jnp.int32),
        "mask": jnp.ones((batch,), jnp.float32)}
    self.use_prototype = task > 0

  def apply(self, params, images, mode):
    return self.model.apply({"params": params}, images, self.expert_state,
                            mode=mode)

  def inference(self, mode: str) -> Row:
    def fn(params, images):
      return self.apply(params, images, mode)["logits"]
    return Row(fn, (self.params, self.images))

  def l2p_two_pass(self) -> Row:
    """Frozen query pass, L2P key matching, then the prompted pass.

    The pool keys are matched by cosine similarity as in L2P; the selected
    indices are returned so the query pass cannot be compiled away. The
    prompted pass is our own sparse prefix pass, so the row isolates the
    cost of the extra forward.
    """
    config = self.config
    pool = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                             (config.num_experts, self.model.hidden_size))

    def fn(params, images, pool):
      query = self.apply(params, images, "plain")["pre_logits"]
      query = query / jnp.linalg.norm(query, axis=-1, keepdims=True)
      keys = pool / jnp.linalg.norm(pool, axis=-1, keepdims=True)
      _, picked = jax.lax.top_k(query @ keys.T, config.top_k)
      return self.apply(params, images, "eval")["logits"], picked

    return Row(fn, (self.params, self.images, pool))

  def train(self) -> Row:
    """The real `train_step` with the task optimizer, state donated."""
    config = self.config
    tx = schedules.adam(config.weight_decay)
    weights = steps_lib.LossWeights(
        router=config.router_weight, prototype=config.prototype_weight,
        epsilon=config.epsilon, top_k=config.top_k)
    fn = functools.partial(steps_lib.train_step, model=self.model, tx=tx,
                           mode="train", weights=weights,
                           use_prototype=self.use_prototype)
    trainable, frozen = steps_lib.split_params(self.params)
    # Fresh copies: the step donates (consumes) its trainable state.
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    inputs = steps_lib.TaskInputs(
        class_range=self.class_range,
        rates={"prompts": jnp.float32(config.lr * config.prompt_lr_multiplier),
               "head": jnp.float32(config.lr)},
        expert_state=self.expert_state,
        old_keys=trainable["prompts"]["keys"] + 0.0)
    args = (trainable, tx.init(trainable), frozen, self.batch, inputs)
    return Row(fn, args, donate=(0, 1),
               carry=lambda args, out: out[:2] + args[2:])

  def rows(self) -> dict[str, Row]:
    """Lighter rows first, so the running peak memory grows row by row."""
    return {"plain_vit": self.inference("plain"),
            "smope_inference": self.inference("eval"),
            "dense_prompts": self.inference("dense"),
            "l2p_two_pass": self.l2p_two_pass(),
            "smope_train": self.train()}
