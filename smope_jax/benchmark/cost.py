"""What a configured method costs per image, without running it.

Learnable parameters from the parameter shapes, and FLOPs from XLA's cost
analysis of the lowered train step and inference (no compilation, no
weights: a few seconds even for ViT-B/16), per image of a batch of 4 (L2P's
key loss splits its batch into 4 groups). The benchmark measures the
compiled functions instead; the two agree to within 0.1 %.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from smope_jax import schedules
from smope_jax import train_step as steps_lib
from smope_jax import factory

BATCH = 4


def _flops(lowered) -> float:
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


def train_step_of(config, model, method, step=None):
  """(fn, tx, rates) of a train step: `step` (one of the method's own
  `timed_steps`), else the generic `train_step`, bound to the model, the
  method and its optimizer; rates per trainable group."""
  tx = method.optimizer() or schedules.adam(
      config.weight_decay, decoupled=config.optimizer == "adamw")
  if step is None:
    fn = functools.partial(steps_lib.train_step, mode="train")
    rates = {
        "prompts": config.lr * config.prompt_lr_multiplier,
        "head": config.lr
    }
  else:
    fn, rates = step.fn, {group: config.lr for group in step.groups}
  return (functools.partial(fn, model=model, method=method, tx=tx), tx, {
      group: np.float32(rate) for group, rate in rates.items()
  })


def static_cost(config, num_tasks: int) -> dict:
  """{'params': counts, 'train_gflops_per_image', 'inference_gflops_per_image'}.

  The train step is that of the second task (SMoPE's prototype loss, CODA's
  frozen rows), with the method's losses and optimizer update; a method
  with a train step of its own (`Method.timed_steps`) is costed by it.
  """
  model, method = factory.build_model(config, num_tasks)
  size = config.image_size
  images = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
  context = method.init_context()
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(
      0), jnp.zeros((1,) + images.shape[1:]), context, mode="train"))["params"]
  inference = jax.jit(lambda p, x: model.apply({"params": p}, x, context, mode=
                                               "eval")["logits"])
  trainable, frozen = steps_lib.split_params(params)
  train, tx, rates = train_step_of(config, model, method,
                                   method.timed_steps().get("train"))
  task = min(1, num_tasks - 1)
  inputs = steps_lib.TaskInputs(
      class_range=np.array([0, config.num_classes],
                           np.int32), task=np.int32(task), rates=rates,
      method_state=jax.eval_shape(method.init_state, trainable))
  batch = {
      "image": images,
      "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32),
      "mask": jax.ShapeDtypeStruct((BATCH,), jnp.float32)
  }
  train = jax.jit(train)
  return {
      "params":
          steps_lib.parameter_counts(params),
      "train_gflops_per_image":
          _flops(
              train.lower(trainable, jax.eval_shape(tx.init, trainable), frozen,
                          batch, inputs)) / BATCH / 1e9,
      "inference_gflops_per_image":
          _flops(inference.lower(params, images)) / BATCH / 1e9,
  }
