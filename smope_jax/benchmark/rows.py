"""The functions the benchmark compares, all built from our own modules.

Every method runs the configured ViT on the same random images with random
weights: the benchmark measures cost, not accuracy, so the backbone is never
loaded (`config.pretrained` is ignored). Each method gets its own settings
(prompt sizes, prompted blocks) from its protocol (`configuration.use_method`)
and the reference method's model gives the plain-ViT and dense rows.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import configuration
from smope_jax import train_step as steps_lib
from smope_jax import factory
from smope_jax.benchmark import cost
from smope_jax.methods import base, registry

PLAIN_VIT = "plain ViT forward (mode 'plain', no prompts)"
DENSE = "SMoPE's warm-up forward: prefix attention over all E experts"


def describe(method: str, kind: str) -> str:
  """What a method's inference or generic train step row measures."""
  spec = registry.get(method)
  query = "frozen query pass, then " if spec.query_pass else ""
  if kind == "inference":
    return (f"{spec.display_name} inference: {query}the prompted forward "
            "(test routing)")
  return (f"{spec.display_name} train step: {query}the prompted forward and "
          "backward, gradients for prompts and head only, its losses, the "
          "optimizer update")


@dataclasses.dataclass
class Row:
  """A function, its arguments, how a call feeds the next one, and what
  it measures."""
  fn: Callable[..., Any]
  args: tuple
  description: str
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

  def inference(self, mode: str, description: str) -> Row:
    context = self.method.context(self.state, np.int32(self.task))

    def fn(params, images):
      return self.model.apply({"params": params}, images, context,
                              mode=mode)["logits"]

    return Row(fn, (self.params, self.images), description)

  def forward(self, step: base.TimedStep) -> Row:
    """One of the method's own forwards on the images."""
    fn = functools.partial(step.fn, model=self.model, method=self.method)
    return Row(fn, (self.params, self.images), step.description)

  def train(self, step: Optional[base.TimedStep] = None) -> Row:
    """A train step (the method's own `step`, or the real `train_step`)
    with the method's optimizer, its state donated."""
    fn, tx, rates = cost.train_step_of(self.config, self.model, self.method,
                                       step)
    trainable, frozen = steps_lib.split_params(self.params)
    # Fresh copies: the step donates (consumes) its trainable state.
    trainable = jax.tree_util.tree_map(jnp.array, trainable)
    inputs = steps_lib.TaskInputs(class_range=self.class_range,
                                  task=np.int32(self.task), rates=rates,
                                  method_state=self.state)
    args = (trainable, tx.init(trainable), frozen, self.batch, inputs)
    description = (step.description if step else describe(
        self.config.method, "train"))
    return Row(fn, args, description, donate=(0, 1),
               carry=lambda args, out: out[:2] + args[2:])

  def own_rows(self, kind: str) -> dict[str, Row]:
    """The method's own steps of `kind`, by row name; a train step named
    "train" takes the place of the generic one."""
    build = self.forward if kind == "forward" else self.train
    name = self.config.method
    rows = {
        f"{name}_{suffix}": build(step)
        for suffix, step in self.method.timed_steps().items()
        if step.kind == kind
    }
    if kind == "train" and f"{name}_train" not in rows:
      rows = {f"{name}_train": self.train(), **rows}
    return rows


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
    ref = registry.REFERENCE
    reference = self.methods[ref]
    rows = {
        "plain_vit":
            reference.inference("plain", PLAIN_VIT),
        f"{ref}_inference":
            reference.inference("eval", describe(ref, "inference")),
        "dense_prompts":
            reference.inference("dense", DENSE)
    }
    for name, setup in self.methods.items():
      if name != ref:
        rows[f"{name}_inference"] = setup.inference("eval",
                                                    describe(name, "inference"))
      rows.update(setup.own_rows("forward"))
    for setup in self.methods.values():
      rows.update(setup.own_rows("train"))
    return rows

  def parameter_counts(self) -> dict:
    return {
        name: steps_lib.parameter_counts(s.params)
        for name, s in self.methods.items()
    }
