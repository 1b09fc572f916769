"""The functions the benchmark compares, all built from our own modules.

Every method runs the configured ViT on the same random images with random
weights: the benchmark measures cost, not accuracy, so the backbone is never
loaded (`config.pretrained` is ignored). Each method gets its own settings
(prompt sizes, prompted blocks) from its protocol (`configuration.use_method`)
and the reference method's model gives the plain-ViT and dense rows.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import configuration, schedules
from smope_jax import train_step as steps_lib
from smope_jax import factory
from smope_jax.methods import registry


def describe(row: str) -> str:
  """What a row measures."""
  if row == "plain_vit":
    return "plain ViT forward (mode 'plain', no prompts)"
  if row == "dense_prompts":
    return "SMoPE's warm-up forward: prefix attention over all E experts"
  method, _, kind = row.rpartition("_")
  spec = registry.get(method)
  name = spec.display_name
  query = "frozen query pass, then " if spec.query_pass else ""
  if kind == "inference":
    return f"{name} inference: {query}the prompted forward (test routing)"
  return (f"{name} train step: {query}the prompted forward and backward, "
          "gradients for prompts and head only, its losses, the optimizer "
          "update")


@dataclasses.dataclass
class Row:
  """A function, its arguments, and how a call feeds the next one."""
  fn: Callable[..., Any]
  args: tuple
  donate: tuple = ()
  carry: Any = None


class MethodSetup:
  """One method's model, random weights and mid-run state on shared images."""

  def __init__(self, config, images, labels, task: int):
    self.config = config
    self.model, self.method = factory.build_model(config, config.num_tasks)
    self.params = factory.init_params(config, self.model, self.method)
    self.images, self.task = images, task
    trainable, _ = steps_lib.split_params(self.params)
    self.state = dict(self.method.init_state(trainable))
    if "counts" in self.state:  # SMoPE mid-run: some marked, some unused.
      rng = np.random.default_rng(config.seed)
      shape = self.state["counts"].shape
      self.state["counts"] = rng.integers(0, 10, shape).astype(np.int32)
      self.state["frequent"] = rng.uniform(size=shape) < 0.3
    per_task = config.num_classes // config.num_tasks
    self.class_range = np.array([task * per_task, (task + 1) * per_task],
                                np.int32)
    self.batch = {
        "image": images,
        "label": jnp.asarray(labels % per_task + task * per_task, jnp.int32),
        "mask": jnp.ones((images.shape[0],), jnp.float32)
    }

  def inference(self, mode: str = "eval") -> Row:
    context = self.method.context(self.state, np.int32(self.task))

    def fn(params, images):
      return self.model.apply({"params": params}, images, context,
                              mode=mode)["logits"]

    return Row(fn, (self.params, self.images))

  def train(self) -> Row:
    """The real `train_step` with the method's optimizer, state donated."""
    config = self.config
    tx = schedules.adam(config.weight_decay,
                        decoupled=config.optimizer == "adamw")
    fn = functools.partial(steps_lib.train_step, model=self.model,
                           method=self.method, tx=tx, mode="train")
    trainable, frozen = steps_lib.split_params(self.params)
    # Fresh copies: the step donates (consumes) its trainable state.
    trainable = jax.tree_util.tree_map(jnp.array, trainable)
    inputs = steps_lib.TaskInputs(
        class_range=self.class_range, task=np.int32(self.task), rates={
            "prompts": np.float32(config.lr * config.prompt_lr_multiplier),
            "head": np.float32(config.lr)
        }, method_state=self.state)
    args = (trainable, tx.init(trainable), frozen, self.batch, inputs)
    return Row(fn, args, donate=(0, 1),
               carry=lambda args, out: out[:2] + args[2:])


class Setup:
  """Every method on the same images.

  The config is the reference method's (a benchmark config without
  `method=`); every other method takes its own settings from
  `configuration.use_method`, with the benchmark's batch.
  """

  def __init__(self, config, batch: int, methods=None):
    key_images, key_labels = jax.random.split(jax.random.PRNGKey(config.seed))
    size = config.image_size
    images = jax.random.uniform(key_images, (batch, size, size, 3))
    labels = np.asarray(jax.random.randint(key_labels, (batch,), 0, 1 << 16))
    # The second task: SMoPE's prototype loss and CODA's frozen rows act.
    task = 1 if config.num_tasks > 1 else 0
    base = config.copy_and_resolve_references()
    base.pretrained = ""
    self.methods = {}
    for name in registry.names():
      if methods is not None and name not in (registry.REFERENCE, *methods):
        continue
      method_config = configuration.use_method(
          base.copy_and_resolve_references(), name, epochs=base.epochs,
          batch_size=base.batch_size)
      method_config.batch_size = batch
      configuration.validate(method_config)
      self.methods[name] = MethodSetup(method_config, images, labels, task)
    self.model = self.methods[registry.REFERENCE].model

  def rows(self) -> dict[str, Row]:
    """Lighter rows first, so the running peak memory grows row by row."""
    reference = self.methods[registry.REFERENCE]
    rows = {
        "plain_vit": reference.inference("plain"),
        f"{registry.REFERENCE}_inference": reference.inference(),
        "dense_prompts": reference.inference("dense")
    }
    for name in self.methods:
      if name == registry.REFERENCE:
        continue
      rows[f"{name}_inference"] = self.methods[name].inference()
    for name in self.methods:
      rows[f"{name}_train"] = self.methods[name].train()
    return rows

  def parameter_counts(self) -> dict:
    return {
        name: steps_lib.parameter_counts(s.params)
        for name, s in self.methods.items()
    }
